"""Counting host-device synchronisations from Python: every Tensor -> Python value conversion is recorded.

On CUDA each of these (`item`, `__float__`, `__bool__`, `__int__`, `__index__`, `tolist`) waits for the stream; on
the CPU they are free but are the same lines of code, so counting them on CPU finds every synchronisation the
runtime would make on a GPU. Tensors that live on the CPU by design whatever the model's device (host-side
counters such as a state's "step") are excused by identity of their storage.

Reads made by inductor while it compiles a new graph (its constant folding reads a constant it built itself) are
kept apart in `compile_calls`: they happen once per graph and process, and not at all when the graph comes from
the FX-graph cache, so they are no part of any step. Dynamo's own reads (a 0-dim argument it specialises on,
which would recompile per value) are not excused: they stay in `calls`.
"""
from __future__ import annotations

import traceback
from contextlib import contextmanager

import torch

_METHODS = ("item", "__float__", "__bool__", "__int__", "__index__", "tolist")


class SyncCounter:
    def __init__(self, host_tensors=()):
        self.host_ptrs = {t.untyped_storage().data_ptr() for t in host_tensors}
        self.calls: list[str] = []
        self.compile_calls: list[str] = []

    @contextmanager
    def counting(self):
        originals = {name: getattr(torch.Tensor, name) for name in _METHODS}
        counter = self

        def wrap(name, original):
            def patched(tensor, *args, **kwargs):
                if tensor.untyped_storage().data_ptr() not in counter.host_ptrs:
                    where = counter.compile_calls if _in_inductor_compile() else counter.calls
                    where.append(f"{name} at {_caller()}")
                return original(tensor, *args, **kwargs)
            return patched

        for name, original in originals.items():
            setattr(torch.Tensor, name, wrap(name, original))
        try:
            yield self
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)


def _in_inductor_compile() -> bool:
    """Whether inductor (torch/_inductor) is on the stack: compiling a graph, not running one (a compiled kernel
    runs without Python frames of inductor's compiler)."""
    return any(frame.filename.replace("\\", "/").endswith("torch/_inductor/compile_fx.py")
               and frame.name.startswith(("compile_fx", "_compile_fx", "fw_compiler"))
               for frame in traceback.extract_stack()[:-3])


def _caller() -> str:
    """file:line of the innermost frame outside torch and this module (where the conversion was asked for)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "site-packages" not in frame.filename and not frame.filename.endswith("sync_counter.py"):
            return f"{frame.filename}:{frame.lineno}"
    return "?"


def host_state_tensors(runtime) -> list[torch.Tensor]:
    """The runtime's CPU-by-design state tensors: low-rank counters and refresh bookkeeping, float AdamW steps."""
    from lowmem.optim.lowrank import HOST_STATE_KEYS
    out = []
    for state in runtime.states.values():
        out.extend(t for k, t in state.items() if k in HOST_STATE_KEYS)
    return out
