"""Tensors that reach a program without an aten op in the metered thread, made visible to LiveTensorBytes.

`lowmem.memory.live_bytes.LiveTensorBytes` charges the storages that ops return, and torch hands ops to a dispatch
mode only on the thread that entered it. Two ways of getting tensors from files slip past that:

  torch.frombuffer      builds a tensor over a Python buffer with no aten op at all (safetensors.torch.load of
                        bytes, hand-rolled readers). Wrapped while a meter is active: the new tensor's storage is
                        charged to every meter on the calling thread's mode stack.
  thread pools          transformers' `from_pretrained` materialises each checkpoint tensor in a
                        `concurrent.futures.ThreadPoolExecutor` worker (transformers.core_model_loading), where no
                        mode is active, so a whole model loaded under a meter used to count 0 bytes. While a meter
                        is active, `ThreadPoolExecutor.submit` from a metered thread wraps the job so that it runs
                        under the same meters (a forwarding mode per meter, pushed on the worker's own stack).

Already seen without help (tested in tests/unit/lowmem/memory/test_live_bytes.py): safetensors `safe_open(...)
.get_tensor` / `get_slice` and `load_file` and `torch.load` (with or without mmap=True) reach the meter through
`aten.set_` with a fresh storage; `torch.tensor` / `from_numpy` through `aten.lift_fresh`. A memory-mapped
storage is charged its size like any other: it is what the tensor holds (on a CPU run the pages count in the
process's resident set once touched; on a GPU run it is the host-side copy the device copy is made from).

The patches are process-wide and installed only while at least one meter is entered (reference-counted), so code
that never meters runs the original functions. Work that threads start by other means (threading.Thread, native
thread pools) is not followed.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import threading
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack

__all__ = ["active_meters", "install", "uninstall"]

_lock = threading.Lock()
_installs = 0
_original_frombuffer: Callable[..., torch.Tensor] | None = None
_original_submit: Callable[..., concurrent.futures.Future] | None = None


class _ForwardingMode(TorchDispatchMode):
    """Runs on a pool worker on behalf of one meter of the submitting thread: every op goes to that meter."""

    def __init__(self, meter) -> None:
        super().__init__()
        self.meter = meter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.meter._observe(func, args, kwargs or {})


def active_meters() -> list:
    """The meters (LiveTensorBytes) active on this thread, outermost first, those forwarded to a worker included."""
    meters = []
    for mode in _get_current_dispatch_mode_stack():
        meter = mode.meter if isinstance(mode, _ForwardingMode) else mode
        if getattr(meter, "observes_tensor_sources", False) and meter not in meters:
            meters.append(meter)
    return meters


def _frombuffer(*args: Any, **kwargs: Any) -> torch.Tensor:
    tensor = _original_frombuffer(*args, **kwargs)
    for meter in active_meters():
        meter.charge(tensor)
    return tensor


def _run_under(meters: tuple, fn: Callable, *args: Any, **kwargs: Any):
    with contextlib.ExitStack() as stack:
        for meter in meters:
            stack.enter_context(_ForwardingMode(meter))
        return fn(*args, **kwargs)


def _submit(self, fn, /, *args, **kwargs):
    meters = tuple(active_meters())
    if meters:
        fn = functools.partial(_run_under, meters, fn)
    return _original_submit(self, fn, *args, **kwargs)


def install() -> None:
    """Patch torch.frombuffer and ThreadPoolExecutor.submit (first call), count the others. Pair with uninstall."""
    global _installs, _original_frombuffer, _original_submit
    with _lock:
        _installs += 1
        if _installs == 1:
            _original_frombuffer = torch.frombuffer
            _original_submit = concurrent.futures.ThreadPoolExecutor.submit
            torch.frombuffer = _frombuffer
            concurrent.futures.ThreadPoolExecutor.submit = _submit


def uninstall() -> None:
    """Undo one install(); the last one restores the original functions."""
    global _installs
    with _lock:
        if _installs == 0:
            raise RuntimeError("tensor_sources.uninstall() without a matching install()")
        _installs -= 1
        if _installs == 0:
            torch.frombuffer = _original_frombuffer
            concurrent.futures.ThreadPoolExecutor.submit = _original_submit
