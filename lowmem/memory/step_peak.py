"""Peak memory of one optimizer step: the high-water mark is reset when the step starts and read when it ends.

CUDA: the caching allocator's peak (`torch.cuda.reset_peak_memory_stats` at the step's first micro-batch,
`torch.cuda.max_memory_allocated` in `step()`): the most tensor bytes allocated at once during the step, model and
optimizer state included (they are allocated), model loading and earlier steps not. It does not count the CUDA
context or the allocator's cached-but-free blocks (`torch.cuda.max_memory_reserved` would).

CPU: the process's peak resident set (Linux VmHWM, which `ru_maxrss` reports too), reset at the step's start by
writing "5" to /proc/self/clear_refs (Linux >= 4.0). What RSS can say: the most physical memory the process held
during the step. What it cannot: which of it is tensors (Python, libraries and the allocator's free lists count
too; memory glibc keeps after a `free` stays resident, so a peak never falls below what earlier steps left
resident), and pages that were allocated but never touched are not counted. Where the reset is refused (not
Linux, or /proc read-only), the value is the process-lifetime peak and `step_peak_resets(device)` says False.
lowmem.memory.live_bytes.LiveTensorBytes is the exact tensor-bytes meter on the CPU (tests, the planner).
Resetting the process's high-water mark also resets it for anyone else reading `ru_maxrss` in this process.
"""
from __future__ import annotations

import resource

import torch

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"
_cpu_reset_works: bool | None = None


def reset_step_peak(device: torch.device) -> bool:
    """Start a new high-water mark for `device` (see the module docstring). Returns whether it was reset."""
    global _cpu_reset_works
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    if _cpu_reset_works is False:
        return False
    try:
        with open(_CLEAR_REFS, "w") as handle:
            handle.write("5")
        _cpu_reset_works = True
    except OSError:
        _cpu_reset_works = False
    return _cpu_reset_works


def step_peak_resets(device: torch.device) -> bool:
    """Whether `step_peak_bytes` measures from the last reset (True on CUDA; on the CPU once a reset worked)."""
    return device.type == "cuda" or bool(_cpu_reset_works)


def step_peak_bytes(device: torch.device) -> int:
    """Bytes at the high-water mark since the last `reset_step_peak(device)`: allocator peak on CUDA, peak resident
    set on the CPU (module docstring)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open(_STATUS) as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
