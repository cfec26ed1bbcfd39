"""8-bit blockwise codec for optimizer moments: bitsandbytes' "dynamic" format (DESIGN §3.4).

Format: x of any shape is flattened row-major and cut into blocks of block_size values (the last may be short).
Per block, absmax = max|x| (fp32); each value is stored as the uint8 index of the entry of a fixed 256-value map
(`dynamic_map`) nearest to x / absmax. Decoding is map[code] * absmax. The map is dynamic-exponent: 2**e values
(2**(e+1) unsigned) in the decade [10**(e-7), 10**(e-6)) for e = 0..6, plus 0 and 1, so small moments keep some
relative precision. The signed map serves first moments; the unsigned one (twice the resolution, no negatives)
second moments.

Devices: the same pure-torch code on every device (compiled where quant.compiled is on, bit-identical to its eager
form), so a moment has the same codes on CPU and CUDA, compiled or not:
  v = x * (1 / absmax)            (fp32, the product bitsandbytes forms too)
  code = index of the nearest map entry to v; at an exact midpoint between entries k and k + 1 the even index wins
         (this is what bitsandbytes' CUDA binary search returns);
  an all-zero block has absmax 0 and codes 0 (bitsandbytes returns 0 there as well).
Why not bitsandbytes' own blockwise kernels on CUDA: they are a third variant. Its CUDA build uses --use_fast_math,
whose approximate reciprocal can move v by an ulp and so flip a value lying within an ulp of a midpoint to the
neighbouring code (the compiled twin and an eager fallback mid-run would then disagree, and the bits would depend on
whether bitsandbytes is installed); and its CPU kernel (0.50.x) rounds v to a 65536-point grid on [-1, 1] before
the lookup, so for |v| below about 1e-3 it often picks a code that is not the nearest (measured in the tests: 1.4%
of the codes of a signed tensor with a wide dynamic range, 35% of its squares with the unsigned map). The format is
bitsandbytes', so its fused 8-bit Adam kernel reads and writes the same state (lowmem.optim.float_adamw's
backend="bnb", an explicit choice).

Error: |x - decode(code)| <= absmax * (largest gap between adjacent map entries) / 2, since the nearest entry is at
most half a gap away; tests derive the gap from the map itself.

Second moments: the squared map (`squared=True`, unsigned only). The unsigned map reaches down to 1.6e-7 * absmax
and rounds anything smaller to 0; a second moment v = E[g^2] spans the square of the gradient's dynamic range, so a
block whose gradients differ by 2.5e3 or more (rare embedding rows, the small singular directions of a projected
gradient) loses its small v to 0 while their first moment survives, and Adam's m / (sqrt(v) + eps) then explodes
to m / eps. The squared map holds map_u[k]**2: v is stored with absmax = max v, and decodes to
absmax * map_u[k]**2, i.e. sqrt(v) = sqrt(absmax) * map_u[k] -- the unsigned map applied to sqrt(v), which has the
gradient's dynamic range (to 1.6e-7 of the block's largest |g|, like the first moment's signed map). Codes are
the nearest entry in v (what bitsandbytes' fused 8-bit Adam kernel does when handed this map as qmap2), so the same
state works on both paths.
"""
from __future__ import annotations

import torch

from quant import _checks, compiled

BLOCK_SIZE = 256
# Twin's elements per step on CPU: temporaries stay in cache, and at torch's grain size (32768) each op runs on one
# thread, which avoids fork/join stalls that cost more than they gain at this size (measured on a busy 2-core box).
_CHUNK_ELEMS = 1 << 15
_CHUNK_ELEMS_GPU = 1 << 24
_EXPONENT_BITS = 7
_MAP_SIZE = 256

_maps: dict[tuple[bool, bool, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _build_map(signed: bool, squared: bool = False) -> torch.Tensor:
    """The 256 map values, built from their definition: for decade e = 0..6 the bin centres of 2**e (signed) or
    2**(e+1) (unsigned) equal bins of [0.1, 1], times 10**(e-6), with both signs when signed; plus 0 and 1.
    squared: the unsigned values squared (fp32), for second moments (module docstring)."""
    values = [torch.tensor([0.0, 1.0])]
    for decade in range(_EXPONENT_BITS):
        n_bins = 2 ** decade if signed else 2 ** (decade + 1)
        edges = torch.linspace(0.1, 1.0, n_bins + 1, dtype=torch.float32)
        magnitudes = (edges[:-1] + edges[1:]) / 2.0 * (10.0 ** (decade - _EXPONENT_BITS + 1))
        values.append(magnitudes)
        if signed:
            values.append(-magnitudes)
    table = torch.sort(torch.cat(values)).values
    if squared:
        table = table * table
    assert table.numel() == _MAP_SIZE and bool((table[1:] > table[:-1]).all())
    return table


def _cached(signed: bool, device: torch.device, squared: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(map (256,), midpoints padded with +inf (256,), bucket table (2**17,) int32) on device, built once."""
    key = (bool(signed), bool(squared), str(device))
    if key not in _maps:
        cpu_key = (bool(signed), bool(squared), "cpu")
        if cpu_key not in _maps:
            table = _build_map(signed, squared)
            midpoints = torch.cat([(table[:-1] + table[1:]) * 0.5, torch.tensor([float("inf")])])
            _maps[cpu_key] = (table, midpoints, _build_bucket_table(midpoints))
        _maps[key] = tuple(t.to(device) for t in _maps[cpu_key])
    return _maps[key]


def dynamic_map(signed: bool = True, *, squared: bool = False) -> torch.Tensor:
    """fp32 (256,) sorted map values in [-1, 1] (signed) or [0, 1] (unsigned); a fresh CPU tensor. Equal to
    bitsandbytes.functional.create_dynamic_map(signed=signed). squared=True (unsigned only): that map's values
    squared, the second-moment map (module docstring)."""
    return _cached(_check_signed(signed, squared), torch.device("cpu"), squared)[0].clone()


def _check_signed(signed, squared=False) -> bool:
    if not isinstance(signed, bool):
        raise TypeError(f"signed must be a bool, got {type(signed).__name__}")
    if not isinstance(squared, bool):
        raise TypeError(f"squared must be a bool, got {type(squared).__name__}")
    if signed and squared:
        raise ValueError("squared=True is the second-moment map and needs signed=False")
    return signed


# Nearest-entry search without a per-element binary search: order fp32 values by an int32 key (the bit pattern,
# with negative values' magnitude bits flipped so the key is monotone), cut the key range into 2**17 buckets of
# 2**15 consecutive floats (1/256 of a binade), and store per bucket k0 = the number of midpoints below the bucket.
# For both maps every bucket holds at most one midpoint (checked when the table is built), so the number of
# midpoints below v is k0 + [v > midpoints[k0]]. Two table lookups per value; about 10x faster than
# torch.bucketize on CPU when the chunk stays in cache.
_BUCKET_SHIFT = 15
_N_BUCKETS_HALF = 1 << (31 - _BUCKET_SHIFT)


def _order_key(v: torch.Tensor) -> torch.Tensor:
    """int32 key of fp32 v, monotone in v (-0.0 sorts just below +0.0; no midpoint lies between them)."""
    bits = v.view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _build_bucket_table(midpoints: torch.Tensor) -> torch.Tensor:
    """int32 (2**17,): for each bucket, the number of (finite) midpoints strictly below its smallest float."""
    keys = torch.arange(-_N_BUCKETS_HALF, _N_BUCKETS_HALF, dtype=torch.int64) << _BUCKET_SHIFT
    bits = torch.where(keys >= 0, keys, (-1 - keys) - 2**31).to(torch.int32)  # inverse of _order_key
    lowest = bits.view(torch.float32)
    below = torch.searchsorted(midpoints[:-1].contiguous(), lowest)
    # buckets of NaN bit patterns sit at both ends of the key range and are never looked up
    below = torch.where(torch.isnan(lowest), torch.where(keys < 0, 0, _MAP_SIZE - 1), below)
    per_bucket = below[1:] - below[:-1]
    if int(per_bucket.min()) < 0 or int(per_bucket.max()) > 1:
        raise RuntimeError("dynamic map too fine for the bucket table: a bucket holds more than one midpoint")
    return below.to(torch.int32)


def _nearest_codes(v: torch.Tensor, midpoints: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
    """int32 index of the nearest map entry to each v (1-D fp32); exact midpoint ties go to the even index."""
    bucket = (_order_key(v) >> _BUCKET_SHIFT).add_(_N_BUCKETS_HALF)
    below = buckets.index_select(0, bucket)
    mid = midpoints.index_select(0, below)
    codes = below + (v > mid)
    codes += (v == mid) & (below & 1).bool()
    return codes


def quantize_moment8(x: torch.Tensor, *, signed: bool, block_size: int = BLOCK_SIZE,
                     check_values: bool = True, squared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode x blockwise with the dynamic map (squared=True: the second-moment map, see the module docstring).

    check_values=False skips the finiteness and sign checks of x (device synchronisations on CUDA) for hot paths
    whose input is known good (lowmem's optimizer state, updated only from verified-finite gradients).

    Args:
        x: any shape, fp32 (bf16/fp16 accepted and read as fp32), finite; non-negative when signed=False.
        signed: signed map (first moments) or unsigned map (second moments).
        block_size: values per absmax block (>= 1).
    Returns:
        codes uint8 (x.shape) and absmax fp32 (ceil(numel / block_size),), on x's device; empty x gives an empty
        codes tensor of x's shape and absmax (0,).
    """
    _checks.floating(x, "x")
    signed = _check_signed(signed, squared)
    block_size = _checks.integer(block_size, "block_size", minimum=1)
    if check_values:
        _checks.finite(x, "x")
    if check_values and not signed and x.numel() and bool((x < 0).any()):
        raise ValueError(f"x has {int((x < 0).sum())} negative value(s); the unsigned map (signed=False) cannot "
                         "represent them (use signed=True)")
    numel = x.numel()
    n_blocks = -(-numel // block_size)
    if numel == 0:
        return (torch.empty(x.shape, dtype=torch.uint8, device=x.device),
                torch.empty(0, dtype=torch.float32, device=x.device))
    return _quantize_twin(x, signed, block_size, n_blocks, squared)


def _zero_empty_blocks_(codes: torch.Tensor, absmax: torch.Tensor, block_size: int) -> None:
    """Codes of blocks whose absmax is 0 set to 0 (no host sync)."""
    n_full = codes.numel() // block_size
    full = codes[:n_full * block_size].view(n_full, block_size)
    full.masked_fill_((absmax[:n_full] == 0)[:, None], 0)
    if codes.numel() > n_full * block_size:
        codes[n_full * block_size:].masked_fill_(absmax[n_full] == 0, 0)


def _block_chunks(n_blocks: int, block_size: int, device: torch.device):
    """(first block, end block) of consecutive chunks of about _CHUNK_ELEMS elements (larger on GPUs)."""
    chunk_elems = _CHUNK_ELEMS if device.type == "cpu" else _CHUNK_ELEMS_GPU
    blocks_per_chunk = max(1, chunk_elems // block_size)
    for b0 in range(0, n_blocks, blocks_per_chunk):
        yield b0, min(n_blocks, b0 + blocks_per_chunk)


def _quantize_twin(x: torch.Tensor, signed: bool, block_size: int, n_blocks: int, squared: bool = False):
    _, midpoints, buckets = _cached(signed, x.device, squared)
    if compiled.wanted():
        codes, absmax = compiled.moment8_encode(
            x.reshape(-1), midpoints, buckets, block_size=block_size, bucket_shift=_BUCKET_SHIFT,
            buckets_half=_N_BUCKETS_HALF,
            eager=lambda flat: _quantize_twin_eager(flat, midpoints, buckets, block_size, n_blocks))
        return codes.view(x.shape), absmax
    codes, absmax = _quantize_twin_eager(x.reshape(-1), midpoints, buckets, block_size, n_blocks)
    return codes.view(x.shape), absmax


def _quantize_twin_eager(flat: torch.Tensor, midpoints: torch.Tensor, buckets: torch.Tensor, block_size: int,
                         n_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference twin: flat (numel,) -> (codes uint8 (numel,), absmax fp32 (n_blocks,)), in cache-sized chunks."""
    numel = flat.numel()
    codes = torch.empty(numel, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=flat.device)
    for b0, b1 in _block_chunks(n_blocks, block_size, flat.device):
        e0, e1 = b0 * block_size, min(numel, b1 * block_size)
        chunk = flat[e0:e1].float()
        padded = chunk if e1 - e0 == (b1 - b0) * block_size else torch.cat(
            [chunk, chunk.new_zeros((b1 - b0) * block_size - (e1 - e0))])
        blocks = padded.view(b1 - b0, block_size)
        block_absmax = torch.amax(blocks.abs(), dim=1, out=absmax[b0:b1])
        inv = torch.reciprocal(block_absmax)
        inv.masked_fill_(block_absmax == 0, 0.0)  # all-zero block: v = 0 instead of 0 * inf
        v = blocks.mul(inv[:, None]).view(-1)[:e1 - e0]
        codes[e0:e1] = _nearest_codes(v, midpoints, buckets)
        _zero_empty_blocks_(codes[e0:e1], block_absmax, block_size)
    return codes, absmax


def dequantize_moment8(codes: torch.Tensor, absmax: torch.Tensor, *, signed: bool, block_size: int = BLOCK_SIZE,
                       dtype: torch.dtype = torch.float32, check_values: bool = True,
                       squared: bool = False) -> torch.Tensor:
    """Decode map[codes] * absmax (fp32 product, then rounded to dtype). check_values=False skips the absmax
    finiteness and sign checks (absmax written by quantize_moment8 is always finite and >= 0). squared must be
    what the codes were written with.

    Args:
        codes: uint8, any shape; absmax: float (ceil(numel / block_size),), finite and >= 0.
    Returns:
        `dtype` tensor of codes.shape on codes' device (empty for empty codes).
    """
    _checks.dtype_is(codes, "codes", torch.uint8)
    _checks.floating(absmax, "absmax")
    _checks.rank(absmax, "absmax", 1)
    _checks.same_device(codes, absmax, "codes", "absmax")
    signed = _check_signed(signed, squared)
    block_size = _checks.integer(block_size, "block_size", minimum=1)
    _checks.float_dtype(dtype)
    numel = codes.numel()
    n_blocks = -(-numel // block_size)
    if absmax.numel() != n_blocks:
        raise ValueError(f"absmax must have {n_blocks} entries for {numel} codes and block_size {block_size}, "
                         f"got {absmax.numel()}")
    if check_values:
        _checks.finite(absmax, "absmax")
    if check_values and n_blocks and bool((absmax < 0).any()):
        raise ValueError(f"absmax has {int((absmax < 0).sum())} negative value(s); block absmax values are >= 0")
    if numel == 0:
        return torch.empty(codes.shape, dtype=dtype, device=codes.device)
    absmax = absmax.float()
    table = _cached(signed, codes.device, squared)[0]
    out = _dequantize_twin_eager(codes.reshape(-1), absmax, table, block_size).view(codes.shape)
    return out if dtype == torch.float32 else out.to(dtype)


def _dequantize_twin_eager(flat: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor,
                           block_size: int) -> torch.Tensor:
    """The reference twin: codes (numel,) -> fp32 table[code] * absmax[block] (numel,), chunk by chunk."""
    numel = flat.numel()
    n_blocks = absmax.numel()
    out = torch.empty(numel, dtype=torch.float32, device=flat.device)
    n_full = numel // block_size
    for b0, b1 in _block_chunks(n_full, block_size, flat.device):
        e0, e1 = b0 * block_size, b1 * block_size
        values = out[e0:e1].view(b1 - b0, block_size)
        torch.index_select(table, 0, flat[e0:e1].int(), out=values.view(-1))
        values.mul_(absmax[b0:b1, None])
    if n_full < n_blocks:
        tail = out[n_full * block_size:]
        torch.index_select(table, 0, flat[n_full * block_size:].int(), out=tail)
        tail.mul_(absmax[n_full])
    return out


def codec_tables(signed: bool, device: torch.device | str, *, squared: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(map fp32 (256,), midpoints fp32 (256,), bucket table int32 (2**17,)) on device: the inputs of
    encode_traceable / decode_traceable (a kernel takes them as arguments rather than reading module state)."""
    return _cached(_check_signed(signed, squared), torch.device(device), squared)


def encode_traceable(x: torch.Tensor, midpoints: torch.Tensor, buckets: torch.Tensor, *, block_size: int,
                     tail: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The twin's encoding of flat fp32 x (numel,) as plain traceable ops, for a caller's compiled kernel: the same
    codes and absmax as quantize_moment8 (tail: numel % block_size != 0)."""
    return compiled.moment8_encode_ops(x, midpoints, buckets, block_size=block_size, tail=tail,
                                       bucket_shift=_BUCKET_SHIFT, buckets_half=_N_BUCKETS_HALF)


def decode_traceable(codes: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, *, block_size: int,
                     tail: bool) -> torch.Tensor:
    """map[codes] * absmax of flat codes (numel,) as plain traceable ops: the same fp32 values as
    dequantize_moment8."""
    return compiled.moment8_decode_ops(codes, absmax, table, block_size=block_size, tail=tail)


# The three maps and their lookup tables are constants: built on the host once, here, so that no training step
# ever builds them (their construction reads values on the host; a step must not, see lowmem.diagnostics).
for _signed, _squared in ((True, False), (False, False), (False, True)):
    _cached(_signed, torch.device("cpu"), _squared)
del _signed, _squared
