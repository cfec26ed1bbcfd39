"""Activation offload: the inputs that gradient checkpointing keeps wait in (pinned) host memory, not on the GPU.

    enable_offloaded_checkpointing(model)      # instead of model.gradient_checkpointing_enable(...)

With non-reentrant checkpointing (torch.utils.checkpoint, use_reentrant=False) each decoder layer keeps only its
input between forward and backward: L x (tokens, hidden) in the compute dtype, 0.78 GiB for Llama-2-13B at 2048
tokens, the largest activation term left. Checkpoint saves that input through autograd's saved-tensor hooks (the
checkpoint's own hooks, which drop everything inside the layer, start after it), so wrapping each checkpointed call
in `saved_tensors_hooks(pack, unpack)` moves exactly the layer inputs, and the result is bit-identical to plain
checkpointing: the same values take the same ops.

The schedule (an `ActivationOffloader` per model; copies on a side stream, so none of them waits in line with the
compute kernels):
- forward, layer i starts: its input is copied device -> host on the side stream (after the side stream waits for
  the compute stream to have produced it) into a pinned host buffer, and an event is recorded. The device tensor is
  kept until layer i + 1 starts; then the compute stream waits for that event (the copy has had a whole layer's
  compute to finish) and the reference is dropped, so the caching allocator cannot hand the block to a kernel while
  the copy still reads it. The last layer's input is never released in the forward: its recompute, the first thing
  the backward does, uses it as is.
- backward, layer i's recompute asks for its input: a prefetched copy (the compute stream waits for its event), or
  the kept device tensor, or, failing both, a copy made now. Then layer i - 1's input is prefetched host -> device
  on the side stream into a tensor allocated on the compute stream (the side stream first waits for the compute
  stream, whose queued kernels may still use that block), while layer i recomputes and runs its backward.
- host buffers are pooled by (dtype, shape) and reused by the next micro-batch. Reuse needs no wait: every copy in
  and out of a host buffer runs on the one side stream, in issue order. A buffer returns to the pool when autograd
  drops the saved input (after that layer's backward), so a retained graph can unpack it again.
The compute stream waits only where it must: before a kept input is released (once per layer) and before a copy
brought back is used (once per layer). At most two layer inputs are on the device at a time: in the forward the
current layer's input and the output it becomes, in the backward the recomputed layer's input and the prefetched
one before it; during the loss and the head only the last layer's.

On a device without streams (the CPU, where the host is the device: launch leaves offload off there, the tests use
it with the live-tensor counter, whose `host_memory` split counts the host copies) the same schedule runs with plain
copies (`HostCopies`). `Transfers` is the seam: tests inject a fake that records the order of copies and waits.
"""
from __future__ import annotations

import weakref
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lowmem.memory.live_bytes import host_memory

__all__ = ["ActivationOffloader", "CudaTransfers", "HostCopies", "Transfers", "enable_offloaded_checkpointing",
           "offloaded_checkpoint"]


class Transfers(Protocol):
    """Where the offload copies run and how the compute stream waits for them. An event is whatever `wait` takes
    (None when a copy is complete on return)."""

    def to_host(self, src: Tensor, dst: Tensor) -> Any:
        """Start copying device tensor `src` into host buffer `dst`; return its completion event."""

    def to_device(self, src: Tensor, device: torch.device) -> tuple[Tensor, Any]:
        """Start copying host buffer `src` to a new tensor on `device`; return (that tensor, completion event)."""

    def wait(self, event: Any) -> None:
        """Make the compute stream wait for `event` (on the device: the host never blocks)."""


class HostCopies:
    """Transfers for a device without streams (the CPU): each copy is complete when it returns."""

    def to_host(self, src: Tensor, dst: Tensor) -> None:
        dst.copy_(src)

    def to_device(self, src: Tensor, device: torch.device) -> tuple[Tensor, None]:
        return src.to(device, copy=True), None

    def wait(self, event: None) -> None:
        pass


class CudaTransfers:
    """Transfers on one side CUDA stream of `device`, ordered against the current (compute) stream by events."""

    def __init__(self, device: torch.device):
        self.side = torch.cuda.Stream(device)

    def to_host(self, src: Tensor, dst: Tensor) -> torch.cuda.Event:
        self.side.wait_stream(torch.cuda.current_stream(src.device))   # src has been computed
        with torch.cuda.stream(self.side):
            dst.copy_(src, non_blocking=True)
            return self.side.record_event()

    def to_device(self, src: Tensor, device: torch.device) -> tuple[Tensor, torch.cuda.Event]:
        out = torch.empty(src.shape, dtype=src.dtype, device=device)     # a block of the compute stream's pool
        self.side.wait_stream(torch.cuda.current_stream(device))         # its previous users are done with it
        with torch.cuda.stream(self.side):
            out.copy_(src, non_blocking=True)
            return out, self.side.record_event()

    def wait(self, event: torch.cuda.Event) -> None:
        torch.cuda.current_stream().wait_event(event)


class _SavedInput:
    """One saved layer input: its host copy, and while it has one, a device tensor (the original until released,
    or a prefetched copy). Gives the host buffer back to the pool when autograd drops it."""

    def __init__(self, layer: int, device: torch.device, host: Tensor, pool: list[Tensor], transfers: Transfers):
        self.layer, self.device, self.host = layer, device, host
        self.original: Tensor | None = None
        self.to_host_event: Any = None
        self.prefetched: tuple[Tensor, Any] | None = None
        self.unpacked = False
        self._pool, self._transfers = pool, transfers

    def release_original(self) -> None:
        if self.original is not None:
            self._transfers.wait(self.to_host_event)
            self.original = None

    def __del__(self) -> None:
        if self.prefetched is not None:    # brought back but never used: its copy must end before the block is reused
            self._transfers.wait(self.prefetched[1])
        self._pool.append(self.host)


class ActivationOffloader:
    """Offloads the saved inputs of the checkpointed calls it runs (`checkpoint`), on the schedule of the module
    docstring. transfers: None picks CudaTransfers for CUDA tensors and HostCopies otherwise.

    host_buffers_allocated: host buffers made so far (reused afterwards: a steady run makes L of them)."""

    def __init__(self, transfers: Transfers | None = None):
        self._transfers = transfers
        self._by_device: dict[torch.device, Transfers] = {}
        self._pools: dict[tuple, list[Tensor]] = {}
        self._layer = -1
        self._kept: list[_SavedInput] = []                       # the current layer's inputs, originals still held
        self._waiting: dict[int, list[weakref.ref]] = {}          # layer -> its inputs not unpacked yet
        self.host_buffers_allocated = 0

    def release_host_buffers(self) -> int:
        """Free the pooled host buffers not in use (a run whose shapes changed keeps one set per shape); returns
        how many were freed."""
        freed = sum(len(pool) for pool in self._pools.values())
        for pool in self._pools.values():
            pool.clear()
        return freed

    def transfers_for(self, device: torch.device) -> Transfers:
        if self._transfers is not None:
            return self._transfers
        if device not in self._by_device:
            self._by_device[device] = CudaTransfers(device) if device.type == "cuda" else HostCopies()
        return self._by_device[device]

    def checkpoint(self, function, *args: Any, **kwargs: Any):
        """torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs) whose saved inputs wait
        in host memory until the backward recomputes `function`. A drop-in `_gradient_checkpointing_func` for
        Hugging Face layers (they pass the layer's forward with its keyword arguments bound, tensors positionally)."""
        kwargs.setdefault("use_reentrant", False)
        if kwargs["use_reentrant"]:
            raise ValueError("offloaded_checkpoint needs non-reentrant checkpointing (use_reentrant=False): reentrant "
                             "checkpointing keeps its inputs outside autograd's saved-tensor hooks")
        if torch.is_grad_enabled():
            self._next_layer()
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            return checkpoint(function, *args, **kwargs)

    def _next_layer(self) -> None:
        for saved in self._kept:     # the previous layer's input copies have had that layer's compute to finish
            saved.release_original()
        self._kept = []
        self._layer += 1

    def _host_buffer(self, tensor: Tensor) -> tuple[Tensor, list[Tensor]]:
        pinned = tensor.device.type == "cuda"
        pool = self._pools.setdefault((tensor.dtype, tuple(tensor.shape), pinned), [])
        if not pool:
            with host_memory():
                pool.append(torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pinned))
            self.host_buffers_allocated += 1
        return pool.pop(), pool

    def _pack(self, tensor: Tensor) -> _SavedInput:
        transfers = self.transfers_for(tensor.device)
        host, pool = self._host_buffer(tensor)
        saved = _SavedInput(self._layer, tensor.device, host, pool, transfers)
        saved.to_host_event = transfers.to_host(tensor, host)
        saved.original = tensor
        self._kept.append(saved)
        self._waiting.setdefault(self._layer, []).append(weakref.ref(saved))
        return saved

    def _unpack(self, saved: _SavedInput) -> Tensor:
        transfers = self.transfers_for(saved.device)
        if saved.original is not None:          # the last layer's input: never left the device
            tensor = saved.original
            saved.release_original()
            self._kept = [s for s in self._kept if s is not saved]
        elif saved.prefetched is not None:
            (tensor, event), saved.prefetched = saved.prefetched, None
            transfers.wait(event)
        else:                                    # not predicted (or unpacked again under retain_graph)
            tensor, event = transfers.to_device(saved.host, saved.device)
            transfers.wait(event)
        if not saved.unpacked:
            saved.unpacked = True
            self._prefetch_before(saved.layer)
        return tensor

    def _prefetch_before(self, layer: int) -> None:
        """Bring back the inputs of the latest layer before `layer` whose inputs are still waiting: the one the
        backward reaches next."""
        for key in [k for k, refs in self._waiting.items() if not any(r() is not None and not r().unpacked
                                                                     for r in refs)]:
            del self._waiting[key]
        earlier = [k for k in self._waiting if k < layer]
        if not earlier:
            return
        for ref in self._waiting[max(earlier)]:
            saved = ref()
            if saved is not None and not saved.unpacked and saved.original is None and saved.prefetched is None:
                saved.prefetched = self.transfers_for(saved.device).to_device(saved.host, saved.device)


_DEFAULT = ActivationOffloader()


def offloaded_checkpoint(function, *args: Any, **kwargs: Any):
    """`ActivationOffloader.checkpoint` of a process-wide offloader (its schedule spans every model that uses it:
    `enable_offloaded_checkpointing` gives each model its own)."""
    return _DEFAULT.checkpoint(function, *args, **kwargs)


def enable_offloaded_checkpointing(model: nn.Module, offloader: ActivationOffloader | None = None) -> int:
    """Turn on non-reentrant gradient checkpointing of a Hugging Face model with offloaded layer inputs (a new
    ActivationOffloader unless one is given). Returns the number of checkpointed modules; raises TypeError for a
    model that has no gradient checkpointing and ValueError when enabling it marked no module (an architecture whose
    layers transformers does not checkpoint)."""
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if enable is None:
        raise TypeError(f"{type(model).__name__} has no gradient_checkpointing_enable(); activation offload works on "
                        "Hugging Face models with gradient checkpointing")
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True
              and hasattr(m, "_gradient_checkpointing_func")]
    if not layers:
        raise ValueError(f"gradient checkpointing marked no module of {type(model).__name__}; activation offload "
                         "has nothing to offload")
    offloader = offloader or ActivationOffloader()
    for layer in layers:
        layer._gradient_checkpointing_func = offloader.checkpoint
    return len(layers)
