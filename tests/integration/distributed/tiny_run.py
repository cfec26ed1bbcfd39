"""The model, data and settings shared by the data-parallel runtime test and its one-process reference."""
from __future__ import annotations

import torch

GLOBAL_BATCH = 4      # sequences per micro-batch step, split evenly over the ranks
# ZeRO 2 with 2 micro-batches per step and two-pass clipping: "accum" refreshes from the first micro-batch's
# gradient, "accum_rr" (the default refresh_sketch) adds the Rayleigh-Ritz step over the whole step's sketch.
# "accum" keeps the moments across a refresh: one process and two ranks reach its projectors through differently
# ordered sums, and 'reset' (the default) restarts Adam at every refresh (every 2 steps here), whose sign-like first
# steps (|N| = 1 whatever |g|) enlarge those rounding differences past the tolerance (grad norm 1.3e-3 apart at step
# 5). The default transfer is checked under data parallelism by ZeRO 0-3 and "accum_rr".
SCENARIOS = {"accum": {"grad_accum_steps": 2, "clip_mode": "two_pass", "refresh_sketch": "first_micro_batch",
                       "moment_transfer": "keep"},
             "accum_rr": {"grad_accum_steps": 2, "clip_mode": "two_pass", "refresh_sketch": "rayleigh_ritz"},
             "bytes": {"refresh_interval_steps": 1000, "residual_warmup_steps": 1000},
             "nan_loss": {}}   # rank 1's loss is NaN at step 2 (ZeRO 2)
# ZeRO 3 with INT8 embedding and head (every weight partitioned), without and with gradient checkpointing of the
# decoder layers: the same arithmetic, so the same bits; gathers per micro-batch counted.
ZERO3_SCENARIOS = {"zero3_tables": {"exclude_modules": ()},
                   "zero3_ckpt": {"exclude_modules": (), "gradient_checkpointing": True}}
SEQ_LEN = 16
STEPS = 6
VOCAB = 96
LR = 2e-3


def make_model():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.train()
    return model


def lowmem_config():
    """The lowmem preset small enough to exercise every part within STEPS steps: projected weights (rank 8 of
    64-96), cross-head q/k, refreshes every 2 steps, residual indices chosen after 2 steps, INT8 + SR weights,
    8-bit moments, embeddings and lm_head on full-rank AdamW."""
    from lowmem.presets import preset
    return preset("lowmem", rank=8, refresh_interval_steps=2, residual_warmup_steps=2, residual_ratio=0.05,
                  lr=LR, warmup_steps=0, lr_schedule="constant", float_optim_min_numel=1, seed=3)


def batch_for_step(step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ_LEN), generator=generator)


def weights_of(model) -> dict[str, torch.Tensor]:
    """Every weight as fp32 (INT8 linears dequantised), contiguous and unaliased (for safetensors)."""
    from lowmem.model.int8_linear import Int8Linear
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, Int8Linear):
            out[f"{name}.weight"] = module.dequantized_weight(torch.float32).contiguous()
            out[f"{name}.weight_q"] = module.weight_q.clone()
    for name, param in model.named_parameters():
        out[name] = param.detach().float().clone().contiguous()
    return out


def reference_run(accum: int = 1, **changes):
    """One process, the whole global batch per micro-batch: losses, grad norms, weights, state bytes.
    accum > 1: micro-batch k of step s is batch_for_step(s * accum + k); `changes` go into the lowmem config."""
    from hooks.runtime import prepare
    model = make_model()
    runtime = prepare(model, lowmem_config().replace(grad_accum_steps=accum, **changes))
    losses, norms = [], []
    for step in range(STEPS):
        for k in range(accum):
            ids = batch_for_step(step * accum + k)
            with runtime.micro_batch():
                runtime.backward(model(input_ids=ids, labels=ids).loss / accum)
        stats = runtime.step()
        losses.append(stats["loss"])
        norms.append(stats["grad_norm"])
    state_bytes = sum(t.numel() * t.element_size() for st in runtime.states.values() for t in st.values())
    weight_bytes = sum(item.module.weight_q.numel() + 4 * item.module.weight_scales.numel()
                       for item in runtime.trainables if item.kind == "lowrank_int8")
    return {"losses": losses, "grad_norms": norms, "weights": weights_of(model), "state_bytes": state_bytes,
            "weight_bytes": weight_bytes, "runtime": runtime}
