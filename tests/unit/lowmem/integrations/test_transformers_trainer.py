"""LowMemTrainer: a transformers.Trainer whose optimizer is the lowmem runtime.

The reference for every Trainer run is the same run written by hand against `hooks.runtime.prepare` (micro-batches
in the same order, the LowMemConfig built field by field from the TrainingArguments, not by `runtime_config`)."""
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments

from hooks.runtime import prepare
from lowmem.config import ConfigError, LowMemConfig
from lowmem.integrations.transformers import LowMemTrainer, check_trainer_args, runtime_config
from lowmem.schedule import lr_at

VOCAB = 96
BATCH = 4
ACCUM = 2
STEPS = 6
LR = 3e-3
CLIP = 0.05   # small enough that every step clips (the grad norms of this model are ~1)
BASE = dict(rank=8, refresh_interval_steps=2, max_refresh_interval_steps=8, residual_warmup_steps=2,
            weight_block_size=32)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).float()


def rows(n=BATCH * ACCUM * 3, seq=16, seed=5):
    """n examples with a learnable pattern (next token = token + 1 mod VOCAB)."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=gen)
    ids = (start + torch.arange(seq)) % VOCAB
    return [{"input_ids": ids[i], "labels": ids[i].clone()} for i in range(n)]


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM,
                max_steps=STEPS, learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=2, max_grad_norm=CLIP,
                logging_steps=1, save_strategy="steps", save_steps=2, train_sampling_strategy="sequential",
                report_to=[], use_cpu=True, seed=0, dataloader_drop_last=True, disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base)


def by_hand_config(clip_mode):
    # What the TrainingArguments above mean, written out: HF cosine decays to 0 over max_steps.
    return LowMemConfig(**BASE, clip_mode=clip_mode, lr=LR, lr_schedule="cosine", min_lr_ratio=0.0, warmup_steps=2,
                        total_steps=STEPS, grad_accum_steps=ACCUM, grad_clip=CLIP, seed=0)


def reference_run(clip_mode, data):
    model = tiny_llama()
    runtime = prepare(model, by_hand_config(clip_mode))
    batches = [data[i:i + BATCH] for i in range(0, len(data), BATCH)]
    stats = []
    for step in range(STEPS):
        for micro in range(ACCUM):
            group = batches[(step * ACCUM + micro) % len(batches)]
            batch = {k: torch.stack([r[k] for r in group]) for k in group[0]}
            with runtime.micro_batch():
                runtime.backward(model(**batch).loss / ACCUM)
        stats.append(runtime.step())
    return model, runtime, stats


class NoGradHeld(TrainerCallback):
    """After every backward (between micro-batches and before the optimizer step) no parameter holds .grad."""

    def __init__(self):
        self.checked = 0

    def _check(self, model):
        held = [n for n, p in model.named_parameters() if p.grad is not None]
        assert not held, held
        self.checked += 1

    def on_substep_end(self, args, state, control, model=None, **kw):
        self._check(model)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self._check(model)


def identical(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bit for bit (NaN entries, e.g. an empty similarity history, count as equal to NaN)."""
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    if x.is_floating_point():
        return torch.equal(torch.isnan(x), torch.isnan(y)) and torch.equal(x.nan_to_num(0.0), y.nan_to_num(0.0))
    return torch.equal(x, y)


def same_state(a: dict, b: dict) -> list[str]:
    """Names whose tensors differ."""
    assert a.keys() == b.keys()
    return [k for k in a if not identical(a[k], b[k])]


@pytest.mark.parametrize("clip_mode", ["per_tensor", "two_pass"])
def test_trainer_matches_prepare_logs_and_resumes_exactly(tmp_path, clip_mode):
    data = rows()
    ref_model, ref_runtime, ref_stats = reference_run(clip_mode, data)

    model = tiny_llama()
    watch = NoGradHeld()
    trainer = LowMemTrainer(model=model, args=args(tmp_path / "a"), train_dataset=data, callbacks=[watch],
                            lowmem_config=LowMemConfig(**BASE, clip_mode=clip_mode))
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    assert watch.checked == STEPS * ACCUM
    final = trainer.model.state_dict()
    moved = same_state(start, final)
    # INT8 linears moved, and so did the untied input embedding (an INT8 low-rank weight by default, float if excluded)
    assert any(k.endswith("weight_q") for k in moved) and any(k.startswith("model.embed_tokens.") for k in moved)

    # Identical to the hand-written prepare() run: weights and optimizer state bit for bit.
    assert same_state(ref_model.state_dict(), final) == []
    ref_opt, opt = ref_runtime.state_dict()["state"], trainer.runtime.state_dict()["state"]
    assert all(same_state(ref_opt[i], opt[i]) == [] for i in ref_opt)

    # The Trainer's log: loss, grad_norm and learning_rate per step, from the runtime's statistics.
    logs = [r for r in trainer.state.log_history if "grad_norm" in r]
    assert [r["step"] for r in logs] == list(range(1, STEPS + 1))
    for rec, st in zip(logs, ref_stats):
        assert rec["grad_norm"] == pytest.approx(st["grad_norm"], rel=1e-6) and rec["grad_norm"] > CLIP
        assert rec["learning_rate"] == pytest.approx(lr_at(st["step"], by_hand_config(clip_mode)), rel=1e-12)
        # Trainer logs the micro-batches' mean loss; the runtime the mean of loss / ACCUM.
        assert rec["loss"] == pytest.approx(st["loss"] * ACCUM, rel=1e-5)
    assert logs[-1]["loss"] < logs[0]["loss"]

    # Resume from the step-2 checkpoint (inside the first epoch of 3 steps: the Trainer skips the batches already
    # seen) with a differently initialised model: the continuation is bit-identical.
    ckpt = tmp_path / "a" / "checkpoint-2"
    assert (ckpt / "lowmem").is_dir() and (ckpt / "trainer_state.json").is_file()
    resumed = LowMemTrainer(model=tiny_llama(seed=1), args=args(tmp_path / "b"), train_dataset=data,
                            lowmem_config=LowMemConfig(**BASE, clip_mode=clip_mode))
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.runtime.global_step == STEPS
    assert same_state(final, resumed.model.state_dict()) == []
    again = resumed.runtime.state_dict()["state"]
    assert all(same_state(opt[i], again[i]) == [] for i in opt)
    resumed_logs = [r for r in resumed.state.log_history if "grad_norm" in r]
    assert [r["grad_norm"] for r in resumed_logs[-4:]] == [r["grad_norm"] for r in logs[-4:]]
    assert resumed_logs[-1]["peak_memory_gib"] > 0 and "refreshed_layers" in resumed_logs[-1]


def test_runtime_config_maps_the_training_arguments(tmp_path):
    cfg = runtime_config(args(tmp_path, lr_scheduler_type="linear", warmup_steps=0.5, max_grad_norm=0.0, seed=7),
                         LowMemConfig(rank=8))
    assert (cfg.lr, cfg.lr_schedule, cfg.min_lr_ratio, cfg.warmup_steps, cfg.total_steps) == (LR, "linear", 0.0, 3,
                                                                                               STEPS)
    assert (cfg.grad_accum_steps, cfg.grad_clip, cfg.seed, cfg.rank) == (ACCUM, None, 7, 8)
    cfg = runtime_config(args(tmp_path, lr_scheduler_type="cosine_with_min_lr",
                              lr_scheduler_kwargs={"min_lr_rate": 0.25}))
    assert (cfg.lr_schedule, cfg.min_lr_ratio) == ("cosine", 0.25)
    assert runtime_config(args(tmp_path, lr_scheduler_type="constant_with_warmup")).lr_schedule == "constant"
    with pytest.raises(ConfigError, match="lr_scheduler_type='polynomial' has no lowmem equivalent"):
        runtime_config(args(tmp_path, lr_scheduler_type="polynomial"))
    with pytest.raises(ConfigError, match=r"lowmem_config.lr=0.1 conflicts .*TrainingArguments.learning_rate"):
        runtime_config(args(tmp_path), LowMemConfig(lr=0.1))
    with pytest.raises(ConfigError, match="set max_grad_norm=0"):
        runtime_config(args(tmp_path), LowMemConfig(clip_mode="none"))


def test_refuses_what_cannot_work(tmp_path):
    data = rows()
    with pytest.raises(ValueError, match="do not pass optimizers="):
        LowMemTrainer(model=tiny_llama(), args=args(tmp_path), train_dataset=data,
                      optimizers=(torch.optim.SGD(tiny_llama().parameters(), lr=0.1), None))
    with pytest.raises(ValueError, match="optim='galore_adamw_layerwise': lowmem is the optimizer"):
        LowMemTrainer(model=tiny_llama(), args=args(tmp_path, optim="galore_adamw_layerwise",
                                                    optim_target_modules=["mlp"]), train_dataset=data)
    with pytest.raises(ValueError, match="torch_compile=True"):
        LowMemTrainer(model=tiny_llama(), args=args(tmp_path, torch_compile=True), train_dataset=data)
    ds = {"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    with pytest.raises(ValueError) as err:
        LowMemTrainer(model=tiny_llama(), args=args(tmp_path, deepspeed=ds), train_dataset=data)
    assert "optimizer: " in str(err.value) and "zero_optimization.offload_optimizer" in str(err.value)
    with pytest.raises(ValueError, match="DeepSpeed engine wraps its own optimizer"):   # no refused key: still no
        LowMemTrainer(model=tiny_llama(), args=args(tmp_path, deepspeed={"zero_optimization": {"stage": 1}}),
                      train_dataset=data)
    with pytest.raises(ValueError, match="fp16=True: lowmem has no loss scaling"):
        check_trainer_args(SimpleNamespace(deepspeed=None, optim=args(tmp_path).optim, torch_compile=False,
                                           fp16=True, fsdp=None, load_best_model_at_end=False, world_size=1, n_gpu=1))
    # Parameters swapped after prepare would leave the runtime training a stale copy (here: the float head replaced by
    # a new Parameter, as resizing it would; the input embedding is an INT8 weight by default and has no `.weight`).
    trainer = LowMemTrainer(model=tiny_llama(), args=args(tmp_path), train_dataset=data)
    trainer.model.lm_head.weight = torch.nn.Parameter(trainer.model.lm_head.weight.detach().clone())
    with pytest.raises(RuntimeError, match="(lm_head|embed_tokens).weight.* replaced after lowmem prepared"):
        trainer.train()
    # An epoch of 5 batches cannot be split into steps of 2 micro-batches.
    trainer = LowMemTrainer(model=tiny_llama(), args=args(tmp_path, max_steps=4), train_dataset=rows(n=20))
    with pytest.raises(ValueError, match="not a multiple of gradient_accumulation_steps=2"):
        trainer.train()


def test_save_model_writes_a_loadable_bf16_model(tmp_path):
    trainer = LowMemTrainer(model=tiny_llama(), args=args(tmp_path, max_steps=2, save_strategy="no"),
                            train_dataset=rows())
    trainer.train()
    trainer.save_model()
    from transformers import AutoModelForCausalLM
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    ids = torch.arange(8).unsqueeze(0)
    with torch.no_grad():
        theirs = loaded.float()(ids).logits
        ours = trainer.model(ids).logits
    assert torch.isfinite(theirs).all() and math.isclose(float((theirs - ours).abs().max()), 0.0, abs_tol=0.1)
    from huggingface_hub import ModelCard
    card = ModelCard.load(tmp_path / "model" / "README.md")
    assert card.data.to_dict()["library_name"] == "transformers" and "| optimizer steps | 2 |" in card.text


def test_a_model_from_load_pretrained_is_used_in_place_and_trains_like_prepare(tmp_path):
    """lowmem.load_pretrained's model is INT8 on its device already: the Trainer neither copies nor moves it (the
    codes keep their storage) and the run equals the by-hand run on a model prepared from the same weights."""
    from lowmem import load_pretrained

    folder = tmp_path / "base"
    tiny_llama().save_pretrained(folder)
    model, loaded_runtime = load_pretrained(folder, LowMemConfig(**BASE), device="cpu", dtype=torch.float32)
    codes = model.model.layers[0].self_attn.q_proj.weight_q
    pointer = codes.data_ptr()
    trainer = LowMemTrainer(model=model, args=args(tmp_path / "run", save_strategy="no"), train_dataset=rows(),
                            lowmem_config=LowMemConfig(**BASE, clip_mode="two_pass"))
    assert trainer.model is model and trainer.runtime is not loaded_runtime
    assert model.model.layers[0].self_attn.q_proj.weight_q.data_ptr() == pointer   # not copied by the Trainer
    trainer.train()
    reference, _, _ = reference_run("two_pass", rows())
    assert same_state(reference.state_dict(), model.state_dict()) == []


def test_a_float_model_is_int8_before_the_trainer_places_it(tmp_path, monkeypatch):
    """A float model given to the Trainer is converted where it lies; what transformers.Trainer moves is INT8
    (every linear but the float head)."""
    import transformers

    moved = []
    real = transformers.Trainer._move_model_to_device

    def spy(self, model, device):
        moved.append(sorted(name for name, m in model.named_modules() if type(m) is torch.nn.Linear))
        return real(self, model, device)

    monkeypatch.setattr(transformers.Trainer, "_move_model_to_device", spy)
    LowMemTrainer(model=tiny_llama(), args=args(tmp_path, save_strategy="no"), train_dataset=rows(),
                  lowmem_config=LowMemConfig(**BASE))
    assert moved == [["lm_head"]]   # only the head, float by default (LowMemConfig.exclude_modules), stays float
