"""Counter-based uniform noise: u(seed, stream, step, counter) in [0, 1), the same bits on every device and run.

Stochastic rounding needs noise that is reproducible on resume and identical on every data-parallel rank without
storing or communicating generator state. A counter-based generator gives that: element i of a draw is a pure
function of the key (seed, stream, step) and its counter offset + i, so any slice of a draw can be regenerated on
its own (chunked updates stay bit-identical whatever the chunk size) and nothing but three integers is kept.

Construction (all integer arithmetic, so CPU and CUDA agree bit for bit):
  - the key (seed, stream, step) and the high 32 bits of the counter are mixed in Python with the splitmix64
    finalizer into two 32-bit words k1, k2 (once per call, not per element);
  - per element, with c the low 32 bits of the counter: x = H(H(c ^ k1) ^ k2), where H is a 32-bit
    xor-shift-multiply mixer (Wellons' low-bias `lowbias32` family, constants 0x21f0aaad and 0x735a2d97);
    H is a bijection, so within one key distinct counters give distinct 32-bit words;
  - u = (x >> 8) * 2**-24: the top 24 bits, exactly representable in fp32, so u takes the values
    k * 2**-24, k = 0 .. 2**24 - 1, and u < 1 always.
Arithmetic runs on int64 tensors; both multipliers are < 2**31 and operands are masked to 32 bits, so no product
exceeds 2**63 and nothing overflows.
"""
from __future__ import annotations

import torch

from quant import _checks, compiled

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
_MUL1 = 0x21F0AAAD  # both < 2**31: x (< 2**32) * _MUL (< 2**31) < 2**63 fits int64
_MUL2 = 0x735A2D97
_INV_2_24 = 2.0**-24

# Elements per int64 work buffer. On CPU a few hundred KiB keeps the ~15 elementwise passes in cache (measured
# ~3x faster than one pass over a 16M-element tensor on 2 cores); on CUDA larger chunks amortise launch overhead.
_CHUNK_CPU = 1 << 15
_CHUNK_CUDA = 1 << 24
_COMPILED_PIECE = 1 << 30  # a compiled call's int32 local counters stay below 2**31


def _mix64(z: int) -> int:
    """splitmix64 finalizer on a Python int (a bijection of 64-bit words)."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def stream_key(seed: int, stream: int, step: int) -> int:
    """64-bit key of one (seed, stream, step) triple; each component goes through its own mixing round."""
    key = _mix64(seed)
    key = _mix64(key ^ _mix64(stream ^ 0x5851F42D4C957F2D))
    key = _mix64(key ^ _mix64(step ^ 0x14057B7EF767814F))
    return key


def _hash32_(x: torch.Tensor, tmp: torch.Tensor) -> None:
    """In place: x <- H(x) for int64 x holding 32-bit values; tmp is scratch of the same shape."""
    torch.bitwise_right_shift(x, 16, out=tmp)
    x.bitwise_xor_(tmp)
    x.mul_(_MUL1).bitwise_and_(_MASK32)
    torch.bitwise_right_shift(x, 15, out=tmp)
    x.bitwise_xor_(tmp)
    x.mul_(_MUL2).bitwise_and_(_MASK32)
    torch.bitwise_right_shift(x, 15, out=tmp)
    x.bitwise_xor_(tmp)


def _segments(start: int, numel: int, chunk: int):
    """Split counters [start, start + numel) into pieces of at most `chunk` that never cross a 2**32 boundary
    (the high counter bits are folded into the per-piece key). Yields (position in output, counter, length)."""
    pos = 0
    while pos < numel:
        counter = start + pos
        length = min(chunk, numel - pos, (1 << 32) - (counter & _MASK32))
        yield pos, counter, length
        pos += length


def counter_uniform(numel: int, *, seed: int, stream: int, step: int, offset: int = 0,
                    device: torch.device | str | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Uniform noise in [0, 1) from a counter-based hash.

    Args:
        numel: number of values (>= 0).
        seed, stream, step: the key, ints in [0, 2**63). Different keys give independent streams.
        offset: counter of the first element (>= 0; offset + numel <= 2**63).
        device: where to build the result (default CPU; with `out`, None or out's device).
        out: optional contiguous fp32 tensor of numel elements to write into (any shape) and return, e.g. a buffer
            reused across calls: a freshly allocated large tensor costs its page faults on CPU (most of the time of
            one 64 MiB draw), which a reused buffer pays once.
    Returns:
        fp32 tensor (numel,) on `device` (or `out`); element i depends only on (seed, stream, step, offset + i), so
        counter_uniform(n, ..., offset=a)[k] == counter_uniform(m, ..., offset=b)[a + k - b] whenever both exist,
        on CPU and CUDA alike. Values are multiples of 2**-24 in [0, 1 - 2**-24].
    """
    numel = _checks.integer(numel, "numel", minimum=0)
    offset = _checks.integer(offset, "offset", minimum=0)
    if offset + numel > 2**63:
        raise ValueError(f"offset + numel must be <= 2**63, got {offset} + {numel}")
    key = stream_key(_checks.key(seed, "seed"), _checks.key(stream, "stream"), _checks.key(step, "step"))
    if out is None:
        device = torch.device("cpu") if device is None else torch.device(device)
        out = torch.empty(numel, dtype=torch.float32, device=device)
    else:
        if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or out.numel() != numel \
                or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous float32 tensor of {numel} elements, got "
                             f"{getattr(out, 'dtype', type(out).__name__)} {tuple(getattr(out, 'shape', ()))}")
        if device is not None and torch.device(device) != out.device:
            raise ValueError(f"out is on {out.device}, device is {device}")
        result, out = out, out.view(-1)
        _fill_uniform_(out, key, offset)
        return result
    _fill_uniform_(out, key, offset)
    return out


def _fill_uniform_(out: torch.Tensor, key: int, offset: int) -> None:
    """Fill fp32 out (numel,) with the draw of `key` (stream_key) at counters offset .. offset + numel - 1."""
    numel = out.numel()
    if numel == 0:
        return
    if compiled.wanted():
        for pos in range(0, numel, _COMPILED_PIECE):  # a piece spans at most two 2**32 counter segments
            piece = out[pos:pos + _COMPILED_PIECE]
            compiled.uniform_(piece, key=key, offset=offset + pos, mix64=_mix64,
                              eager=lambda out_, at=offset + pos: _uniform_eager_(out_, key, at))
        return
    _uniform_eager_(out, key, offset)


def _uniform_eager_(out: torch.Tensor, key: int, offset: int) -> None:
    """The reference twin: out fp32 (numel,) <- noise at counters offset .. offset + numel - 1."""
    numel, device = out.numel(), out.device
    chunk = _CHUNK_CPU if device.type == "cpu" else _CHUNK_CUDA
    buf = torch.empty(min(chunk, numel), dtype=torch.int64, device=device)
    tmp = torch.empty_like(buf)
    for pos, counter, length in _segments(offset, numel, chunk):
        segment_key = _mix64(key ^ ((counter >> 32) * 0xD1B54A32D192ED03 & _MASK64))
        k1, k2 = segment_key & _MASK32, segment_key >> 32
        lo = counter & _MASK32
        x, t = buf[:length], tmp[:length]
        torch.arange(lo, lo + length, dtype=torch.int64, device=device, out=x)
        x.bitwise_xor_(k1)
        _hash32_(x, t)
        x.bitwise_xor_(k2)
        _hash32_(x, t)
        torch.bitwise_right_shift(x, 8, out=t)
        out[pos:pos + length].copy_(t).mul_(_INV_2_24)
