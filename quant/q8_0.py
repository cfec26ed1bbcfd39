"""Q8_0, llama.cpp's 8-bit block format, from float rows or straight from lowmem's blockwise INT8 codes.

Format (ggml `block_q8_0`): a row of n elements (n a multiple of 32) is n / 32 blocks of 34 bytes each: d, the
block's scale as a little-endian IEEE float16, then its 32 codes q as int8; element k of the block is d * q[k].
Rows here are (r, n / 32 * 34) uint8 tensors, the bytes a GGUF file holds, in row order.

quantize_q8_0 is ggml's reference quantiser (`quantize_row_q8_0_ref`, gguf-py's `Q8_0`): d = max|x| / 127 in fp32,
q = round-half-away-from-zero(x * (1 / d)), and only then d is rounded to float16. Its error per element is at most
d / 2 + 127 * |d - fp16(d)| (the rounding of x / d, plus the codes times the rounding of d).

q8_0_from_int8 converts lowmem's INT8 rows (q int8 (r, n), scales fp32 (r, ceil(n / B)), value q * s; see
quant.int8) without going through floats when the layouts line up: if B is a multiple of 32, every Q8_0 block lies
inside one lowmem block, so the Q8_0 block is (fp16(s), q): the codes are reused as they are and the only change is
the rounding of s to float16, an error of |q| * |s - fp16(s)| <= 127 * s * 2**-11 for s in fp16's normal range
(s >= 2**-14). Requantising instead would re-round values that already lie on the grid of s onto a finer grid,
an error up to d / 2 (about s / 2 where a block holds a code of +-127), so the codes are reused whenever they can be.
Otherwise (B not a multiple of 32: a Q8_0 block straddles two lowmem scales) the rows are dequantised in fp32 and
quantised with quantize_q8_0.
"""
from __future__ import annotations

import sys

import torch

from quant import _checks
from quant.int8 import dequantize_int8

QK8_0 = 32                 # elements per Q8_0 block
Q8_0_BLOCK_BYTES = 34      # fp16 scale + 32 int8 codes
_FP16_MAX = 65504.0


def _check_little_endian() -> None:
    if sys.byteorder != "little":
        raise RuntimeError("Q8_0 bytes are written in the machine's byte order; GGUF here needs a little-endian host")


def _check_row_length(n: int) -> None:
    if n % QK8_0:
        raise ValueError(f"Q8_0 needs rows whose length is a multiple of {QK8_0}, got {n}")


def q8_0_row_bytes(n: int) -> int:
    """Bytes of one Q8_0 row of n elements (n a multiple of 32)."""
    _check_row_length(n)
    return n // QK8_0 * Q8_0_BLOCK_BYTES


def _pack(d: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """d (r, nb) fp16 and codes (r, nb, 32) int8 -> (r, nb * 34) uint8 blocks."""
    rows, nb = d.shape
    out = torch.empty(rows, nb, Q8_0_BLOCK_BYTES, dtype=torch.uint8)
    out[:, :, :2] = d.contiguous().view(torch.uint8).view(rows, nb, 2)
    out[:, :, 2:] = codes.view(torch.uint8)
    return out.view(rows, nb * Q8_0_BLOCK_BYTES)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """ggml's roundf as gguf-py writes it (floor(|x|) + floor(2 * frac)), with x's sign; exact in fp32.
    In place on two temporaries of x's size (the chunk's peak memory)."""
    frac = x.abs()
    out = frac.floor()
    frac.sub_(out).mul_(2).floor_()
    return out.add_(frac).copysign_(x)


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """Q8_0 blocks of float rows, bit-identical to ggml's reference quantiser (module docstring).

    x: (r, n) float (any float dtype, computed in fp32), n a multiple of 32, finite, every block's max|x| / 127 at
    most fp16's largest value. Returns (r, n / 32 * 34) uint8 on the CPU.
    """
    _check_little_endian()
    _checks.floating(x, "x")
    _checks.rank(x, "x", 2)
    rows, n = x.shape
    _check_row_length(n)
    blocks = x.detach().to(device="cpu", dtype=torch.float32).reshape(rows, n // QK8_0, QK8_0)
    _checks.finite(blocks, "x")
    d = blocks.abs().amax(dim=-1) / 127
    if rows and n and d.max() > _FP16_MAX:
        raise ValueError(f"a Q8_0 block scale {float(d.max()):.6g} exceeds float16's largest value {_FP16_MAX}")
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    scaled = blocks * inv[..., None]
    codes = _round_half_away(scaled).to(torch.int8)
    del scaled
    return _pack(d.to(torch.float16), codes)


def q8_0_reuses_codes(block_size: int) -> bool:
    """Whether q8_0_from_int8 writes lowmem's codes unchanged (a block size that is a multiple of 32)."""
    return block_size % QK8_0 == 0


def q8_0_from_int8(q: torch.Tensor, scales: torch.Tensor, *, block_size: int) -> torch.Tensor:
    """Q8_0 blocks of INT8 rows: (fp16(s), q) when the block size is a multiple of 32, else requantised.

    q: int8 (r, n), n a multiple of 32; scales: fp32 (r, ceil(n / block_size)), finite, at most fp16's largest
    value when the codes are reused. Returns (r, n / 32 * 34) uint8 on the CPU. See the module docstring for the
    error of each path.
    """
    _check_little_endian()
    rows, n = q.shape
    _check_row_length(n)
    if not q8_0_reuses_codes(block_size):
        return quantize_q8_0(dequantize_int8(q, scales, block_size=block_size))
    q, scales = q.detach().cpu(), scales.detach().cpu()
    _checks.finite(scales, "scales")
    if rows and scales.numel() and scales.abs().max() > _FP16_MAX:
        raise ValueError(f"an INT8 block scale {float(scales.abs().max()):.6g} exceeds float16's largest value "
                         f"{_FP16_MAX}: Q8_0 cannot hold it (export as bf16 instead)")
    per_block = block_size // QK8_0
    d = scales.to(torch.float16).repeat_interleave(per_block, dim=1, output_size=scales.shape[1] * per_block)
    return _pack(d[:, : n // QK8_0], q.reshape(rows, n // QK8_0, QK8_0))


def dequantize_q8_0(data: torch.Tensor, n: int) -> torch.Tensor:
    """fp32 (r, n) values of Q8_0 rows data (r, n / 32 * 34) uint8: d * q per block."""
    rows = data.shape[0]
    blocks = data.reshape(rows, q8_0_row_bytes(n) // Q8_0_BLOCK_BYTES, Q8_0_BLOCK_BYTES)
    d = blocks[:, :, :2].contiguous().view(torch.float16).to(torch.float32)
    codes = blocks[:, :, 2:].contiguous().view(torch.int8).to(torch.float32)
    return (codes * d).reshape(rows, n)
