"""Memory preflight: before any weight is loaded, say whether the run fits the device, and refuse if it does not.

This is the seam the memory planner (`lowmem.memory.estimate`) plugs into: `check(cfg, model_config, device)`
returns a `Preflight` verdict; `launch.finetune` prints it and stops with the named cheapest fix when
`fits` is False and `force` is not set. Without a planner the verdict is "unknown" and the run proceeds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Preflight:
    fits: bool | None            # None: no estimate available
    predicted_peak_bytes: int | None
    device_bytes: int | None
    cheapest_fix: str | None     # e.g. "optim.rank=128 (saves 1.2 GiB)"
    detail: str                  # one paragraph for the console


def device_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return None


def check(cfg, model_config, device: torch.device) -> Preflight:
    """Verdict for `cfg` on `device`; uses lowmem.memory when it is available."""
    try:
        from lowmem import memory  # noqa: F401  (arrives with the memory planner)
    except ImportError:
        return Preflight(None, None, device_memory_bytes(device), None,
                         "memory preflight: no planner installed in this version; not checked")
    return memory.preflight(cfg, model_config, device)  # pragma: no cover - the planner's own tests cover it
