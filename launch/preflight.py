"""Memory preflight: before any weight is loaded, say whether the run fits the device, and refuse if it does not.

This is the seam the memory planner plugs into: `check(cfg, model_config, device)` returns a `Preflight` verdict
(defined in `lowmem.memory`, re-exported here); `launch.finetune` prints it and stops with the named cheapest fix
when `fits` is False and `force` is not set.
"""
from __future__ import annotations

import torch

from lowmem.memory import Preflight, preflight

__all__ = ["Preflight", "check", "device_memory_bytes"]


def device_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return None


def check(cfg, model_config, device: torch.device, *, zero_stage: int = 0, world_size: int = 1) -> Preflight:
    """Verdict for `cfg` on `device` from lowmem.memory.preflight: one rank's peak under ZeRO `zero_stage` on
    `world_size` processes."""
    return preflight(cfg, model_config, device, zero_stage=zero_stage, world_size=world_size)
