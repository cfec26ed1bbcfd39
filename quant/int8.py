"""Blockwise INT8 weights and their stochastic-rounding update (DESIGN §3.1).

Format: a weight W (m, n) is stored as q int8 (m, n) and scales fp32 (m, ceil(n / block_size)). Blocks are
block_size consecutive elements along dim 1 (the input dimension); the last block of a row may be short (it is
padded logically: the missing elements count as zeros, which never change an absmax). For block b of row i,
s = max|w| / 127 and the weight is q * s. An all-zero block has s = 0 and q = 0.

Rounding: nearest is torch.round (ties to even). Stochastic rounding is q = floor(x + u) with x = w / s (fp32) and
u ~ U[0, 1) from `quant.noise.counter_uniform` keyed by (seed, stream, step) at counter offset i * n + j for element
(i, j), so E[q s] = w given s (up to the 2**-24 grid of u). The sum x + u is never rounded: with a = |x|,
n = floor(a) and f = a - n (both exact in fp32), floor(x + u) = n + [f >= 1 - u] for x >= 0 and -(n + [f > u]) for
x < 0, and 1 - u is exact because u is a multiple of 2**-24. (Adding in fp32 would round x + u near |x| = 127 to
2**-17 and bias it.) Results are clamped to [-127, 127].

Memory: quantize_int8 and sr_update_int8_ work in chunks of rows (default about 2**15 elements per chunk on CPU,
2**22 on GPUs), so beyond their inputs and outputs no more than a few chunk-sized fp32 buffers are live. Results do
not depend on the chunking.
"""
from __future__ import annotations

from typing import Callable, Union

import torch

from quant import _checks, compiled
from quant.noise import _mix64, counter_uniform, stream_key

BLOCK_SIZE = 256
_QMAX = 127
_CHUNK_ELEMS = 1 << 15  # per row chunk on CPU: in cache, and at torch's grain size ops run on one thread (as moments8)
_CHUNK_ELEMS_GPU = 1 << 22  # on GPUs: 16 MiB buffers, few enough chunks that kernel launches do not dominate
_CHUNK_ELEMS_COMPILED = 1 << 20  # compiled SR update: a dynamo call costs ~0.1 ms, a 2**20-element chunk ~1 ms

DeltaRows = Callable[[int, int, torch.Tensor], torch.Tensor]


def _num_blocks(n: int, block_size: int) -> int:
    return -(-n // block_size)


def _default_rows(n: int, device: torch.device, fused: bool = False) -> int:
    if fused:  # one compiled kernel per chunk, no chunk-sized temporaries: large chunks amortise the call overhead
        return max(1, _CHUNK_ELEMS_COMPILED // max(n, 1))
    return max(1, (_CHUNK_ELEMS if device.type == "cpu" else _CHUNK_ELEMS_GPU) // max(n, 1))


def quantize_chunk_rows(n: int, device_type: str) -> int:
    """Rows of an (m, n) matrix that quantize_int8 handles at a time on a device of `device_type` ("cpu", "cuda"):
    its fp32 workspace is one chunk of these rows (lowmem.memory.load_cost predicts the load from it)."""
    return _default_rows(n, torch.device(device_type))


def _block_views(x: torch.Tensor, block_size: int, *, writable: bool = False):
    """Split x (r, n) into its full blocks (r, n // B, B) and its tail (r, n % B); either may be empty.
    writable=True insists on views (outputs are written through them); otherwise a copy is allowed."""
    rows, n = x.shape
    n_full = n // block_size
    head = x[:, :n_full * block_size]
    full = head.view(rows, n_full, block_size) if writable else head.reshape(rows, n_full, block_size)
    return full, x[:, n_full * block_size:]


def _quantize_rows_(w: torch.Tensor, q_out: torch.Tensor, scales_out: torch.Tensor, *, block_size: int,
                    stochastic: bool, seed: int, stream: int, step: int, row_start: int) -> None:
    """Quantize fp32 rows w (r, n) (global rows row_start ..) into q_out int8 (r, n) and scales_out fp32 (r, nb).
    w is not modified. Noise offsets are global flat indices, so any row chunking gives the same bytes."""
    rows, n = w.shape
    full, tail = _block_views(w, block_size)
    n_full = full.shape[1]
    absmax = torch.empty(rows, scales_out.shape[1], dtype=torch.float32, device=w.device)
    torch.amax(full.abs(), dim=-1, out=absmax[:, :n_full])  # abs + amax: vectorised, unlike aminmax on CPU
    if tail.shape[1]:
        torch.amax(tail.abs(), dim=-1, out=absmax[:, n_full])
    scale = absmax.div_(_QMAX)
    scales_out.copy_(scale)

    y = torch.empty_like(w)  # w / s, one block at a time through views
    y_full, y_tail = _block_views(y, block_size, writable=True)
    torch.div(full, scale[:, :n_full, None], out=y_full)
    if tail.shape[1]:
        torch.div(tail, scale[:, n_full:], out=y_tail)
    y.nan_to_num_(nan=0.0)  # 0 / 0 in all-zero blocks (inputs are finite, so NaN can only come from there)

    if stochastic:
        u = counter_uniform(rows * n, seed=seed, stream=stream, step=step, offset=row_start * n,
                            device=w.device).view(rows, n)
        _stochastic_floor_(y, u)
    else:
        y.round_()
    q_out.copy_(y.clamp_(-_QMAX, _QMAX))


def _stochastic_floor_(x: torch.Tensor, u: torch.Tensor) -> None:
    """In place: x <- floor(x + u), evaluated exactly (see the module docstring)."""
    non_negative = x >= 0
    magnitude = x.abs_()
    whole = torch.floor(magnitude)
    frac = magnitude.sub_(whole)
    bump = torch.where(non_negative, frac >= torch.sub(1.0, u), frac > u)
    whole.add_(bump)
    torch.where(non_negative, whole, whole.neg(), out=x)


def _check_block_size(block_size) -> int:
    return _checks.integer(block_size, "block_size", minimum=1)


def quantize_int8(w: torch.Tensor, *, block_size: int = BLOCK_SIZE, stochastic: bool = False, seed: int = 0,
                  stream: int = 0, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a matrix to blockwise INT8.

    Args:
        w: (m, n) fp32, bf16 or fp16, finite.
        block_size: elements per block along dim 1.
        stochastic: stochastic rounding with the counter noise of (seed, stream, step) instead of nearest.
    Returns:
        q int8 (m, n) in [-127, 127] and scales fp32 (m, ceil(n / block_size)), on w's device. Empty w gives
        empty outputs of those shapes.
    Raises:
        TypeError for a non-float w, ValueError for a w that is not 2-D or has non-finite values.
    """
    _checks.floating(w, "w")
    _checks.rank(w, "w", 2)
    block_size = _check_block_size(block_size)
    for name, value in (("seed", seed), ("stream", stream), ("step", step)):
        _checks.key(value, name)
    _checks.finite(w, "w")
    m, n = w.shape
    q = torch.empty(m, n, dtype=torch.int8, device=w.device)
    scales = torch.empty(m, _num_blocks(n, block_size), dtype=torch.float32, device=w.device)
    if m == 0 or n == 0:
        return q, scales
    rows_per_chunk = _default_rows(n, w.device)
    for r0 in range(0, m, rows_per_chunk):
        r1 = min(m, r0 + rows_per_chunk)
        _quantize_rows_(w[r0:r1].float(), q[r0:r1], scales[r0:r1], block_size=block_size, stochastic=stochastic,
                        seed=seed, stream=stream, step=step, row_start=r0)
    return q, scales


def _check_pair(q: torch.Tensor, scales: torch.Tensor, block_size: int) -> None:
    _checks.dtype_is(q, "q", torch.int8)
    _checks.rank(q, "q", 2)
    _checks.floating(scales, "scales")
    _checks.rank(scales, "scales", 2)
    _checks.same_device(q, scales, "q", "scales")
    m, n = q.shape
    expected = (m, _num_blocks(n, block_size))
    if tuple(scales.shape) != expected:
        raise ValueError(f"scales must have shape {expected} for q {tuple(q.shape)} and block_size {block_size}, "
                         f"got {tuple(scales.shape)}")


def _dequantize_rows(q: torch.Tensor, scales: torch.Tensor, block_size: int) -> torch.Tensor:
    """fp32 (r, n) = q (r, n) * scales (r, nb) broadcast over blocks; one output allocation."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    q_full, q_tail = _block_views(q, block_size)
    out_full, out_tail = _block_views(out, block_size, writable=True)
    n_full = q_full.shape[1]
    torch.mul(q_full, scales[:, :n_full, None].float(), out=out_full)
    if q_tail.shape[1]:
        torch.mul(q_tail, scales[:, n_full:].float(), out=out_tail)
    return out


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, *, block_size: int = BLOCK_SIZE,
                    dtype: torch.dtype = torch.float32, row_start: int = 0,
                    row_end: int | None = None, check_values: bool = True) -> torch.Tensor:
    """Rows [row_start, row_end) of the dequantized matrix q * s.

    check_values=False skips the finiteness check of the scales (a device synchronisation on CUDA): for hot paths
    whose scales come from quantize_int8 / sr_update_int8_, which only ever write finite scales.

    float16 output: values beyond fp16's largest finite value (65504) would round to inf. With check_values=True
    they raise ValueError (naming the largest |w| and the dtypes that hold it); with check_values=False (no device
    synchronisation) they saturate to ±65504, so a forward pass stays finite.

    Args:
        q: int8 (m, n); scales: float (m, ceil(n / block_size)), finite (fp32 from quantize_int8).
        dtype: output dtype; the product is formed in fp32 and then rounded to dtype (float16: see above).
        row_start, row_end: 0 <= row_start <= row_end <= m (row_end None means m).
    Returns:
        (row_end - row_start, n) tensor of `dtype` on q's device (empty when the range or n is empty).
    """
    block_size = _check_block_size(block_size)
    _check_pair(q, scales, block_size)
    _checks.float_dtype(dtype)
    m, n = q.shape
    row_end = m if row_end is None else _checks.integer(row_end, "row_end")
    row_start = _checks.integer(row_start, "row_start")
    if not 0 <= row_start <= row_end <= m:
        raise ValueError(f"need 0 <= row_start <= row_end <= {m}, got row_start={row_start}, row_end={row_end}")
    if check_values:
        _checks.finite(scales[row_start:row_end], "scales")
    rows_q, rows_s = q[row_start:row_end], scales[row_start:row_end]
    if dtype == torch.float16:
        # fp16 cannot hold every fp32 product (|w| > 65504 -> inf): form fp32, then refuse or saturate, then round.
        out = _dequantize(rows_q, rows_s, block_size, torch.float32)
        fp16_max = torch.finfo(torch.float16).max
        if check_values and out.numel():
            largest = float(out.abs().max())
            if largest > fp16_max:
                raise ValueError(f"dequantized weight has |w| up to {largest:.6g}, beyond float16's largest finite "
                                 f"value {fp16_max:.0f}: dequantize to float32 or bfloat16, or pass "
                                 "check_values=False to saturate at ±65504")
        return out.clamp_(-fp16_max, fp16_max).to(torch.float16)
    return _dequantize(rows_q, rows_s, block_size, dtype)


def _dequantize(q: torch.Tensor, scales: torch.Tensor, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """q * s as `dtype`: the compiled kernel when compilation is on (bit-identical), else the eager twin."""
    if compiled.wanted():
        return compiled.dequantize(q, scales, block_size=block_size, dtype=dtype, eager=_dequantize_eager)
    return _dequantize_eager(q, scales, block_size, dtype)


def _dequantize_eager(q: torch.Tensor, scales: torch.Tensor, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    out = _dequantize_rows(q, scales, block_size)
    return out if dtype == torch.float32 else out.to(dtype)


def sr_update_int8_(q: torch.Tensor, scales: torch.Tensor, delta: Union[torch.Tensor, DeltaRows], *, seed: int,
                    stream: int, step: int, block_size: int = BLOCK_SIZE, rows_per_chunk: int | None = None,
                    stochastic: bool = True, check_values: bool = True, keep: torch.Tensor | None = None) -> None:
    """In place: W <- requantize(dequant(q, scales) + delta), chunk by chunk over rows.

    Per chunk of rows [r0, r1): w' = q * s + delta in fp32; per block s' = max|w'| / 127; q' = floor(w'/s' + u)
    (or round-to-nearest when stochastic=False), clamped to [-127, 127]; q and scales are overwritten for those
    rows. The noise of element (i, j) has counter offset i * n + j under (seed, stream, step), so the bytes are
    identical for every rows_per_chunk and for a tensor or a callable delta giving the same values.

    Args:
        q: int8 (m, n), updated in place. scales: fp32 (m, ceil(n / block_size)), updated in place.
        delta: float (m, n) tensor (upcast to fp32) on q's device, or a callable
            delta_rows(row_start, row_end, w_rows) -> float (row_end - row_start, n) tensor, where w_rows is the
            current dequantized fp32 weight of those rows (e.g. for weight decay). The callable must not modify
            w_rows and must return a new tensor (w_rows is overwritten after it returns). A callable with the
            attribute `reads_weight = False` is passed w_rows=None instead, and the rows are not dequantized for it
            (a full pass over the chunk saved when no weight decay is applied).
        seed, stream, step: the noise key (see quant.noise.counter_uniform).
        rows_per_chunk: rows per chunk (default: about 2**15 elements on CPU, 2**22 on GPUs). Memory and speed
            depend on it, the result does not.
        stochastic: False gives round-to-nearest (for ablations and tests: updates below half a step are lost).
    Memory: beyond q, scales and the caller's delta, a few fp32 buffers of one chunk are live.
    Errors: the caller guarantees finite input. A tensor delta is checked up front (ValueError, nothing written).
        A callable's output is checked chunk by chunk: the first non-finite chunk raises ValueError and leaves the
        chunks before it already written (checking first would need the whole delta in memory). Empty q: no-op.
        check_values=False skips those finiteness checks (a synchronisation per chunk on CUDA) for callers that
        have already verified their inputs, such as lowmem's runtime, which checks each step's gradient first.
    keep: None, or a 0-dim bool tensor on q's device (the device-side skip of a non-finite step, no host read):
        where True, q and scales keep their bytes, decided inside each chunk's write. The delta (callable) is still
        evaluated chunk by chunk and must be finite either way.
    """
    block_size = _check_block_size(block_size)
    _check_pair(q, scales, block_size)
    _checks.dtype_is(scales, "scales", torch.float32)
    for name, value in (("seed", seed), ("stream", stream), ("step", step)):
        _checks.key(value, name)
    if keep is not None:
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.numel() != 1:
            raise TypeError("keep must be None or a one-element bool tensor")
        _checks.same_device(keep, q, "keep", "q")
    m, n = q.shape
    rows_per_chunk = _default_rows(n, q.device, compiled.wanted()) if rows_per_chunk is None else _checks.integer(
        rows_per_chunk, "rows_per_chunk", minimum=1)
    from_callable = callable(delta) and not isinstance(delta, torch.Tensor)
    reads_weight = getattr(delta, "reads_weight", True) if from_callable else False
    if not from_callable:
        _check_delta(delta, q, "delta", (m, n))
        if check_values:
            _checks.finite(delta, "delta")
    if m == 0 or n == 0:
        return
    w = None
    use_compiled = compiled.wanted()
    key = stream_key(seed, stream, step) if use_compiled else 0
    for r0 in range(0, m, rows_per_chunk):
        r1 = min(m, r0 + rows_per_chunk)
        if from_callable:
            w = None
            if reads_weight:
                # eager even with kernels on: one product (the same bits), without a compiled call's host cost
                w = _dequantize_rows(q[r0:r1], scales[r0:r1], block_size)
            d = delta(r0, r1, w)
            name = f"delta_rows({r0}, {r1})"
            _check_delta(d, q, name, (r1 - r0, n))
            if w is not None and d.untyped_storage().data_ptr() == w.untyped_storage().data_ptr():
                raise ValueError(f"{name} returned (a view of) w_rows; it must return a new tensor")
            if check_values:
                _checks.finite(d, name, where=f" (rows {r0}..{r1 - 1}; rows before {r0} are already updated)")
        else:
            d = delta[r0:r1]
        if use_compiled:
            # One fused kernel for the chunk; its eager fallback is exactly the path below.
            def eager(q_rows, s_rows, d_rows, r0=r0):
                _sr_rows_eager_(q_rows, s_rows, d_rows, block_size=block_size, stochastic=stochastic, seed=seed,
                                stream=stream, step=step, row_start=r0, keep=keep)
            compiled.sr_chunk_(q[r0:r1], scales[r0:r1], d, key=key, counter_start=r0 * n, block_size=block_size,
                               stochastic=stochastic, mix64=_mix64, eager=eager, keep=keep)
        else:
            _sr_rows_eager_(q[r0:r1], scales[r0:r1], d, block_size=block_size, stochastic=stochastic, seed=seed,
                            stream=stream, step=step, row_start=r0, w=w, keep=keep)


def sr_write_inputs(q: torch.Tensor, *, seed: int, stream: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(qmax, key words) of a whole-matrix SR write of q int8 (m, n) traced into a caller's compiled kernel
    (quant.compiled.sr_write_traceable_): the noise sr_update_int8_ draws under (seed, stream, step)."""
    return compiled.sr_write_inputs(tuple(q.shape), key=stream_key(seed, stream, step), mix64=_mix64,
                                    device=q.device)


def _sr_rows_eager_(q: torch.Tensor, scales: torch.Tensor, d: torch.Tensor, *, block_size: int, stochastic: bool,
                    seed: int, stream: int, step: int, row_start: int, w: torch.Tensor | None = None,
                    keep: torch.Tensor | None = None) -> None:
    """The reference twin of one chunk: q (r, n) int8 and scales (r, nb) fp32 <- requantize(q * s + d), or left as
    they are where keep (0-dim bool tensor) is True. w: the chunk already dequantized (fp32, overwritten), if the
    caller has it."""
    w = _dequantize_rows(q, scales, block_size) if w is None else w
    w.add_(d)
    if keep is None:
        _quantize_rows_(w, q, scales, block_size=block_size, stochastic=stochastic, seed=seed, stream=stream,
                        step=step, row_start=row_start)
        return
    q_new, scales_new = torch.empty_like(q), torch.empty_like(scales)
    _quantize_rows_(w, q_new, scales_new, block_size=block_size, stochastic=stochastic, seed=seed, stream=stream,
                    step=step, row_start=row_start)
    q.copy_(torch.where(keep, q, q_new))
    scales.copy_(torch.where(keep, scales, scales_new))


def _check_delta(d, q: torch.Tensor, name: str, shape: tuple[int, int]) -> None:
    if not isinstance(d, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or a callable delta_rows(row_start, row_end, w_rows), "
                        f"got {type(d).__name__}")
    _checks.floating(d, name)
    if tuple(d.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(d.shape)}")
    _checks.same_device(d, q, name, "q")
