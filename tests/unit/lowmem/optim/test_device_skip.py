"""The device-side skip (keep_old / skip=...) of every writer: False gives the same bytes as the unguarded call, True
leaves every byte as it was; and the on-device clipping coefficient equals the host formula it replaced."""
import math

import pytest
import torch

from lowmem.optim import float_adamw
from lowmem.optim.float_adamw import float_adamw_update_, init_float_adamw_state
from lowmem.optim.lowrank import clip_coefficient
from lowmem.optim.weights import FloatWeight, Int8Weight
from quant.int8 import quantize_int8


def _float_case(bits, dtype, numel=5000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    param = torch.randn(numel, generator=gen).to(dtype)
    state = init_float_adamw_state(param, bits=bits)
    for _ in range(2):   # non-trivial moments first
        float_adamw_update_(param, torch.randn(numel, generator=gen).to(dtype), state, lr=1e-2, beta1=0.9,
                            beta2=0.999, eps=1e-8, weight_decay=0.1, backend="torch")
    return param, state, torch.randn(numel, generator=gen).to(dtype)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("bits,dtype", [(32, torch.float32), (32, torch.bfloat16), (8, torch.float32),
                                        (8, torch.bfloat16)])
def test_float_adamw_keep_old(monkeypatch, bits, dtype, backend):
    monkeypatch.setattr(float_adamw, "GUARD_CHUNK_ELEMENTS", 1024)   # several chunks, a short last one
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, backend=backend)
    param, state, grad = _float_case(bits, dtype)
    ref_param, ref_state = param.clone(), {k: v.clone() for k, v in state.items()}
    float_adamw_update_(ref_param, grad, ref_state, **hyper)
    written_param, written_state = param.clone(), {k: v.clone() for k, v in state.items()}
    float_adamw_update_(written_param, grad, written_state, keep_old=torch.tensor(False), **hyper)
    assert torch.equal(written_param, ref_param) and not torch.equal(written_param, param)
    assert all(torch.equal(written_state[k], ref_state[k]) for k in state)
    kept_param, kept_state = param.clone(), {k: v.clone() for k, v in state.items()}
    float_adamw_update_(kept_param, grad, kept_state, keep_old=torch.tensor(True), **hyper)
    assert torch.equal(kept_param, param)
    assert all(torch.equal(kept_state[k], state[k]) for k in state if k != "step")
    assert int(kept_state["step"]) == int(state["step"]) + 1   # the caller puts the counter back


def test_float_adamw_keep_old_strided_param():
    param, state, grad = _float_case(32, torch.float32, numel=60)
    param2d = param.view(6, 10).T            # non-contiguous: guarded whole
    state2d = {k: (v.view(6, 10).T.contiguous() if v.dim() else v.clone()) for k, v in state.items()}
    before = param2d.clone()
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    float_adamw_update_(param2d, grad.view(6, 10).T, state2d, keep_old=torch.tensor(True), **hyper)
    assert torch.equal(param2d, before)


def _int8_target(seed=0, m=40, n=70):
    gen = torch.Generator().manual_seed(seed)
    q, s = quantize_int8(torch.randn(m, n, generator=gen), block_size=32)
    delta = torch.randn(m, n, generator=gen) * 0.05
    return q, s, delta


@pytest.mark.parametrize("chunk_rows", [1, 7, 40])
def test_int8_weight_keep_old(monkeypatch, chunk_rows):
    monkeypatch.setattr("lowmem.optim.weights.rows_per_chunk", lambda shape, device_type="cpu": chunk_rows)
    q, s, delta = _int8_target()

    def apply(keep_old):
        tq, ts = q.clone(), s.clone()
        Int8Weight(tq, ts, block_size=32, seed=3, stream=5).apply_(lambda r0, r1, w: delta[r0:r1].clone(), step=2,
                                                                   keep_old=keep_old)
        return tq, ts
    ref = apply(None)
    assert not torch.equal(ref[0], q)
    written = apply(torch.tensor(False))
    assert torch.equal(written[0], ref[0]) and torch.equal(written[1], ref[1])
    kept = apply(torch.tensor(True))
    assert torch.equal(kept[0], q) and torch.equal(kept[1], s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_weight_keep_old(dtype):
    _, _, delta = _int8_target()
    w = torch.randn(40, 70).to(dtype)

    def apply(keep_old):
        t = w.clone()
        FloatWeight(t).apply_(lambda r0, r1, rows: delta[r0:r1].clone(), step=0, keep_old=keep_old)
        return t
    assert torch.equal(apply(torch.tensor(False)), apply(None)) and not torch.equal(apply(None), w)
    assert torch.equal(apply(torch.tensor(True)), w)


def test_clip_coefficient_equals_the_host_formula():
    gen = torch.Generator().manual_seed(0)
    values = torch.cat([torch.rand(2000, generator=gen) * 10.0 ** torch.randint(-8, 8, (2000,), generator=gen),
                        torch.tensor([0.0, 1.0, 4.0])])
    for clip in (1.0, 0.05, 3.7):
        for sq in values:
            host = min(1.0, clip / (math.sqrt(float(sq)) + 1e-6))
            expected = torch.tensor(host, dtype=torch.float32)
            got = clip_coefficient(sq, clip)
            assert got.dtype == torch.float32 and torch.equal(got, expected), (float(sq), clip)
    assert math.isnan(float(clip_coefficient(torch.tensor(float("nan")), 1.0)))
