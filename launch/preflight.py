"""Memory preflight: before any weight is loaded, say whether the run fits the device, and refuse if it does not.

This is the seam the memory planner plugs into: `check(cfg, model_config, device)` returns a `Preflight` verdict
(defined in `lowmem.memory`, re-exported here) on the larger of the load's and the step's predicted peaks (both in
the verdict: `load_peak_bytes`, `step_peak_bytes`, and in its detail line); `launch.finetune` prints it and stops with the named cheapest fix
when `fits` is False and `force` is not set, or with `fit: auto` first asks `fit_automatically` for the planner's
cheapest settings that fit.
"""
from __future__ import annotations

import dataclasses

import torch

from launch.config import OptimSection
from lowmem.memory import Preflight, auto_fit, preflight

__all__ = ["Preflight", "check", "device_memory_bytes", "fit_automatically"]


def device_memory_bytes(device: torch.device) -> int | None:
    """Memory a run can take on a CUDA device (lowmem.memory.fit: free memory, not the total); None elsewhere."""
    if device.type == "cuda":
        from lowmem.memory.fit import _device_bytes
        return _device_bytes(device)
    return None


def check(cfg, model_config, device: torch.device, *, zero_stage: int = 0, world_size: int = 1) -> Preflight:
    """Verdict for `cfg` on `device` from lowmem.memory.preflight: one rank's peak under ZeRO `zero_stage` on
    `world_size` processes."""
    return preflight(cfg, model_config, device, zero_stage=zero_stage, world_size=world_size)


def fit_automatically(cfg, model_config, device: torch.device, *, zero_stage: int = 0, world_size: int = 1):
    """fit: auto -> (the config with the planner's cheapest fitting settings applied, the line saying what it
    chose); the config unchanged and a line saying so when nothing tried fits."""
    plan = auto_fit(cfg, model_config, device, zero_stage=zero_stage, world_size=world_size)
    if plan is None:
        return cfg, ("fit: auto found no setting that fits (checkpointing, activation offload on a GPU, "
                     "micro-batch, rank down to 32)")
    changes = {k: v for k, v in plan.changes.items() if not k.startswith("optim.")}
    if "optim.rank" in plan.changes:
        changes["optim"] = OptimSection({**cfg.optim.to_dict(), "rank": plan.changes["optim.rank"]})
    return dataclasses.replace(cfg, **changes), plan.detail
