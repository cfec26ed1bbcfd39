"""Low-rank Adam moments: storage formats, the Adam step against a plain reference, and transfer on refresh."""
import math

import pytest
import torch

from lowmem.optim.moments import (adam_direction_, adam_direction_bound, init_moments, load_moments, moment_shape,
                                  transfer_moments_)


def reference_adam(grads, beta1=0.9, beta2=0.999, eps=1e-8):
    m = torch.zeros_like(grads[0])
    v = torch.zeros_like(grads[0])
    out = []
    for t, g in enumerate(grads, start=1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        out.append((m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + eps))
    return out, v


@pytest.mark.parametrize("shape", [(7, 5), (1, 300), (33, 16)])
def test_fp32_adam_direction_matches_reference(shape):
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(shape, generator=gen) for _ in range(6)]
    expected, expected_v = reference_adam(grads)
    state = init_moments(shape, bits=32)
    for t, (g, want) in enumerate(zip(grads, expected), start=1):
        got, v = adam_direction_(state, g, step=t, beta1=0.9, beta2=0.999, eps=1e-8, bits=32)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v, expected_v)
    assert moment_shape(state) == shape


@pytest.mark.parametrize("bits, condition, tol", [(16, 1.0, 0.05), (8, 1.0, 0.08), (16, 4096.0, 0.05),
                                                   (8, 4096.0, 0.15)])
def test_low_bit_moments_track_fp32(bits, condition, tol):
    """Relative error of the Adam direction with 8/16-bit moments vs fp32 over 20 steps of correlated gradients.

    condition: sigma_1 / sigma_r of the projected gradient, R = (B + 0.3·noise)·diag(sigma) with sigma log-spaced,
    the shape a GaLore R takes for an ill-conditioned G (4096: v spans 1.7e7 in each 256-block, below the plain
    unsigned map's 1.6e-7, where the 8-bit direction reached |N| = 1.8e4 against fp32's 1.1).
    Bound: bf16 has ~3 significant digits, the 8-bit dynamic map ~1-2% per value within a block; the direction is a
    ratio of two such values, so a few percent in relative Frobenius norm (tol above, measured 0.4% / 3.5% at
    condition 1). At 4096 the direction of every column is O(1) whatever its sigma, and the small columns sit
    where the maps are coarse (at 2.4e-4 of the block's largest, half a gap is 12% of sqrt(V') on the unsigned map
    and 23% of M' on the signed one), hence 15% for 8 bits (measured 10.7%; 183x fp32's norm with V' on the plain
    map). No entry beyond Adam's bound at any width.
    """
    gen = torch.Generator().manual_seed(1)
    sigma = torch.logspace(0.0, -math.log10(condition), 256) if condition > 1 else torch.ones(256)
    base = torch.randn(64, 256, generator=gen)
    s32, sq = init_moments((64, 256), bits=32), init_moments((64, 256), bits=bits)
    worst = 0.0
    for t in range(1, 21):
        g = (base + 0.3 * torch.randn(64, 256, generator=gen)) * sigma
        d32, _ = adam_direction_(s32, g, step=t, beta1=0.9, beta2=0.999, eps=1e-8, bits=32)
        dq, _ = adam_direction_(sq, g, step=t, beta1=0.9, beta2=0.999, eps=1e-8, bits=bits)
        rel = (dq - d32).norm() / d32.norm()
        worst = max(worst, float(rel))
        assert rel < tol, (t, float(rel))
        assert float(dq.abs().max()) <= _adam_bound(t, 0.9, 0.999) * (1 + 1e-5)
    print(f"bits={bits} condition={condition}: worst relative error {worst:.4f}")


def _adam_bound(t, beta1, beta2):
    """Largest |m̂/sqrt(v̂)| over gradient sequences, found numerically (not from the code's formula): a linear form
    over a weighted l2 ball peaks at g_i ∝ w1_i / w2_i."""
    i = torch.arange(1, t + 1, dtype=torch.float64)
    w1 = (1 - beta1) * beta1 ** (t - i) / (1 - beta1 ** t)
    w2 = (1 - beta2) * beta2 ** (t - i) / (1 - beta2 ** t)
    g = w1 / w2
    return float((w1 * g).sum() / torch.sqrt((w2 * g * g).sum()))


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.9, 0.95), (0.0, 0.99), (0.95, 0.9)])
def test_direction_bound_is_adams_own(betas):
    """adam_direction_bound equals the numerically found maximum, and random fp32 Adam runs never exceed it."""
    beta1, beta2 = betas
    for t in (1, 2, 3, 10, 100, 1000):
        assert adam_direction_bound(t, beta1, beta2) == pytest.approx(_adam_bound(t, beta1, beta2), rel=1e-9)
    gen = torch.Generator().manual_seed(0)
    state = init_moments((4, 256), bits=32)
    for t in range(1, 60):
        g = torch.randn(4, 256, generator=gen) * torch.rand(4, 256, generator=gen) ** 4
        n, _ = adam_direction_(state, g, step=t, beta1=beta1, beta2=beta2, eps=0.0, bits=32)
        assert float(n.abs().max()) <= adam_direction_bound(t, beta1, beta2) * (1 + 1e-5)


def test_8bit_small_second_moment_does_not_blow_up_the_direction():
    """Gradient [1, 1e-4, ...] at step 1, then 0 for the small entries. Reference: the plain fp32 formula, N = 0.67
    for the small entries at step 2; with V' on the plain unsigned map it was 4.2e3 (= m/eps). Bound: 15% (the first
    moment's 8-bit rounding at 5e-5 of its block: measured 6%)."""
    g1 = torch.full((1, 256), 1e-4)
    g1[0, 0] = 1.0
    g2 = torch.zeros(1, 256)
    g2[0, 0] = 1.0
    expected, _ = reference_adam([g1, g2, g2])
    state = init_moments((1, 256), bits=8)
    for t, (g, want) in enumerate(zip([g1, g2, g2], expected), start=1):
        got, _ = adam_direction_(state, g, step=t, beta1=0.9, beta2=0.999, eps=1e-8, bits=8)
        torch.testing.assert_close(got, want, rtol=0.15, atol=0.0)


def test_eight_bit_state_is_uint8_codes():
    state = init_moments((10, 300), bits=8)
    assert state["exp_avg_codes"].dtype == torch.uint8 and state["exp_avg_codes"].shape == (10, 300)
    assert state["exp_avg_sq_absmax"].dtype == torch.float32
    m, v = load_moments(state, bits=8)
    assert m.abs().max() == 0 and v.abs().max() == 0


def test_bad_bits_and_step():
    with pytest.raises(ValueError, match="optim_bits"):
        init_moments((2, 2), bits=4)
    state = init_moments((2, 2), bits=32)
    with pytest.raises(ValueError, match="step"):
        adam_direction_(state, torch.zeros(2, 2), step=0, beta1=0.9, beta2=0.999, eps=1e-8, bits=32)
    with pytest.raises(ValueError, match="shape"):
        adam_direction_(state, torch.zeros(3, 2), step=1, beta1=0.9, beta2=0.999, eps=1e-8, bits=32)


def _orthonormal(d, r, seed):
    return torch.linalg.qr(torch.randn(d, r, generator=torch.Generator().manual_seed(seed)))[0]


@pytest.mark.parametrize("side", ["right", "left"])
def test_rotate_expresses_first_moment_in_new_basis(side):
    """If the new basis spans the old one, rotating M gives exactly the moment of the same gradients projected
    on the new basis (first moment is linear in G)."""
    d, r = 12, 4
    p_old = _orthonormal(d, r, 0)
    q = torch.linalg.qr(torch.randn(r, r, generator=torch.Generator().manual_seed(3)))[0]
    p_new = p_old @ q  # same span, rotated
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(9, d, generator=gen) if side == "right" else torch.randn(d, 9, generator=gen)
             for _ in range(4)]
    proj = (lambda g, p: g @ p) if side == "right" else (lambda g, p: p.T @ g)
    shape = (9, r) if side == "right" else (r, 9)
    old, new = init_moments(shape, bits=32), init_moments(shape, bits=32)
    for t, g in enumerate(grads, start=1):
        adam_direction_(old, proj(g, p_old), step=t, beta1=0.9, beta2=0.999, eps=1e-8, bits=32)
        adam_direction_(new, proj(g, p_new), step=t, beta1=0.9, beta2=0.999, eps=1e-8, bits=32)
    transfer_moments_(old, p_old, p_new, side=side, mode="rotate", bits=32, steps_done=4, betas=(0.9, 0.999))
    torch.testing.assert_close(old["exp_avg"], new["exp_avg"], rtol=1e-5, atol=1e-6)
    assert (old["exp_avg_sq"] >= 0).all()


BETAS = (0.9, 0.999)
EPS = 1e-8


def _project(g, p, side):
    return g @ p if side == "right" else p.T @ g


def _adam(state, r, t, side):
    return adam_direction_(state, r, step=t, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, bits=32,
                           coord_dim=1 if side == "right" else 0)[0]


def _torch_adamw_directions(grads):
    """Independent reference: torch.optim.AdamW (lr 1, no decay) on a zero parameter; its steps are -N."""
    param = torch.zeros_like(grads[0], requires_grad=True)
    opt = torch.optim.AdamW([param], lr=1.0, betas=BETAS, eps=EPS, weight_decay=0.0)
    out = []
    for g in grads:
        before = param.detach().clone()
        param.grad = g.clone()
        opt.step()
        out.append(before - param.detach())
    return out


def _new_projector(p_old, kind, seed):
    """What a refresh may return: 'signs' (same basis, flipped columns: a refresh on an unchanged gradient before
    sign alignment), 'rotated' (same subspace, another basis), 'half_new' (half the columns replaced by directions
    orthogonal to the old subspace: what `rotate` brings in fresh)."""
    d, r = p_old.shape
    gen = torch.Generator().manual_seed(seed)
    if kind == "signs":
        return p_old * torch.tensor([(-1.0) ** k for k in range(r)])
    if kind == "rotated":
        return p_old @ torch.linalg.qr(torch.randn(r, r, generator=gen))[0]
    fresh = torch.randn(d, r, generator=gen)
    fresh = torch.linalg.qr(fresh - p_old @ (p_old.T @ fresh))[0]
    return torch.cat([p_old[:, : r // 2], fresh[:, : r - r // 2]], dim=1)


# keep: GaLore's rule keeps the moments in the old coordinates, which is only meaningful when the refresh returns
# the same coordinates (a constant gradient's subspace, up to column signs); rotate/reset must hold for any basis.
_TRANSFER_CASES = [("keep", "signs"), ("rotate", "signs"), ("rotate", "rotated"), ("rotate", "half_new"),
                   ("reset", "signs"), ("reset", "rotated"), ("reset", "half_new")]


@pytest.mark.parametrize("mode, kind", _TRANSFER_CASES)
@pytest.mark.parametrize("refresh_step", [200, 2000])
@pytest.mark.parametrize("side", ["right", "left"])
def test_normalised_update_stays_bounded_after_refresh(mode, kind, refresh_step, side):
    """Under a constant gradient Adam's normalised update |m̂|/(√v̂+ε) is exactly 1 per coordinate; after a refresh
    at step 200 / 2000 it must stay <= 1 for the next 50 steps whatever the transfer (tolerance 1e-4: fp32 rounding
    of the moment updates, ~1e-6, far below the 1.35-6.1 that a stale bias correction produces)."""
    d, r, other = 12, 4, 9
    gen = torch.Generator().manual_seed(7)
    g = torch.randn(other, d, generator=gen) if side == "right" else torch.randn(d, other, generator=gen)
    p_old = _orthonormal(d, r, 0)
    p_new = _new_projector(p_old, kind, 1)
    state = init_moments((other, r) if side == "right" else (r, other), bits=32)
    for t in range(1, refresh_step + 1):
        _adam(state, _project(g, p_old, side), t, side)
    transfer_moments_(state, p_old, p_new, side=side, mode=mode, bits=32, steps_done=refresh_step, betas=BETAS)
    worst = 0.0
    for t in range(refresh_step + 1, refresh_step + 51):
        worst = max(worst, float(_adam(state, _project(g, p_new, side), t, side).abs().max()))
    assert worst <= 1.0 + 1e-4, worst


@pytest.mark.parametrize("refresh_step", [200, 2000])
@pytest.mark.parametrize("side", ["right", "left"])
def test_update_after_reset_equals_fresh_adamw(refresh_step, side):
    """After `reset` the next updates are those of torch.optim.AdamW started at the refresh on the new projected
    gradients (varying gradients, so the bias correction of every step is exercised)."""
    d, r, other = 12, 4, 9
    gen = torch.Generator().manual_seed(3)
    shape = (other, d) if side == "right" else (d, other)
    p_old, p_new = _orthonormal(d, r, 0), _orthonormal(d, r, 1)
    state = init_moments((other, r) if side == "right" else (r, other), bits=32)
    for t in range(1, refresh_step + 1):
        _adam(state, _project(torch.randn(shape, generator=gen), p_old, side), t, side)
    transfer_moments_(state, p_old, p_new, side=side, mode="reset", bits=32, steps_done=refresh_step, betas=BETAS)
    grads = [_project(torch.randn(shape, generator=gen), p_new, side) for _ in range(12)]
    want = _torch_adamw_directions(grads)
    for k, (grad, expected) in enumerate(zip(grads, want)):
        got = _adam(state, grad, refresh_step + 1 + k, side)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=f"update {k + 1} after the reset")


@pytest.mark.parametrize("side", ["right", "left"])
def test_rotate_starts_new_directions_fresh_and_keeps_old_ones(side):
    """`rotate` onto a basis whose first half is the old first half and whose second half is new: the kept
    coordinates continue the old Adam (a never-refreshed AdamW), the new ones equal a fresh AdamW from the refresh."""
    d, r, other, refresh_step = 12, 4, 9, 200
    gen = torch.Generator().manual_seed(4)
    shape = (other, d) if side == "right" else (d, other)
    p_old = _orthonormal(d, r, 0)
    p_new = _new_projector(p_old, "half_new", 1)
    before = [torch.randn(shape, generator=gen) for _ in range(refresh_step)]
    after = [torch.randn(shape, generator=gen) for _ in range(10)]
    state = init_moments((other, r) if side == "right" else (r, other), bits=32)
    for t, g in enumerate(before, start=1):
        _adam(state, _project(g, p_old, side), t, side)
    transfer_moments_(state, p_old, p_new, side=side, mode="rotate", bits=32, steps_done=refresh_step, betas=BETAS)
    got = [_adam(state, _project(g, p_new, side), refresh_step + 1 + k, side) for k, g in enumerate(after)]
    half = r // 2
    pick = (lambda x, sl: x[:, sl]) if side == "right" else (lambda x, sl: x[sl])
    kept = _torch_adamw_directions([pick(_project(g, p_old, side), slice(0, half)) for g in before + after])
    fresh = _torch_adamw_directions([pick(_project(g, p_new, side), slice(half, r)) for g in after])
    for k in range(len(after)):
        torch.testing.assert_close(pick(got[k], slice(0, half)), kept[refresh_step + k], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(pick(got[k], slice(half, r)), fresh[k], rtol=1e-5, atol=1e-6)


def test_keep_and_reset():
    """keep changes nothing (the next update is the one without a refresh); reset zeroes the moments and the next
    update is a first Adam step: N = g/(|g|+ε) = ±1, not the stale-bias value g·(1-β1)/(1-β1ᵗ)/... ."""
    g = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    p_old, p_new = _orthonormal(6, 3, 0), _orthonormal(6, 3, 1)
    state, twin = init_moments((5, 3), bits=32), init_moments((5, 3), bits=32)
    for t in range(1, 6):
        _adam(state, g, t, "right")
        _adam(twin, g, t, "right")
    before = state["exp_avg"].clone()
    transfer_moments_(state, p_old, p_new, side="right", mode="keep", bits=32, steps_done=5, betas=BETAS)
    assert torch.equal(state["exp_avg"], before)
    torch.testing.assert_close(_adam(state, 2 * g, 6, "right"), _adam(twin, 2 * g, 6, "right"), rtol=0, atol=0)
    transfer_moments_(state, p_old, p_new, side="right", mode="reset", bits=32, steps_done=6, betas=BETAS)
    assert state["exp_avg"].abs().max() == 0 and state["exp_avg_sq"].abs().max() == 0
    torch.testing.assert_close(_adam(state, 3 * g, 7, "right"), _torch_adamw_directions([3 * g])[0],
                               rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="moment_transfer"):
        transfer_moments_(state, p_old, p_new, side="right", mode="spin", bits=32, steps_done=7, betas=BETAS)


def _eight_bit_steps(shape, steps, *, seed, use_compiled):
    """Run `steps` 8-bit Adam steps on gradients spanning six decades within a block; (directions, V's, state)."""
    from quant import compiled
    compiled.set_enabled(use_compiled)
    try:
        gen = torch.Generator().manual_seed(seed)
        state = init_moments(shape, bits=8)
        out = []
        for t in range(1, steps + 1):
            g = torch.randn(shape, generator=gen) * torch.logspace(-6, 0, shape[-1])
            out.append(adam_direction_(state, g, step=t, beta1=0.9, beta2=0.999, eps=1e-8, bits=8))
        return out, state
    finally:
        compiled.set_enabled(True)


@pytest.mark.parametrize("shape", [(64, 32), (50, 45), (3, 256), (1, 1), (1, 300)])
def test_8bit_compiled_direction_is_bit_identical_to_twin(shape):
    """The compiled low-rank 8-bit Adam step (decode, Adam, encode in one kernel) gives its eager twin's direction,
    V' and stored bytes exactly: full blocks, a partial last block, one element."""
    from quant import compiled
    (got, s_c), (want, s_e) = (_eight_bit_steps(shape, 5, seed=3, use_compiled=flag) for flag in (True, False))
    assert compiled.failure() is None
    for (d_c, v_c), (d_e, v_e) in zip(got, want):
        assert torch.equal(d_c, d_e) and torch.equal(v_c, v_e)
    assert s_c.keys() == s_e.keys() and all(torch.equal(s_c[k], s_e[k]) for k in s_e)


@pytest.mark.parametrize("use_compiled", [True, False])
def test_8bit_direction_matches_an_fp64_step_from_the_decoded_state(use_compiled):
    """Independent reference for one step: decode the stored 8-bit moments, run Adam in float64 with the direction
    clamped to Adam's own bound, compare the direction (fp32 rounding) and the moments the step stores (within one
    8-bit code of the fp64 moments)."""
    from quant import compiled
    from quant.moments8 import dequantize_moment8
    shape, t = (40, 48), 4
    (_, state) = _eight_bit_steps(shape, t - 1, seed=5, use_compiled=use_compiled)
    m0 = dequantize_moment8(state["exp_avg_codes"], state["exp_avg_absmax"], signed=True, block_size=256).double()
    v0 = dequantize_moment8(state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], signed=False, block_size=256,
                            squared=True).double()
    g = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    m = 0.9 * m0 + 0.1 * g.double()
    v = 0.999 * v0 + 0.001 * g.double() ** 2
    bound = adam_direction_bound(t, 0.9, 0.999)
    expected = ((m / (1 - 0.9 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)).clamp(-bound, bound)
    compiled.set_enabled(use_compiled)
    try:
        direction, v_new = adam_direction_(state, g, step=t, beta1=0.9, beta2=0.999, eps=1e-8, bits=8)
    finally:
        compiled.set_enabled(True)
    torch.testing.assert_close(direction.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v_new.double(), v, rtol=1e-5, atol=0)
    m_stored = dequantize_moment8(state["exp_avg_codes"], state["exp_avg_absmax"], signed=True,
                                  block_size=256).double()
    assert float((m_stored - m).abs().max()) <= 0.05 * float(m.abs().max())   # the signed map's coarsest step


def _eight_bit_after_transfer(side, mode, other, *, use_compiled, steps_after=3):
    """8-bit moments: 5 steps on the old projector, a `mode` transfer onto a half-new one (per-coordinate bias
    masses from then on), `steps_after` steps on the new one. Returns (directions and V's after, state)."""
    from quant import compiled
    d, r = 40, 8
    coord_dim = 1 if side == "right" else 0
    p_old = _orthonormal(d, r, 0)
    p_new = _new_projector(p_old, "half_new", 1)
    gen = torch.Generator().manual_seed(11)
    scale = torch.logspace(-4, 0, d)   # projected gradients spanning decades within a block
    full = (other, d) if side == "right" else (d, other)
    compiled.set_enabled(use_compiled)
    try:
        state = init_moments((other, r) if side == "right" else (r, other), bits=8)
        step = lambda g, t, p: adam_direction_(state, _project(g, p, side), step=t, beta1=BETAS[0],  # noqa: E731
                                               beta2=BETAS[1], eps=EPS, bits=8, coord_dim=coord_dim)
        for t in range(1, 6):
            g = torch.randn(full, generator=gen) * (scale if side == "right" else scale[:, None])
            step(g, t, p_old)
        transfer_moments_(state, p_old, p_new, side=side, mode=mode, bits=8, steps_done=5, betas=BETAS)
        out = []
        for t in range(6, 6 + steps_after):
            g = torch.randn(full, generator=gen) * (scale if side == "right" else scale[:, None])
            out.append(step(g, t, p_new))
        return out, state
    finally:
        compiled.set_enabled(True)


@pytest.mark.parametrize("mode", ["reset", "rotate"])
@pytest.mark.parametrize("side, other", [("right", 37), ("right", 64), ("right", 1), ("left", 50), ("left", 32)])
def test_8bit_compiled_direction_with_bias_masses_is_bit_identical_to_twin(mode, side, other):
    """After a reset or rotate transfer the state carries per-coordinate bias masses: the compiled 8-bit step
    (lowrank_adam8_masses) gives its eager twin's direction, V', stored bytes and masses exactly, for both
    projection sides, a partial last block, whole blocks and one row."""
    from quant import compiled
    (got, s_c), (want, s_e) = (_eight_bit_after_transfer(side, mode, other, use_compiled=flag)
                               for flag in (True, False))
    assert compiled.failure() is None
    assert "bias1" in s_c and "bias2" in s_c
    for (d_c, v_c), (d_e, v_e) in zip(got, want):
        assert torch.equal(d_c, d_e) and torch.equal(v_c, v_e)
    assert s_c.keys() == s_e.keys() and all(torch.equal(s_c[k], s_e[k]) for k in s_e)


@pytest.mark.parametrize("use_compiled", [True, False])
@pytest.mark.parametrize("mode", ["reset", "rotate"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_8bit_direction_with_bias_masses_matches_an_fp64_step(use_compiled, mode, side):
    """Independent reference for a step on a state with bias masses: decode the stored moments and masses, run one
    Adam step in float64 with each coordinate's own bias correction b <- βb + (1-β) and the direction clamped to
    Adam's bound; the 8-bit step's direction must match to fp32 rounding and its masses must advance the same way."""
    from quant import compiled
    from quant.moments8 import dequantize_moment8
    other, t = 23, 8
    (_, state) = _eight_bit_after_transfer(side, mode, other, use_compiled=use_compiled, steps_after=2)
    shape = tuple(state["exp_avg_codes"].shape)
    m0 = dequantize_moment8(state["exp_avg_codes"], state["exp_avg_absmax"], signed=True, block_size=256).double()
    v0 = dequantize_moment8(state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], signed=False, block_size=256,
                            squared=True).double()
    coord = (1, -1) if side == "right" else (-1, 1)
    b1 = BETAS[0] * state["bias1"].double() + (1 - BETAS[0])
    b2 = BETAS[1] * state["bias2"].double() + (1 - BETAS[1])
    assert float(b1.min()) > 0 and float(b1.max()) < 1   # per-coordinate masses, not the global 1 - βᵗ
    g = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    m = BETAS[0] * m0 + (1 - BETAS[0]) * g.double()
    v = BETAS[1] * v0 + (1 - BETAS[1]) * g.double() ** 2
    bound = adam_direction_bound(t, *BETAS)
    expected = ((m / b1.view(coord)) / ((v / b2.view(coord)).sqrt() + EPS)).clamp(-bound, bound)
    compiled.set_enabled(use_compiled)
    try:
        direction, v_new = adam_direction_(state, g, step=t, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, bits=8,
                                           coord_dim=1 if side == "right" else 0)
    finally:
        compiled.set_enabled(True)
    torch.testing.assert_close(direction.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v_new.double(), v, rtol=1e-5, atol=0)
    torch.testing.assert_close(state["bias1"].double(), b1, rtol=1e-6, atol=0)
    torch.testing.assert_close(state["bias2"].double(), b2, rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", [(64, 32), (3, 300), (1, 1)])
def test_8bit_zero_moments_are_the_encoders_zeros(shape):
    """init_moments and a 'reset' transfer write zero codes and absmax directly: exactly what encoding zeros gives
    (independent reference: quant.moments8's encoder on a zero tensor), on the moments' device, masses reset."""
    from lowmem.optim.moments import store_moments_, transfer_moments_
    zeros = torch.zeros(shape)
    encoded = {}
    store_moments_(encoded, zeros, zeros, bits=8)
    fresh = init_moments(shape, bits=8)
    assert fresh.keys() == encoded.keys()
    assert all(fresh[k].dtype == encoded[k].dtype and torch.equal(fresh[k], encoded[k]) for k in encoded)
    state = init_moments(shape, bits=8)
    for t in range(1, 4):
        adam_direction_(state, torch.randn(shape), step=t, beta1=0.9, beta2=0.999, eps=1e-8, bits=8)
    assert any(bool(state[k].ne(0).any()) for k in encoded)
    rank = shape[1]
    proj = torch.linalg.qr(torch.randn(rank + 3, rank)).Q
    transfer_moments_(state, proj, proj, side="right", mode="reset", bits=8, steps_done=3, betas=(0.9, 0.999))
    assert all(torch.equal(state[k], encoded[k]) for k in encoded)
    assert torch.equal(state["bias1"], torch.zeros(rank)) and torch.equal(state["bias2"], torch.zeros(rank))
def _sqrt_samples() -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    wide = torch.exp(torch.empty(20000).uniform_(-80, 80, generator=g))     # second moments span many decades
    edges = torch.tensor([0.0, 1.0, 2.0, 4.0, 1e-38, 3.4e38, 1.1754944e-38, 1.0000001, 0.99999994])
    return torch.cat([wide, edges]).float()


def test_sqrt_on_the_cpu_is_correctly_rounded():
    """The CPU branch of correctly_rounded_sqrt: every value equals the fp32 rounding of the exact root (numpy's
    fp64 root, then one rounding to fp32; 53 >= 2·24 + 2 bits, so no double-rounding error)."""
    import numpy as np
    from lowmem.optim.moments import correctly_rounded_sqrt
    v = _sqrt_samples()
    reference = torch.from_numpy(np.sqrt(v.numpy().astype(np.float64)).astype(np.float32))
    assert torch.equal(correctly_rounded_sqrt(v), reference)


def test_sqrt_off_the_cpu_stays_in_fp32():
    """On any other device (meta stands in for CUDA here) the root is one fp32 sqrt: no fp64 tensor is made (fp64
    runs at 1/64 rate on consumer GPUs), in the functional and in the in-place (eager twin) form."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from lowmem.optim.moments import adam8_hyper, adam8_ratio, adam8_ratio_, correctly_rounded_sqrt

    class Dtypes(TorchDispatchMode):
        seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    self.seen.add(t.dtype)
            return out

    v = torch.empty(1000, device="meta")
    h = torch.empty(9, device="meta")
    with Dtypes() as mode:
        correctly_rounded_sqrt(v)
        adam8_ratio(v, v, v, h)
        adam8_ratio_(v, v.clone(), v.clone(), h)
    assert torch.float64 not in mode.seen and torch.float32 in mode.seen
    with Dtypes() as mode:
        correctly_rounded_sqrt(torch.ones(10))
    assert torch.float64 in mode.seen       # the CPU branch: through fp64
    assert adam8_hyper(step=1, beta1=0.9, beta2=0.999, eps=1e-8, device="cpu").dtype == torch.float32


@pytest.mark.gpu
def test_sqrt_on_cuda_equals_the_cpu_bits():
    from lowmem.optim.moments import correctly_rounded_sqrt
    v = _sqrt_samples()
    assert torch.equal(correctly_rounded_sqrt(v.cuda()).cpu(), correctly_rounded_sqrt(v))
    compiled_sqrt = torch.compile(correctly_rounded_sqrt)
    assert torch.equal(compiled_sqrt(v.cuda()).cpu(), correctly_rounded_sqrt(v))
