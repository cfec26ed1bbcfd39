"""The decoder types lowmem is tested on, as tiny random configs (hidden 64, 2 layers, vocabulary 128): what the
coverage test (test_architectures.py) trains and exports, and what README.md's table of supported architectures
lists. `python -m tests.unit.lowmem.model.architecture_matrix` prints that table; test_architectures checks README.md
holds it.

Each entry: model_type -> config keyword arguments on top of COMMON (layer-count and size keys every config takes;
types that do not know grouped-query attention leave `num_key_value_heads` out, since a config keeps unknown keys as
attributes). Every type trains, exports and reloads in about a second on a 2-core box, so none is marked slow.
"""
from __future__ import annotations

import torch

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
GQA = dict(num_key_value_heads=2)
MOE_SIZES = dict(num_experts_per_tok=2, moe_intermediate_size=32)

MATRIX: dict[str, dict] = {
    "llama": GQA,
    "mistral": GQA,
    "qwen2": GQA,
    "qwen3": {**GQA, "head_dim": 16},
    "gpt2": {},
    "gemma": {**GQA, "head_dim": 16},
    "gemma2": {**GQA, "head_dim": 16, "query_pre_attn_scalar": 16},
    "gemma3_text": {**GQA, "head_dim": 16, "query_pre_attn_scalar": 16},
    "phi3": GQA,
    "phi": GQA,
    "mixtral": {**GQA, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {**GQA, **MOE_SIZES, "num_experts": 4, "shared_expert_intermediate_size": 64},
    "qwen3_moe": {**GQA, **MOE_SIZES, "num_experts": 4, "head_dim": 16},
    "olmo2": GQA,
    "granite": {**GQA, "logits_scaling": 4.0},
    "starcoder2": GQA,
    "gpt_neox": {},
    "falcon": {},
    "cohere": GQA,
    "stablelm": GQA,
    "smollm3": GQA,
    "glm4": {**GQA, "head_dim": 16},
    "bloom": {},
    "gpt_bigcode": {},
    "deepseek_v3": {**GQA, **MOE_SIZES, "n_routed_experts": 4, "n_shared_experts": 1, "q_lora_rank": 32,
                    "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 16,
                    "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1},
}


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**COMMON, **MATRIX[model_type], **overrides})


def tiny_model(model_type: str, seed: int = 0, **overrides):
    """A freshly initialised fp32 *ForCausalLM of `model_type`, seeded, in train mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides)).float()

# Expected by the coverage test (and shown in the README table, which is computed from the models themselves).
NO_CROSS_HEAD = {"deepseek_v3": "multi-head latent attention: no q/k projection"}
FUSED_LOSS_REFUSED = {"gemma2": "final_logit_softcapping", "phi": "head with a bias"}
MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"}

_HEADER = ("| model_type | class | trained | exported | fused projections (split to train) | cross-head q/k | "
           "fused loss | MoE experts |\n| --- | --- | --- | --- | --- | --- | --- | --- |")


def _row(model_type: str) -> str:
    import warnings

    from lowmem.model.adapters import find_adapter
    from lowmem.model.fused_loss import logit_factor
    from lowmem.model.fused_split import SplitLinear

    model = tiny_model(model_type)
    adapter = find_adapter(model)
    adapter.split_fused(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        specs = adapter.linear_specs(model)
    fused = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                    if isinstance(module, SplitLinear)})
    if any(spec.num_heads for spec in specs):
        cross = "yes"
    else:
        cross = f"no ({NO_CROSS_HEAD.get(model_type, 'no head layout found')})"
    try:
        factor = logit_factor(model)
        loss = "yes" if factor == 1.0 else "yes (logit scale folded in)"
    except ValueError:
        loss = f"refused ({FUSED_LOSS_REFUSED.get(model_type, 'see message')}): fused_loss=false"
    experts = "float (full-rank AdamW)" if model_type in MOE else "-"
    split = ", ".join(fused) or "-"
    return f"| {model_type} | {type(model).__name__} | yes | yes | {split} | {cross} | {loss} | {experts} |"


def readme_table() -> str:
    """The README's table of supported architectures, one row per MATRIX entry (computed from the tiny models)."""
    return "\n".join([_HEADER] + [_row(model_type) for model_type in MATRIX])


if __name__ == "__main__":
    print(readme_table())
