"""Sparse coded residuals (DESIGN §3.5): kernels against reference twins, index selection, memory, and the headline
comparison with full-rank Adam on a synthetic problem."""
import math

import pytest
import torch

from lowmem.optim.residual import (exact_residual_step, init_exact_residual, residual_index_dtype, residual_state_bytes,
                             residual_step, select_residual_indices)


def _ref_residual(dm, dv, g, ghat, vback, t, b1, b2, eps):
    """Reference twin in float64, written straight from DESIGN §3.5."""
    dm, dv, g, ghat, vback = (x.double() for x in (dm, dv, g, ghat, vback))
    dG = g - ghat
    dm = b1 * dm + (1 - b1) * dG
    dv = b2 * dv + 2 * (1 - b2) * ghat * dG
    rad = vback / (1 - b2 ** t) + dv / (1 - b2 ** t)
    clamped = int((rad < 0).sum())
    delta = (dm / (1 - b1 ** t)) / (torch.sqrt(torch.clamp(rad, min=0)) + eps)
    return dm, dv, delta, clamped


def _inputs(length, seed, vback_shift=2.0):
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(length, generator=g)
    ghat = grad * 0.7 + 0.3 * torch.randn(length, generator=g)
    vback = torch.rand(length, generator=g) * 0.01 + vback_shift * 1e-3
    return grad, ghat, vback


# ---------------------------------------------------------------- residual_step

def test_residual_step_matches_reference_over_steps():
    length, b1, b2, eps = 257, 0.9, 0.999, 1e-8
    dm = torch.zeros(length)
    dv = torch.zeros(length)
    ref_m, ref_v = dm.double(), dv.double()
    for t in range(1, 8):
        grad, ghat, vback = _inputs(length, seed=t, vback_shift=50.0)
        delta, clamped = residual_step(dm, dv, grad, ghat, vback, step=t, beta1=b1, beta2=b2, eps=eps)
        ref_m, ref_v, ref_delta, ref_clamped = _ref_residual(ref_m, ref_v, grad, ghat, vback, t, b1, b2, eps)
        assert delta.dtype == torch.float32 and delta.shape == (length,)
        torch.testing.assert_close(dm.double(), ref_m, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(dv.double(), ref_v, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(delta.double(), ref_delta, rtol=1e-4, atol=1e-5)
        assert clamped == ref_clamped == 0


def test_residual_step_counts_clamped_radicands():
    length, b1, b2, eps = 64, 0.9, 0.999, 1e-3
    grad, ghat, vback = _inputs(length, seed=11)
    vback[::4] = -1.0                               # backproject(V') can be negative: these must clamp
    dm, dv = torch.zeros(length), torch.zeros(length)
    delta, clamped = residual_step(dm, dv, grad, ghat, vback, step=3, beta1=b1, beta2=b2, eps=eps)
    ref_m, _, ref_delta, ref_clamped = _ref_residual(torch.zeros(length), torch.zeros(length), grad, ghat, vback, 3,
                                                     b1, b2, eps)
    assert clamped == ref_clamped == 16
    assert torch.isfinite(delta).all()
    # A clamped radicand leaves only ε in the denominator.
    torch.testing.assert_close(delta[::4].double(), ref_m[::4] / (1 - b1 ** 3) / eps, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(delta.double(), ref_delta, rtol=1e-4, atol=1e-5)


def test_residual_step_bf16_storage():
    length, b1, b2, eps = 300, 0.9, 0.99, 1e-8
    dm = torch.zeros(length, dtype=torch.bfloat16)
    dv = torch.zeros(length, dtype=torch.bfloat16)
    for t in range(1, 5):
        grad, ghat, vback = _inputs(length, seed=100 + t)
        start_m, start_v = dm.clone(), dv.clone()
        delta, _ = residual_step(dm, dv, grad, ghat, vback, step=t, beta1=b1, beta2=b2, eps=eps)
        ref_m, ref_v, ref_delta, _ = _ref_residual(start_m, start_v, grad, ghat, vback, t, b1, b2, eps)
        assert dm.dtype == dv.dtype == torch.bfloat16 and delta.dtype == torch.float32
        # δ comes from the fp32 moments; storage rounds them once to bf16 (round to nearest).
        torch.testing.assert_close(delta.double(), ref_delta, rtol=1e-4, atol=1e-5)
        assert torch.equal(dm, ref_m.float().to(torch.bfloat16))
        assert torch.equal(dv, ref_v.float().to(torch.bfloat16))


def test_residual_step_rejects_bad_input():
    x = torch.zeros(8)
    with pytest.raises(ValueError, match="expected L = 8"):
        residual_step(x.clone(), x.clone(), torch.zeros(7), x, x, step=1, beta1=0.9, beta2=0.999, eps=1e-8)
    with pytest.raises(ValueError, match="step"):
        residual_step(x.clone(), x.clone(), x, x, x, step=0, beta1=0.9, beta2=0.999, eps=1e-8)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        residual_step(x.half(), x.half(), x, x, x, step=1, beta1=0.9, beta2=0.999, eps=1e-8)
    with pytest.raises(ValueError, match="1-D"):
        residual_step(torch.zeros(2, 4), x.clone(), x, x, x, step=1, beta1=0.9, beta2=0.999, eps=1e-8)


# ---------------------------------------------------------------- exact_residual_step (proposed alternative)

def test_exact_residual_matches_full_adam_at_indices():
    length, b1, b2, eps, scale = 50, 0.9, 0.999, 1e-8, 0.25
    g = torch.Generator().manual_seed(5)
    mback, vsq = torch.randn(length, generator=g) * 0.1, torch.rand(length, generator=g) * 0.01
    m, v = init_exact_residual(mback, vsq)
    ref_m, ref_v = mback.double(), vsq.double()
    for t in range(6, 12):
        grad = torch.randn(length, generator=g)
        low = torch.randn(length, generator=g)
        delta = exact_residual_step(m, v, grad, low, step=t, beta1=b1, beta2=b2, eps=eps, scale=scale)
        ref_m = b1 * ref_m + (1 - b1) * grad.double()
        ref_v = b2 * ref_v + (1 - b2) * grad.double() ** 2
        full = (ref_m / (1 - b1 ** t)) / (torch.sqrt(ref_v / (1 - b2 ** t)) + eps)
        torch.testing.assert_close((scale * low.double() + delta.double()), full, rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        init_exact_residual(mback, vsq, torch.float16)
    m16, v16 = init_exact_residual(mback, -vsq, torch.bfloat16)
    assert m16.dtype == torch.bfloat16 and bool((v16 == 0).all())   # a negative estimate starts at 0


# ---------------------------------------------------------------- indices and memory

@pytest.mark.parametrize("ratio", [0.01, 0.05, 0.3, 1.0])
def test_select_residual_indices_matches_topk(ratio):
    g = torch.Generator().manual_seed(3)
    mom = torch.randn(37, 53, generator=g)          # continuous values: no ties
    idx = select_residual_indices(mom, ratio)
    k = math.ceil(ratio * mom.numel())
    ref = torch.topk(mom.abs().reshape(-1), k).indices
    assert idx.dtype == torch.int32 and idx.dim() == 1 and idx.numel() == k
    assert torch.equal(idx.long(), torch.sort(ref).values)
    assert bool((idx[1:] > idx[:-1]).all())         # sorted, unique


def test_select_residual_indices_rejects_bad_input():
    mom = torch.randn(4, 5)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="ratio"):
            select_residual_indices(mom, bad)
    with pytest.raises(ValueError, match="2-D"):
        select_residual_indices(torch.randn(20), 0.1)
    with pytest.raises(ValueError, match="NaN"):
        select_residual_indices(torch.tensor([[float("nan"), 1.0]]), 0.5)


def test_residual_index_dtype_rule():
    assert residual_index_dtype(0) == torch.int32
    assert residual_index_dtype(2 ** 31 - 1) == torch.int32
    assert residual_index_dtype(2 ** 31) == torch.int64
    assert residual_index_dtype(4096 * 11008 * 64) == torch.int64
    with pytest.raises(ValueError):
        residual_index_dtype(-1)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16])
def test_residual_state_bytes_counts_real_tensors(index_dtype, value_dtype):
    n = 1234
    tensors = [torch.zeros(n, dtype=index_dtype), torch.zeros(n, dtype=value_dtype), torch.zeros(n, dtype=value_dtype)]
    assert residual_state_bytes(n, index_dtype, value_dtype) == sum(t.numel() * t.element_size() for t in tensors)
    assert residual_state_bytes(0, index_dtype, value_dtype) == 0


# ---------------------------------------------------------------- headline: closer to full-rank Adam?

def _synthetic_gradients(seed=0, m=64, n=48, k_true=4, steps=30, n_spikes=12, spike_scale=3.0, noise=0.1):
    """Correlated rank-4 gradients (AR(1) coefficients), dense noise, and 12 large fixed-sign spikes."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, k_true, generator=g))[0]
    V = torch.linalg.qr(torch.randn(n, k_true, generator=g))[0]
    strength = torch.linspace(3.0, 1.0, k_true) * math.sqrt(m * n / k_true) / 8
    spike_pos = torch.randperm(m * n, generator=g)[:n_spikes]
    spike_sign = torch.sign(torch.randn(n_spikes, generator=g))
    coef = torch.randn(k_true, generator=g)
    grads = []
    for _ in range(steps):
        coef = 0.8 * coef + 0.6 * torch.randn(k_true, generator=g)
        G = U @ torch.diag(strength * (1 + 0.3 * coef)) @ V.T + noise * torch.randn(m, n, generator=g)
        G.view(-1)[spike_pos] += spike_scale * spike_sign * (1 + 0.2 * torch.randn(n_spikes, generator=g))
        grads.append(G)
    return grads


def _simulate(grads, mode, *, rank=4, warmup=5, ratio=0.05, b1=0.9, b2=0.999, eps=1e-8):
    """Low-rank Adam (right projection, P fixed from the SVD of the first gradient) with residual `mode` in
    {"none", "design", "exact"}; returns per-step relative errors vs full-rank Adam, over all entries and at L."""
    m, n = grads[0].shape
    P = torch.linalg.svd(grads[0], full_matrices=False)[2][:rank].T          # (n, r)
    M, V = torch.zeros(m, n), torch.zeros(m, n)
    M_low, V_low = torch.zeros(m, rank), torch.zeros(m, rank)
    idx = res_a = res_b = None
    errors, errors_at_idx, clamps = [], [], 0
    for t, G in enumerate(grads, start=1):
        M.mul_(b1).add_(G, alpha=1 - b1)
        V.mul_(b2).addcmul_(G, G, value=1 - b2)
        full = (M / (1 - b1 ** t)) / ((V / (1 - b2 ** t)).sqrt() + eps)
        R = G @ P
        M_low.mul_(b1).add_(R, alpha=1 - b1)
        V_low.mul_(b2).addcmul_(R, R, value=1 - b2)
        N = (M_low / (1 - b1 ** t)) / ((V_low / (1 - b2 ** t)).sqrt() + eps)
        update = N @ P.T
        if t == warmup:
            idx = select_residual_indices(M_low @ P.T, ratio).long()
            if mode == "exact":
                res_a, res_b = init_exact_residual((M_low @ P.T).view(-1)[idx], (V_low @ (P * P).T).view(-1)[idx])
            else:
                res_a, res_b = torch.zeros(idx.numel()), torch.zeros(idx.numel())
        elif t > warmup and mode != "none":
            at = lambda X: X.reshape(-1)[idx]  # noqa: E731
            if mode == "design":
                delta, clamped = residual_step(res_a, res_b, at(G), at(R @ P.T), at(V_low @ P.T), step=t, beta1=b1,
                                               beta2=b2, eps=eps)
                clamps += clamped
            else:
                delta = exact_residual_step(res_a, res_b, at(G), at(update), step=t, beta1=b1, beta2=b2, eps=eps)
            update.view(-1).index_add_(0, idx, delta)
        if t > warmup:
            errors.append(float((update - full).norm() / full.norm()))
            errors_at_idx.append(float((update - full).reshape(-1)[idx].norm() / full.reshape(-1)[idx].norm()))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return mean(errors), mean(errors_at_idx), clamps


# Measured on this problem (64x48, r = 4, 30 steps, warm-up 5, ratio 5% = 154 indices), mean relative Frobenius
# error vs full-rank Adam over steps 6..30, seed 0 (seeds 1-3 in brackets):
#   no residual                   0.806 (0.770-0.813);  at L 0.574
#   DESIGN §3.5 residual_step     2.5e6 (3.2e6-4.7e6);  at L 9.3e6; 77% (52-57%) of the radicands at L clamped,
#                                 so δ = ΔM̂/ε there
#   exact_residual_step           0.792, ratio 0.982 (0.980-0.982);  at L 0.100, ratio 0.175 (0.15-0.23)
# Even a perfect update at L caps the whole-matrix gain near 1 - 5%: the low-rank/full-rank mismatch is spread over
# every entry (Adam normalises per entry), so the brief's 0.9 bound on the whole matrix is out of reach at ratio 5%.
# The bounds below are the measured ratios with a margin.

def test_headline_exact_residual_moves_update_toward_full_adam():
    grads = _synthetic_gradients()
    err_none, err_none_at_idx, _ = _simulate(grads, "none")
    err_exact, err_exact_at_idx, _ = _simulate(grads, "exact")
    assert err_exact <= 0.99 * err_none
    assert err_exact_at_idx <= 0.3 * err_none_at_idx


def test_paper_residual_diverges_which_is_why_exact_is_the_default():
    """GaLore+ Algorithm 2 as written (residual_mode="paper") moves the update AWAY from full-rank Adam here:
    clamped radicands leave only ε in the denominator, δ = ΔM̂/ε (measured: error 2.5e6 vs 0.806 without
    residual). The measurement behind lowmem's default residual_mode="exact"; if the formula is ever repaired,
    this test fails and the default should be revisited."""
    grads = _synthetic_gradients()
    err_none, _, _ = _simulate(grads, "none")
    err_design, _, _ = _simulate(grads, "design")
    assert err_design > 100 * err_none


def test_design_residual_clamps_most_radicands_with_a_dense_projector():
    """Why the DESIGN formula fails above: backproject(V') = V' Pᵀ changes sign with P's column signs."""
    grads = _synthetic_gradients()
    _, _, clamps = _simulate(grads, "design")
    num_indices = math.ceil(0.05 * 64 * 48)
    assert clamps >= 0.3 * num_indices * (30 - 5)
