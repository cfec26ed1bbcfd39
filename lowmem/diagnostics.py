"""Device-wait auditor: every op that would make the host wait for a GPU, found on any device (the CPU included).

    with DeviceWaitAuditor(host_tensors=counters) as audit:
        loss.backward()
    assert audit.hits == [], audit.report()

On CUDA an op waits for the device when its result's size or value must reach the host before the next launch:
`nonzero` (and what lowers to it: `torch.where(cond)`, boolean-mask indexing and `index_put_`, `masked_select`),
`unique` / `unique_consecutive`, `repeat_interleave` without `output_size`, `bincount`, `_local_scalar_dense`
(`item()`, `float()`, `int()`, `bool()`, `if tensor:`), `equal` / `allclose` / `is_nonzero`, `tolist()` / `numpy()`,
the linear-algebra ops that check their info on the host (`svd`, `eigh`, `eig`, `pinv`, `cond`), and a blocking
copy from the device to the host. On the CPU none of these waits, but the same lines of code run, so the auditor,
a TorchDispatchMode, records them there too: each hit names the op, why it waits, and the innermost frame of
lowmem's own code that asked for it (`caller`: "lowmem/optim/rowgrad.py:41 in from_lookup").

Host-resident tensors (by design on the CPU whatever the model's device: a state's step counter) are read freely.
On an accelerator every CPU tensor is one. On the CPU nothing tells them apart, so the rule is: the tensors passed
as `host_tensors`, their views, and every tensor an op computes from host tensors only (tracked by storage, held
weakly) are host-resident; every other tensor stands for a device tensor. Waits the design needs (a refresh step's
range-finder decision) are listed in `allowed` as `AllowedWait(op, where)` and land in `allowed_hits`, not `hits`.

What it cannot see: `Tensor.cpu()` / `.to("cpu")` of a CPU tensor (no op runs; on a GPU run the copy rule above
sees them), stream or event synchronisation (`torch.cuda.synchronize`: not an op), and ops inside a compiled graph
(quant.compiled runs the eager twin under any dispatch mode, so the audited step runs the twins' ops).
"""
from __future__ import annotations

import traceback
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_ROOT = Path(__file__).resolve().parent.parent
# lowmem's own code, where a caller is looked for (tests and torch are not callers)
_PACKAGES = tuple(str(_ROOT / name) + "/" for name in ("lowmem", "quant", "hooks", "launch"))
_THIS_FILE = str(Path(__file__).resolve())

_aten = torch.ops.aten
# op overload packet -> why it waits (every overload of each counts)
_ALWAYS_WAITS = {
    _aten.nonzero: "output size depends on values",
    _aten.masked_select: "output size depends on values",
    _aten.unique_consecutive: "output size depends on values",
    _aten.unique_dim: "output size depends on values",
    _aten._unique: "output size depends on values",
    _aten._unique2: "output size depends on values",
    _aten.unique_dim_consecutive: "output size depends on values",
    _aten.bincount: "output size depends on values (max)",
    _aten._local_scalar_dense: "reads a device value on the host (item/float/int/bool)",
    _aten.is_nonzero: "reads a device value on the host (bool)",
    _aten.equal: "returns a host bool",
    _aten.allclose: "returns a host bool",
    _aten._linalg_svd: "checks the solver's info on the host",
    _aten._linalg_eigh: "checks the solver's info on the host",
    _aten.linalg_eig: "checks the solver's info on the host",
    _aten.linalg_pinv: "checks the solver's info on the host",
    _aten.linalg_cond: "checks the solver's info on the host",
}
_INDEX_OPS = (_aten.index, _aten.index_put, _aten.index_put_, _aten._index_put_impl_)


@dataclass(frozen=True)
class DeviceWait:
    """One op that would wait for the device: op name ("nonzero"), why, where ("lowmem/optim/rowgrad.py:from_lookup":
    the innermost lowmem frame's file and function), via (the same for a library frame between it and torch, such
    as "transformers/masking_utils.py:find_packed_sequence_indices", else None) and caller (with line numbers)."""
    op: str
    reason: str
    where: str
    via: str | None
    caller: str

    def __str__(self) -> str:
        return f"{self.op} at {self.caller} ({self.reason})"


@dataclass(frozen=True)
class AllowedWait:
    """A wait the design needs: `op` (the aten name, e.g. "_local_scalar_dense", or "tolist") called from `where`,
    "path/file.py:function" of lowmem's innermost frame or of the library frame the call went through."""
    op: str
    where: str

    def matches(self, wait: DeviceWait) -> bool:
        return wait.op == self.op and self.where in (wait.where, wait.via)


class DeviceWaitAuditor(TorchDispatchMode):
    """Records ops that wait for the device (module docstring) while active. `hits`: the unexpected ones;
    `allowed_hits`: those matching `allowed`. host_tensors: tensors resident on the host by design."""

    def __init__(self, host_tensors=(), allowed: tuple[AllowedWait, ...] | list[AllowedWait] = ()):
        super().__init__()
        self._host_storages: weakref.WeakSet = weakref.WeakSet()
        for tensor in host_tensors:
            self.mark_host(tensor)
        self.allowed = tuple(allowed)
        self.hits: list[DeviceWait] = []
        self.allowed_hits: list[DeviceWait] = []
        self._patched: dict[str, object] = {}

    def mark_host(self, tensor: Tensor) -> None:
        """Declare `tensor` (and its views) host-resident by design."""
        self._host_storages.add(tensor.untyped_storage())

    def _is_host(self, tensor: Tensor) -> bool:
        if tensor.device.type != "cpu":
            return False
        if _accelerator_in_use():
            return True
        try:
            return tensor.untyped_storage() in self._host_storages
        except (RuntimeError, NotImplementedError):   # a tensor without storage (a fake or meta tensor)
            return False

    # -- the dispatch hook ----------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, Tensor)]
        reason = self._waits(func, args, kwargs, inputs)
        if reason is not None:
            self._record(func.overloadpacket.__name__, reason)
        out = func(*args, **kwargs)
        if inputs and all(self._is_host(t) for t in inputs):
            for t in tree_flatten(out)[0]:
                if isinstance(t, Tensor) and t.device.type == "cpu":
                    self.mark_host(t)
        return out

    def _waits(self, func, args, kwargs, inputs: list[Tensor]) -> str | None:
        packet = func.overloadpacket
        if packet in _ALWAYS_WAITS:
            if inputs and all(self._is_host(t) for t in inputs):
                return None
            return _ALWAYS_WAITS[packet]
        if packet in _INDEX_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, Tensor) and i.dtype == torch.bool and not self._is_host(i) for i in indices):
                return "boolean-mask index: output size depends on values"
            return None
        if packet is _aten.repeat_interleave and func is _aten.repeat_interleave.Tensor:
            if kwargs.get("output_size") is None and not self._is_host(args[0]):
                return "repeat_interleave without output_size"
            return None
        if packet in (_aten._to_copy, _aten.copy_):
            return _blocking_copy_to_host(func, args, kwargs)
        return None

    def _record(self, op: str, reason: str) -> None:
        wait = DeviceWait(op, reason, *_lowmem_caller())
        if any(allow.matches(wait) for allow in self.allowed):
            self.allowed_hits.append(wait)
        else:
            self.hits.append(wait)

    # -- reads that never reach the dispatcher --------------------------------------------------------------------
    def __enter__(self):
        auditor = self
        for name in ("tolist", "numpy"):
            original = getattr(Tensor, name)
            self._patched[name] = original

            def patched(tensor, *a, _original=original, _name=name, **kw):
                if not auditor._is_host(tensor):
                    auditor._record(_name, "copies a device tensor to the host")
                return _original(tensor, *a, **kw)
            setattr(Tensor, name, patched)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for name, original in self._patched.items():
                setattr(Tensor, name, original)
            self._patched.clear()

    # -- results ----------------------------------------------------------------------------------------------------
    def counts(self, allowed: bool = False) -> dict[str, int]:
        """{op name: number of hits} (of `allowed_hits` with allowed=True)."""
        out: dict[str, int] = {}
        for wait in (self.allowed_hits if allowed else self.hits):
            out[wait.op] = out.get(wait.op, 0) + 1
        return out

    def report(self) -> str:
        """One line per distinct (op, caller) with its count: unexpected waits first, then allowed ones."""
        lines = []
        for title, waits in (("waits", self.hits), ("allowed waits", self.allowed_hits)):
            seen: dict[str, int] = {}
            for wait in waits:
                seen[str(wait)] = seen.get(str(wait), 0) + 1
            lines += [f"{title}: {len(waits)}"] + [f"  {n} x {w}" for w, n in seen.items()]
        return "\n".join(lines)


def _accelerator_in_use() -> bool:
    """Whether CUDA is initialised in this process: then a CPU tensor is host-resident (no tagging needed)."""
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _blocking_copy_to_host(func, args, kwargs) -> str | None:
    """A device -> host copy that is not non_blocking (seen on an accelerator only: on the CPU there is no copy)."""
    if kwargs.get("non_blocking") or (len(args) > 2 and args[2] is True):
        return None
    if func.overloadpacket is _aten._to_copy:
        target = kwargs.get("device")
        if args[0].device.type != "cpu" and target is not None and torch.device(target).type == "cpu":
            return "blocking copy from the device to the host"
        return None
    dst, src = args[0], args[1]
    if isinstance(src, Tensor) and src.device.type != "cpu" and dst.device.type == "cpu":
        return "blocking copy from the device to the host"
    return None


def _lowmem_caller() -> tuple[str, str | None, str]:
    """(where, via, caller) for DeviceWait: the innermost frame in lowmem's packages (the test or script that ran
    the step when none is) and a library frame between it and torch (a Hugging Face model's code), if any."""
    stack = [f for f in traceback.extract_stack() if f.filename != _THIS_FILE]
    library = next((k for k in range(len(stack) - 1, -1, -1)
                    if "/torch/" not in stack[k].filename and "site-packages" in stack[k].filename), None)
    own = next((k for k in range(len(stack) - 1, -1, -1)
                if not stack[k].filename.startswith("<")
                and str(Path(stack[k].filename).resolve()).startswith(_PACKAGES)), None)
    if own is None:
        own = next((k for k in range(len(stack) - 1, -1, -1) if "site-packages" not in stack[k].filename
                    and "/torch/" not in stack[k].filename), None)
        if own is None:
            return "?", None, "?"
        path = stack[own].filename
    else:
        path = str(Path(stack[own].filename).resolve().relative_to(_ROOT))
    frame = stack[own]
    where, caller, via = f"{path}:{frame.name}", f"{path}:{frame.lineno} in {frame.name}", None
    if library is not None and library > own:
        lib = stack[library]
        via = f"{_short(lib.filename)}:{lib.name}"
        caller += f" via {_short(lib.filename)}:{lib.lineno} in {lib.name}"
    return where, via, caller


def _short(filename: str) -> str:
    return filename.split("site-packages/", 1)[-1]
