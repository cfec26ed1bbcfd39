"""Pieces of lowmem.distributed that need no second process (the 2-process behaviour is in
tests/integration/distributed): owner assignment, byte accounting, the follower's share of a state, ReducedGrad."""
import itertools

import pytest
import torch

from lowmem.distributed import Comm, assign_owners, dense_allreduce_wire_bytes
from lowmem.optim.linop import DenseGrad, FactoredGrad, ReducedGrad
from lowmem.optim.lowrank import LowRankSpec, follower_state, init_lowrank_state
from lowmem.presets import preset


def test_assign_owners_is_the_greedy_largest_first_balance():
    sizes = [50, 10, 40, 30, 30, 5, 5, 20]
    owners = assign_owners(sizes, 3)
    # Reference twin: largest first, each to the currently lightest rank (ties: lower rank).
    loads = [0, 0, 0]
    expected = [None] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        k = loads.index(min(loads))
        expected[i] = k
        loads[k] += sizes[i]
    assert owners == expected
    per_rank = [sum(s for s, o in zip(sizes, owners) if o == k) for k in range(3)]
    assert max(per_rank) - min(per_rank) <= max(sizes)
    # The best split of these sizes over 3 ranks cannot beat ceil(total / 3); greedy is within the largest item.
    assert max(per_rank) <= -(-sum(sizes) // 3) + max(sizes)
    assert assign_owners(sizes, 1) == [0] * len(sizes)
    with pytest.raises(ValueError):
        assign_owners(sizes, 0)


def test_assign_owners_near_optimal_on_small_cases():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        sizes = torch.randint(1, 100, (7,), generator=generator).tolist()
        owners = assign_owners(sizes, 2)
        greedy = max(sum(s for s, o in zip(sizes, owners) if o == k) for k in range(2))
        best = min(max(sum(s for s, b in zip(sizes, split) if b == k) for k in range(2))
                   for split in itertools.product((0, 1), repeat=len(sizes)))
        assert greedy <= 7 / 6 * best + 1e-9   # Graham's LPT bound for 2 machines: (4/3 - 1/(3m)) = 7/6


class FakeDist:
    """A one-rank stand-in for deepspeed.comm (only the bookkeeping is under test here)."""

    def get_rank(self):
        return 0

    def get_world_size(self):
        return 4

    def all_reduce(self, tensor, op=None, async_op=False):
        return None

    def reduce(self, tensor, dst, async_op=False):
        return None

    def broadcast(self, tensor, src, async_op=False):
        return None


def test_comm_counts_payload_and_wire_bytes():
    comm = Comm(FakeDist())
    comm.all_reduce_mean_(torch.zeros(10))                  # 40 bytes
    comm.reduce_mean_(torch.zeros(5, dtype=torch.float64), dst=0)   # 40 bytes
    comm.broadcast_(torch.zeros(8, dtype=torch.int8), src=0)         # 8 bytes
    assert comm.bytes_by_kind == {"all_reduce": 40, "reduce": 40, "broadcast": 8}
    assert comm.bytes_total == 88
    assert comm.wire_bytes == pytest.approx(3 / 4 * (2 * 40 + 40 + 8))
    assert dense_allreduce_wire_bytes([100, 28], 4) == pytest.approx(2 * 3 / 4 * 4 * 128)


def test_follower_state_keeps_only_what_every_rank_needs():
    cfg = preset("lowmem", rank=4, residual_ratio=0.1)
    spec = LowRankSpec(name="w", shape=(16, 32), param_index=0, residual=True)
    state = init_lowrank_state(spec, cfg)
    state["proj_data"] = torch.zeros(3, dtype=torch.uint8)
    state["res_idx"] = torch.arange(5, dtype=torch.int32)
    state["res_m"] = torch.zeros(5)
    kept = follower_state(state)
    assert "proj_data" in kept and "res_idx" in kept and "step" in kept and "next_refresh_step" in kept
    assert not any(k.startswith("exp_avg") or k in ("res_m", "res_v", "res_clamp_count") for k in kept)
    assert set(kept) < set(state)


def test_reduced_grad_averages_every_product():
    """A stand-in reduction averages with what a second rank would contribute; every product of ReducedGrad then
    equals the product of the mean gradient (reference twin: (G0 + G1) / 2 formed densely)."""
    generator = torch.Generator().manual_seed(1)
    A0, X0 = torch.randn(6, 8, generator=generator), torch.randn(6, 12, generator=generator)
    peer = DenseGrad(torch.randn(8, 12, generator=generator))
    mean = (A0.T @ X0 + peer.dense()) / 2
    from_peer = []
    op = ReducedGrad(FactoredGrad(A0, X0), lambda t: t.add_(from_peer.pop(0)).div_(2))
    M, L = torch.randn(12, 3, generator=generator), torch.randn(8, 3, generator=generator)
    from_peer.append(peer.matmul(M))
    torch.testing.assert_close(op.matmul(M), mean @ M, rtol=1e-5, atol=1e-5)
    from_peer.append(peer.rmatmul(L))
    torch.testing.assert_close(op.rmatmul(L), mean.T @ L, rtol=1e-5, atol=1e-5)
    from_peer.append(peer.t().matmul(L))
    torch.testing.assert_close(op.t().matmul(L), mean.T @ L, rtol=1e-5, atol=1e-5)
    from_peer.append(peer.dense())
    torch.testing.assert_close(op.dense(), mean, rtol=1e-5, atol=1e-5)
    assert op.shape == (8, 12) and not from_peer
    with pytest.raises(TypeError):
        ReducedGrad(torch.zeros(2, 2), lambda t: t)
