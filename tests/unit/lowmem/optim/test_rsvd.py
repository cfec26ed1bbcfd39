"""Randomized subspace iteration on matrices with known spectra G = U diag(s) Vᵀ (built in fp64 here)."""
import pytest
import torch

from lowmem.optim.linop import DenseGrad, FactoredGrad, SumGrad
from lowmem.optim.rsvd import (PendingSubspace, SubspaceResult, exact_right_subspace, randomized_right_subspace,
                               resolve_subspaces, subspace_similarity)
from tests.unit.hooks.sync_counter import SyncCounter


def known_spectrum(m, n, s, seed):
    """G (m, n) fp64 with singular values s (k,) and singular vectors U (m, k), V (n, k)."""
    g = torch.Generator().manual_seed(seed)
    k = len(s)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    return (U * s) @ V.T, U, V


def captured_energy(G, P, s, rank):
    """||G P||_F² / Σ_{i<r} s_i²: 1 for the exact top-r right subspace."""
    return float((G @ P.double()).pow(2).sum() / s[:rank].pow(2).sum())


def assert_orthonormal(P, atol=1e-5):
    eye = torch.eye(P.shape[1], dtype=torch.float64)
    torch.testing.assert_close(P.double().T @ P.double(), eye, rtol=0, atol=atol)


def gen(seed):
    return torch.Generator().manual_seed(seed)


SPECTRA = {
    "harmonic": lambda k: 1.0 / torch.arange(1, k + 1, dtype=torch.float64),
    "exponential": lambda k: torch.exp(-torch.arange(k, dtype=torch.float64) / 10),
    "slow_sqrt": lambda k: torch.arange(1, k + 1, dtype=torch.float64) ** -0.5,
}


@pytest.mark.parametrize("spectrum", SPECTRA, ids=list(SPECTRA))
@pytest.mark.parametrize("m,n,rank", [(160, 96, 12), (96, 160, 12), (128, 128, 32)])
def test_captured_energy_within_one_percent_of_exact(spectrum, m, n, rank):
    s = SPECTRA[spectrum](min(m, n))
    G, _, _ = known_spectrum(m, n, s, seed=1)
    res = randomized_right_subspace(DenseGrad(G), rank, generator=gen(2))
    assert isinstance(res, SubspaceResult) and not res.fell_back
    assert res.basis.shape == (n, rank) and res.basis.dtype == torch.float32
    assert res.singular_values.shape == (rank,) and res.singular_values.dtype == torch.float32
    assert res.iterations == 2
    assert_orthonormal(res.basis)
    exact = exact_right_subspace(DenseGrad(G), rank)
    assert captured_energy(G, exact.basis, s, rank) == pytest.approx(1.0, abs=1e-5)
    assert captured_energy(G, res.basis, s, rank) >= 0.99 * captured_energy(G, exact.basis, s, rank)
    # leading singular values are estimated from below, tightly
    assert torch.all(res.singular_values.double() <= s[:rank] * (1 + 1e-5))
    torch.testing.assert_close(res.singular_values[:4].double(), s[:4], rtol=1e-3, atol=0)


def test_exact_right_subspace_recovers_known_vectors():
    s = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    G, _, V = known_spectrum(30, 20, s, seed=3)
    res = exact_right_subspace(DenseGrad(G), 4)
    assert not res.fell_back and res.iterations == 0
    torch.testing.assert_close(res.singular_values.double(), s[:4], rtol=1e-5, atol=0)
    # each column equals ±v_i (distinct singular values)
    cosines = (res.basis.double() * V[:, :4]).sum(0).abs()
    torch.testing.assert_close(cosines, torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-5)


def test_gap_spectrum_recovers_top_subspace():
    s = torch.cat([torch.linspace(10, 6, 8), 0.5 ** torch.arange(1, 33)]).double()
    G, _, V = known_spectrum(100, 40, s, seed=4)
    res = randomized_right_subspace(DenseGrad(G), 8, generator=gen(5))
    assert subspace_similarity(V[:, :8].float(), res.basis) > 1 - 1e-6


def test_factored_equals_dense_with_same_generator():
    g = gen(6)
    T, m, n, rank = 48, 70, 50, 10
    scales = torch.exp(-torch.arange(T, dtype=torch.float32) / 6)  # decaying spectrum
    A = torch.randn(T, m, generator=g) * scales[:, None]
    X = torch.randn(T, n, generator=g)
    dense = randomized_right_subspace(DenseGrad(A.T @ X), rank, generator=gen(7))
    factored = randomized_right_subspace(FactoredGrad(A, X), rank, generator=gen(7))
    assert not dense.fell_back and not factored.fell_back
    # same sketch, products equal to rounding -> same basis up to column signs
    signs = torch.sign((dense.basis * factored.basis).sum(0))
    torch.testing.assert_close(factored.basis * signs, dense.basis, rtol=0, atol=1e-4)
    torch.testing.assert_close(factored.singular_values, dense.singular_values, rtol=1e-5, atol=0)


def test_same_seed_same_basis_and_generator_is_used():
    G, _, _ = known_spectrum(60, 40, SPECTRA["harmonic"](40), seed=8)
    a = randomized_right_subspace(DenseGrad(G), 5, generator=gen(9))
    b = randomized_right_subspace(DenseGrad(G), 5, generator=gen(9))
    assert torch.equal(a.basis, b.basis)
    g = gen(9)
    randomized_right_subspace(DenseGrad(G), 5, generator=g)
    assert not torch.equal(g.get_state(), gen(9).get_state())


def test_warm_start_converges_in_fewer_iterations():
    # slow decay (0.95^i) without a gap: the cold start needs several power iterations to settle at tol
    m, n, rank, tol = 120, 80, 10, 1e-3
    s = 0.95 ** torch.arange(n, dtype=torch.float64)
    G, _, _ = known_spectrum(m, n, s, seed=10)
    previous = exact_right_subspace(DenseGrad(G), rank).basis
    G_next = G + 1e-3 * torch.randn(m, n, generator=gen(11), dtype=torch.float64)  # next step: small change
    cold = randomized_right_subspace(DenseGrad(G_next), rank, power_iters=20, tol=tol, generator=gen(12))
    warm = randomized_right_subspace(DenseGrad(G_next), rank, power_iters=20, tol=tol, generator=gen(12),
                                     warm_start=previous)
    assert cold.iterations >= 3
    assert warm.iterations == 0
    s_next = torch.linalg.svdvals(G_next)
    assert captured_energy(G_next, warm.basis, s_next, rank) > 0.999
    assert captured_energy(G_next, cold.basis, s_next, rank) > 0.99


def test_power_iters_is_the_cap_without_tol():
    G, _, _ = known_spectrum(50, 30, SPECTRA["slow_sqrt"](30), seed=13)
    for q in (0, 1, 4):
        assert randomized_right_subspace(DenseGrad(G), 4, power_iters=q, generator=gen(14)).iterations == q


def test_fallback_on_nan_gradient():
    G, _, _ = known_spectrum(40, 30, SPECTRA["harmonic"](30), seed=15)
    G = G.float()
    G[3, 7] = float("nan")
    res = randomized_right_subspace(DenseGrad(G), 6, generator=gen(16))
    assert res.fell_back
    assert torch.isfinite(res.basis).all() and torch.isfinite(res.singular_values).all()
    assert_orthonormal(res.basis)


@pytest.mark.parametrize("true_rank", [4, 5, 6, 9])
def test_rank_deficient_gradient_needs_no_fallback(true_rank):
    """rank(G) = k <= r + p: the sketch spans range(G), so the top-k directions are exact without the full SVD.
    Reference: the known singular vectors V and values s of G, and torch.linalg.svd (exact_right_subspace)."""
    s = torch.linspace(3, 1, true_rank, dtype=torch.float64)
    G, _, V = known_spectrum(50, 40, s, seed=17)
    res = randomized_right_subspace(DenseGrad(G), 6, generator=gen(18))
    assert not res.fell_back
    assert res.numerical_rank == min(6, true_rank)
    assert_orthonormal(res.basis)
    k = min(6, true_rank)
    # the top-k directions are G's: principal angles to V[:, :k] at fp32 rounding, singular values likewise
    assert float((V[:, :k].T @ res.basis.double()).pow(2).sum()) / k > 1 - 1e-5
    torch.testing.assert_close(res.singular_values[:k].double(), s[:k], rtol=1e-5, atol=0)
    exact = exact_right_subspace(DenseGrad(G), 6)
    assert captured_energy(G, res.basis, s, k) == pytest.approx(captured_energy(G, exact.basis, s, k), abs=1e-5)
    # the columns beyond the rank lie in G's null space, like the full SVD's trailing vectors
    assert float((G @ res.basis[:, k:].double()).norm()) <= 1e-5 * float(s[0])


@pytest.mark.parametrize("tokens,rank", [(5, 8), (3, 8), (8, 8)])
def test_factored_gradient_with_fewer_tokens_than_rank_needs_no_fallback(tokens, rank):
    """G = Aᵀ X with T tokens has rank T; T <= r used to force the full SVD. Reference: torch.linalg.svd of the
    dense G (m, n): same top-T singular values and subspace, and the rest of the basis in G's null space."""
    g = gen(19)
    A, X = torch.randn(tokens, 30, generator=g), torch.randn(tokens, 20, generator=g)
    res = randomized_right_subspace(FactoredGrad(A, X), rank, generator=gen(20))
    assert not res.fell_back
    assert res.numerical_rank == tokens
    assert_orthonormal(res.basis)
    G = (A.T @ X).double()
    _, S, Vh = torch.linalg.svd(G)
    top = Vh[:tokens].T
    assert float((top.T @ res.basis.double()).pow(2).sum()) / tokens > 1 - 1e-5
    torch.testing.assert_close(res.singular_values[:tokens].double(), S[:tokens], rtol=1e-4, atol=0)
    assert float((G @ res.basis[:, tokens:].double()).norm()) <= 1e-5 * float(S[0])


def test_deferred_range_finders_resolve_to_the_direct_results_in_one_read():
    """defer=True + resolve_subspaces gives the results of the plain calls bit for bit (a fine one, one with a tol
    and early stop, a zero gradient that falls back, a NaN one the small SVD refuses), reading the device once."""
    G, _, _ = known_spectrum(50, 30, SPECTRA["exponential"](30), seed=31)
    G = G.float()
    nan = G.clone()
    nan[2, 5] = float("nan")
    calls = [(DenseGrad(G), dict(power_iters=2)),
             (DenseGrad(G), dict(power_iters=4, tol=1e-3, warm_start=exact_right_subspace(DenseGrad(G), 6).basis)),
             (DenseGrad(torch.zeros(20, 10)), dict(power_iters=1)),
             (DenseGrad(nan), dict(power_iters=1))]
    direct = [randomized_right_subspace(op, 6 if op.shape[1] > 10 else 3, generator=gen(32), **kw)
              for op, kw in calls]
    pending = [randomized_right_subspace(op, 6 if op.shape[1] > 10 else 3, generator=gen(32), defer=True, **kw)
               for op, kw in calls]
    assert all(isinstance(p, PendingSubspace) for p in pending)
    counter = SyncCounter()
    with counter.counting():
        resolved = resolve_subspaces(pending)
    assert len(counter.calls) == 1, counter.calls
    assert [r.fell_back for r in direct] == [False, False, True, True]
    for a, b in zip(direct, resolved):
        assert (a.fell_back, a.iterations) == (b.fell_back, b.iterations)
        assert torch.equal(a.basis, b.basis) and torch.equal(a.singular_values, b.singular_values)
    assert direct[1].iterations < 4   # the early stop was decided from the deferred read too


def test_zero_gradient_falls_back_and_stays_finite():
    res = randomized_right_subspace(DenseGrad(torch.zeros(20, 10)), 3, generator=gen(21))
    assert res.fell_back and torch.isfinite(res.basis).all()
    assert_orthonormal(res.basis)


def test_sum_operator_matches_its_dense_sum():
    g = gen(22)
    A1, X1 = torch.randn(30, 40, generator=g), torch.randn(30, 25, generator=g)
    A2, X2 = torch.randn(30, 40, generator=g), torch.randn(30, 25, generator=g)
    op = SumGrad([(1.0, FactoredGrad(A1, X1)), (0.5, FactoredGrad(A2, X2))])
    a = randomized_right_subspace(op, 6, generator=gen(23))
    b = randomized_right_subspace(DenseGrad(A1.T @ X1 + 0.5 * A2.T @ X2), 6, generator=gen(23))
    torch.testing.assert_close(a.basis @ a.basis.T, b.basis @ b.basis.T, rtol=0, atol=1e-4)


def test_subspace_similarity_reference():
    g = gen(24)
    P = torch.linalg.qr(torch.randn(30, 5, generator=g)).Q
    Q = torch.linalg.qr(torch.randn(30, 5, generator=g)).Q
    rotation = torch.linalg.qr(torch.randn(5, 5, generator=g)).Q
    assert subspace_similarity(P, P @ rotation) == pytest.approx(1.0, abs=1e-6)
    assert subspace_similarity(P, -P) == pytest.approx(1.0, abs=1e-6)
    # reference twin: mean squared cosine of the principal angles
    cosines = torch.linalg.svdvals(P.double().T @ Q.double())
    assert subspace_similarity(P, Q) == pytest.approx(float(cosines.pow(2).sum() / 5), abs=1e-6)
    E = torch.eye(30)
    assert subspace_similarity(E[:, :5], E[:, 5:10]) == 0.0
    assert subspace_similarity(E[:, :2], E[:, :4]) == pytest.approx(0.5)


def test_errors():
    G = DenseGrad(torch.randn(10, 6, generator=gen(25)))
    with pytest.raises(ValueError, match="rank"):
        randomized_right_subspace(G, 7)
    with pytest.raises(ValueError, match="rank"):
        randomized_right_subspace(G, 0)
    with pytest.raises(ValueError, match="rank"):
        exact_right_subspace(G, 7)
    with pytest.raises(TypeError, match="GradOperator"):
        randomized_right_subspace(torch.zeros(3, 3), 1)
    with pytest.raises(ValueError, match="warm_start"):
        randomized_right_subspace(G, 2, warm_start=torch.zeros(5, 2))
    with pytest.raises(ValueError, match="columns"):
        randomized_right_subspace(G, 2, oversampling=1, warm_start=torch.zeros(6, 4))
    with pytest.raises(ValueError, match="tol"):
        randomized_right_subspace(G, 2, tol=1.5)
    with pytest.raises(ValueError, match="power_iters"):
        randomized_right_subspace(G, 2, power_iters=-1)
    with pytest.raises(ValueError, match="row count"):
        subspace_similarity(torch.zeros(4, 2), torch.zeros(5, 2))
