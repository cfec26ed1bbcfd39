"""ZeRO-3 for INT8 weights: each Int8Linear's codes live whole on one owner rank and are gathered for each use.

Every rank runs the same forward and backward, so every rank asks for the same layers in the same order; a gather
is one broadcast from the owner (its own buffers, no copy) into a fresh buffer on the others, dropped after use.

Prefetch follows a trace. The gather requests of one micro-batch (forward, and in the backward the recomputed
forwards of checkpointed layers and the backward uses) are recorded in order; from the next micro-batch on, the
request that follows each one in that trace is broadcast asynchronously while the current layer computes. Under
activation checkpointing the trace of the backward is the reverse layer order, each layer's modules in forward
order (its recompute), so the prediction is exact and no prefetch is thrown away; without checkpointing it is the
reverse module order. A micro-batch that leaves its trace (another model path, an evaluation forward) stops
prefetching until it ends, and becomes the next trace. The first micro-batch has no trace and gathers on demand.
A request for the module served just before it (a head's forward, then the start of its backward) reuses the codes
already there. A micro-batch starts at a forward request outside the backward after the backward began, or at the
first module of the recording.

Under checkpointing the forward runs twice: the recompute (a forward request made inside the backward) gathers
the layer's codes, and Int8Linear keeps them for the backward of the same layer (lowmem.model.int8_linear), so a
checkpointed weight is gathered twice per micro-batch, not three times. That keeps one decoder layer's codes alive
on every rank during its backward.

A wrong prediction costs a wait, never a mismatch: every rank sees the same requests and makes the same choice, the
pending broadcast is completed by every rank alike and dropped (counted in `prefetch_discards`).

Non-owners hold empty placeholders (0 elements, same dtype and device) in weight_q / weight_scales; their full
shapes are kept here. At most two gathered weights are alive at a time on a rank that owns neither (the one in use
and the prefetched one), plus the recomputed layer kept for its backward.
"""
from __future__ import annotations

from torch import Tensor

from lowmem.distributed import Comm
from lowmem.model.int8_linear import Int8Linear, inside_backward


class WeightPartition:
    """Partitions the codes of `modules` (Int8Linear -> owner rank) and serves gathers for them.

    Counters: gathers (broadcasts started), prefetch_hits (requests served by a prefetch), prefetch_discards
    (prefetched broadcasts thrown away). trace: the gather requests of the last complete micro-batch, in order.
    """

    def __init__(self, comm: Comm, owners: dict[Int8Linear, int]):
        self.comm = comm
        self.owners = dict(owners)
        self.shapes = {m: (tuple(m.weight_q.shape), tuple(m.weight_scales.shape)) for m in owners}
        self.trace: list[Int8Linear] = []
        self._recording: list[Int8Linear] = []
        self._on_trace = False          # every request of this micro-batch so far matched the trace
        self._backward_began = False
        self._pending: tuple[Int8Linear, tuple[Tensor, Tensor], list] | None = None
        self.gathers = 0
        self.prefetch_hits = 0
        self.prefetch_discards = 0
        for module, owner in self.owners.items():
            if owner != comm.rank:
                module.weight_q = module.weight_q.new_empty(0)
                module.weight_scales = module.weight_scales.new_empty(0)
            module.weight_gather = self.gather

    def owns(self, module: Int8Linear) -> bool:
        return self.owners[module] == self.comm.rank

    def local_bytes(self) -> int:
        """Bytes of INT8 codes + scales this rank holds."""
        return sum(m.weight_q.numel() * m.weight_q.element_size() +
                   m.weight_scales.numel() * m.weight_scales.element_size() for m in self.owners)

    def _start(self, module: Int8Linear) -> tuple[tuple[Tensor, Tensor], list]:
        owner = self.owners[module]
        if owner == self.comm.rank:
            codes = (module.weight_q, module.weight_scales)
        else:
            q_shape, s_shape = self.shapes[module]
            codes = (module.weight_q.new_empty(q_shape), module.weight_scales.new_empty(s_shape))
        works = [self.comm.broadcast_(codes[0], src=owner, async_op=True),
                 self.comm.broadcast_(codes[1], src=owner, async_op=True)]
        self.gathers += 1
        return codes, works

    @staticmethod
    def _wait(works: list) -> None:
        for work in works:
            if work is not None:
                work.wait()

    def _begin_micro_batch(self) -> None:
        if self._recording:
            self.trace = self._recording
        self._recording = []
        self._on_trace = bool(self.trace)
        self._backward_began = False

    def _take_pending(self, module: Int8Linear) -> tuple[Tensor, Tensor] | None:
        """The prefetched codes when they are `module`'s; a prefetch of another module is completed and dropped."""
        if self._pending is None:
            return None
        pending_module, codes, works = self._pending
        self._pending = None
        self._wait(works)
        if pending_module is module:
            self.prefetch_hits += bool(works)
            return codes
        self.prefetch_discards += bool(works)
        return None

    def _predicted_next(self, index: int, module: Int8Linear) -> Int8Linear | None:
        """The request the trace says follows request `index` (this one, for `module`); None off the trace."""
        self._on_trace = self._on_trace and index < len(self.trace) and self.trace[index] is module
        if not self._on_trace or index + 1 >= len(self.trace):
            return None
        return self.trace[index + 1]

    def gather(self, module: Int8Linear, phase: str) -> tuple[Tensor, Tensor]:
        """Full (weight_q, weight_scales) of `module` for one use (the owner's own buffers on the owner). phase:
        "forward" or "backward" (a forward inside the backward is a checkpoint's recompute)."""
        backward = inside_backward()
        if phase == "forward" and not backward and (
                self._backward_began or (self._recording and module is self._recording[0])):
            self._begin_micro_batch()
        self._backward_began = self._backward_began or backward or phase == "backward"
        index = len(self._recording)
        self._recording.append(module)
        codes = self._take_pending(module)
        if codes is None:
            codes, works = self._start(module)
            self._wait(works)
        upcoming = self._predicted_next(index, module)
        if upcoming is module:
            self._pending = (module, codes, [])        # asked for again next: keep what is here
        elif upcoming is not None:
            self._pending = (upcoming, *self._start(upcoming))
        return codes

    def flush(self) -> None:
        """Complete a prefetch still in flight and drop codes a recompute left for a backward that never came (end of
        a step, before saving or evaluating: the owners write their weights in between)."""
        if self._pending is not None:
            self._wait(self._pending[2])
            self.prefetch_discards += bool(self._pending[2])
            self._pending = None
        for module in self.owners:
            module.codes_for_backward = None

    def gather_all_(self) -> None:
        """Give every rank full codes and switch gathering off (export, whole-model reads on one rank);
        `release_` undoes it."""
        self.flush()
        for module in self.owners:
            codes, works = self._start(module)
            self._wait(works)
            module.weight_q, module.weight_scales = codes
            module.weight_gather = None

    def release_(self) -> None:
        self.flush()
        for module, owner in self.owners.items():
            if owner != self.comm.rank:
                module.weight_q = module.weight_q.new_empty(0)
                module.weight_scales = module.weight_scales.new_empty(0)
            module.weight_gather = self.gather

    def detach(self) -> None:
        self.flush()
        for module in self.owners:
            module.weight_gather = None
