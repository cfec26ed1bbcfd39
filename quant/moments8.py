"""8-bit blockwise codec for optimizer moments: bitsandbytes' "dynamic" format (DESIGN §3.4).

Format: x of any shape is flattened row-major and cut into blocks of block_size values (the last may be short).
Per block, absmax = max|x| (fp32); each value is stored as the uint8 index of the entry of a fixed 256-value map
(`dynamic_map`) nearest to x / absmax. Decoding is map[code] * absmax. The map is dynamic-exponent: values from
about 1e-6 to 1 with relative spacing from 1/2 to 1/64 per decade, so small moments keep their relative precision.
The signed map serves first moments; the unsigned one (twice the fraction resolution, no negatives) second moments.

Devices: on CUDA, when bitsandbytes is importable and block_size is one it supports (64 .. 4096, powers of two),
the bitsandbytes kernels run; everywhere else a pure-torch twin produces the same codes:
  v = x * (1 / absmax)            (fp32, correctly rounded reciprocal, as the CUDA kernel computes it)
  code = index of the nearest map entry to v; at an exact midpoint between entries k and k + 1 the even index wins
         (this is what bitsandbytes' CUDA binary search returns);
  an all-zero block has absmax 0 and codes 0 (on every path; bitsandbytes returns 0 there as well).
Known differences, none of which changes the format: bitsandbytes' CUDA build uses --use_fast_math, whose
approximate reciprocal can move v by an ulp and so flip a value lying within an ulp of a midpoint to the neighbouring
code; and bitsandbytes' own CPU kernel (0.50.x) rounds v to a 65536-point grid before the lookup, so for about
0.1-1% of typical values it picks a code that is not the nearest. The twin always picks the nearest.

Error: |x - decode(code)| <= absmax * (largest gap between adjacent map entries) / 2, since the nearest entry is at
most half a gap away; tests derive the gap from the map itself.
"""
from __future__ import annotations

import torch

from quant import _checks

BLOCK_SIZE = 256
_BNB_BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)
_CHUNK_ELEMS = 1 << 20  # twin works on about this many elements at a time (int64 indices are 8 B/element)
_EXPONENT_BITS = 7
_MAP_SIZE = 256

_maps: dict[tuple[bool, str], torch.Tensor] = {}
_midpoints: dict[tuple[bool, str], torch.Tensor] = {}


def _build_map(signed: bool) -> torch.Tensor:
    """The 256 map values, built from their definition: for decade e = 0..6 the bin centres of 2**e (signed) or
    2**(e+1) (unsigned) equal bins of [0.1, 1], times 10**(e-6), with both signs when signed; plus 0 and 1."""
    values = [torch.tensor([0.0, 1.0])]
    for decade in range(_EXPONENT_BITS):
        n_bins = 2 ** decade if signed else 2 ** (decade + 1)
        edges = torch.linspace(0.1, 1.0, n_bins + 1, dtype=torch.float32)
        magnitudes = (edges[:-1] + edges[1:]) / 2.0 * (10.0 ** (decade - _EXPONENT_BITS + 1))
        values.append(magnitudes)
        if signed:
            values.append(-magnitudes)
    table = torch.sort(torch.cat(values)).values
    assert table.numel() == _MAP_SIZE and bool((table[1:] > table[:-1]).all())
    return table


def _cached(signed: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(map (256,), midpoints padded with +inf (256,)) on device, built once per (signed, device)."""
    key = (bool(signed), str(device))
    if key not in _maps:
        cpu_key = (bool(signed), "cpu")
        if cpu_key not in _maps:
            table = _build_map(signed)
            _maps[cpu_key] = table
            _midpoints[cpu_key] = torch.cat([(table[:-1] + table[1:]) * 0.5, torch.tensor([float("inf")])])
        _maps[key] = _maps[cpu_key].to(device)
        _midpoints[key] = _midpoints[cpu_key].to(device)
    return _maps[key], _midpoints[key]


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """fp32 (256,) sorted map values in [-1, 1] (signed) or [0, 1] (unsigned); a fresh CPU tensor. Equal to
    bitsandbytes.functional.create_dynamic_map(signed=signed)."""
    return _cached(signed, torch.device("cpu"))[0].clone()


def _use_bnb(device: torch.device, block_size: int):
    if device.type != "cuda" or block_size not in _BNB_BLOCK_SIZES:
        return None
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError:
        return None
    return bnb_functional


def _check_signed(signed) -> bool:
    if not isinstance(signed, bool):
        raise TypeError(f"signed must be a bool, got {type(signed).__name__}")
    return signed


def _nearest_codes(v: torch.Tensor, midpoints: torch.Tensor) -> torch.Tensor:
    """int64 index of the nearest map entry to each v (1-D fp32); exact midpoint ties go to the even index."""
    idx = torch.bucketize(v, midpoints[:-1])  # number of midpoints strictly below v
    tie = (midpoints[idx] == v) & (idx % 2 == 1)
    return idx.add_(tie)


def quantize_moment8(x: torch.Tensor, *, signed: bool, block_size: int = BLOCK_SIZE) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
    """Encode x blockwise with the dynamic map.

    Args:
        x: any shape, fp32 (bf16/fp16 accepted and read as fp32), finite; non-negative when signed=False.
        signed: signed map (first moments) or unsigned map (second moments).
        block_size: values per absmax block (>= 1).
    Returns:
        codes uint8 (x.shape) and absmax fp32 (ceil(numel / block_size),), on x's device; empty x gives an empty
        codes tensor of x's shape and absmax (0,).
    """
    _checks.floating(x, "x")
    signed = _check_signed(signed)
    block_size = _checks.integer(block_size, "block_size", minimum=1)
    _checks.finite(x, "x")
    if not signed and x.numel() and bool((x < 0).any()):
        raise ValueError(f"x has {int((x < 0).sum())} negative value(s); the unsigned map (signed=False) cannot "
                         "represent them (use signed=True)")
    numel = x.numel()
    n_blocks = -(-numel // block_size)
    if numel == 0:
        return (torch.empty(x.shape, dtype=torch.uint8, device=x.device),
                torch.empty(0, dtype=torch.float32, device=x.device))
    bnb_functional = _use_bnb(x.device, block_size)
    if bnb_functional is not None:
        table, _ = _cached(signed, x.device)
        codes, state = bnb_functional.quantize_blockwise(x.contiguous(), code=table, blocksize=block_size)
        absmax = state.absmax
        _zero_empty_blocks_(codes.view(-1), absmax, block_size)
        return codes, absmax
    return _quantize_twin(x, signed, block_size, n_blocks)


def _zero_empty_blocks_(codes: torch.Tensor, absmax: torch.Tensor, block_size: int) -> None:
    """Codes of blocks whose absmax is 0 set to 0 (no host sync)."""
    n_full = codes.numel() // block_size
    full = codes[:n_full * block_size].view(n_full, block_size)
    full.masked_fill_((absmax[:n_full] == 0)[:, None], 0)
    if codes.numel() > n_full * block_size:
        codes[n_full * block_size:].masked_fill_(absmax[n_full] == 0, 0)


def _quantize_twin(x: torch.Tensor, signed: bool, block_size: int, n_blocks: int):
    _, midpoints = _cached(signed, x.device)
    flat = x.reshape(-1)
    numel = flat.numel()
    codes = torch.empty(numel, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    blocks_per_chunk = max(1, _CHUNK_ELEMS // block_size)
    for b0 in range(0, n_blocks, blocks_per_chunk):
        b1 = min(n_blocks, b0 + blocks_per_chunk)
        e0, e1 = b0 * block_size, min(numel, b1 * block_size)
        chunk = flat[e0:e1].float()
        padded = chunk if e1 - e0 == (b1 - b0) * block_size else torch.cat(
            [chunk, chunk.new_zeros((b1 - b0) * block_size - (e1 - e0))])
        blocks = padded.view(b1 - b0, block_size)
        lo, hi = torch.aminmax(blocks, dim=1)
        block_absmax = torch.maximum(hi, lo.neg(), out=absmax[b0:b1])
        inv = torch.reciprocal(block_absmax)
        inv.masked_fill_(block_absmax == 0, 0.0)  # all-zero block: v = 0 instead of 0 * inf
        v = blocks.mul(inv[:, None]).view(-1)[:e1 - e0]
        idx = _nearest_codes(v, midpoints).view(-1)
        codes[e0:e1] = idx
        _zero_empty_blocks_(codes[e0:e1], block_absmax, block_size)
    return codes.view(x.shape), absmax


def dequantize_moment8(codes: torch.Tensor, absmax: torch.Tensor, *, signed: bool, block_size: int = BLOCK_SIZE,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode map[codes] * absmax (fp32 product, then rounded to dtype).

    Args:
        codes: uint8, any shape; absmax: float (ceil(numel / block_size),), finite and >= 0.
    Returns:
        `dtype` tensor of codes.shape on codes' device (empty for empty codes).
    """
    _checks.dtype_is(codes, "codes", torch.uint8)
    _checks.floating(absmax, "absmax")
    _checks.rank(absmax, "absmax", 1)
    _checks.same_device(codes, absmax, "codes", "absmax")
    signed = _check_signed(signed)
    block_size = _checks.integer(block_size, "block_size", minimum=1)
    _checks.float_dtype(dtype)
    numel = codes.numel()
    n_blocks = -(-numel // block_size)
    if absmax.numel() != n_blocks:
        raise ValueError(f"absmax must have {n_blocks} entries for {numel} codes and block_size {block_size}, "
                         f"got {absmax.numel()}")
    _checks.finite(absmax, "absmax")
    if n_blocks and bool((absmax < 0).any()):
        raise ValueError(f"absmax has {int((absmax < 0).sum())} negative value(s); block absmax values are >= 0")
    if numel == 0:
        return torch.empty(codes.shape, dtype=dtype, device=codes.device)
    absmax = absmax.float()
    table, _ = _cached(signed, codes.device)
    bnb_functional = _use_bnb(codes.device, block_size)
    if bnb_functional is not None and dtype in (torch.float32, torch.float16, torch.bfloat16):
        state = bnb_functional.QuantState(absmax=absmax, code=table, blocksize=block_size, dtype=dtype)
        return bnb_functional.dequantize_blockwise(codes.contiguous(), quant_state=state)

    flat = codes.reshape(-1)
    out = torch.empty(numel, dtype=torch.float32, device=codes.device)
    blocks_per_chunk = max(1, _CHUNK_ELEMS // block_size)
    for b0 in range(0, n_blocks, blocks_per_chunk):
        b1 = min(n_blocks, b0 + blocks_per_chunk)
        e0, e1 = b0 * block_size, min(numel, b1 * block_size)
        values = table[flat[e0:e1].long()]
        scale = absmax[b0:b1].repeat_interleave(block_size)[:e1 - e0]
        torch.mul(values, scale, out=out[e0:e1])
    out = out.view(codes.shape)
    return out if dtype == torch.float32 else out.to(dtype)
