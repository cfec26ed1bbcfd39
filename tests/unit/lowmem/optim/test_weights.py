"""FloatWeight: row-chunked float updates; bf16 with stochastic rounding keyed by (seed, stream, step)."""
import torch

from lowmem.optim.weights import FloatWeight


def _apply(weight, delta, step):
    weight.apply_(lambda r0, r1, rows: delta[r0:r1], step=step)


def test_bf16_float_weight_small_updates_move_in_mean_only_with_sr():
    """100 updates of 1e-3 on 1.0: round-to-nearest stays at 1.0, SR moves by 0.1 in mean. Bound (as for
    quant.bf16): zero-mean rounding errors of variance <= (2**-7)²/4 each, 100 steps, mean of 64·64 elements:
    within 6·sqrt(25)·2**-7/64 = 3.7e-3."""
    sr = FloatWeight(torch.ones(64, 64, dtype=torch.bfloat16), sr_key=(0, 9))
    rn = FloatWeight(torch.ones(64, 64, dtype=torch.bfloat16))
    delta = torch.full((64, 64), 1e-3)
    for step in range(100):
        _apply(sr, delta, step)
        _apply(rn, delta, step)
    assert bool((rn.tensor == 1.0).all())
    assert abs(float(sr.tensor.double().mean()) - 1.1) <= 3.7e-3


def test_bits_do_not_depend_on_row_chunking_and_repeat_for_the_same_key(monkeypatch):
    from lowmem.optim import weights
    g = torch.Generator().manual_seed(0)
    init = torch.randn(50, 300, generator=g).bfloat16()
    delta = torch.randn(50, 300, generator=g) * 1e-3
    a = FloatWeight(init.clone(), sr_key=(4, 2))
    _apply(a, delta, step=7)
    monkeypatch.setattr(weights, "DEFAULT_CHUNK_ELEMENTS", 600)  # two rows per chunk
    b = FloatWeight(init.clone(), sr_key=(4, 2))
    _apply(b, delta, step=7)
    assert torch.equal(a.tensor, b.tensor)
    c = FloatWeight(init.clone(), sr_key=(4, 2))
    _apply(c, delta, step=8)
    assert not torch.equal(a.tensor, c.tensor)
    # fp32 weights are plain additions whatever the key
    f = FloatWeight(init.float(), sr_key=(4, 2))
    _apply(f, delta, step=7)
    assert torch.equal(f.tensor, init.float() + delta)


def test_update_chunks_are_larger_on_accelerators():
    """4 MiB fp32 chunks on CPU, 16 MiB on an accelerator: a Llama-2-7B MLP weight (11008 x 4096 in its update's
    (m, n)) is written in 11 chunks on a GPU and 43 on CPU, each a back-projection and a kernel call."""
    from lowmem.optim.weights import rows_per_chunk
    m, n = 11008, 4096
    cpu, gpu = rows_per_chunk((m, n), "cpu"), rows_per_chunk((m, n), "cuda")
    assert cpu == (1 << 20) // n == 256 and gpu == (1 << 22) // n == 1024
    assert -(-m // cpu) == 43 and -(-m // gpu) == 11
    assert rows_per_chunk((3, 5), "cuda") == 3 and rows_per_chunk((5, 10**7), "cpu") == 1   # bounded by m, >= 1
