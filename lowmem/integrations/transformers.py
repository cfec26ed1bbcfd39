"""`LowMemTrainer`: the Hugging Face `transformers.Trainer` with lowmem as its optimizer (fused-backward runtime).

    from lowmem import LowMemConfig
    from lowmem.integrations.transformers import LowMemTrainer
    trainer = LowMemTrainer(model=model, args=TrainingArguments(..., gradient_accumulation_steps=4,
                            max_grad_norm=1.0, learning_rate=1e-5, lr_scheduler_type="cosine", warmup_steps=10),
                            train_dataset=ds, lowmem_config=LowMemConfig(rank=128))
    trainer.train()                                  # or trainer.train(resume_from_checkpoint=True)

TRL (or any Trainer subclass): `lowmem_trainer(trl.SFTTrainer)` is that class with lowmem underneath, built with the
subclass's own arguments plus `lowmem_config=`:

    LowMemSFTTrainer = lowmem_trainer(SFTTrainer)
    trainer = LowMemSFTTrainer(model=model, args=SFTConfig(...), train_dataset=chats, processing_class=tokenizer,
                               lowmem_config=LowMemConfig(rank=128))

What the Trainer's arguments become (`runtime_config`): the run-wide fields of the LowMemConfig come from the
TrainingArguments -- learning_rate -> lr, lr_scheduler_type (linear / cosine / cosine_with_min_lr / constant /
constant_with_warmup) -> lr_schedule + min_lr_ratio (Hugging Face decays to 0), warmup_steps / warmup_ratio ->
warmup_steps, the run's max_steps -> total_steps, gradient_accumulation_steps -> grad_accum_steps, max_grad_norm ->
grad_clip (0 -> None), seed -> seed. The schedule is the runtime's (lowmem.schedule.lr_at); the Trainer's scheduler is
a view of it. Its warm-up differs from Hugging Face's by one step: step s < warmup uses lr*(s+1)/warmup (never 0).
`max_grad_norm` clips with the LowMemConfig's clip_mode: 'per_tensor' (lowmem's default, fused) or 'two_pass' (the
exact global norm, as the Trainer would clip). Setting one of these fields in lowmem_config to something else than
its default and than the Trainer's value is refused (one place decides each value).

The step: each micro-batch's forward and backward run inside `runtime.micro_batch()`; the loss is each micro-batch's
mean loss divided by gradient_accumulation_steps (as `launch.finetune` does; the Trainer's `num_items_in_batch`
token weighting is not used); weights are written during the last micro-batch's backward, no `.grad` is kept, and
the Trainer's `optimizer.step()` is `runtime.step()`. Loss, grad_norm and learning_rate reach the Trainer's normal
logs (callbacks, report_to) from the runtime's step statistics, with peak_memory_gib and refreshed_layers (projector
refreshes in that step) beside them. An epoch whose batch count is not a multiple of
gradient_accumulation_steps is refused (the runtime takes exactly that many micro-batches per step).

Checkpoints (`save_steps`, `resume_from_checkpoint`): `checkpoint-N/lowmem/step-N/` holds the exact-resume state
through lowmem.checkpoint.store (INT8 weights and float parameters, Runtime.state_dict(), torch RNG, step; safetensors
with sha256 sidecar), next to the Trainer's own trainer_state.json and rng_state.pth. `save_model(dir)` writes a
bf16 Hugging Face model (lowmem.checkpoint.export) with a model card (README.md, lowmem.checkpoint.model_card);
`save_model()` without a directory writes `<output_dir>/model`.

Refused with a message saying what to do instead: an optimizer or scheduler passed to the Trainer
(`optimizers=`, `optimizer_cls_and_kwargs=`, a non-default `optim`, `optim_args`, `optim_target_modules`),
`model_init`, `torch_compile` (Dynamo traces through the backward hooks
that write the weights), fp16 (no loss scaling: use bf16), several processes or GPUs (use `launch.finetune` under
torchrun/deepspeed), FSDP, `load_best_model_at_end`, and DeepSpeed: the keys lowmem's CLI refuses
(lowmem.deepspeed_keys) are named one by one, and any other DeepSpeed config is refused too, because the Trainer's
DeepSpeed engine would wrap its own optimizer around the model.

Layering: lowmem may import hooks/ only lazily (this module is a facade like `lowmem.prepare`): `hooks.runtime` is
imported inside the functions that need it. Importing this module imports transformers; `lowmem.integrations`
itself does not.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import transformers
from torch import nn

from lowmem.config import ConfigError, LowMemConfig
from lowmem.deepspeed_keys import refused_keys

__all__ = ["LowMemTrainer", "LowMemTrainerMixin", "check_trainer_args", "lowmem_trainer", "runtime_config"]

CHECKPOINT_SUBDIR = "lowmem"   # checkpoint-N/lowmem/step-N: lowmem.checkpoint.store's layout
_DEFAULTS = LowMemConfig()
# LowMemConfig field -> the TrainingArguments name that sets it (for conflict messages)
_ARG_OF = {"lr": "learning_rate", "lr_schedule": "lr_scheduler_type", "min_lr_ratio": "lr_scheduler_type",
           "warmup_steps": "warmup_steps", "total_steps": "max_steps",
           "grad_accum_steps": "gradient_accumulation_steps", "grad_clip": "max_grad_norm", "seed": "seed"}


def _schedule(args) -> tuple[str, float]:
    """(lowmem lr_schedule, min_lr_ratio) for the Trainer's lr_scheduler_type."""
    kind = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    if kind in ("linear", "cosine"):
        return kind, 0.0   # Hugging Face decays to 0
    if kind in ("constant", "constant_with_warmup"):
        return "constant", _DEFAULTS.min_lr_ratio
    if kind == "cosine_with_min_lr":
        kwargs = dict(args.lr_scheduler_kwargs or {})
        if "min_lr_rate" in kwargs:
            return "cosine", float(kwargs["min_lr_rate"])
        if "min_lr" in kwargs and args.learning_rate > 0:
            return "cosine", float(kwargs["min_lr"]) / float(args.learning_rate)
        raise ConfigError("lr_scheduler_type='cosine_with_min_lr' needs lr_scheduler_kwargs={'min_lr_rate': ...} "
                          "or {'min_lr': ...}")
    raise ConfigError(f"lr_scheduler_type={kind!r} has no lowmem equivalent; use 'linear', 'cosine', "
                      "'cosine_with_min_lr', 'constant' or 'constant_with_warmup' (lowmem.schedule)")


def runtime_config(args, base: LowMemConfig | None = None, *, total_steps: int | None = None) -> LowMemConfig:
    """The LowMemConfig a LowMemTrainer runs: `base` with the run-wide fields taken from TrainingArguments `args`.

    total_steps: the run's optimizer steps (None: args.max_steps when > 0, else unknown: no decay yet). Raises
    ConfigError when `base` sets a run-wide field to a non-default value that differs from the Trainer's."""
    base = base if base is not None else LowMemConfig()
    if total_steps is None and args.max_steps > 0:
        total_steps = int(args.max_steps)
    schedule, min_ratio = _schedule(args)
    clip = float(args.max_grad_norm) if args.max_grad_norm and args.max_grad_norm > 0 else None
    if clip is not None and base.clip_mode == "none":
        raise ConfigError(f"lowmem_config.clip_mode='none' but max_grad_norm={args.max_grad_norm}: set "
                          "max_grad_norm=0 in TrainingArguments to train without clipping")
    mapped = {"lr": float(args.learning_rate), "lr_schedule": schedule, "min_lr_ratio": min_ratio,
              "warmup_steps": args.get_warmup_steps(total_steps) if total_steps else 0, "total_steps": total_steps,
              "grad_accum_steps": int(args.gradient_accumulation_steps), "grad_clip": clip, "seed": int(args.seed)}
    if mapped["lr_schedule"] == "constant":
        mapped["min_lr_ratio"] = base.min_lr_ratio   # unused by a constant schedule: keep what the user set
    for name, value in mapped.items():
        mine = getattr(base, name)
        if mine != getattr(_DEFAULTS, name) and mine != value:
            raise ConfigError(f"lowmem_config.{name}={mine!r} conflicts with the Trainer's arguments, which make it "
                              f"{value!r} (from TrainingArguments.{_ARG_OF[name]}); set it there and leave "
                              f"lowmem_config.{name} at its default")
    return base.replace(**mapped)


def _deepspeed_dict(args) -> dict | None:
    spec = getattr(args, "deepspeed", None)
    if not spec:
        return None
    if isinstance(spec, dict):
        return spec
    try:
        return json.loads(Path(spec).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"TrainingArguments.deepspeed={spec!r} cannot be read as a JSON file ({err})") from None


def _default_optim(kind: type) -> str | None:
    """The default `optim` of this arguments class (TrainingArguments or a subclass such as TRL's SFTConfig): the
    value a user did not choose."""
    import dataclasses
    if not dataclasses.is_dataclass(kind):
        kind = transformers.TrainingArguments
    for f in dataclasses.fields(kind):
        if f.name == "optim" and f.default is not dataclasses.MISSING:
            return str(getattr(f.default, "value", f.default))
    return None


def check_trainer_args(args) -> None:
    """Refuse TrainingArguments that cannot work with lowmem's fused-backward runtime (module docstring)."""
    ds = _deepspeed_dict(args)
    if ds is not None:
        refused = refused_keys(ds)
        detail = ("; ".join(refused) + ". Besides, ") if refused else ""
        detail = detail.replace(" in the YAML", " (launch.finetune's YAML; here: lowmem_config and the Trainer's "
                                "arguments)")
        raise ValueError(f"LowMemTrainer: TrainingArguments.deepspeed: {detail}the Trainer's DeepSpeed engine wraps "
                         "its own optimizer around the model, which lowmem replaces; for several GPUs run "
                         "`deepspeed --module launch.finetune ... deepspeed=ds.json` (lowmem's own data "
                         "parallelism over the same JSON), or drop deepspeed= for one process")
    problems = []
    default_optim = _default_optim(type(args))
    chosen = str(getattr(getattr(args, "optim", None), "value", getattr(args, "optim", None)))
    if default_optim is not None and chosen != default_optim:
        problems.append(f"optim={chosen!r}: lowmem is the optimizer (its settings go in lowmem_config=LowMemConfig("
                        "...)); leave TrainingArguments.optim at its default")
    if getattr(args, "optim_target_modules", None) or getattr(args, "optim_args", None):
        problems.append("optim_target_modules / optim_args: choose modules and settings with LowMemConfig "
                        "(target_modules, exclude_modules, rank, ...) instead")
    if getattr(args, "torch_compile", False):
        problems.append("torch_compile=True (with torch_compile_backend/mode): Dynamo would trace through the "
                        "backward hooks that write the weights; set torch_compile=False")
    if getattr(args, "fp16", False):
        problems.append("fp16=True: lowmem has no loss scaling; use bf16=True (or fp32)")
    if getattr(args, "fsdp", None):
        problems.append("fsdp: lowmem partitions its own state (launch.finetune with ZeRO stages); drop fsdp")
    if getattr(args, "load_best_model_at_end", False):
        problems.append("load_best_model_at_end=True: reload a checkpoint with resume_from_checkpoint instead")
    if args.world_size > 1 or getattr(args, "n_gpu", 1) > 1:
        problems.append(f"{max(args.world_size, args.n_gpu)} processes/GPUs: LowMemTrainer runs one process on one "
                        "device; for data parallelism use `torchrun -m launch.finetune ...`")
    if problems:
        raise ValueError("LowMemTrainer cannot run with " + "; ".join(problems))


class _RuntimeOptimizer(torch.optim.Optimizer):
    """What the Trainer calls its optimizer: step() is runtime.step(); zero_grad() has nothing to clear (lowmem
    keeps no .grad). `last_stats` is the runtime's statistics of the latest step (loss, lr, grad_norm, ...)."""

    def __init__(self, runtime):
        params = [p for p in runtime.model.parameters() if p.requires_grad] or [nn.Parameter(torch.zeros(0))]
        super().__init__(params, {"lr": runtime.config.lr})
        self.runtime = runtime
        self.last_stats: dict | None = None

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("lowmem updates during backward; a closure that recomputes the loss cannot be used")
        self.last_stats = self.runtime.step()
        for group in self.param_groups:
            group["lr"] = self.last_stats["lr"]
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None


class _RuntimeSchedule:
    """The Trainer's lr_scheduler: a read-only view of the runtime's schedule (lowmem.schedule.lr_at)."""

    def __init__(self, optimizer: _RuntimeOptimizer):
        self.optimizer = optimizer

    def get_last_lr(self) -> list[float]:
        from lowmem.schedule import lr_at
        stats = self.optimizer.last_stats
        runtime = self.optimizer.runtime
        return [stats["lr"] if stats is not None else lr_at(runtime.global_step, runtime.config)]

    def step(self, *args, **kwargs) -> None:
        return None   # the runtime advances its schedule in runtime.step()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


def _int8_before_placement(model: nn.Module, config: LowMemConfig) -> None:
    """Make `model` what the Trainer may move to its device: INT8 layers, never the float model.

    A model from `lowmem.load_pretrained` is already INT8 on its device with a runtime attached: the runtime is
    detached (the INT8 layers stay, nothing is copied) so that `prepare` can attach one with the Trainer's run-wide
    settings. A float model is converted layer by layer where it lies (the host, as from_pretrained leaves it)
    before transformers.Trainer moves it, so the device receives only the INT8 model."""
    attached = getattr(model, "_lowmem_runtime", None)
    if attached is not None:
        if attached.global_step:
            raise ValueError("LowMemTrainer: the model's lowmem runtime has already trained "
                             f"{attached.global_step} step(s); pass a model fresh from lowmem.load_pretrained, or "
                             "resume with trainer.train(resume_from_checkpoint=...)")
        attached.detach()
        return
    from lowmem.model.surgery import convert_model
    convert_model(model, config)


class LowMemTrainerMixin:
    """The lowmem part of LowMemTrainer; put it before a transformers.Trainer subclass (see `lowmem_trainer`)."""

    def __init__(self, *args, lowmem_config: LowMemConfig | None = None, **kwargs):
        optimizers = kwargs.get("optimizers") or (None, None)
        if any(item is not None for item in optimizers) or kwargs.get("optimizer_cls_and_kwargs") is not None:
            raise ValueError("LowMemTrainer: lowmem is the optimizer and owns the learning-rate schedule; do not pass "
                             "optimizers= or optimizer_cls_and_kwargs=. Set the update in lowmem_config="
                             "LowMemConfig(...) and the schedule in TrainingArguments (learning_rate, "
                             "lr_scheduler_type, warmup_steps)")
        if kwargs.get("model_init") is not None:
            raise ValueError("LowMemTrainer: model_init is not supported (lowmem prepares one model once); pass "
                             "model=")
        if lowmem_config is not None and not isinstance(lowmem_config, LowMemConfig):
            raise TypeError(f"lowmem_config must be a lowmem.LowMemConfig, got {type(lowmem_config).__name__}")
        train_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if train_args is not None:
            check_trainer_args(train_args)
        self.lowmem_config = lowmem_config if lowmem_config is not None else LowMemConfig()
        model = kwargs.get("model", args[0] if args else None)
        if isinstance(model, nn.Module):
            _int8_before_placement(model, self.lowmem_config)
        super().__init__(*args, **kwargs)   # places the model on its device: only INT8 weights move
        check_trainer_args(self.args)
        from hooks.runtime import prepare   # lazily: lowmem must not import hooks at import time
        self.runtime = prepare(self.model, runtime_config(self.args, self.lowmem_config))

    # -- optimizer and schedule: views of the runtime ---------------------------------------------------------------
    def create_optimizer(self, model=None):
        self._check_still_prepared()
        if not isinstance(self.optimizer, _RuntimeOptimizer):
            self.optimizer = _RuntimeOptimizer(self.runtime)
        return self.optimizer

    def _check_still_prepared(self) -> None:
        """Every float tensor the runtime trains must still be a parameter of the model: Trainer.train() may swap
        one before the loop (e.g. resizing the embeddings to the tokenizer's new special tokens), and the runtime's
        hooks would then train a detached copy while the model's new tensor never changes."""
        live = {id(p) for p in self.model.parameters()}
        gone = [item.name for item in self.runtime.trainables if item.kind != "lowrank_int8" and id(item.tensor)
                not in live]
        if gone:
            raise RuntimeError(f"LowMemTrainer: {', '.join(gone[:3])} {'was' if len(gone) == 1 else 'were'} replaced "
                               "after lowmem prepared the model (resized embeddings for new tokenizer tokens?); make "
                               "such changes (model.resize_token_embeddings(len(tokenizer))) before building the "
                               "LowMemTrainer")

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        # Only now is the run's length known (max_steps or epochs x batches): the schedule's total_steps.
        self.runtime.config = runtime_config(self.args, self.lowmem_config, total_steps=num_training_steps)
        optimizer = self.optimizer
        while not isinstance(optimizer, _RuntimeOptimizer):   # accelerate wraps it in AcceleratedOptimizer
            optimizer = optimizer.optimizer
        self.lr_scheduler = _RuntimeSchedule(optimizer)
        return self.lr_scheduler

    def set_initial_training_values(self, args, dataloader):
        values = super().set_initial_training_values(args, dataloader)
        _, per_epoch, _, _, _, steps_in_epoch, max_steps = values
        accum = args.gradient_accumulation_steps
        if steps_in_epoch % accum and max_steps >= per_epoch:
            raise ValueError(f"LowMemTrainer: an epoch has {steps_in_epoch} batches, not a multiple of "
                             f"gradient_accumulation_steps={accum}: its last optimizer step would have "
                             f"{steps_in_epoch % accum} micro-batches, and the lowmem runtime takes exactly {accum}. "
                             "Set dataloader_drop_last=True with a data set size that divides, or change "
                             "gradient_accumulation_steps or per_device_train_batch_size")
        return values

    # -- the micro-batch ------------------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.runtime.micro_batch():
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs)   # each micro-batch's mean loss (module docstring)
            loss = loss / self.args.gradient_accumulation_steps
            self.runtime.backward(loss)   # weights are written inside the last micro-batch's backward
        return loss.detach()

    def _clip_grad_norm(self, model):
        return None   # the runtime clips (grad_clip, clip_mode) while it writes

    def _get_grad_norm(self, model, grad_norm=None):
        return None   # known after runtime.step(); substituted in _maybe_log_save_evaluate

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *args, **kwargs):
        stats = self._runtime_stats()
        if stats is not None:
            grad_norm = stats["grad_norm"]
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Training-step logs also carry the runtime's peak memory and how many projectors it refreshed."""
        stats = self._runtime_stats()
        if stats is not None and "loss" in logs and "grad_norm" in logs:
            logs = {**logs, "peak_memory_gib": stats["peak_memory_bytes"] / 2**30,
                    "refreshed_layers": len(stats["refreshed"])}
        return super().log(logs, *args, **kwargs)

    def _runtime_stats(self) -> dict | None:
        optimizer = self.optimizer
        while optimizer is not None and not isinstance(optimizer, _RuntimeOptimizer):
            optimizer = getattr(optimizer, "optimizer", None)   # accelerate's AcceleratedOptimizer wraps ours
        return None if optimizer is None else optimizer.last_stats

    # -- saving and resuming -------------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoint saves (internal): the exact-resume state under output_dir/lowmem. A user's call: a bf16
        Hugging Face model and its model card in output_dir (default <args.output_dir>/model)."""
        if not self.args.should_save:
            return
        if _internal_call:
            from lowmem.checkpoint.store import save_checkpoint
            save_checkpoint(Path(output_dir) / CHECKPOINT_SUBDIR, step=self.runtime.global_step, model=self.model,
                            runtime_state=self.runtime.state_dict(), keep_last=None,
                            meta={"trainer_global_step": self.state.global_step,
                                  "lowmem_config": json.loads(self.runtime.config.to_json())})
            return
        out = output_dir if output_dir is not None else os.path.join(self.args.output_dir, "model")
        tokenizer = self.processing_class if hasattr(self.processing_class, "save_pretrained") else None
        exported = self.runtime.export(out, tokenizer=tokenizer)
        from lowmem.checkpoint.model_card import write_model_card
        evals = [r["eval_loss"] for r in self.state.log_history if "eval_loss" in r]
        write_model_card(exported, base_model=getattr(self.model.config, "_name_or_path", None) or None,
                         datasets=(), steps=self.runtime.global_step, method=self.runtime.config,
                         eval_loss=evals[-1] if evals else None, extra={"trainer": type(self).__name__})

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        return None   # the optimizer state is in output_dir/lowmem with the weights (save_model)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        from lowmem.checkpoint.store import latest_checkpoint, load_checkpoint
        root = Path(resume_from_checkpoint) / CHECKPOINT_SUBDIR
        path = latest_checkpoint(root)
        if path is None:
            raise ValueError(f"{resume_from_checkpoint} has no lowmem checkpoint under {root}: it was not written by "
                             "LowMemTrainer (a plain Trainer checkpoint holds float weights; load those with "
                             "from_pretrained before building the LowMemTrainer)")
        model_state, runtime_state, _ = load_checkpoint(path)
        self.runtime.load_model_state(model_state)
        self.runtime.load_state_dict(runtime_state)

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        if checkpoint is not None and self.state.global_step != self.runtime.global_step:
            raise ValueError(f"{checkpoint}: trainer_state.json is at step {self.state.global_step} but the lowmem "
                             f"state at step {self.runtime.global_step}; the checkpoint is inconsistent")


def lowmem_trainer(base: type) -> type:
    """`base` (transformers.Trainer or a subclass such as trl.SFTTrainer) with lowmem underneath; the class takes
    base's arguments plus `lowmem_config=`."""
    if not (isinstance(base, type) and issubclass(base, transformers.Trainer)):
        raise TypeError(f"lowmem_trainer() takes a transformers.Trainer subclass, got {base!r}")
    return type(f"LowMem{base.__name__}", (LowMemTrainerMixin, base), {"__module__": __name__})


class LowMemTrainer(LowMemTrainerMixin, transformers.Trainer):
    """transformers.Trainer whose optimizer is the lowmem runtime; module docstring for what maps where."""
