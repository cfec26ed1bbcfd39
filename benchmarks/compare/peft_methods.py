"""Adapter methods for `python -m benchmarks.compare`, all through peft: LoRA, DoRA, PiSSA, VeRA, AdaLoRA, QLoRA
and the merge-and-restart family ReLoRA, ReDoRA, RePiSSA, ReLoQRa (benchmarks/compare/restart.py; "reloqra" follows
the paper's eq. 5 literally and changes the function at every restart, "reloqra-olora" is the function-preserving
reading).

Every method adapts the attention and MLP linears (q, k, v, o, gate, up, down) at rank `settings.rank` with
lora_alpha = rank (scaling 1; AdaLoRA: final average rank `rank`, starting from 1.5x; VeRA: rank `rank` shared
random projections). The optimizer is torch AdamW (betas 0.9/0.999, no weight decay) with the same schedule as the
lowmem runtime (lowmem.schedule.lr_at: linear warm-up, cosine to 0.1 lr at settings.steps) and global gradient-norm
clipping at 1.0. Models that were not loaded from pretrained weights (config.name_or_path empty: pre-training from
scratch) also train their embeddings, norms and lm_head in full, as ReLoRA does; fine-tuning trains only the adapters
(override with settings.extra["train_non_adapter_params"]).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.compare.api import Batch, MethodSettings, MethodSpec
from benchmarks.compare.restart import RestartingAdapter, adapter_parameters, qr_init_, set_other_trainable
from lowmem.config import LowMemConfig
from lowmem.schedule import lr_at

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GRAD_CLIP = 1.0
# The paper re-warms for 100 steps of each 2500-step ReLoRA cycle.
REWARM_FRACTION = 100 / 2500


@dataclass(frozen=True)
class Recipe:
    """What distinguishes one adapter method: the peft tuner, LoRA init, DoRA, 4-bit base, restarts."""
    tuner: str = "lora"                 # "lora" | "vera" | "adalora"
    init: bool | str = True             # peft init_lora_weights
    dora: bool = False
    qr_init: bool = False               # ReLoQRa: B, A from the QR factors of the weight (restart.qr_init_)
    restarts: bool = False
    base_4bit: bool = False             # QLoRA: NF4 bitsandbytes base linears
    # lr of the fully trained non-adapter parameters (pre-training) relative to the family's lr: VeRA's family lr is
    # 10x an adapter's (workloads.LR) for its scaling vectors only.
    other_lr_scale: float = 1.0


def _peft_config(recipe: Recipe, settings: MethodSettings):
    from peft import AdaLoraConfig, LoraConfig, VeraConfig

    rank, targets = settings.rank, list(TARGET_MODULES)
    if recipe.tuner == "vera":
        return VeraConfig(r=rank, target_modules=targets, projection_prng_key=settings.seed, save_projection=False)
    if recipe.tuner == "adalora":
        steps = settings.steps
        # AdaLoRA's three phases: keep init_r for the first 10%, prune toward target_r, freeze ranks for the last 20%.
        return AdaLoraConfig(init_r=math.ceil(1.5 * rank), target_r=rank, lora_alpha=rank, target_modules=targets,
                             total_step=steps, tinit=steps // 10, tfinal=steps // 5, deltaT=max(1, steps // 10))
    return LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0, bias="none",
                      init_lora_weights=recipe.init, use_dora=recipe.dora)


def quantize_linears_4bit(model: nn.Module, names: tuple[str, ...], compute_dtype: torch.dtype) -> nn.Module:
    """Replace the nn.Linear children called `names` by bitsandbytes NF4 Linear4bit layers (QLoRA's frozen base),
    quantized when moved to the model's device."""
    import bitsandbytes as bnb

    device = next(model.parameters()).device
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if child_name in names and type(child) is nn.Linear:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
                setattr(module, child_name, q.to(device))
    return model


def _is_pretrained(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "name_or_path", "") or getattr(config, "_name_or_path", ""))


class AdapterTrainer:
    """api.Trainer for one peft method on one model (see the module docstring for the shared settings)."""

    def __init__(self, name: str, recipe: Recipe, model: nn.Module, settings: MethodSettings):
        self.name, self.recipe, self.settings = name, recipe, settings
        self.step = 0
        self.schedule = LowMemConfig(lr=settings.lr, warmup_steps=min(settings.warmup_steps, settings.steps),
                                     total_steps=settings.steps, lr_schedule="cosine")
        self.extra: dict = {}
        model = model.to(device=settings.device, dtype=settings.dtype)
        if recipe.base_4bit:
            model = quantize_linears_4bit(model, TARGET_MODULES, compute_dtype=settings.dtype)
        train_other = settings.extra.get("train_non_adapter_params", not _is_pretrained(model))
        config = _peft_config(recipe, settings)
        started = time.perf_counter()
        if recipe.restarts:
            interval = settings.refresh_interval_steps
            self.restarter = RestartingAdapter(
                model, config, interval_steps=interval, rewarm_steps=round(interval * REWARM_FRACTION),
                train_other=train_other, make_optimizer=self._adam, reinit=qr_init_ if recipe.qr_init else None,
                seed=settings.seed)
            self.model, adapters, other = (self.restarter.model, self.restarter.adapter_params,
                                           self.restarter.other_params)
            self.optimizer = self.restarter.optimizer
        else:
            from peft import get_peft_model

            self.restarter = None
            self.model = get_peft_model(model, config)
            adapters = adapter_parameters(self.model)
            other = set_other_trainable(self.model, adapters) if train_other else []
            self.optimizer = self._adam(adapters)
        self.extra["init_seconds"] = time.perf_counter() - started
        self.extra["trainable_parameters"] = sum(p.numel() for p in adapters + other)
        # Parameters outside the adapters keep one optimizer (and its state) across restarts.
        self.other_optimizer = self._adam(other) if other else None

    def _adam(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if not params:
            raise ValueError(f"{self.name}: no trainable adapter parameters; are the target modules "
                             f"{TARGET_MODULES} in the model?")
        return torch.optim.AdamW(params, lr=self.settings.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def _lm_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)

    def train_step(self, micro_batches: list[Batch]) -> float:
        if not micro_batches:
            raise ValueError("train_step needs at least one micro-batch")
        total = 0.0
        for batch in micro_batches:
            out = self.model(**batch)
            (out.loss / len(micro_batches)).backward()
            # AdaLoRA adds its orthogonality penalty to out.loss; report the language-model loss alone.
            lm = self._lm_loss(out.logits.detach(), batch["labels"]) if self.recipe.tuner == "adalora" else out.loss
            total += float(lm.detach())
        optimizers = [o for o in (self.optimizer, self.other_optimizer) if o is not None]
        params = [p for o in optimizers for g in o.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        lr = lr_at(self.step, self.schedule) * (self.restarter.lr_factor(self.step) if self.restarter else 1.0)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = lr * (self.recipe.other_lr_scale if opt is self.other_optimizer else 1.0)
            opt.step()
        if self.recipe.tuner == "adalora":
            self.model.base_model.update_and_allocate(self.step)   # reads the gradients: before zero_grad
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        if self.restarter is not None and self.restarter.after_step(self.step, self.settings.steps):
            self.model, self.optimizer = self.restarter.model, self.restarter.optimizer
            self.extra["restarts"] = self.restarter.restarts
        self.step += 1
        return total / len(micro_batches)

    def eval_model(self) -> nn.Module:
        return self.model

    def refresh_seconds(self) -> float | None:
        return None

    def svd_equivalents(self) -> float | None:
        return None

    def close(self) -> None:
        self.optimizer = self.other_optimizer = self.restarter = None
        self.model = None


def _spec(name: str, recipe: Recipe, description: str, *, family: str = "adapter", cuda_only: bool = False,
          requires: tuple[str, ...] = ("peft",)) -> MethodSpec:
    def build(model: nn.Module, settings: MethodSettings) -> AdapterTrainer:
        return AdapterTrainer(name, recipe, model, settings)
    return MethodSpec(name=name, family=family, build=build, requires=requires, cuda_only=cuda_only,
                      group="adapter", description=description)


PEFT_METHODS: list[MethodSpec] = [
    _spec("lora", Recipe(), "LoRA (peft): frozen W + B A on q,k,v,o,gate,up,down"),
    _spec("dora", Recipe(dora=True), "DoRA (peft use_dora): LoRA on the direction, trained magnitude"),
    _spec("pissa", Recipe(init="pissa_niter_4"),
          "PiSSA (peft pissa_niter_4): adapters from the top-r singular triplets, residual frozen"),
    _spec("vera", Recipe(tuner="vera", other_lr_scale=0.1),
          "VeRA (peft): shared frozen random projections, trained scaling vectors", family="vera"),
    _spec("adalora", Recipe(tuner="adalora"), "AdaLoRA (peft): SVD-form adapters, rank budget 1.5r -> r"),
    _spec("qlora", Recipe(base_4bit=True), "QLoRA: LoRA on an NF4 bitsandbytes 4-bit base",
          cuda_only=True, requires=("peft", "bitsandbytes")),
    _spec("relora", Recipe(restarts=True),
          "ReLoRA: LoRA merged and re-initialised every interval, adapter Adam reset, lr re-warm-up"),
    _spec("redora", Recipe(dora=True, restarts=True), "ReDoRA: DoRA with ReLoRA restarts"),
    _spec("repissa", Recipe(init="pissa_niter_4", restarts=True), "RePiSSA: PiSSA of the merged weight at restarts"),
    _spec("reloqra", Recipe(qr_init=True, restarts=True),
          "ReLoQRa: restarts with B, A = QR factors of the merged weight, added on top of it (paper eq. 5)"),
    _spec("reloqra-olora", Recipe(init="olora", restarts=True),
          "ReLoQRa read as function-preserving: peft OLoRA init (Q_r R_r moved from the base into B, A) at restarts"),
]
