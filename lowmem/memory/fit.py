"""Does a run fit a device? Format a breakdown and the launch preflight (the planner's verdict and cheapest fix).

    b = estimate(LlamaConfig(...), method="lowmem", seq_len=256, micro_batch_size=1, gradient_checkpointing=False)
    print(format_breakdown(b))
    verdict = preflight(cfg, model_config, torch.device("cuda"))   # launch.preflight.check calls this
    verdict = preflight(cfg, model_config, device, zero_stage=2)  # one rank of WORLD_SIZE under ZeRO-2

A run must fit twice: while it loads (lowmem.memory.load_cost.estimate_load: the streamed checkpoint and the
Runtime's optimizer state) and while it trains (cost_model.estimate: one step). The verdict, the cheapest fix and
`fit: auto` all judge the larger of the two peaks; the detail line states both.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from lowmem.memory.cost_model import COMPONENTS, CUDA_CONTEXT_BYTES, GIB, MemoryBreakdown, estimate
from lowmem.memory.load_cost import estimate_load

__all__ = ["GPUS", "FitPlan", "Preflight", "auto_fit", "format_breakdown", "load_and_step", "preflight"]

GPUS: dict[str, int] = {"3060-12gb": 12 * GIB, "4060ti-16gb": 16 * GIB, "4090": 24 * GIB, "3090": 24 * GIB,
                        "a100-40gb": 40 * GIB,
                        "a100-80gb": 80 * GIB, "h100-80gb": 80 * GIB}
FIT_FRACTION = 0.95


@dataclass
class Preflight:
    fits: bool | None            # None: no estimate available
    predicted_peak_bytes: int | None     # max(load_peak_bytes, step_peak_bytes): what the verdict judges
    device_bytes: int | None
    cheapest_fix: str | None     # e.g. "optim.rank=128 (saves 1.2 GiB)"
    detail: str                  # one paragraph for the console
    load_peak_bytes: int | None = None   # the load phase (estimate_load) on the device
    step_peak_bytes: int | None = None   # one training step (estimate)
    host_load_peak_bytes: int | None = None   # the load phase on the host (== load_peak_bytes on a CPU device)


def load_and_step(load_bytes: int, step_bytes: int) -> str:
    """'load A GiB, step B GiB', the larger named as the peak: the wording of the preflight and the run report."""
    larger = "load" if load_bytes > step_bytes else "step"
    return f"load {load_bytes / GIB:.2f} GiB, step {step_bytes / GIB:.2f} GiB: the {larger} is the peak"


def format_breakdown(b: MemoryBreakdown) -> str:
    """A fixed-width table of the components in GiB, then the peak and the notes."""
    width = max(len(k) for k in COMPONENTS)
    lines = [f"memory breakdown: {b.method}", f"  {'component':<{width}}  {'GiB':>8}"]
    for key in COMPONENTS:
        lines.append(f"  {key:<{width}}  {b.components.get(key, 0) / GIB:8.3f}")
    lines.append(f"  {'peak':<{width}}  {b.peak_bytes / GIB:8.3f}")
    lines += [f"  note: {n}" for n in b.notes]
    return "\n".join(lines)


def _device_bytes(device: torch.device) -> int:
    """Memory the run can still take on `device`. CUDA: the free memory (torch.cuda.mem_get_info: what other
    processes hold is not available) plus what this process's caching allocator already reserved (the estimate
    counts this run's tensors) plus one CUDA context (the query creates this process's context if there was none,
    and the estimate charges it as cuda_context), at most the total. CPU: the available RAM."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        reserved = torch.cuda.memory_reserved(device)
        return int(min(total, free + reserved + CUDA_CONTEXT_BYTES))
    import psutil
    return int(psutil.virtual_memory().available)


def _lowmem_config(cfg):
    """The LowMemConfig inside a launch TrainConfig (attribute `optim`), or cfg itself."""
    from lowmem.config import LowMemConfig
    if isinstance(cfg, LowMemConfig):
        return cfg
    if hasattr(cfg, "lowmem_config"):
        return cfg.lowmem_config()
    raise TypeError(f"preflight needs a launch TrainConfig (with lowmem_config()), got {type(cfg).__name__}")


def _settings(cfg, device: torch.device) -> dict:
    """The run's shape settings for `estimate`; activation offload counts only on a GPU (launch leaves it off when
    the device is the host)."""
    return {"seq_len": int(cfg.seq_len), "micro_batch_size": int(cfg.micro_batch_size),
            "gradient_checkpointing": bool(getattr(cfg, "gradient_checkpointing", False)),
            "fused_loss": bool(getattr(cfg, "fused_loss", False)),
            "activation_offload": bool(getattr(cfg, "activation_offload", False))
            and bool(getattr(cfg, "gradient_checkpointing", False)) and device.type == "cuda"}


def _dtype(cfg, device: torch.device) -> torch.dtype:
    name = str(getattr(cfg, "dtype", "auto")).replace("torch.", "")
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
            "fp16": torch.float16}.get(name, torch.bfloat16)


def _world_size(world_size: int | None) -> int:
    if world_size is None:
        text = os.environ.get("WORLD_SIZE", "1")
        try:
            world_size = int(text)
        except ValueError:
            raise ValueError(f"environment variable WORLD_SIZE must be an int >= 1, got {text!r}") from None
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    return world_size


def preflight(cfg, model_config, device: torch.device, *, zero_stage: int = 0,
              world_size: int | None = None) -> Preflight:
    """Does `cfg` (a launch TrainConfig: seq_len, micro_batch_size, optim: LowMemConfig, optional
    gradient_checkpointing) fit `device`? If not, the first of the cheap changes that fits, with bytes saved.

    The estimate is one rank's peak under lowmem's ZeRO `zero_stage` (from the caller's DeepSpeed plan) on
    `world_size` ranks (None: the WORLD_SIZE environment variable, 1 when unset); on several ranks a higher ZeRO
    stage is among the changes tried."""
    device = torch.device(device)
    world = _world_size(world_size)
    total = _device_bytes(device)
    limit = int(FIT_FRACTION * total)
    optim = _lowmem_config(cfg)
    settings = _settings(cfg, device)
    dtype = _dtype(cfg, device)

    load_of = _load_peaks(model_config, dtype, device.type, world)

    def step_peak(opt, st, stage=zero_stage) -> int:
        return estimate(model_config, method="lowmem", lowmem_config=opt, dtype=dtype, device_type=device.type,
                        zero_stage=stage, world_size=world, **st).peak_bytes

    def peak(opt, st, stage=zero_stage) -> int:
        return max(load_of(opt, stage).peak_bytes, step_peak(opt, st, stage))

    load = load_of(optim, zero_stage)
    step = step_peak(optim, settings)
    predicted = max(load.peak_bytes, step)
    where = f"{device.type}" + (f", one of {world} ranks, ZeRO stage {zero_stage}" if world > 1 else "")
    both = load_and_step(load.peak_bytes, step)
    host = (f"; the load holds {load.host_peak_bytes / GIB:.2f} GiB of the checkpoint in host memory at a time"
            if device.type != "cpu" else "")
    peaks = dict(load_peak_bytes=load.peak_bytes, step_peak_bytes=step, host_load_peak_bytes=load.host_peak_bytes)
    if predicted <= limit:
        return Preflight(True, predicted, total, None,
                         f"memory preflight: predicted peak {predicted / GIB:.2f} GiB ({both}) of "
                         f"{total / GIB:.2f} GiB available ({where}){host}; fits", **peaks)
    # cheapest first: a ZeRO stage that partitions optimizer state costs no compute; stage 3 adds weight gathers
    zero2 = [("deepspeed=launch/configs/ds_zero2.json", optim, settings, 2)] if world > 1 and zero_stage < 1 else []
    zero3 = [("deepspeed=launch/configs/ds_zero3.json", optim, settings, 3)] if world > 1 and zero_stage < 3 else []
    # offloading checkpointed inputs to host memory needs a separate host: a GPU
    offload = [("gradient_checkpointing=true activation_offload=true", optim,
                {**settings, "gradient_checkpointing": True, "activation_offload": True}, zero_stage)] \
        if device.type == "cuda" else []
    candidates = zero2 + [
        ("gradient_checkpointing=true", optim, {**settings, "gradient_checkpointing": True}, zero_stage),
        *offload,
        *zero3,
        (f"optim.rank={max(1, optim.rank // 2)}", dataclasses.replace(optim, rank=max(1, optim.rank // 2)),
         settings, zero_stage),
        (f"micro_batch_size={max(1, settings['micro_batch_size'] // 2)}", optim,
         {**settings, "micro_batch_size": max(1, settings["micro_batch_size"] // 2)}, zero_stage),
        (f"seq_len={max(1, settings['seq_len'] // 2)}", optim,
         {**settings, "seq_len": max(1, settings["seq_len"] // 2)}, zero_stage),
        ("optim.projector_bits=4", dataclasses.replace(optim, projector_bits=4), settings, zero_stage),
    ]
    fix = None
    for label, opt, st, stage in candidates:
        if st == settings and opt == optim and stage == zero_stage:
            continue
        new_peak = peak(opt, st, stage)
        if new_peak <= limit:
            fix = f"{label} (saves {(predicted - new_peak) / GIB:.2f} GiB)"
            break
    detail = (f"memory preflight: predicted peak {predicted / GIB:.2f} GiB ({both}) exceeds {FIT_FRACTION:.0%} "
              f"of {total / GIB:.2f} GiB available ({where}); "
              + (f"cheapest fix: {fix}" if fix else "no single cheap change fits; use a larger device or a "
                                                 "smaller model"))
    return Preflight(False, predicted, total, fix, detail, **peaks)


def _load_peaks(model_config, dtype: torch.dtype, device_type: str, world: int):
    """(LowMemConfig, ZeRO stage) -> its estimate_load on one of `world` ranks, each computed once (the batch
    settings do not change it)."""
    cache = {}

    def load_of(opt, stage):
        if (opt, stage) not in cache:
            cache[opt, stage] = estimate_load(model_config, opt, dtype=dtype, device_type=device_type,
                                              zero_stage=stage, world_size=world)
        return cache[opt, stage]
    return load_of


@dataclass
class FitPlan:
    """What `auto_fit` chose: the changed settings (launch TrainConfig keys; "optim.rank" for the rank), the
    predicted peak with them (the larger of the load's and the step's, both kept), and one line for the console and
    the run report."""
    changes: dict
    predicted_peak_bytes: int
    device_bytes: int
    detail: str
    load_peak_bytes: int | None = None
    step_peak_bytes: int | None = None


MIN_AUTO_RANK = 32


def auto_fit(cfg, model_config, device: torch.device, *, zero_stage: int = 0, world_size: int | None = None,
             device_bytes: int | None = None) -> FitPlan | None:
    """The cheapest settings that fit `device` (95% of its memory), or None when nothing tried fits.

    Tried in order of cost, first fit wins: the run as configured; gradient checkpointing (recompute, ~1/3 more
    forward compute); on a GPU, checkpointing with the kept layer inputs offloaded to host memory (one copy per
    layer each way over PCIe); smaller micro-batches with more accumulation (micro_batch_size halved,
    grad_accum_steps doubled: the global batch and the update are kept, the step takes more passes); only then a
    lower optim.rank (halved down to 32, which changes the optimizer), each rank with the cheapest of the
    compute-only settings. Each candidate is judged on the larger of its load and step peaks (the load changes with
    the rank only).
    `device_bytes` replaces the device's memory (planning for a card that is not in this machine)."""
    device = torch.device(device)
    world = _world_size(world_size)
    total = int(device_bytes) if device_bytes is not None else _device_bytes(device)
    limit = int(FIT_FRACTION * total)
    optim = _lowmem_config(cfg)
    base = _settings(cfg, device)
    dtype = _dtype(cfg, device)
    accum = int(getattr(cfg, "grad_accum_steps", optim.grad_accum_steps))
    ranks = [optim.rank]
    while ranks[-1] // 2 >= MIN_AUTO_RANK:
        ranks.append(ranks[-1] // 2)
    micro = [base["micro_batch_size"]]
    while micro[-1] % 2 == 0:
        micro.append(micro[-1] // 2)
    memory_modes = [(base["gradient_checkpointing"], base["activation_offload"]), (True, base["activation_offload"])]
    if device.type == "cuda":
        memory_modes.append((True, True))
    compute_only = [(ckpt, offload, mb) for mb in micro for ckpt, offload in memory_modes]
    seen = set()
    load_of = _load_peaks(model_config, dtype, device.type, world)
    for rank in ranks:
        opt = dataclasses.replace(optim, rank=rank)
        for ckpt, offload, mb in compute_only:
            if (rank, ckpt, offload, mb) in seen:
                continue
            seen.add((rank, ckpt, offload, mb))
            st = {**base, "gradient_checkpointing": ckpt, "activation_offload": offload, "micro_batch_size": mb}
            step = estimate(model_config, method="lowmem", lowmem_config=opt, dtype=dtype, device_type=device.type,
                            zero_stage=zero_stage, world_size=world, **st).peak_bytes
            load = load_of(opt, zero_stage).peak_bytes
            peak = max(load, step)
            if peak > limit:
                continue
            changes = {}
            if ckpt != base["gradient_checkpointing"]:
                changes["gradient_checkpointing"] = ckpt
            if offload != base["activation_offload"]:
                changes["activation_offload"] = offload
            if mb != base["micro_batch_size"]:
                changes["micro_batch_size"] = mb
                changes["grad_accum_steps"] = accum * (base["micro_batch_size"] // mb)
            if rank != optim.rank:
                changes["optim.rank"] = rank
            chosen = ", ".join(f"{k}={v}" for k, v in changes.items()) or "the settings as configured"
            return FitPlan(changes, peak, total, f"fit: auto chose {chosen}; predicted peak {peak / GIB:.2f} GiB "
                                                 f"({load_and_step(load, step)}) of {total / GIB:.2f} GiB "
                                                 f"({FIT_FRACTION:.0%} limit {limit / GIB:.2f} GiB)", load, step)
    return None
