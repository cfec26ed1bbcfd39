"""quant.int8: blockwise INT8 against a padded-reshape reference twin, SR statistics, chunk invariance, bad input.

Statistical bounds are 6 sigma (stated at each assert); keys and torch seeds are fixed, so runs are deterministic.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from quant.int8 import BLOCK_SIZE, dequantize_int8, quantize_int8, sr_update_int8_
from quant.noise import counter_uniform


# ---- reference twin: pad each row to whole blocks, reshape, do the formula of DESIGN §3.1 literally ----------
def ref_scales(w32, block):
    m, n = w32.shape
    nb = -(-n // block)
    padded = F.pad(w32, (0, nb * block - n))
    return padded.view(m, nb, block).abs().max(dim=2).values / 127, nb


def ref_quantize(w, block, stochastic=False, key=None):
    w32 = w.float()
    m, n = w32.shape
    s, nb = ref_scales(w32, block)
    s_full = s.repeat_interleave(block, dim=1)[:, :n]
    x = torch.where(s_full > 0, w32 / torch.where(s_full > 0, s_full, 1.0), 0.0)
    if stochastic:
        u = counter_uniform(m * n, **key).view(m, n)
        q = torch.floor(x.double() + u.double())  # floor(w/s + u), the sum taken exactly in float64
    else:
        q = torch.round(x)
    return q.clamp(-127, 127).to(torch.int8), s


def ref_dequantize(q, s, block):
    return q.float() * s.repeat_interleave(block, dim=1)[:, :q.shape[1]]


SHAPES = [(1, 1), (1, 300), (3, 256), (5, 513), (7, 1000), (2, 37)]
BLOCKS = [256, 64, 7]


def make_weight(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 3, shape[1])  # spread of magnitudes along a row
    if shape[1] > 70:
        w[:, 64:70] = 0.0  # a partly zero stretch
    if shape[0] > 2:
        w[1] = 0.0  # an all-zero row: every block has scale 0
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", BLOCKS)
def test_quantize_nearest_matches_reference(shape, block, dtype):
    w = make_weight(shape, dtype if dtype != torch.float16 else torch.float32, seed=shape[1] + block)
    w = (w / w.abs().max() * 100).to(dtype) if dtype == torch.float16 else w  # stay in fp16 range
    q, s = quantize_int8(w, block_size=block)
    q_ref, s_ref = ref_quantize(w, block)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q.shape == shape and s.shape == (shape[0], -(-shape[1] // block))
    assert torch.equal(s, s_ref)
    assert torch.equal(q, q_ref)
    # round to nearest: error at most half a step, plus the fp32 rounding of w / s and of q * s (an ulp of |w|)
    err = (dequantize_int8(q, s, block_size=block) - w.float()).abs()
    half_step = s.repeat_interleave(block, dim=1)[:, :shape[1]] / 2
    assert bool((err <= half_step + w.float().abs() * 2**-22).all())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", [256, 7])
def test_quantize_stochastic_matches_reference(shape, block):
    w = make_weight(shape, torch.float32, seed=1)
    key = dict(seed=5, stream=3, step=11)
    q, s = quantize_int8(w, block_size=block, stochastic=True, **key)
    q_ref, s_ref = ref_quantize(w, block, stochastic=True, key=key)
    assert torch.equal(s, s_ref) and torch.equal(q, q_ref)


def test_large_values_and_zeros():
    w = torch.tensor([[3.0e38, -3.0e38, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1e-30, -2e-30, 0.0, 5e-31]])
    for stochastic in (False, True):
        q, s = quantize_int8(w, block_size=256, stochastic=stochastic, seed=1, stream=0, step=0)
        assert torch.isfinite(s).all()
        assert q[0, 0] == 127 and q[0, 1] == -127
        assert s[1, 0] == 0 and bool((q[1] == 0).all())
        assert q[2, 1] == -127
        q_ref, s_ref = ref_quantize(w, 256, stochastic, dict(seed=1, stream=0, step=0))
        assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_matches_reference_and_row_ranges(dtype):
    w = make_weight((9, 700), torch.float32, seed=3)
    q, s = quantize_int8(w, block_size=256)
    full_ref = ref_dequantize(q, s, 256)
    assert torch.equal(dequantize_int8(q, s, dtype=dtype), full_ref.to(dtype))
    for r0, r1 in [(0, 9), (2, 5), (8, 9), (4, 4)]:
        part = dequantize_int8(q, s, block_size=256, dtype=dtype, row_start=r0, row_end=r1)
        assert part.dtype == dtype and part.shape == (r1 - r0, 700)
        assert torch.equal(part, full_ref[r0:r1].to(dtype))


def test_dequantize_float16_refuses_or_saturates_beyond_its_range():
    """fp16's largest finite value is 65504. Reference: the fp32 product q·s (ref_dequantize). In range, fp16
    output is that product rounded to fp16; beyond it, check_values=True raises and check_values=False saturates
    to ±65504 (it returned inf before)."""
    w = make_weight((3, 300), torch.float32, seed=5)
    w = w / w.abs().max() * 60000.0
    w[1, 7] = 1e5
    w[2, 280] = -2e5
    q, s = quantize_int8(w, block_size=256)
    ref = ref_dequantize(q, s, 256)
    assert float(ref.abs().max()) > 65504  # the case is real
    with pytest.raises(ValueError, match="65504.*float32 or bfloat16"):
        dequantize_int8(q, s, dtype=torch.float16)
    out = dequantize_int8(q, s, dtype=torch.float16, check_values=False)
    assert bool(torch.isfinite(out).all())
    assert torch.equal(out, ref.clamp(-65504, 65504).to(torch.float16))
    assert float(out[1, 7]) == 65504 and float(out[2, 280]) == -65504
    # rows inside fp16's range are unaffected, with and without the check
    assert torch.equal(dequantize_int8(q, s, dtype=torch.float16, row_start=0, row_end=1),
                       ref[:1].to(torch.float16))


def test_empty_inputs():
    for shape in [(0, 10), (4, 0), (0, 0)]:
        q, s = quantize_int8(torch.zeros(shape))
        assert q.shape == shape and q.dtype == torch.int8
        assert s.shape == (shape[0], -(-shape[1] // BLOCK_SIZE))
        assert dequantize_int8(q, s).shape == shape
        sr_update_int8_(q, s, torch.zeros(shape), seed=0, stream=0, step=0)  # no-op


# ---- sr_update_int8_ --------------------------------------------------------------------------------------------
def ref_sr_update(q, s, delta, block, key, stochastic=True):
    w_new = ref_dequantize(q, s, block) + delta.float()
    return ref_quantize(w_new, block, stochastic=stochastic, key=key)


@pytest.mark.parametrize("shape,block", [((7, 513), 256), ((1, 300), 256), ((6, 50), 7), ((5, 256), 64)])
@pytest.mark.parametrize("stochastic", [True, False])
def test_sr_update_matches_reference_and_is_chunk_invariant(shape, block, stochastic):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g)
    q0, s0 = quantize_int8(w, block_size=block)
    delta = torch.randn(shape, generator=g) * 0.01
    key = dict(seed=1, stream=2, step=3)
    q_ref, s_ref = ref_sr_update(q0, s0, delta, block, key, stochastic)

    results = []
    for rows_per_chunk in (None, 1, 2, 3, shape[0]):
        q, s = q0.clone(), s0.clone()
        sr_update_int8_(q, s, delta, block_size=block, rows_per_chunk=rows_per_chunk, stochastic=stochastic, **key)
        results.append((q, s))

    seen_rows = []

    def delta_rows(r0, r1, w_rows):
        assert w_rows.dtype == torch.float32
        assert torch.equal(w_rows, ref_dequantize(q0[r0:r1], s0[r0:r1], block))  # the current weights
        seen_rows.append((r0, r1))
        return delta[r0:r1].clone()

    q, s = q0.clone(), s0.clone()
    sr_update_int8_(q, s, delta_rows, block_size=block, rows_per_chunk=2, stochastic=stochastic, **key)
    results.append((q, s))
    assert seen_rows == [(r, min(r + 2, shape[0])) for r in range(0, shape[0], 2)]

    for q, s in results:
        assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


def test_sr_update_bf16_delta_is_added_in_fp32():
    g = torch.Generator().manual_seed(1)
    q0, s0 = quantize_int8(torch.randn(4, 300, generator=g))
    delta = (torch.randn(4, 300, generator=g) * 0.01).to(torch.bfloat16)
    key = dict(seed=0, stream=0, step=0)
    q, s = q0.clone(), s0.clone()
    sr_update_int8_(q, s, delta, **key)
    q_ref, s_ref = ref_sr_update(q0, s0, delta.float(), 256, key)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


def test_weight_decay_through_callable():
    g = torch.Generator().manual_seed(2)
    q, s = quantize_int8(torch.randn(8, 256, generator=g))
    q0, s0 = q.clone(), s.clone()
    decay = 0.3
    sr_update_int8_(q, s, lambda r0, r1, w_rows: -decay * w_rows, seed=0, stream=0, step=0, rows_per_chunk=3)
    w_ref, _ = ref_sr_update(q0, s0, -decay * ref_dequantize(q0, s0, 256), 256, dict(seed=0, stream=0, step=0))
    assert torch.equal(q, w_ref)


# ---- stochastic rounding statistics -----------------------------------------------------------------------------
def test_sr_is_unbiased():
    """Mean of N independent roundings (steps 0..N-1) of a fixed tensor equals it within 6 sigma.
    A single rounding has variance p(1-p) s**2 <= s**2 / 4, so the mean of N has sigma <= s / (2 sqrt(N))."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 512, generator=g)
    n_draws = 400
    total = torch.zeros_like(w, dtype=torch.float64)
    for step in range(n_draws):
        q, s = quantize_int8(w, stochastic=True, seed=123, stream=0, step=step)
        total += dequantize_int8(q, s).double()
    mean = total / n_draws
    step_size = s.repeat_interleave(BLOCK_SIZE, dim=1).double()  # scales do not depend on the noise
    z = (mean - w.double()) / step_size
    assert float(z.abs().max()) <= 6 / (2 * math.sqrt(n_draws))
    # all elements together: sigma of the average bias <= 1 / (2 sqrt(N * numel)) steps
    assert abs(float(z.mean())) <= 6 / (2 * math.sqrt(n_draws * w.numel()))
    # and the draws are not all the same: SR actually randomises
    assert float(z.abs().mean()) < 0.5 / 4


def test_tiny_updates_accumulate_with_sr_and_vanish_without():
    """K updates of delta = step/100 each. With SR the expected drift is K/100 steps (tower property: every update
    is unbiased given the current state). Each update adds variance <= 1/4 step**2 per element, so after K steps the
    mean drift over M elements has sigma <= sqrt(K / 4 / M) steps (elements take independent noise); bound 6 sigma.
    The first column of each block holds the block absmax and gets no update, so the step size stays fixed.
    With round-to-nearest every update is below half a step and the weights never move."""
    rows, n, n_updates = 32, 512, 300
    g = torch.Generator().manual_seed(0)
    grid = torch.randint(-60, 61, (rows, n), generator=g).float()
    grid[:, ::BLOCK_SIZE] = 127.0
    step_size = 2.0**-7
    q0, s0 = quantize_int8(grid * step_size)
    assert torch.equal(s0, torch.full_like(s0, step_size))
    delta = torch.full((rows, n), step_size / 100)
    delta[:, ::BLOCK_SIZE] = 0.0
    moving = delta > 0

    results = {}
    for stochastic in (True, False):
        q, s = q0.clone(), s0.clone()
        for k in range(n_updates):
            sr_update_int8_(q, s, delta, seed=9, stream=1, step=k, stochastic=stochastic)
        results[stochastic] = (q, s)

    q, s = results[True]
    drift_steps = ((dequantize_int8(q, s) - dequantize_int8(q0, s0)) / step_size)[moving]
    expected = n_updates / 100
    sigma = math.sqrt(n_updates / 4 / drift_steps.numel())
    print(f"SR drift: mean {float(drift_steps.mean()):.4f} steps, expected {expected}, 6 sigma = {6 * sigma:.4f}")
    assert abs(float(drift_steps.mean()) - expected) <= 6 * sigma

    q, s = results[False]
    assert torch.equal(q, q0) and torch.equal(s, s0)


# ---- bad input ---------------------------------------------------------------------------------------------------
def _q_s():
    return quantize_int8(torch.randn(4, 300))


def _nan_delta_rows(r0, r1, w_rows):
    d = torch.zeros_like(w_rows)
    if r0 >= 2:
        d[0, 0] = float("nan")
    return d


BAD = [
    ("int weights", lambda: quantize_int8(torch.ones(3, 4, dtype=torch.int32)), TypeError, "floating"),
    ("bool weights", lambda: quantize_int8(torch.ones(3, 4, dtype=torch.bool)), TypeError, "floating"),
    ("1-D weights", lambda: quantize_int8(torch.ones(10)), ValueError, "2-D"),
    ("3-D weights", lambda: quantize_int8(torch.ones(2, 3, 4)), ValueError, "2-D"),
    ("NaN weights", lambda: quantize_int8(torch.tensor([[1.0, float("nan"), float("inf")]])), ValueError,
     "2 non-finite"),
    ("not a tensor", lambda: quantize_int8([[1.0]]), TypeError, "torch.Tensor"),
    ("fp64 beyond fp32", lambda: quantize_int8(torch.tensor([[1e300, 1.0]], dtype=torch.float64)), ValueError,
     "fp32 range"),
    ("zero block", lambda: quantize_int8(torch.ones(2, 2), block_size=0), ValueError, "block_size"),
    ("negative step", lambda: quantize_int8(torch.ones(2, 2), stochastic=True, step=-1), ValueError, "step"),
    ("float q", lambda: dequantize_int8(torch.ones(2, 2), torch.ones(2, 1)), TypeError, "int8"),
    ("scales shape", lambda: dequantize_int8(torch.ones(2, 300, dtype=torch.int8), torch.ones(2, 1)), ValueError,
     r"\(2, 2\)"),
    ("NaN scales", lambda: dequantize_int8(torch.ones(2, 3, dtype=torch.int8), torch.full((2, 1), float("nan"))),
     ValueError, "non-finite"),
    ("row range", lambda: dequantize_int8(*_q_s(), row_start=3, row_end=2), ValueError, "row_start"),
    ("int dtype", lambda: dequantize_int8(*_q_s(), dtype=torch.int32), TypeError, "dtype"),
    ("delta shape", lambda: sr_update_int8_(*_q_s(), torch.zeros(4, 299), seed=0, stream=0, step=0), ValueError,
     "shape"),
    ("int delta", lambda: sr_update_int8_(*_q_s(), torch.zeros(4, 300, dtype=torch.int64), seed=0, stream=0, step=0),
     TypeError, "floating"),
    ("bf16 scales", lambda: sr_update_int8_(_q_s()[0], _q_s()[1].bfloat16(), torch.zeros(4, 300), seed=0, stream=0,
                                            step=0), TypeError, "float32"),
    ("bad chunk", lambda: sr_update_int8_(*_q_s(), torch.zeros(4, 300), seed=0, stream=0, step=0, rows_per_chunk=0),
     ValueError, "rows_per_chunk"),
    ("callable returns list", lambda: sr_update_int8_(*_q_s(), lambda a, b, w: [0.0], seed=0, stream=0, step=0),
     TypeError, "tensor"),
    ("callable returns w_rows", lambda: sr_update_int8_(*_q_s(), lambda a, b, w: w.mul_(0.5), seed=0, stream=0,
                                                        step=0), ValueError, "new tensor"),
]


@pytest.mark.parametrize("name,call,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_non_finite_tensor_delta_writes_nothing():
    q, s = _q_s()
    q0, s0 = q.clone(), s.clone()
    delta = torch.zeros(4, 300)
    delta[3, 7] = float("inf")
    with pytest.raises(ValueError, match="1 non-finite"):
        sr_update_int8_(q, s, delta, seed=0, stream=0, step=0, rows_per_chunk=1)
    assert torch.equal(q, q0) and torch.equal(s, s0)


def test_non_finite_callable_delta_stops_at_first_bad_chunk():
    q, s = _q_s()
    q0, s0 = q.clone(), s.clone()
    with pytest.raises(ValueError, match="rows 2..3"):
        sr_update_int8_(q, s, _nan_delta_rows, seed=0, stream=0, step=0, rows_per_chunk=2)
    # documented: rows before the bad chunk are written (here with a zero delta, i.e. re-rounded), later rows not
    q_ref, s_ref = ref_sr_update(q0[:2], s0[:2], torch.zeros(2, 300), 256, dict(seed=0, stream=0, step=0))
    assert torch.equal(q[:2], q_ref) and torch.equal(s[:2], s_ref)
    assert torch.equal(q[2:], q0[2:]) and torch.equal(s[2:], s0[2:])


@pytest.mark.gpu
def test_cuda_matches_cpu_bitwise():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(33, 700, generator=g)
    delta = torch.randn(33, 700, generator=g) * 0.003
    key = dict(seed=4, stream=2, step=8)
    for stochastic in (False, True):
        q_cpu, s_cpu = quantize_int8(w, stochastic=stochastic, **key)
        q_gpu, s_gpu = quantize_int8(w.cuda(), stochastic=stochastic, **key)
        assert torch.equal(q_gpu.cpu(), q_cpu) and torch.equal(s_gpu.cpu(), s_cpu)
        sr_update_int8_(q_cpu, s_cpu, delta, rows_per_chunk=5, **key)
        sr_update_int8_(q_gpu, s_gpu, delta.cuda(), **key)
        assert torch.equal(q_gpu.cpu(), q_cpu) and torch.equal(s_gpu.cpu(), s_cpu)
        assert torch.equal(dequantize_int8(q_gpu, s_gpu).cpu(), dequantize_int8(q_cpu, s_cpu))


@pytest.mark.parametrize("use_compiled", [True, False])
def test_callable_without_weight_gets_none_and_same_bytes(use_compiled):
    """A delta callable marked reads_weight=False is handed w_rows=None (no dequantisation for it) and gives the
    bytes of the same delta passed as a tensor."""
    from quant import compiled
    g = torch.Generator().manual_seed(5)
    w, delta = torch.randn(9, 300, generator=g), torch.randn(9, 300, generator=g) * 1e-2
    q, s = quantize_int8(w)
    seen = []

    def delta_rows(r0, r1, w_rows):
        seen.append(w_rows)
        return delta[r0:r1].clone()
    delta_rows.reads_weight = False
    compiled.set_enabled(use_compiled)
    try:
        q_fn, s_fn = q.clone(), s.clone()
        sr_update_int8_(q_fn, s_fn, delta_rows, seed=1, stream=2, step=3, rows_per_chunk=4)
        q_t, s_t = q.clone(), s.clone()
        sr_update_int8_(q_t, s_t, delta, seed=1, stream=2, step=3)
    finally:
        compiled.set_enabled(True)
    assert seen == [None, None, None]
    assert torch.equal(q_fn, q_t) and torch.equal(s_fn, s_t) and not torch.equal(q_t, q)
