"""The registry of compared methods: full-parameter optimizers, external low-rank optimizers, lowmem's paper presets
and its ablations (plus the adapter methods of benchmarks.compare.peft_methods when that module imports).

Every Trainer here follows benchmarks.compare.api.Trainer. Shared rules so that methods differ only in the optimizer:
- one learning-rate shape for all: lowmem.schedule.lr_at (linear warm-up, cosine decay to 0.1·lr over the run);
- torch-optimizer methods clip the global gradient norm to GRAD_CLIP; lowmem clips per tensor (its fused default);
- no weight decay anywhere;
- the same low-rank targets everywhere: every nn.Linear except lm_head and embeddings (lowmem's default selection).

Projector time is measured by wrapping the function that computes projectors (CallTimer): lowmem.optim.lowrank's
`compute_projector`, galore-torch's `GaLoreProjector.get_orthogonal_matrix`, APOLLO's random projector. A wrapper
is installed when a Trainer is built and removed by `close()`.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import json
import time
from fnmatch import fnmatchcase

import torch
from torch import nn

from benchmarks.compare.api import Batch, MethodSettings, MethodSpec
from lowmem.config import LowMemConfig
from lowmem.presets import PRESET_DESCRIPTIONS, preset
from lowmem.schedule import lr_at

GRAD_CLIP = 1.0
GALORE_SCALE = 0.25                          # GaLore's alpha; lowmem's presets use the same default
EXCLUDED_FROM_LOWRANK = ("*lm_head", "*embed*")
PIP_NAMES = {"galore_torch": "galore-torch", "apollo_torch": "apollo-torch", "torchao": "torchao",
             "bitsandbytes": "bitsandbytes", "peft": "peft"}


# ---- shared pieces -------------------------------------------------------------------------------------------------

def lr_at_step(step: int, settings: MethodSettings) -> float:
    """The learning rate of optimizer step `step` (0-based) for every method: lowmem's own schedule."""
    return lr_at(step, _schedule_config(settings.lr, settings.warmup_steps, settings.steps))


@functools.lru_cache(maxsize=64)
def _schedule_config(lr: float, warmup_steps: int, steps: int) -> LowMemConfig:
    return LowMemConfig(lr=lr, warmup_steps=min(warmup_steps, steps), total_steps=steps, lr_schedule="cosine")


def lowrank_weights(model: nn.Module) -> list[nn.Parameter]:
    """Weights of the nn.Linear modules that low-rank methods project (all but lm_head and embeddings)."""
    return [module.weight for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not any(fnmatchcase(name, p) for p in EXCLUDED_FROM_LOWRANK)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CallTimer:
    """Replaces `owner.attr` (a module function or a class's method) by a wrapper that records the wall seconds and
    the gradient shape of every call: calls = [((m, n), device, seconds), ...]. `shape_of(args, kwargs)` returns the
    gradient tensor or operator argument (anything with .shape and .device). CUDA work is synchronized around a call.
    """

    def __init__(self, owner, attr: str, shape_of):
        self.owner, self.attr, self.shape_of = owner, attr, shape_of
        self.calls: list[tuple[tuple[int, ...], torch.device, float]] = []
        self._original = getattr(owner, attr)
        original, calls = self._original, self.calls

        @functools.wraps(original)
        def timed(*args, **kwargs):
            grad = shape_of(args, kwargs)
            _sync(grad.device)
            start = time.perf_counter()
            out = original(*args, **kwargs)
            _sync(grad.device)
            calls.append((tuple(grad.shape), grad.device, time.perf_counter() - start))
            return out

        self._wrapper = timed
        setattr(owner, attr, timed)

    def restore(self) -> None:
        if getattr(self.owner, self.attr, None) is self._wrapper:
            setattr(self.owner, self.attr, self._original)

    def seconds(self) -> float:
        return sum(seconds for _, _, seconds in self.calls)

    def svd_equivalents(self) -> float:
        """Recorded seconds in units of one full torch.linalg.svd of the same shape on the same device."""
        return sum(seconds / full_svd_seconds(shape, device) for shape, device, seconds in self.calls)


_SVD_SECONDS: dict[tuple, float] = {}


def full_svd_seconds(shape: tuple[int, ...], device: torch.device) -> float:
    """Wall seconds of one torch.linalg.svd(full_matrices=False) of a fp32 Gaussian matrix of `shape` (best of two
    after a warm-up), measured once per (shape, device) in this process."""
    key = (tuple(shape), str(device))
    if key not in _SVD_SECONDS:
        generator = torch.Generator().manual_seed(0)
        matrix = torch.randn(*shape, generator=generator).to(device)
        torch.linalg.svd(matrix, full_matrices=False)
        best = float("inf")
        for _ in range(2):
            _sync(matrix.device)
            start = time.perf_counter()
            torch.linalg.svd(matrix, full_matrices=False)
            _sync(matrix.device)
            best = min(best, time.perf_counter() - start)
        _SVD_SECONDS[key] = max(best, 1e-9)
    return _SVD_SECONDS[key]


# ---- trainers ------------------------------------------------------------------------------------------------------

class OptimizerTrainer:
    """A torch.optim-style optimizer: backward of every micro-batch (loss / K), global-norm clip, step, zero_grad.

    timer: a CallTimer around the optimizer's projector computation (None: no projector).
    svd_per_call: True when each projector call is one full SVD by construction (galore-torch), so SVD-equivalents
    are the call count rather than measured seconds over the reference SVD time.
    """

    def __init__(self, name: str, model: nn.Module, optimizer: torch.optim.Optimizer, settings: MethodSettings, *,
                 timer: CallTimer | None = None, svd_per_call: bool = False):
        self.name, self.model, self.optimizer, self.settings = name, model, optimizer, settings
        self.timer, self.svd_per_call = timer, svd_per_call
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.step_index = 0

    def train_step(self, micro_batches: list[Batch]) -> float:
        lr = lr_at_step(self.step_index, self.settings)
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):   # torchao keeps lr as a tensor (no recompiles)
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        total = 0.0
        for batch in micro_batches:
            loss = self.model(**batch).loss
            (loss / len(micro_batches)).backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_index += 1
        return total / len(micro_batches)

    def eval_model(self) -> nn.Module:
        return self.model

    def refresh_seconds(self) -> float | None:
        return None if self.timer is None else self.timer.seconds()

    def svd_equivalents(self) -> float | None:
        if self.timer is None:
            return None
        return float(len(self.timer.calls)) if self.svd_per_call else self.timer.svd_equivalents()

    def refresh_count(self) -> int | None:
        """Projector computations so far (one per weight per refresh)."""
        return None if self.timer is None else len(self.timer.calls)

    def close(self) -> None:
        if self.timer is not None:
            self.timer.restore()
        self.optimizer.state.clear()


class LowMemTrainer:
    """lowmem's fused runtime (hooks.runtime.prepare): weights update inside backward; `step()` closes the step."""

    def __init__(self, name: str, model: nn.Module, config: LowMemConfig):
        from hooks.runtime import prepare
        import lowmem.optim.lowrank

        self.name, self.model, self.config = name, model, config
        self.timer = CallTimer(lowmem.optim.lowrank, "compute_projector", lambda args, kwargs: args[0])
        self.refreshes = 0
        self.skipped_steps = 0
        try:
            self.runtime = prepare(model, config)
        except BaseException:
            self.timer.restore()
            raise

    def train_step(self, micro_batches: list[Batch]) -> float:
        losses = []
        for batch in micro_batches:
            with self.runtime.micro_batch():
                loss = self.model(**batch).loss
                losses.append(float(loss.detach()))
                self.runtime.backward(loss / len(micro_batches))
        stats = self.runtime.step()
        self.refreshes += len(stats["refreshed"])
        self.skipped_steps += int(stats["skipped"])
        return sum(losses) / len(losses)

    def eval_model(self) -> nn.Module:
        return self.model   # Int8Linear layers dequantize on the fly in forward

    def refresh_seconds(self) -> float | None:
        return self.timer.seconds()

    def svd_equivalents(self) -> float | None:
        return self.timer.svd_equivalents()

    def refresh_count(self) -> int | None:
        return self.refreshes

    def close(self) -> None:
        self.timer.restore()
        self.runtime.detach()


# ---- builders ------------------------------------------------------------------------------------------------------

def _adamw_kwargs(settings: MethodSettings) -> dict:
    return dict(lr=settings.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def _build_adamw(model, settings, *, dtype: torch.dtype, name: str):
    model.to(dtype=dtype)
    return OptimizerTrainer(name, model, torch.optim.AdamW(model.parameters(), **_adamw_kwargs(settings)), settings)


def _build_bnb_adamw8bit(model, settings):
    import bitsandbytes as bnb
    return OptimizerTrainer("adamw-8bit-bnb", model, bnb.optim.AdamW8bit(model.parameters(),
                                                                         **_adamw_kwargs(settings)), settings)


def _build_adafactor(model, settings):
    if hasattr(torch.optim, "Adafactor"):
        optimizer = torch.optim.Adafactor(model.parameters(), lr=settings.lr, weight_decay=0.0)
    else:
        from transformers.optimization import Adafactor
        optimizer = Adafactor(model.parameters(), lr=settings.lr, scale_parameter=True, relative_step=False,
                              warmup_init=False, weight_decay=0.0)
    return OptimizerTrainer("adafactor", model, optimizer, settings)


# torch.compile refuses to run under a TorchDispatchMode, and after one refusal dynamo skips the optimizer's frame for
# the rest of the process (every later torchao run would fail)
_TORCHAO_NO_METER = "torchao's compiled step does not run under the live-bytes meter (a TorchDispatchMode)"


def _build_torchao(model, settings, *, bits: int):
    import torchao.optim
    cls = torchao.optim.AdamW8bit if bits == 8 else torchao.optim.AdamW4bit
    # Its kernel is specialised per parameter shape and per learning-rate value: a few shapes times the values of a
    # learning-rate sweep pass dynamo's recompile limit (8), after which torchao's fullgraph compile refuses to run.
    dynamo_config = torch._dynamo.config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 256)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4096)
    # torchao compiles one kernel per parameter shape on its first step; compile on throwaway copies here so the
    # timed steps measure the optimizer, not the compiler.
    copies = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    for copy in copies:
        copy.grad = torch.zeros_like(copy)
    cls(copies, **_adamw_kwargs(settings)).step()
    del copies
    return OptimizerTrainer(f"torchao-adamw-{bits}bit", model, cls(model.parameters(), **_adamw_kwargs(settings)),
                            settings)


def _split_groups(model, lowrank_extra: dict) -> list[dict]:
    lowrank = lowrank_weights(model)
    ids = {id(p) for p in lowrank}
    return [{"params": [p for p in model.parameters() if id(p) not in ids]}, {"params": lowrank, **lowrank_extra}]


def _build_galore_torch(model, settings, *, eight_bit: bool = False):
    import galore_torch
    from galore_torch.galore_projector import GaLoreProjector
    groups = _split_groups(model, {"rank": settings.rank, "update_proj_gap": settings.refresh_interval_steps,
                                   "scale": GALORE_SCALE, "proj_type": "std"})
    timer = CallTimer(GaLoreProjector, "get_orthogonal_matrix", lambda args, kwargs: args[1])
    try:
        if eight_bit:
            optimizer = galore_torch.GaLoreAdamW8bit(groups, **_adamw_kwargs(settings))
        else:
            optimizer = galore_torch.GaLoreAdamW(groups, no_deprecation_warning=True, **_adamw_kwargs(settings))
    except BaseException:
        timer.restore()
        raise
    name = "galore-torch-8bit" if eight_bit else "galore-torch"
    return OptimizerTrainer(name, model, optimizer, settings, timer=timer, svd_per_call=True)


def _build_apollo(model, settings, *, mini: bool):
    from apollo_torch import APOLLOAdamW
    from apollo_torch.random_projector import GradientProjector
    # The APOLLO README's settings: APOLLO = rank r, channel-wise scaling, scale 1; APOLLO-Mini = rank 1,
    # tensor-wise scaling, scale 128 applied before the norm-growth limiter (recommended for short warm-ups).
    extra = {"rank": 1 if mini else settings.rank, "proj": "random", "scale_type": "tensor" if mini else "channel",
             "scale": 128.0 if mini else 1.0, "update_proj_gap": settings.refresh_interval_steps, "proj_type": "std"}
    timer = CallTimer(GradientProjector, "get_orthogonal_matrix", lambda args, kwargs: args[1])
    try:
        optimizer = APOLLOAdamW(_split_groups(model, extra), scale_front=mini, **_adamw_kwargs(settings))
    except BaseException:
        timer.restore()
        raise
    return OptimizerTrainer("apollo-mini" if mini else "apollo", model, optimizer, settings, timer=timer)


# Fields counted in optimizer steps that belong to the refresh schedule: scaled with the run's refresh interval so a
# short run keeps each paper's proportions (for example GaLore-dynamics grows its interval from step T0, capped at
# 12.5·T0; GaLore+'s residuals start after T0/2).
_SCHEDULE_FIELDS = ("max_refresh_interval_steps", "geometric_start_step", "residual_warmup_steps")


def lowmem_config(preset_name: str, settings: MethodSettings, **overrides) -> LowMemConfig:
    """The preset's config for this comparison: shared lr / rank / interval / schedule / accumulation / seed, the
    schedule fields scaled to the run's interval, then `overrides` (ablations). The override `rank_scale` multiplies
    the run's rank (rank ablations follow whatever rank the run uses); `interval_scale` multiplies the run's refresh
    interval only (the other schedule fields stay scaled to the run's interval, so one thing changes)."""
    overrides = dict(overrides)
    rank = max(1, round(settings.rank * overrides.pop("rank_scale", 1.0)))
    base = preset(preset_name)
    interval = settings.refresh_interval_steps
    ratio = interval / base.refresh_interval_steps
    scaled = {f: max(1, round(getattr(base, f) * ratio)) for f in _SCHEDULE_FIELDS}
    interval_used = max(1, round(interval * overrides.pop("interval_scale", 1.0)))
    scaled["max_refresh_interval_steps"] = max(interval_used, scaled["max_refresh_interval_steps"])
    return preset(preset_name, **{**scaled, "lr": settings.lr, "rank": rank,
                                  "refresh_interval_steps": interval_used,
                                  "warmup_steps": min(settings.warmup_steps, settings.steps),
                                  "total_steps": settings.steps, "lr_schedule": "cosine",
                                  "grad_accum_steps": settings.grad_accum_steps, "seed": settings.seed, **overrides})


def _build_lowmem(model, settings, *, preset_name: str, name: str, overrides: dict):
    return LowMemTrainer(name, model, lowmem_config(preset_name, settings, **overrides))


def resolved_config(spec: MethodSpec, settings: MethodSettings) -> dict | None:
    """The complete configuration a lowmem preset or ablation runs with under `settings` (its LowMemConfig, as JSON
    types), or None for the other methods (their settings are the MethodSettings and the library's code). Stored
    runs carry it so that a changed lowmem default is not mixed with runs made under the old one."""
    build = spec.build
    if not (isinstance(build, functools.partial) and build.func is _build_lowmem):
        return None
    config = lowmem_config(build.keywords["preset_name"], settings, **build.keywords["overrides"])
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


# ---- the registry --------------------------------------------------------------------------------------------------

BASELINE_METHODS = [
    MethodSpec("adamw-fp32", "full", functools.partial(_build_adamw, dtype=torch.float32, name="adamw-fp32"),
               description="torch.optim.AdamW, fp32 weights and moments (the reference of every ratio)"),
    MethodSpec("adamw-bf16", "full", functools.partial(_build_adamw, dtype=torch.bfloat16, name="adamw-bf16"),
               description="torch.optim.AdamW with bf16 weights and moments"),
    MethodSpec("adamw-8bit-bnb", "full", _build_bnb_adamw8bit, requires=("bitsandbytes",), cuda_only=True,
               description="bitsandbytes AdamW8bit (blockwise 8-bit moments)"),
    MethodSpec("adafactor", "adafactor", _build_adafactor,
               description="Adafactor (torch.optim.Adafactor; factored second moment, no first moment)"),
    MethodSpec("galore-torch", "galore", _build_galore_torch, requires=("galore_torch",),
               description="GaLore reference implementation (galore_torch.GaLoreAdamW), full SVD every interval"),
    MethodSpec("galore-torch-8bit", "galore", functools.partial(_build_galore_torch, eight_bit=True),
               requires=("galore_torch", "bitsandbytes"), cuda_only=True,
               description="GaLore reference implementation, 8-bit variant (galore_torch.GaLoreAdamW8bit)"),
    MethodSpec("apollo", "galore", functools.partial(_build_apollo, mini=False), requires=("apollo_torch",),
               description="APOLLO (apollo_torch.APOLLOAdamW): random projection, channel-wise scaling, rank r"),
    MethodSpec("apollo-mini", "galore", functools.partial(_build_apollo, mini=True), requires=("apollo_torch",),
               description="APOLLO-Mini: rank 1, tensor-wise scaling, scale 128"),
    MethodSpec("torchao-adamw-8bit", "full", functools.partial(_build_torchao, bits=8), requires=("torchao",),
               description="torchao.optim.AdamW8bit (torch.compile'd; compiled before the timed steps)",
               no_cpu_memory=_TORCHAO_NO_METER),
    MethodSpec("torchao-adamw-4bit", "full", functools.partial(_build_torchao, bits=4), requires=("torchao",),
               description="torchao.optim.AdamW4bit (torch.compile'd; compiled before the timed steps)",
               no_cpu_memory=_TORCHAO_NO_METER),
]

PAPER_PRESETS = ("galore", "q_galore", "galore_plus", "galore_ef", "galore_dynamics", "galore_dynamics_ef")

PAPER_METHODS = [
    MethodSpec(name, "galore", functools.partial(_build_lowmem, preset_name=name, name=name, overrides={}),
               group="paper", description=f"lowmem preset '{name}': {PRESET_DESCRIPTIONS[name]}")
    for name in PAPER_PRESETS
] + [MethodSpec("lowmem", "lowmem", functools.partial(_build_lowmem, preset_name="lowmem", name="lowmem",
                                                        overrides={}),
                group="paper", description=PRESET_DESCRIPTIONS["lowmem"])]

# name: (overrides of the `lowmem` preset, what changes)
ABLATIONS: dict[str, tuple[dict, str]] = {
    "lowmem-no-cross-head": ({"cross_head": False}, "q/k projectors from the whole matrix instead of shared heads"),
    "lowmem-svd": ({"projection": "svd"}, "exact torch.linalg.svd projectors instead of randomized iteration"),
    "lowmem-proj-fp32": ({"projector_bits": 32}, "fp32 projectors instead of packed INT4"),
    "lowmem-fixed-refresh": ({"refresh": "fixed"}, "fixed refresh interval instead of lazy"),
    "lowmem-no-residual": ({"residual_ratio": 0.0}, "no sparse residuals on q/k"),
    "lowmem-no-sr": ({"stochastic_rounding": False}, "INT8 weights rounded to nearest instead of stochastically"),
    "lowmem-float-weights": ({"int8_weights": False, "stochastic_rounding": False},
                             "float weights instead of INT8"),
    "lowmem-moments-fp32": ({"optim_bits": 32, "float_optim_bits": 32}, "fp32 Adam moments instead of 8-bit"),
    "lowmem-transfer-rotate": ({"moment_transfer": "rotate"}, "moments rotated into the new basis at a refresh"),
    "lowmem-transfer-keep": ({"moment_transfer": "keep"}, "moments kept as they are at a refresh (GaLore)"),
    "lowmem-rank-half": ({"rank_scale": 0.5}, "half the run's rank"),
    "lowmem-rank-double": ({"rank_scale": 2.0}, "twice the run's rank"),
    "lowmem-interval-half": ({"interval_scale": 0.5}, "half the run's refresh interval"),
    "lowmem-interval-double": ({"interval_scale": 2.0}, "twice the run's refresh interval"),
    "lowmem-power-iters-1": ({"power_iters": 1}, "one power iteration per projector refresh instead of two"),
}

ABLATION_METHODS = [
    MethodSpec(name, "lowmem", functools.partial(_build_lowmem, preset_name="lowmem", name=name,
                                                 overrides=overrides),
               group="ablation", description=f"lowmem with {what}")
    for name, (overrides, what) in ABLATIONS.items()
]


def adapter_methods() -> tuple[list[MethodSpec], str | None]:
    """(benchmarks.compare.peft_methods.PEFT_METHODS, None), or ([], why) when that module does not import."""
    try:
        module = importlib.import_module("benchmarks.compare.peft_methods")
    except ImportError as err:
        return [], f"adapter methods unavailable: {type(err).__name__}: {err}"
    return list(module.PEFT_METHODS), None


def all_methods() -> list[MethodSpec]:
    """Every method in report order: baselines, paper presets, ablations, adapters. Names are unique."""
    methods = BASELINE_METHODS + PAPER_METHODS + ABLATION_METHODS + adapter_methods()[0]
    seen: set[str] = set()
    for spec in methods:
        if spec.name in seen:
            raise ValueError(f"two compared methods are named {spec.name!r}")
        seen.add(spec.name)
    return methods


def unavailable_reason(spec: MethodSpec, device: torch.device) -> str | None:
    """Why `spec` cannot run here ("not installed (pip install ...)" / "needs a GPU"), or None when it can."""
    missing = [module for module in spec.requires if not _importable(module)]
    if missing:
        return f"not installed (pip install {' '.join(PIP_NAMES.get(m, m) for m in missing)})"
    if spec.cuda_only and torch.device(device).type != "cuda":
        return "needs a GPU"
    return None


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False

