"""quant.noise.counter_uniform: reference twin in pure Python ints, reproducibility, offsets, statistics.

Statistical bounds are 6 sigma of the stated estimator under the null hypothesis (independent U[0, 1) values);
all keys are fixed, so the tests are deterministic.
"""
import math

import pytest
import torch

from quant import noise
from quant.noise import counter_uniform

M32 = 0xFFFFFFFF
M64 = 0xFFFFFFFFFFFFFFFF


# ---- reference twin: the construction in the module docstring, one element at a time in Python ints ----------
def ref_mix64(z):
    z = (z + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def ref_h32(x):
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & M32
    x ^= x >> 15
    x = (x * 0x735A2D97) & M32
    x ^= x >> 15
    return x


def ref_uniform(seed, stream, step, counter):
    key = ref_mix64(seed)
    key = ref_mix64(key ^ ref_mix64(stream ^ 0x5851F42D4C957F2D))
    key = ref_mix64(key ^ ref_mix64(step ^ 0x14057B7EF767814F))
    seg = ref_mix64(key ^ (((counter >> 32) * 0xD1B54A32D192ED03) & M64))
    k1, k2 = seg & M32, seg >> 32
    x = ref_h32(ref_h32((counter & M32) ^ k1) ^ k2)
    return (x >> 8) / 2.0**24


@pytest.mark.parametrize("seed,stream,step,offset", [
    (0, 0, 0, 0), (1234, 7, 99, 5), (2**62 + 3, 2**40, 2**33, 2**32 - 20), (5, 6, 7, 2**62), (1, 0, 0, 2**40 + 17),
])
def test_matches_reference_twin(seed, stream, step, offset):
    n = 50
    got = counter_uniform(n, seed=seed, stream=stream, step=step, offset=offset)
    want = torch.tensor([ref_uniform(seed, stream, step, offset + i) for i in range(n)], dtype=torch.float32)
    assert got.dtype == torch.float32 and got.shape == (n,)
    assert torch.equal(got, want)


def test_same_key_same_bits_and_chunking_invariant(monkeypatch):
    a = counter_uniform(100_003, seed=3, stream=1, step=17)
    b = counter_uniform(100_003, seed=3, stream=1, step=17)
    assert torch.equal(a, b)
    monkeypatch.setattr(noise, "_CHUNK_CPU", 977)  # many odd-sized work chunks
    assert torch.equal(counter_uniform(100_003, seed=3, stream=1, step=17), a)


def test_offset_consistency():
    big = counter_uniform(20_000, seed=11, stream=2, step=5)
    part = counter_uniform(3_000, seed=11, stream=2, step=5, offset=1_234)
    assert torch.equal(part, big[1_234:4_234])
    # across the 2**32 counter boundary, where the high counter bits enter the key
    start = 2**32 - 100
    whole = counter_uniform(300, seed=1, stream=2, step=3, offset=start)
    halves = torch.cat([counter_uniform(100, seed=1, stream=2, step=3, offset=start),
                        counter_uniform(200, seed=1, stream=2, step=3, offset=2**32)])
    assert torch.equal(whole, halves)


def test_range_and_grid():
    u = counter_uniform(1 << 18, seed=0, stream=0, step=0)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    scaled = u.double() * 2**24
    assert torch.equal(scaled, scaled.floor())  # multiples of 2**-24


def test_mean_variance_and_histogram():
    n = 1 << 20
    u = counter_uniform(n, seed=42, stream=3, step=1000).double()
    mean_sigma = math.sqrt(1 / 12 / n)
    assert abs(float(u.mean()) - 0.5) <= 6 * mean_sigma
    # sample variance of U[0,1): var(((u - 1/2)**2)) = 1/80 - 1/144 = 1/180
    var_sigma = math.sqrt(1 / 180 / n)
    assert abs(float(((u - 0.5) ** 2).mean()) - 1 / 12) <= 6 * var_sigma
    # chi-square over 64 equal bins: 63 degrees of freedom, mean 63, std sqrt(126)
    counts = torch.bincount((u * 64).long(), minlength=64).double()
    chi2 = float(((counts - n / 64) ** 2 / (n / 64)).sum())
    assert chi2 <= 63 + 6 * math.sqrt(126)


def _corr(a, b):
    a = a.double() - a.double().mean()
    b = b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_different_keys_are_independent():
    n = 1 << 18
    bound = 6 / math.sqrt(n)  # std of a sample correlation of independent variables is ~ 1/sqrt(n)
    base = dict(seed=7, stream=5, step=100)
    ref = counter_uniform(n, **base)
    neighbours = [dict(base, seed=8), dict(base, stream=6), dict(base, step=101), dict(base, step=99),
                  dict(base, seed=0, stream=0, step=0)]
    for key in neighbours:
        other = counter_uniform(n, **key)
        assert abs(_corr(ref, other)) <= bound, key
        # not a shifted copy either: no small lag correlates
        for lag in (1, 2, 3):
            assert abs(_corr(ref[lag:], other[:-lag])) <= bound, (key, lag)
        # equal 24-bit values occur by chance with probability 2**-24 each: expect ~n / 2**24 = 0.016
        assert int((ref == other).sum()) <= 5
    # within one stream, successive values are uncorrelated too
    for lag in (1, 2, 256):
        assert abs(_corr(ref[lag:], ref[:-lag])) <= bound


def test_empty_and_device_argument():
    assert counter_uniform(0, seed=0, stream=0, step=0).shape == (0,)
    assert counter_uniform(5, seed=0, stream=0, step=0, device="cpu").device.type == "cpu"


@pytest.mark.parametrize("use_compiled", [True, False])
def test_out_buffer_gets_the_same_bits(use_compiled):
    """out=: the draw written into a caller's buffer (any shape, reused across calls) is the allocated draw's bits,
    compiled and eager; wrong buffers are refused before anything is written."""
    from quant import compiled
    previous = compiled.enabled()
    compiled.set_enabled(use_compiled)
    try:
        buf = torch.full((3, 337), -1.0)
        for step, offset in ((4, 0), (5, 2**32 - 500)):   # reused; the second draw crosses a 2**32 counter boundary
            got = counter_uniform(buf.numel(), seed=8, stream=2, step=step, offset=offset, out=buf)
            assert got is buf and got.shape == (3, 337)
            want = torch.tensor([ref_uniform(8, 2, step, offset + i) for i in range(buf.numel())], dtype=torch.float32)
            assert torch.equal(buf.flatten(), want)
        # wrong dtype, wrong size, not contiguous, not a tensor
        for numel, bad in ((10, torch.zeros(10, dtype=torch.float64)), (10, torch.zeros(9)),
                           (20, torch.zeros(4, 5).t()), (10, [0.0] * 10)):
            with pytest.raises(ValueError, match="out must be"):
                counter_uniform(numel, seed=0, stream=0, step=0, out=bad)
        with pytest.raises(ValueError, match="out is on"):
            counter_uniform(4, seed=0, stream=0, step=0, out=torch.zeros(4), device="meta")
    finally:
        compiled.set_enabled(previous)


@pytest.mark.parametrize("kwargs,exc", [
    (dict(numel=-1, seed=0, stream=0, step=0), ValueError),
    (dict(numel=3, seed=-1, stream=0, step=0), ValueError),
    (dict(numel=3, seed=0, stream=2**63, step=0), ValueError),
    (dict(numel=3, seed=0, stream=0, step=0, offset=-5), ValueError),
    (dict(numel=3, seed=0, stream=0, step=0, offset=2**63 - 1), ValueError),
    (dict(numel=3, seed=1.5, stream=0, step=0), TypeError),
    (dict(numel=3, seed=True, stream=0, step=0), TypeError),
    (dict(numel=2.0, seed=0, stream=0, step=0), TypeError),
])
def test_bad_input(kwargs, exc):
    with pytest.raises(exc):
        counter_uniform(**kwargs)


@pytest.mark.gpu
def test_cuda_matches_cpu_bitwise():
    for offset in (0, 2**32 - 1000, 2**45):
        cpu = counter_uniform(300_001, seed=9, stream=4, step=77, offset=offset)
        gpu = counter_uniform(300_001, seed=9, stream=4, step=77, offset=offset, device="cuda")
        assert gpu.device.type == "cuda"
        assert torch.equal(gpu.cpu(), cpu)
