"""Data-parallel lowmem over DeepSpeed's communication layer (DESIGN §4).

Every collective goes through `Comm`, a thin wrapper over `deepspeed.comm` (gloo on CPU, NCCL on CUDA) that counts
the payload bytes of each call, so a run can report what it moved per step next to a dense-gradient all-reduce.

What travels, per optimizer step, with W ranks (a low-rank weight W (m, n), rank r, projected side of size d):
- projected gradients R (r x d, fp32) instead of the (m, n) gradient: all-reduced (mean) at ZeRO 0, reduced (mean)
  to the weight's owner at ZeRO >= 1; Rayleigh-Ritz refresh steps all-reduce R because the projector then depends
  on it. Refresh steps also all-reduce the range finder's thin products ((m + n) x (r + p) per power iteration).
- ZeRO 1/2 (lowmem treats them alike: no rank ever holds a full gradient, so there is nothing more to partition at
  stage 2): the owner computes Adam on R and broadcasts the update direction N (r x d fp32, plus the sparse residual
  values), and every rank back-projects and writes its copy of the INT8 weight with the shared counter-based
  stochastic rounding, so the copies stay bit-identical. The alternative — the owner writes and broadcasts the new
  INT8 codes and scales (m·n bytes + m·ceil(n/256)·4) — moves min(m, n)/(4r)·(1 + 1/64) times more bytes (8x for a
  4096 x 4096 weight at r = 128). Measured (benchmarks/results/distributed-cpu.md, 2 CPU processes over gloo): 4-8x
  fewer bytes with the direction, but on 2 CPU cores sharing the codes was as fast or faster (0.55-0.99x the
  time): there every rank repeating the back-projection and rounding write costs more than the bytes saved. lowmem ships the
  direction: consumer multi-GPU boxes talk over PCIe, where bytes are the scarce resource and the write is a fast
  kernel — expected, not yet measured on GPUs.
- ZeRO 3: INT8 weights are partitioned too (each whole weight lives on its owner); forward and backward gather each
  layer's codes from the owner one layer ahead (hooks.zero3) and drop them after use. Only the owner writes, so only
  the skip flag is broadcast.
- Float parameters (embeddings, norms, lm_head): gradients all-reduced (ZeRO 0) or reduced to the owner, which runs
  AdamW and broadcasts the new values (ZeRO >= 1).
Ownership: each trained tensor lives whole on one rank; owners are chosen greedily by bytes (largest first, to the
least-loaded rank), deterministic on every rank.
"""
from __future__ import annotations

import math
from collections import Counter
from datetime import timedelta

import torch
from torch import Tensor

from lowmem.optim.lowrank import UpdateExchange


class Comm:
    """deepspeed.comm with payload-byte accounting. Create after `init_process_group` (see `init_distributed`)."""

    def __init__(self, dist=None, device: torch.device | str = "cpu"):
        if dist is None:
            import deepspeed.comm as dist
        self._dist = dist
        self.device = torch.device(device)   # where small control tensors live (the CUDA device under NCCL)
        self.rank = int(dist.get_rank())
        self.world_size = int(dist.get_world_size())
        self.bytes_by_kind: Counter = Counter()
        self.calls_by_kind: Counter = Counter()

    def _count(self, kind: str, tensor: Tensor) -> None:
        self.bytes_by_kind[kind] += tensor.numel() * tensor.element_size()
        self.calls_by_kind[kind] += 1

    @property
    def bytes_total(self) -> int:
        """Payload bytes handed to collectives so far (each call counts its tensor once)."""
        return sum(self.bytes_by_kind.values())

    @property
    def wire_bytes(self) -> float:
        """Bytes each rank sends with bandwidth-optimal algorithms: a ring all-reduce sends 2(W-1)/W of the
        payload, a reduce or a pipelined broadcast (W-1)/W. Comparable with `dense_allreduce_wire_bytes`."""
        share = (self.world_size - 1) / self.world_size
        return sum(bytes_ * share * (2 if kind == "all_reduce" else 1) for kind, bytes_ in self.bytes_by_kind.items())

    def all_reduce_mean_(self, tensor: Tensor) -> Tensor:
        self._count("all_reduce", tensor)
        self._dist.all_reduce(tensor)
        return tensor.div_(self.world_size)

    def all_reduce_sum_(self, tensor: Tensor) -> Tensor:
        self._count("all_reduce", tensor)
        self._dist.all_reduce(tensor)
        return tensor

    def all_reduce_max_(self, tensor: Tensor) -> Tensor:
        from deepspeed.comm import ReduceOp
        self._count("all_reduce", tensor)
        self._dist.all_reduce(tensor, op=ReduceOp.MAX)
        return tensor

    def reduce_mean_(self, tensor: Tensor, dst: int) -> Tensor:
        """Mean on `dst`; the other ranks' buffers hold unspecified partial sums afterwards."""
        self._count("reduce", tensor)
        self._dist.reduce(tensor, dst=dst)
        if self.rank == dst:
            tensor.div_(self.world_size)
        return tensor

    def broadcast_(self, tensor: Tensor, src: int, async_op: bool = False):
        self._count("broadcast", tensor)
        return self._dist.broadcast(tensor, src=src, async_op=async_op)

    def start_mean_(self, tensor: Tensor, dst: int | None = None):
        """Begin an asynchronous mean over ranks (on `dst` only, or everywhere when dst is None); returns a
        function that waits for it and finishes the division. Lets a layer's reduction run under the backward of
        the next layer."""
        if dst is None:
            self._count("all_reduce", tensor)
            work = self._dist.all_reduce(tensor, async_op=True)
        else:
            self._count("reduce", tensor)
            work = self._dist.reduce(tensor, dst=dst, async_op=True)

        def finish() -> Tensor:
            work.wait()
            if dst is None or self.rank == dst:
                tensor.div_(self.world_size)
            return tensor
        return finish

    def barrier(self) -> None:
        self._dist.barrier()

    def all_gather_object(self, obj) -> list:
        out = [None] * self.world_size
        self._dist.all_gather_object(out, obj)
        return out


def dense_allreduce_wire_bytes(numels: list[int], world_size: int, bytes_per_element: int = 4) -> float:
    """What plain data parallelism sends per step: a ring all-reduce of every gradient (DDP / ZeRO-0)."""
    return 2 * (world_size - 1) / world_size * bytes_per_element * sum(numels)


def init_distributed(*, device: torch.device, timeout_s: float) -> Comm:
    """`deepspeed.init_distributed` from the launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...): NCCL for
    CUDA devices, gloo on CPU."""
    import deepspeed
    backend = "nccl" if device.type == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    return Comm(device=device)


def shutdown(comm: Comm | None, *, clean: bool) -> None:
    """Tear down explicitly (a barrier first when every rank is healthy), or the process aborts at exit."""
    import deepspeed.comm as dist
    if comm is not None and clean:
        comm.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


def assign_owners(sizes_bytes: list[int], world_size: int) -> list[int]:
    """Owner rank of each item: largest first to the least-loaded rank (ties: lower rank, then lower index)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    loads = [0] * world_size
    owners = [0] * len(sizes_bytes)
    for index in sorted(range(len(sizes_bytes)), key=lambda i: (-sizes_bytes[i], i)):
        rank = min(range(world_size), key=lambda k: (loads[k], k))
        owners[index] = rank
        loads[rank] += sizes_bytes[index]
    return owners


class _Exchange(UpdateExchange):
    """UpdateExchange for one low-rank weight at ZeRO >= 1 (see lowmem.optim.lowrank.commit_)."""

    def __init__(self, comm: Comm, owner_rank: int, zero_stage: int, device: torch.device):
        self.comm = comm
        self.owner_rank = owner_rank
        self.owner = comm.rank == owner_rank
        self.writes_weight = zero_stage < 3 or self.owner
        self.ship_direction = zero_stage < 3
        self.device = device

    def share_update(self, direction, sparse, skipped, *, direction_shape, sparse_numel):
        # The skip flag travels as data (the last element of one buffer, or the only one at ZeRO 3), so no rank
        # reads the device: a follower gets it as a 0-dim bool tensor (UpdateExchange).
        flag = (skipped.float().reshape(1).to(self.device) if isinstance(skipped, Tensor)
                else torch.full((1,), 1.0 if skipped else 0.0, device=self.device))
        if not self.ship_direction:
            self.comm.broadcast_(flag, src=self.owner_rank)
            return direction, sparse, (skipped if self.owner else flag[0] != 0)
        numel = math.prod(direction_shape)
        if self.owner:
            payload = (torch.zeros(numel + sparse_numel, device=self.device) if direction is None else
                       torch.cat([direction.reshape(-1).float()] + ([sparse.float()] if sparse_numel else [])))
            buffer = torch.cat([payload, flag])
        else:
            buffer = torch.empty(numel + sparse_numel + 1, device=self.device)
        self.comm.broadcast_(buffer, src=self.owner_rank)
        if self.owner:
            return direction, sparse, skipped
        return (buffer[:numel].view(direction_shape), (buffer[numel:numel + sparse_numel] if sparse_numel else None),
                buffer[-1] != 0)

    def share_indices(self, idx, count: int):
        if self.owner:
            self.comm.broadcast_(idx.to(torch.int64), src=self.owner_rank)
            return idx
        idx = torch.empty(count, dtype=torch.int64, device=self.device)
        self.comm.broadcast_(idx, src=self.owner_rank)
        return idx


class DataParallel:
    """The data-parallel plan of one runtime: who owns what, and the collectives of a step.

    comm: the Comm; zero_stage 0..3; owners: trainable index -> owner rank (assigned by `assign`).
    debug: after each refresh, check that every rank holds the same projector bytes (raises if not).
    overlap: reduce each layer's R asynchronously while the backward of the next layer runs (the layer is then
    written when the next one's gradient arrives, or in runtime.step() for the last one).
    """

    def __init__(self, comm: Comm, zero_stage: int, *, debug: bool = False, overlap: bool = True):
        if zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
        self.comm = comm
        self.zero_stage = zero_stage
        self.debug = debug
        self.overlap = overlap
        self.owners: dict[int, int] = {}

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    @property
    def partitioned(self) -> bool:
        return self.zero_stage >= 1 and self.world_size > 1

    def assign(self, sizes_bytes: dict[int, int]) -> None:
        indices = sorted(sizes_bytes)
        ranks = assign_owners([sizes_bytes[i] for i in indices], self.world_size)
        self.owners = dict(zip(indices, ranks))

    def owns(self, index: int) -> bool:
        """Whether this rank holds (and updates) tensor `index`'s optimizer state."""
        return not self.partitioned or self.owners[index] == self.rank

    def exchange(self, index: int, device: torch.device) -> UpdateExchange | None:
        if not self.partitioned:
            return None   # ZeRO 0: every rank has the reduced R and all state, and computes the same update
        return _Exchange(self.comm, self.owners[index], self.zero_stage, device)

    # -- gradients -------------------------------------------------------------------------------------------------
    def reduce_lowrank_(self, index: int, accum: dict):
        """Start averaging the step's accumulators over ranks: everywhere at ZeRO 0 or on Rayleigh-Ritz refreshes
        (the projector depends on R), else only on the owner. Returns a function that completes it (at once when
        `overlap` is off)."""
        dst = None if (not self.partitioned or accum.get("rayleigh_ritz", False)) else self.owners[index]
        finishers = [self.comm.start_mean_(accum[key], dst) for key in ("sketch", "grad_at_idx") if key in accum]

        def finish() -> None:
            for done in finishers:
                done()
        if not self.overlap:
            finish()
            return lambda: None
        return finish

    def reduce_float_grad(self, index: int, grad: Tensor) -> Tensor:
        """The mean gradient of a float parameter, reduced in place in its own dtype (no extra buffer; bf16
        parameters communicate in bf16, as DeepSpeed does by default). Meaningful on its owner only at ZeRO >= 1."""
        grad = grad.contiguous()
        if not self.partitioned:
            self.comm.all_reduce_mean_(grad)
        else:
            self.comm.reduce_mean_(grad, dst=self.owners[index])
        return grad

    def broadcast_param_(self, index: int, tensor: Tensor) -> None:
        if self.partitioned:
            self.comm.broadcast_(tensor.data, src=self.owners[index])

    def check_identical(self, what: str, tensor: Tensor) -> None:
        """Debug: raise unless `tensor` has the same bytes on every rank."""
        probe = tensor.detach().clone().contiguous()
        reference = probe.clone()
        self.comm.broadcast_(reference, src=0)
        mismatch = torch.tensor([0.0 if torch.equal(probe, reference) else 1.0], device=probe.device)
        self.comm.all_reduce_sum_(mismatch)
        if mismatch.item():
            raise RuntimeError(f"{what} differs between ranks ({int(mismatch.item())} of {self.world_size} ranks "
                               "disagree with rank 0)")

    def sum_(self, values: Tensor) -> Tensor:
        return self.comm.all_reduce_sum_(values)

    def any_(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on any rank (one 8-byte all-reduce)."""
        value = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=self.comm.device)
        return bool(self.max_(value).item())

    def total_over_owners(self, value: float) -> float:
        """Sum of a per-tensor quantity each owner measured for its own tensors (at ZeRO 0 every rank measured
        all of them already: returned as is)."""
        if not self.partitioned:
            return value
        return float(self.sum_(torch.tensor([value], dtype=torch.float64, device=self.comm.device)).item())

    def max_(self, values: Tensor) -> Tensor:
        return self.comm.all_reduce_max_(values)
