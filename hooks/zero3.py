"""ZeRO-3 for INT8 weights: each Int8Linear's codes live whole on one owner rank and are gathered for each use.

Every rank runs the same forward and backward, so every rank asks for the same layers in the same order; a gather
is one broadcast from the owner (its own buffers, no copy) into a fresh buffer on the others, dropped after use.
One layer ahead is prefetched: when layer i is asked for in forward, the broadcast of the layer that followed i in
the first recorded forward starts asynchronously (in backward, the one that preceded it). A prediction that turns
out wrong (activation checkpointing recomputation, a module used out of order) costs a wait, never a mismatch:
the pending broadcast is completed by every rank alike and dropped.

Non-owners hold empty placeholders (0 elements, same dtype and device) in weight_q / weight_scales; their full
shapes are kept here. At most two gathered layers are alive at a time on a rank that owns neither: the one in use
and the prefetched one.
"""
from __future__ import annotations

from torch import Tensor

from lowmem.distributed import Comm
from lowmem.model.int8_linear import Int8Linear


class WeightPartition:
    """Partitions the codes of `modules` (Int8Linear -> owner rank) and serves gathers for them."""

    def __init__(self, comm: Comm, owners: dict[Int8Linear, int]):
        self.comm = comm
        self.owners = dict(owners)
        self.shapes = {m: (tuple(m.weight_q.shape), tuple(m.weight_scales.shape)) for m in owners}
        self.order: list[Int8Linear] = []          # first recorded forward order
        self._recording = True
        self._pending: tuple[Int8Linear, tuple[Tensor, Tensor], list] | None = None
        self.gathers = 0
        self.prefetch_hits = 0
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

    def _next(self, module: Int8Linear, phase: str) -> Int8Linear | None:
        if module not in self.order:
            return None
        position = self.order.index(module) + (1 if phase == "forward" else -1)
        return self.order[position] if 0 <= position < len(self.order) else None

    def gather(self, module: Int8Linear, phase: str) -> tuple[Tensor, Tensor]:
        """Full (weight_q, weight_scales) of `module` for one use (the owner's own buffers on the owner)."""
        if phase == "forward" and self._recording:
            if module in self.order:
                self._recording = False
            else:
                self.order.append(module)
        codes = None
        if self._pending is not None:
            pending_module, pending_codes, works = self._pending
            self._pending = None
            self._wait(works)
            if pending_module is module:
                codes = pending_codes
                self.prefetch_hits += 1
        if codes is None:
            codes, works = self._start(module)
            self._wait(works)
        upcoming = self._next(module, phase)
        if upcoming is not None:
            upcoming_codes, works = self._start(upcoming)
            self._pending = (upcoming, upcoming_codes, works)
        return codes

    def flush(self) -> None:
        """Complete a prefetch still in flight (end of a step, before saving or evaluating)."""
        if self._pending is not None:
            self._wait(self._pending[2])
            self._pending = None

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
