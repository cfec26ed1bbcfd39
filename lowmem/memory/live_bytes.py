"""Live tensor bytes: a memory meter that works on every device, CPU included.

`LiveTensorBytes` is a TorchDispatchMode. Every aten op run under it (forward, autograd's backward, the recompute
of `torch.utils.checkpoint`) passes through `__torch_dispatch__`; the storages its outputs own that did not exist
before the op are charged their size, and a `weakref.finalize` on each storage refunds the size when the storage
dies. So `live_bytes` is the bytes of tensor storages allocated under the mode and still alive, and `peak_bytes`
its maximum: the CPU twin of `torch.cuda.memory_allocated` / `max_memory_allocated`, minus whatever existed before
the mode was entered (add `baseline_bytes(...)` / `module_bytes(...)` of what should count, such as the model).

How identity works (the same mechanism as `torch.distributed._tools.mem_tracker`): PyTorch preserves the Python
object of an `UntypedStorage` for as long as its C++ StorageImpl lives, so `t.untyped_storage()` is the same object
for a tensor and all its views, and a weakref on it fires exactly when the memory is released. Views and in-place /
`out=` ops return storages that are already known (or belong to an input) and are not charged again.

Host memory: storages made inside `host_memory()` (lowmem.model.offload's host copies of checkpointed activations)
are charged to `host_live_bytes` / `host_peak_bytes`, not to the device's live / peak bytes, so the meter stays the
twin of the device allocator when activations are offloaded (on a CPU run the host is the same RAM; the split says
which bytes a GPU run would hold where).

Tensors read from files are charged: safetensors (`safe_open`, `load_file`) and `torch.load` (mmap or not) through
`aten.set_`, `torch.frombuffer` and work handed to a `ThreadPoolExecutor` (transformers' `from_pretrained`) through
`lowmem.memory.tensor_sources`, active while a meter is entered. A memory-mapped tensor is charged its size.

What it cannot see: memory an op's kernel allocates and frees internally (workspaces of matmul, SVD, ...), memory
outside tensors (CUDA context, allocator slack and fragmentation), tensors made while the mode is not active, work
of threads not started through a ThreadPoolExecutor, and `UntypedStorage.resize_` called directly (it bypasses
dispatch; `Tensor.resize_` is seen). `torch.tensor`, `as_tensor` and `from_numpy` under the mode are counted (they
reach modes through `aten.lift_fresh`). On CUDA each
storage is charged its size rounded up to the caching allocator's 512-byte block, as `torch.cuda.memory_allocated`
is.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

from lowmem.memory import tensor_sources

# The CUDA caching allocator hands out blocks in multiples of 512 bytes; memory_allocated() counts block sizes.
CUDA_BLOCK_BYTES = 512
UNTAGGED = "untagged"
_LIFT_FRESH = torch.ops.aten.lift_fresh.default


def _storages(t: Tensor) -> list[torch.UntypedStorage]:
    """The untyped storages that hold `t`'s data: one for a plain tensor, several for a wrapper subclass."""
    if is_traceable_wrapper_subclass(t):
        inner_names, _ = t.__tensor_flatten__()
        found: list[torch.UntypedStorage] = []
        for name in inner_names:
            inner = getattr(t, name)
            if isinstance(inner, Tensor):
                found.extend(_storages(inner))
        return found
    if t.layout != torch.strided:
        # Sparse / nested layouts have no single storage; not needed by lowmem (its sparse data are dense tensors).
        return []
    try:
        return [t.untyped_storage()]
    except (RuntimeError, NotImplementedError):
        # Some internal wrappers (functorch levels, ...) expose no storage; their inner tensors are seen when made.
        return []


_host_lock = threading.Lock()
_host_depth = 0


@contextlib.contextmanager
def host_memory() -> Iterator[None]:
    """Storages allocated in this block are host memory: meters charge them to host_live_bytes, not live_bytes.

    Process-wide (all threads), like LiveTensorBytes.tag: autograd may pack saved tensors on its device threads."""
    global _host_depth
    with _host_lock:
        _host_depth += 1
    try:
        yield
    finally:
        with _host_lock:
            _host_depth -= 1


def _in_host_memory() -> bool:
    return _host_depth > 0


def charged_bytes(storage: torch.UntypedStorage) -> int:
    """Bytes an allocator holds for `storage`: nbytes, rounded up to the 512-byte block on CUDA; 0 on meta."""
    nbytes = storage.nbytes()
    if storage.device.type == "meta":
        return 0
    if storage.device.type == "cuda" and nbytes > 0:
        return -(-nbytes // CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES
    return nbytes


def baseline_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views and tensors sharing storage count once).

    A view is charged its whole storage, since that is what stays allocated. Raises TypeError on a non-tensor.
    """
    seen: set[int] = set()
    total = 0
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"baseline_bytes expects an iterable of tensors; item {i} is {type(t).__name__}")
        for st in _storages(t):
            if st._cdata not in seen:
                seen.add(st._cdata)
                total += charged_bytes(st)
    return total


def module_bytes(module: nn.Module) -> int:
    """Bytes of `module`'s parameters and buffers, distinct storages (tied weights count once)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module_bytes expects a torch.nn.Module, got {type(module).__name__}")
    return baseline_bytes([*module.parameters(), *module.buffers()])


class _Record:
    """What is known about one tracked storage: its charged size, device and tag."""

    __slots__ = ("nbytes", "device", "tag", "host")

    def __init__(self, nbytes: int, device: str, tag: str, host: bool = False) -> None:
        self.nbytes = nbytes
        self.device = device
        self.tag = tag
        self.host = host     # made under host_memory(): counted apart from the device's bytes


class LiveTensorBytes(TorchDispatchMode):
    """Counts bytes of tensor storages allocated by ops run under it that are still alive; tracks the peak.

    Usage:
        meter = LiveTensorBytes(track_tags=True)
        with meter:
            with meter.tag("forward"):
                loss = model(x).sum()
            with meter.tag("backward"):
                loss.backward()
        meter.peak_bytes, meter.snapshot()["tags"]["backward"]["peak_bytes"]

    Attributes:
        live_bytes: bytes alive now (int), counted since the first entry.
        peak_bytes: max of live_bytes since the last __enter__ at depth 0 or reset_peak().
        allocated_bytes: cumulative bytes charged (never decreases; for "how much churn").
        host_live_bytes, host_peak_bytes: bytes alive now / at most of storages made under host_memory() (not in
            live_bytes or peak_bytes).

    Storages allocated under the mode keep being refunded when they die, also after the mode is exited. Thread
    safe: autograd may run backward ops and free storages on its device threads.
    """

    observes_tensor_sources = True   # lowmem.memory.tensor_sources charges frombuffer / thread-pool tensors to it

    def __init__(self, *, track_tags: bool = False) -> None:
        super().__init__()
        if not isinstance(track_tags, bool):
            raise TypeError(f"track_tags must be a bool, got {type(track_tags).__name__}")
        self.track_tags = track_tags
        self.live_bytes = 0
        self.peak_bytes = 0
        self.allocated_bytes = 0
        self.host_live_bytes = 0
        self.host_peak_bytes = 0
        self._records: dict[int, _Record] = {}  # storage._cdata -> record, only while the storage lives
        self._live_by_device: dict[str, int] = {}
        self._tag_live: dict[str, int] = {}
        self._tag_peak: dict[str, int] = {}
        self._tag_stack: list[str] = []
        self._depth = 0
        # Re-entrant: a refund can fire while we hold the lock (a storage dropped inside our own bookkeeping).
        self._lock = threading.RLock()

    # -- bookkeeping -------------------------------------------------------------------------------------------
    def _change(self, record: _Record, delta_bytes: int) -> None:
        with self._lock:
            if record.host:
                self.host_live_bytes += delta_bytes
                self.host_peak_bytes = max(self.host_peak_bytes, self.host_live_bytes)
                return
            self.live_bytes += delta_bytes
            if delta_bytes > 0:
                self.allocated_bytes += delta_bytes
            self._live_by_device[record.device] = self._live_by_device.get(record.device, 0) + delta_bytes
            if self.live_bytes > self.peak_bytes:
                self.peak_bytes = self.live_bytes
            if self.track_tags:
                live = self._tag_live.get(record.tag, 0) + delta_bytes
                self._tag_live[record.tag] = live
                if live > self._tag_peak.get(record.tag, 0):
                    self._tag_peak[record.tag] = live

    def _refund(self, key: int) -> None:
        with self._lock:
            record = self._records.pop(key, None)
            if record is not None:
                self._change(record, -record.nbytes)

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        nbytes = charged_bytes(storage)
        with self._lock:
            record = self._records.get(key)
            if record is not None:
                # A known storage came back (in-place, out=, resize_): charge any change in its size.
                if nbytes != record.nbytes:
                    delta = nbytes - record.nbytes
                    record.nbytes = nbytes
                    self._change(record, delta)
                return
            tag = self._tag_stack[-1] if self._tag_stack else UNTAGGED
            host = _in_host_memory()
            record = _Record(nbytes, "host" if host else str(storage.device), tag, host)
            self._records[key] = record
            self._change(record, nbytes)
        # The finalizer holds only the key; it runs when the StorageImpl (not just a Python handle) is freed.
        finalizer = weakref.finalize(storage, self._refund, key)
        finalizer.atexit = False

    def _observe(self, func, args, kwargs):
        """Run one aten op and charge the storages of its outputs that did not exist before (also called by the
        forwarding mode that runs thread-pool work on the meter's behalf: lowmem.memory.tensor_sources)."""
        if func is _LIFT_FRESH:
            # torch.tensor / as_tensor / from_numpy build the tensor below dispatch and hand it to modes as the
            # input of lift_fresh: it is new, although it is the op's input.
            input_keys: set[int] = set()
        else:
            flat_inputs, _ = tree_flatten((args, kwargs))
            input_keys = {st._cdata for a in flat_inputs if isinstance(a, Tensor) for st in _storages(a)}
        out = func(*args, **kwargs)
        flat_outputs, _ = tree_flatten(out)
        for t in flat_outputs:
            if not isinstance(t, Tensor):
                continue
            for st in _storages(t):
                key = st._cdata
                # An input's storage that we do not know existed before the mode (a view or in-place op on it):
                # not ours to count. An input's storage that we do know may have been resized (out=, resize_).
                if key in input_keys and key not in self._records:
                    continue
                self._track(st)
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self._observe(func, args, kwargs or {})

    # -- public ------------------------------------------------------------------------------------------------
    def __enter__(self) -> LiveTensorBytes:
        with self._lock:
            if self._depth == 0:
                self.peak_bytes = self.live_bytes
            self._depth += 1
        tensor_sources.install()
        return super().__enter__()

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        with self._lock:
            self._depth -= 1
        tensor_sources.uninstall()
        return super().__exit__(exc_type, exc_value, traceback)

    def charge(self, tensor: Tensor) -> None:
        """Charge `tensor`'s storages as allocated now (refunded when they die) unless already counted: for tensors
        made with no aten op (torch.frombuffer does this through lowmem.memory.tensor_sources)."""
        if not isinstance(tensor, Tensor):
            raise TypeError(f"charge expects a tensor, got {type(tensor).__name__}")
        for st in _storages(tensor):
            self._track(st)

    def reset_peak(self) -> None:
        """Set peak_bytes (and each tag's peak) to the bytes live now."""
        with self._lock:
            self.peak_bytes = self.live_bytes
            self._tag_peak = dict(self._tag_live)

    @contextlib.contextmanager
    def tag(self, name: str) -> Iterator[None]:
        """Attribute storages allocated inside this block to `name` (innermost tag wins when nested).

        A storage keeps its tag for life: bytes freed later (say activations freed in backward) are refunded to
        the tag that allocated them. The tag is shared by all threads, so backward ops on autograd's device
        threads are attributed to the tag around `loss.backward()`.
        """
        if not self.track_tags:
            raise RuntimeError("LiveTensorBytes.tag() needs LiveTensorBytes(track_tags=True)")
        if not isinstance(name, str) or not name:
            raise ValueError(f"tag name must be a non-empty str, got {name!r}")
        with self._lock:
            self._tag_stack.append(name)
            self._tag_live.setdefault(name, 0)
            self._tag_peak.setdefault(name, 0)
        try:
            yield
        finally:
            with self._lock:
                self._tag_stack.pop()

    def live_bytes_on(self, device: str | torch.device) -> int:
        """Live bytes on one device, e.g. "cpu" or "cuda:0" (a bare "cuda" means the current CUDA device)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        with self._lock:
            return self._live_by_device.get(str(device), 0)

    def snapshot(self) -> dict[str, Any]:
        """Plain-data view of the counters (JSON-serialisable):

        {"live_bytes": int, "peak_bytes": int, "allocated_bytes": int, "tracked_storages": int,
         "live_bytes_by_device": {"cpu": int, ...}, "host_live_bytes": int, "host_peak_bytes": int,
         "tags": {name: {"live_bytes": int, "peak_bytes": int}, ...}}   # "tags" only with track_tags=True
        """
        with self._lock:
            snap: dict[str, Any] = {
                "live_bytes": self.live_bytes,
                "peak_bytes": self.peak_bytes,
                "allocated_bytes": self.allocated_bytes,
                "tracked_storages": len(self._records),
                "live_bytes_by_device": {d: b for d, b in self._live_by_device.items() if b != 0},
                "host_live_bytes": self.host_live_bytes,
                "host_peak_bytes": self.host_peak_bytes,
            }
            if self.track_tags:
                snap["tags"] = {
                    name: {"live_bytes": live, "peak_bytes": self._tag_peak.get(name, 0)}
                    for name, live in self._tag_live.items()
                }
            return snap


def measure(fn: Callable[[], object], *, device: torch.device, baseline_tensors: Iterable[torch.Tensor] = ()) -> int:
    """Peak bytes while running fn(), counting `baseline_tensors` (model, optimizer state) as live from the start.

    CUDA: torch.cuda.max_memory_allocated during fn minus memory_allocated before, plus the baseline's bytes.
    CPU: lowmem.memory.live_bytes.LiveTensorBytes. The baseline storages are charged into the counter and refunded when
    they die, so state that fn replaces (new moments written over old) is not counted twice. Pass a generator or a
    list nobody else keeps: measure holds only weak references once it has read them.
    """
    device = torch.device(device)
    if device.type == "cuda":
        base = baseline_bytes(baseline_tensors)
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before + base)
    if device.type != "cpu":
        raise ValueError(f"measure supports cuda and cpu devices, got {device}")
    storages = {}
    for i, t in enumerate(baseline_tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"baseline_tensors must hold tensors; item {i} is {type(t).__name__}")
        for st in _storages(t):
            storages.setdefault(st._cdata, st)
    del baseline_tensors
    meter = LiveTensorBytes()
    with meter:
        for st in storages.values():
            meter._track(st)    # charged now, refunded by the counter's own finalizer when the storage dies
        storages.clear()
        meter.reset_peak()
        fn()
    return int(meter.peak_bytes)
