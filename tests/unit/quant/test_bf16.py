"""quant.bf16: stochastic rounding to bf16 -- neighbours only, unbiased (statistical bound), reproducible bits."""
import pytest
import torch

from quant.bf16 import sr_to_bf16


def neighbours(x):
    """The two bf16 values around fp32 x, found without bit tricks: round toward zero and away from it."""
    down = x.to(torch.bfloat16)  # nearest; step to the other side where needed
    lower = torch.nextafter(down, torch.full_like(down, -torch.inf)).float()
    upper = torch.nextafter(down, torch.full_like(down, torch.inf)).float()
    below = torch.where(down.float() <= x, down.float(), lower)
    above = torch.where(down.float() >= x, down.float(), upper)
    return below, above


def test_each_value_rounds_to_a_neighbour_and_representable_values_stay():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10000, generator=g) * torch.logspace(-30, 30, 10000)
    y = sr_to_bf16(x, seed=1, stream=2, step=3).float()
    below, above = neighbours(x)
    assert bool(((y == below) | (y == above)).all())
    exact = x.to(torch.bfloat16)
    assert torch.equal(sr_to_bf16(exact.float(), seed=1, stream=2, step=3), exact)
    assert torch.equal(sr_to_bf16(torch.zeros(5), seed=0, stream=0, step=0).float(), torch.zeros(5))


@pytest.mark.parametrize("value", [1.0 + 1e-3, -3.3e-5 - 1e-9, 7.1e3 + 0.37, 2.0 ** -130 * 1.3])
def test_mean_is_the_fp32_value(value):
    """n = 2**17 draws of one value: mean within 6 sigma of x, sigma = gap·sqrt(p(1-p)/n) with p the fraction of
    the gap x lies above the lower neighbour (the exact Bernoulli variance of the rounding)."""
    n = 1 << 17
    x = torch.full((n,), value, dtype=torch.float32)
    y = sr_to_bf16(x, seed=5, stream=0, step=9).double()
    below, above = (t[0].double() for t in neighbours(x[:1]))
    gap = above - below
    p = (torch.tensor(value, dtype=torch.float32).double() - below) / gap
    sigma = gap * torch.sqrt(p * (1 - p) / n)
    assert abs(float(y.mean()) - float(torch.tensor(value, dtype=torch.float32))) <= 6 * float(sigma) + 1e-30
    assert 0 < float(p) < 1 and bool((y == below).any() and (y == above).any())


def test_same_key_same_bits_and_offsets_compose():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 300, generator=g)
    a = sr_to_bf16(x, seed=7, stream=11, step=13)
    assert torch.equal(a, sr_to_bf16(x.clone(), seed=7, stream=11, step=13))  # resume / another rank
    rows = torch.cat([sr_to_bf16(x[i:i + 1], seed=7, stream=11, step=13, offset=i * 300) for i in range(4)])
    assert torch.equal(a, rows)  # chunking by rows with the element's flat index as counter
    for other in (dict(seed=8, stream=11, step=13), dict(seed=7, stream=12, step=13), dict(seed=7, stream=11, step=14)):
        assert not torch.equal(a, sr_to_bf16(x, **other))
    assert a.shape == x.shape and a.dtype == torch.bfloat16


def test_small_updates_accumulate_in_expectation():
    """100 updates of 1e-3 on 1.0 (bf16 ulp there: 2**-7, so each update is 1/8 of an ulp): nearest rounding never
    moves; SR moves by 0.1 on average. Bound: each rounding adds a zero-mean error of variance <= ulp²/4 with
    ulp <= 2**-7 on [1, 2), so after 100 steps the per-element std is <= 0.039 and the mean of 4096 elements is
    within 6·0.039/64 = 3.7e-3 of 1.1."""
    w_sr = torch.ones(4096, dtype=torch.bfloat16)
    w_rn = torch.ones(4096, dtype=torch.bfloat16)
    for step in range(100):
        w_sr = sr_to_bf16(w_sr.float() + 1e-3, seed=0, stream=3, step=step)
        w_rn = (w_rn.float() + 1e-3).to(torch.bfloat16)
    assert bool((w_rn == 1.0).all())
    assert abs(float(w_sr.double().mean()) - 1.1) <= 3.7e-3


@pytest.mark.parametrize("numel, offset", [(1, 0), (1000, 17), (3000, 2**32 - 1234), (777, 2**40 + 3)])
def test_traceable_form_gives_the_same_bits(numel, offset):
    """sr_to_bf16_traceable (what a compiled kernel traces), eager and under torch.compile, against sr_to_bf16 on
    the same key and counters, including a call crossing a 2**32 counter segment."""
    from quant.bf16 import sr_noise_keys, sr_to_bf16_traceable
    x = torch.randn(numel, generator=torch.Generator().manual_seed(4)) * torch.logspace(-20, 20, numel)
    key = dict(seed=3, stream=8, step=12)
    want = sr_to_bf16(x, offset=offset, **key)
    keys = sr_noise_keys(numel, offset=offset, device="cpu", **key)
    assert torch.equal(sr_to_bf16_traceable(x, keys), want)
    compiled_form = torch.compile(sr_to_bf16_traceable, fullgraph=True)
    assert torch.equal(compiled_form(x, keys), want)
