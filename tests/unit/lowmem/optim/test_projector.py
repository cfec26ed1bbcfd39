"""Projector side, cross-head projection, projection/back-projection and storage, against dense references."""
import math

import pytest
import torch

import lowmem.optim.projector as projector
from lowmem.optim.linop import DenseGrad, FactoredGrad
from lowmem.optim.projector import (CrossHead, backproject, backproject_gather, backproject_rows, compute_projector,
                              decode_projector, encode_projector, is_full_rank, project, projection_side,
                              select_heads)
from lowmem.optim.rsvd import exact_right_subspace, randomized_right_subspace, subspace_similarity


def gen(seed):
    return torch.Generator().manual_seed(seed)


def decaying(m, n, seed):
    """G (m, n) fp32 with singular values 1/(i+1), random singular vectors."""
    g = gen(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    s = 1.0 / torch.arange(1, k + 1, dtype=torch.float64)
    return ((U * s) @ V.T).float()


def assert_orthonormal(P, atol=1e-5):
    torch.testing.assert_close(P.double().T @ P.double(), torch.eye(P.shape[1], dtype=torch.float64), rtol=0,
                               atol=atol)


def test_projection_side_and_full_rank():
    assert projection_side((64, 32)) == "right"
    assert projection_side((32, 32)) == "right"
    assert projection_side((32, 64)) == "left"
    assert projection_side(torch.Size([11008, 4096])) == "right"
    assert is_full_rank((64, 32), 32) and is_full_rank((32, 64), 40)
    assert not is_full_rank((64, 32), 31)
    with pytest.raises(ValueError, match="shape"):
        projection_side((3,))


@pytest.mark.parametrize("shape", [(48, 30), (30, 48)])
def test_compute_projector_sides(shape):
    G = decaying(*shape, seed=1)
    side = projection_side(shape)
    rank = 6
    res = compute_projector(DenseGrad(G), rank, side=side, generator=gen(2))
    dim = shape[1] if side == "right" else shape[0]
    assert res.basis.shape == (dim, rank)
    assert_orthonormal(res.basis)
    # left side = right side of Gᵀ, drawn from the same generator
    twin = randomized_right_subspace(DenseGrad(G if side == "right" else G.T.contiguous()), rank, generator=gen(2))
    torch.testing.assert_close(res.basis @ res.basis.T, twin.basis @ twin.basis.T, rtol=0, atol=1e-5)
    # captured energy of the projection within 1% of the exact top-r
    exact = compute_projector(DenseGrad(G), rank, side=side, method="svd")
    R, R_exact = project(DenseGrad(G), res.basis, side), project(DenseGrad(G), exact.basis, side)
    assert R.pow(2).sum() >= 0.99 * R_exact.pow(2).sum()


def test_method_svd_is_exact_subspace():
    G = decaying(40, 25, seed=3)
    res = compute_projector(DenseGrad(G), 5, side="right", method="svd")
    ref = exact_right_subspace(DenseGrad(G), 5)
    assert torch.equal(res.basis, ref.basis) and not res.fell_back


@pytest.mark.parametrize("side", ["right", "left"])
def test_project_and_backproject_match_dense(side):
    g = gen(4)
    T, m, n, r = 20, 18, 14, 5
    A, X = torch.randn(T, m, generator=g), torch.randn(T, n, generator=g)
    G = A.double().T @ X.double()
    P = torch.linalg.qr(torch.randn(n if side == "right" else m, r, generator=g)).Q
    Pd = P.double()
    R_ref = G @ Pd if side == "right" else Pd.T @ G
    for op in (DenseGrad(A.T @ X), FactoredGrad(A, X)):
        R = project(op, P, side)
        assert R.dtype == torch.float32 and R.is_contiguous()
        torch.testing.assert_close(R.double(), R_ref, rtol=1e-5, atol=1e-5)
    back_ref = R_ref @ Pd.T if side == "right" else Pd @ R_ref
    R = R_ref.float()
    torch.testing.assert_close(backproject(R, P, side).double(), back_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(backproject_rows(R, P, side, 3, 11).double(), back_ref[3:11], rtol=1e-5, atol=1e-5)
    assert backproject_rows(R, P, side, 5, 5).shape == (0, n)
    # bf16-stored projector: results are fp32
    assert backproject(R, P.bfloat16(), side).dtype == torch.float32


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_backproject_gather_equals_dense_gather(side, index_dtype, monkeypatch):
    g = gen(5)
    m, n, r = 23, 17, 4
    P = torch.randn(n if side == "right" else m, r, generator=g)
    R = torch.randn(m, r, generator=g) if side == "right" else torch.randn(r, n, generator=g)
    idx = torch.randperm(m * n, generator=g)[:60].sort().values.to(index_dtype)
    want = backproject(R, P, side).flatten()[idx.long()]
    torch.testing.assert_close(backproject_gather(R, P, side, idx, n), want, rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(projector, "CHUNK_ELEMENTS", 3 * r)  # three indices per chunk
    torch.testing.assert_close(backproject_gather(R, P, side, idx, n), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="n_cols"):
        backproject_gather(R, P, side, idx, n + 1)
    with pytest.raises(ValueError, match="flat_idx"):
        backproject_gather(R, P, side, torch.tensor([m * n]), n)


def test_cross_head_single_head_is_the_standard_right_projection():
    G = decaying(32, 48, seed=6)  # wide: the standard side would be left, cross-head is right regardless
    res = compute_projector(DenseGrad(G), 8, side="right", generator=gen(7), cross_head=CrossHead(32, 1))
    std = compute_projector(DenseGrad(G), 8, side="right", generator=gen(7))
    assert torch.equal(res.basis, std.basis)


def test_cross_head_all_heads_needed_uses_whole_matrix():
    G = decaying(64, 80, seed=8)  # 4 heads of 16 rows; rank 50 needs ceil(50/16) = 4 heads: all of them
    res = compute_projector(DenseGrad(G), 50, side="right", generator=gen(7), cross_head=CrossHead(16, 4))
    std = compute_projector(DenseGrad(G), 50, side="right", generator=gen(7))
    assert torch.equal(res.basis, std.basis)
    g = gen(9)
    state = g.get_state()
    assert select_heads(CrossHead(16, 2), 17, g) is None  # 2 heads needed of 2: no draw, generator untouched
    assert torch.equal(g.get_state(), state)


def _stacked_reference(G, heads, d):
    return torch.cat([G[h * d : (h + 1) * d] for h in heads.tolist()])


@pytest.mark.parametrize("num_heads,head_dim,hidden,rank", [
    (8, 8, 64, 20),   # multi-head, r > d: 3 of 8 heads
    (2, 8, 64, 12),   # GQA W_k: 2 key heads of 8 rows for hidden 64, r > d: both heads -> whole matrix
    (4, 16, 96, 40),  # GQA W_k (n_kv=4, d=16), r > d: 3 of 4 key heads
    (4, 16, 96, 10),  # r < d: one head
])
def test_cross_head_stacks_random_heads(num_heads, head_dim, hidden, rank):
    m = num_heads * head_dim
    g = gen(10)
    T = 3 * m
    A, X = torch.randn(T, m, generator=g), torch.randn(T, hidden, generator=g) * torch.logspace(0, -2, hidden)
    G = A.T @ X
    ch = CrossHead(head_dim=head_dim, num_heads=num_heads)
    res = compute_projector(DenseGrad(G), rank, side="right", method="svd", generator=gen(11), cross_head=ch)
    assert res.basis.shape == (hidden, rank)
    assert_orthonormal(res.basis)
    heads = select_heads(ch, rank, gen(11))
    count = math.ceil(rank / head_dim)
    if count >= num_heads:
        assert heads is None
        stack = G
    else:
        # reference twin of the head draw: first `count` of a randperm, distinct, sorted
        assert torch.equal(heads, torch.randperm(num_heads, generator=gen(11))[:count].sort().values)
        stack = _stacked_reference(G, heads, head_dim)
    V = torch.linalg.svd(stack.double(), full_matrices=False).Vh[:rank].T
    assert subspace_similarity(V.float(), res.basis) > 1 - 1e-4
    # randomized and factored paths pick the same heads and give an orthonormal rank-r projector
    rnd = compute_projector(FactoredGrad(A, X), rank, side="right", generator=gen(11), cross_head=ch,
                            power_iters=4)
    assert rnd.basis.shape == (hidden, rank) and not rnd.fell_back
    assert_orthonormal(rnd.basis)
    dense_rnd = compute_projector(DenseGrad(G), rank, side="right", generator=gen(11), cross_head=ch,
                                  power_iters=4)
    torch.testing.assert_close(rnd.basis @ rnd.basis.T, dense_rnd.basis @ dense_rnd.basis.T, rtol=0, atol=1e-4)
    R = project(DenseGrad(stack), rnd.basis, "right")
    R_exact = project(DenseGrad(stack), V.float(), "right")
    assert R.pow(2).sum() >= 0.99 * R_exact.pow(2).sum()


def test_cross_head_draw_is_uniform():
    # one head of 8 per draw, 4000 draws: each count ~ Binomial(4000, 1/8); 6 sigma bound
    g = gen(12)
    draws = torch.cat([select_heads(CrossHead(16, 8), 16, g) for _ in range(4000)])
    counts = torch.bincount(draws, minlength=8).double()
    mean, sigma = 4000 / 8, math.sqrt(4000 * (1 / 8) * (7 / 8))
    assert torch.all((counts - mean).abs() < 6 * sigma)


def test_cross_head_errors():
    op = DenseGrad(torch.randn(64, 32, generator=gen(13)))
    with pytest.raises(ValueError, match="head_dim \\* num_heads"):
        compute_projector(op, 4, side="right", cross_head=CrossHead(16, 3))
    with pytest.raises(ValueError, match="right projector"):
        compute_projector(op, 4, side="left", cross_head=CrossHead(16, 4))
    with pytest.raises(ValueError, match="positive int"):
        CrossHead(0, 4)


def test_compute_projector_errors():
    op = DenseGrad(torch.randn(20, 10, generator=gen(14)))
    with pytest.raises(ValueError, match="side"):
        compute_projector(op, 2, side="top")
    with pytest.raises(ValueError, match="method"):
        compute_projector(op, 2, side="right", method="qr")
    with pytest.raises(ValueError, match="rank"):
        compute_projector(op, 11, side="right")
    with pytest.raises(ValueError, match="rows"):
        project(op, torch.zeros(20, 2), "right")
    with pytest.raises(ValueError, match="one r"):
        backproject(torch.zeros(20, 3), torch.zeros(10, 2), "right")


# ---- storage -----------------------------------------------------------------------------------------------------

def _projector(n, r, seed):
    return torch.linalg.qr(torch.randn(n, r, generator=gen(seed))).Q


@pytest.mark.parametrize("bits", [16, 32])
def test_encode_decode_float_forms(bits):
    P = _projector(96, 12, seed=15)
    stored = encode_projector(P, bits)
    assert set(stored) == {"data", "scales"}
    out = decode_projector(stored, bits, P.shape)
    assert out.dtype == torch.float32 and out.shape == P.shape
    want = P.bfloat16().float() if bits == 16 else P
    assert torch.equal(out, want)
    out.add_(1.0)  # decode returns a fresh buffer: the stored form is untouched
    assert torch.equal(decode_projector(stored, bits, P.shape), want)


@pytest.mark.parametrize("group_size", [256, 64])
def test_encode_decode_int8(group_size):
    P = _projector(96, 40, seed=16)
    stored = encode_projector(P, 8, group_size=group_size)
    assert stored["data"].dtype == torch.int8
    out = decode_projector(stored, 8, P.shape, group_size=group_size)
    assert out.shape == P.shape and out.dtype == torch.float32
    # reference bound: blocks of group_size along the r columns, step absmax/127, error <= step/2
    bound = torch.empty_like(P)
    for start in range(0, P.shape[1], group_size):
        block = P[:, start : start + group_size]
        bound[:, start : start + group_size] = block.abs().amax(1, keepdim=True) / 127 / 2
    assert torch.all((out - P).abs() <= bound * (1 + 1e-4) + 1e-8)


@pytest.mark.parametrize("group_size", [256, 64])
def test_encode_decode_int4(group_size):
    P = _projector(96, 40, seed=17)
    stored = encode_projector(P, 4, group_size=group_size)
    assert stored["data"].dtype == torch.uint8 and stored["data"].numel() == math.ceil(P.numel() / 2)
    out = decode_projector(stored, 4, P.shape, group_size=group_size)
    assert out.shape == P.shape and out.dtype == torch.float32
    # reference bound: groups of group_size consecutive elements, symmetric 4-bit (levels -7..7), error <= step/2
    flat = P.flatten()
    pad = (-flat.numel()) % group_size
    groups = torch.cat([flat, flat.new_zeros(pad)]).view(-1, group_size)
    step = groups.abs().amax(1, keepdim=True) / 7
    bound = (step / 2).expand_as(groups).reshape(-1)[: flat.numel()].view_as(P)
    assert torch.all((out - P).abs() <= bound * (1 + 1e-4) + 1e-8)
    # still close to orthonormal: the projection keeps nearly all of a vector in the subspace
    assert subspace_similarity(P, torch.linalg.qr(out).Q) > 0.98


def test_encode_errors():
    P = _projector(16, 4, seed=18)
    with pytest.raises(ValueError, match="bits"):
        encode_projector(P, 2)
    with pytest.raises(ValueError, match="keys"):
        decode_projector({"data": P}, 32, P.shape)
    with pytest.raises(ValueError, match="expected"):
        decode_projector(encode_projector(P, 32), 32, (4, 16))
