"""Q8_0 blocks against gguf-py's reference (bit-exact with ggml's C quantiser), and the error of the INT8 paths."""
import gguf
import numpy as np
import pytest
import torch

from quant.int8 import dequantize_int8, quantize_int8
from quant.q8_0 import (Q8_0_BLOCK_BYTES, QK8_0, dequantize_q8_0, q8_0_from_int8, q8_0_reuses_codes,
                        q8_0_row_bytes, quantize_q8_0)

Q8_0 = gguf.GGMLQuantizationType.Q8_0


def _rows(seed=0, rows=9, cols=160):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 1, rows)[:, None]  # scales over 4 decades
    x[0, :QK8_0] = 0          # an all-zero block: d = 0, codes 0
    x[1, 5] = 0.5 * x[1, 6]   # values at exact halves of a step exercise round-half-away-from-zero
    return x


def test_quantize_matches_gguf_reference_bit_for_bit():
    x = _rows()
    ours = quantize_q8_0(x)
    ref = gguf.quants.quantize(x.numpy(), Q8_0)
    assert ours.shape == (9, 160 // QK8_0 * Q8_0_BLOCK_BYTES) == ref.shape
    assert np.array_equal(ours.numpy(), ref)
    assert torch.equal(quantize_q8_0(x.to(torch.bfloat16)).view(torch.uint8),
                       torch.from_numpy(gguf.quants.quantize(x.to(torch.bfloat16).float().numpy(), Q8_0)))


def test_dequantize_matches_gguf_reference():
    data = quantize_q8_0(_rows(1))
    assert torch.equal(dequantize_q8_0(data, 160), torch.from_numpy(gguf.quants.dequantize(data.numpy(), Q8_0)))


@pytest.mark.parametrize("block_size", [32, 64, 256])
def test_int8_codes_are_reused_exactly_when_blocks_align(block_size):
    """Block size a multiple of 32: each Q8_0 block is (fp16(s), q); error |q| * |s - fp16(s)| <= 127 s 2**-11."""
    assert q8_0_reuses_codes(block_size)
    x = _rows(2, cols=320)   # 320 = 256 + 64: a short last lowmem block when block_size is 256
    q, s = quantize_int8(x, block_size=block_size)
    data = q8_0_from_int8(q, s, block_size=block_size)
    blocks = data.view(9, 10, Q8_0_BLOCK_BYTES)
    codes = blocks[:, :, 2:].contiguous().view(torch.int8).reshape(9, 320)
    assert torch.equal(codes, q)
    scale_of_element = s.repeat_interleave(block_size, dim=1)[:, :320]
    d = blocks[:, :, :2].contiguous().view(torch.float16).float().reshape(9, 10).repeat_interleave(QK8_0, dim=1)
    assert torch.equal(d, scale_of_element.half().float())
    # read back by gguf-py, not by our own decoder
    back = torch.from_numpy(gguf.quants.dequantize(data.numpy(), Q8_0)).reshape(9, 320)
    exact = dequantize_int8(q, s, block_size=block_size)
    # plus the fp32 rounding of the two products q * s and q * fp16(s) (2**-24 relative each)
    bound = q.abs().float() * (scale_of_element - scale_of_element.half().float()).abs() + 2.0**-22 * exact.abs()
    assert ((back - exact).abs() <= bound).all()
    normal = scale_of_element >= 2.0**-14
    assert ((back - exact).abs()[normal] <= (127 * scale_of_element * 2.0**-11)[normal]).all()


def test_unaligned_blocks_are_requantised_within_the_q8_0_bound():
    """Block size 48: a Q8_0 block straddles two scales; values are requantised with the reference quantiser."""
    assert not q8_0_reuses_codes(48)
    x = _rows(3)
    q, s = quantize_int8(x, block_size=48)
    data = q8_0_from_int8(q, s, block_size=48)
    exact = dequantize_int8(q, s, block_size=48)
    assert np.array_equal(data.numpy(), gguf.quants.quantize(exact.numpy(), Q8_0))
    back = torch.from_numpy(gguf.quants.dequantize(data.numpy(), Q8_0)).reshape(9, 160)
    d = exact.reshape(9, 5, QK8_0).abs().amax(-1) / 127
    bound = (d / 2 + 127 * (d - d.half().float()).abs()).repeat_interleave(QK8_0, dim=1) + 2.0**-22 * exact.abs()
    assert ((back - exact).abs() <= bound).all()


def test_bad_inputs():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_q8_0(torch.ones(2, 40))
    with pytest.raises(ValueError, match="multiple of 32"):
        q8_0_row_bytes(33)
    q = torch.ones(1, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match="float16's largest"):
        q8_0_from_int8(q, torch.full((1, 1), 1e5), block_size=64)
    with pytest.raises(ValueError, match="float16's largest"):
        quantize_q8_0(torch.full((1, 32), 1e7))
