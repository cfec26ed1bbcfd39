"""Full-rank AdamW for the float parameters: embeddings, lm_head, norms, biases (DESIGN §3.4, last bullets).

One pure per-parameter function, `float_adamw_update_`, called both by the fused-backward runtime (hooks/) and by
the thin `FloatAdamW` optimizer below, so "hooks on" and "hooks off" share every line of math. The state is a flat
dict of tensors (no Python objects), created by `init_float_adamw_state`:

  bits=32: "exp_avg", "exp_avg_sq"            fp32, param's shape
  bits=8:  "exp_avg_codes", "exp_avg_sq_codes" uint8, param's shape (bitsandbytes dynamic blockwise codes:
           signed map for the first moment; the squared unsigned map for the second, so that sqrt(v) keeps the
           gradient's dynamic range instead of underflowing to 0 -- quant.moments8's module docstring)
           "exp_avg_absmax", "exp_avg_sq_absmax" fp32 (ceil(numel / block_size),)
  both:    "step"                              int64 0-d (CPU), number of updates applied so far

Big parameters use 8 bits (2 bytes of state per element instead of 8); tiny ones (norms, biases) use 32 bits,
where the absmax overhead and the quantization noise are not worth the few bytes saved.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor

from lowmem.optim.moments import adam8_hyper, adam8_ratio, adam8_ratio_, init_moments
from quant import compiled
from quant._checks import all_finite
from quant.bf16 import sr_noise_keys, sr_to_bf16, sr_to_bf16_traceable
from quant.moments8 import (codec_tables, decode_traceable, dequantize_moment8, dynamic_map, encode_traceable,
                            quantize_moment8)

STATE_BITS = (8, 32)
BACKENDS = ("auto", "bnb", "torch")
_BNB_BLOCK_SIZE = 256  # the only block size bnb's fused 8-bit Adam kernel is compiled for
_BNB_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_KEYS32 = ("exp_avg", "exp_avg_sq")
_KEYS8 = ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")


def init_float_adamw_state(param: Tensor, *, bits: int, block_size: int = 256) -> dict[str, Tensor]:
    """Zero AdamW state for `param` (any shape, floating dtype) at `bits` ∈ {8, 32}; see the module docstring."""
    if not isinstance(param, Tensor) or not param.is_floating_point():
        raise TypeError(f"param must be a floating-point tensor, got {type(param).__name__} "
                        f"{getattr(param, 'dtype', '')}")
    if bits not in STATE_BITS:
        raise ValueError(f"bits must be one of {STATE_BITS}, got {bits!r}")
    if block_size <= 0:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    state: dict[str, Tensor] = {"step": torch.zeros((), dtype=torch.int64)}
    if bits == 32:
        state["exp_avg"] = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
        state["exp_avg_sq"] = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
        return state
    # The codes and absmax an encoding of zeros gives, written directly: no fp32 copy of the parameter's size
    # (for a 128k-vocabulary head that transient was the largest allocation of loading a model).
    state.update(init_moments(tuple(param.shape), bits=8, block_size=block_size, device=param.device))
    return state


def state_bits(state: dict[str, Tensor]) -> int:
    """8 or 32, read from the keys present (raises ValueError for a dict that is neither layout)."""
    if all(k in state for k in _KEYS8):
        return 8
    if all(k in state for k in _KEYS32):
        return 32
    raise ValueError(f"not a float AdamW state: keys {sorted(state)}; expected 'step' plus {_KEYS32} (32-bit) "
                     f"or {_KEYS8} (8-bit)")


def float_adamw_update_(param: Tensor, grad: Tensor, state: dict[str, Tensor], *, lr: float, beta1: float,
                        beta2: float, eps: float, weight_decay: float, block_size: int = 256,
                        backend: str = "auto", sr_key: tuple[int, int] | None = None,
                        keep_old: Tensor | None = None) -> None:
    """One AdamW step on `param` in place, with torch.optim.AdamW's semantics.

    param: any shape, fp32/bf16/fp16. grad: param's shape, any float dtype (read as fp32). state: from
    `init_float_adamw_state`, modified in place; t = state["step"] + 1 below, and "step" is advanced only
    after the update succeeded (a failed call leaves the counter where it was).

      p <- p·(1 − lr·λ)                                     decoupled weight decay, applied first
      m <- β1·m + (1 − β1)·g ;  v <- β2·v + (1 − β2)·g²
      p <- p − (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + ε)  ε outside the square root

    All arithmetic is fp32; a bf16/fp16 param is read as fp32 and written back rounded to nearest in its dtype, so
    a bf16 param loses updates smaller than half its unit in the last place (about |p|·2⁻⁹). sr_key = (seed,
    stream): a bf16 param is written with stochastic rounding instead (quant.bf16.sr_to_bf16, unbiased), the noise
    keyed by (seed, stream, t) and the element's flat index, so a resumed run and every data-parallel rank write
    the same bits (DESIGN §3.1). fp32 params are unaffected; fp16 params keep round-to-nearest.

    bits=8 (`block_size` must be the one the state was made with): dequantize both moments to fp32, update as
    above with the direction m̂ / (√v̂ + ε) clamped to ±`adam_direction_bound(t)` (exact Adam never exceeds it; it
    caps what a second moment quantised to 0 beside a surviving first moment would make of m / ε), re-quantize
    (new absmax per block; the second moment on the squared map, quant.moments8). `backend`: "auto" and "torch" run
    this pure-torch twin (the same code and bits on every device, quant.moments8); "bnb" runs bitsandbytes'
    fused blockwise 8-bit Adam kernel (`optimizer_update_8bit_blockwise("adam", ...)`, same state layout: the
    squared map is handed to it as qmap2; block_size 256, grad dtype == param dtype, contiguous; ValueError
    otherwise). bits=32 always uses torch.

    Why "auto" no longer picks the fused kernel: it cannot apply the direction bound (measured by
    `python -m benchmarks.moments8_range`: on embedding-like rows whose entries span 1e-6..1 the squared map alone
    reaches |N| = 21 where fp32 Adam stays at 1; with the bound 1.6), and bitsandbytes' CPU version of the op
    re-quantises on a 65536-point grid of [0, 1], which cannot resolve the squared map's small entries (a second
    moment below 1.5e-5 of its block's largest lands on a wrong code).

    Known differences of the fused kernel from the twin, all at rounding level except the last two:
      - the kernel applies weight decay after the Adam step, p <- (p − lr·u)·(1 − lr·λ), a difference of
        lr²·λ·|u| per step; for a bf16 param it rounds to bf16 twice (after the step and after the decay);
      - the kernel's code search (`quantize_2D`) is a binary search with midpoint tests on fast-math
        (`__fdividef`, `__powf`) values, and it nudges a first-moment code by one when rounding flipped its sign;
        the twin re-quantizes through `quant.moments8` (the nearest code, on every device), so a code can differ
        near a midpoint;
      - no direction bound (above);
      - for NaN/Inf gradient elements the kernel zeroes both moments and leaves the param element untouched; the
        8-bit twin raises ValueError (quant.moments8 refuses non-finite moments) before changing param or state,
        and the 32-bit path propagates the NaN like torch.optim.AdamW does.
    With compilation on, an fp32 or bf16 contiguous param at bits=8 ("auto"/"torch") takes one compiled kernel
    instead: decode, the twin's arithmetic, encode, the bf16 write (nearest or stochastic, the same noise) and the
    keep_old guard in a single pass, bit-identical to the twin (tests/unit/lowmem/optim/test_float_adamw.py); a
    non-finite grad then raises before anything is written.
    keep_old: a 0-dim bool tensor on param's device (the fused runtime's device-side skip of a non-finite step).
    The update then runs over flat chunks of GUARD_CHUNK_ELEMENTS (a multiple of every 8-bit block size that
    divides it, so the bytes are those of one whole-tensor call, stochastic rounding included: each chunk's noise
    counter starts at its flat offset), each chunk's param and state copied first and put back with torch.where
    where keep_old holds: no host synchronisation, one chunk of transient copies. The caller passes a finite grad
    (zeroed where skipped); "step" advances either way (the caller undoes it on a skip).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(param, Tensor) or not param.is_floating_point():
        raise TypeError(f"param must be a floating-point tensor, got {getattr(param, 'dtype', type(param))}")
    if not isinstance(grad, Tensor) or grad.is_sparse or not grad.is_floating_point():
        raise TypeError("grad must be a dense floating-point tensor (sparse gradients are not supported)")
    if grad.shape != param.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} does not match param shape {tuple(param.shape)}")
    if "step" not in state:
        raise ValueError(f"state has no 'step' counter (keys {sorted(state)}); build it with init_float_adamw_state")
    bits = state_bits(state)
    step = int(state["step"]) + 1  # this update's t; the counter is advanced only once the update went through
    hyper = dict(lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps),
                 weight_decay=float(weight_decay), step=step)

    def make_write(offset: int):
        """How updated fp32 values are written into param (or a chunk of it starting at flat index `offset`)."""
        if sr_key is None or param.dtype != torch.bfloat16:
            return _copy_nearest_
        seed, stream = sr_key

        def write(target: Tensor, value: Tensor) -> None:
            target.copy_(sr_to_bf16(value, seed=seed, stream=stream, step=step, offset=offset))
        return write
    with torch.no_grad():
        if bits == 8:
            _check_8bit_layout(param, state, block_size)
        use_bnb = bits == 8 and backend == "bnb"   # "auto" runs the twin: see "Why" above
        if bits == 8 and not use_bnb and _fused_applies(param, grad):
            if keep_old is None and not all_finite(grad):
                raise ValueError("grad has non-finite values; the 8-bit AdamW step needs a finite gradient")
            _update_8bit_fused_(param, grad, state, keep_old, block_size=block_size, hyper=hyper, sr_key=sr_key)
        elif keep_old is None:
            _update_any_(param, grad, state, bits=bits, use_bnb=use_bnb, block_size=block_size, hyper=hyper,
                         write=make_write(0))
        else:
            _update_guarded_(param, grad, state, keep_old, bits=bits, use_bnb=use_bnb, block_size=block_size,
                             hyper=hyper, make_write=make_write)
        state["step"] += 1


def _copy_nearest_(target: Tensor, value: Tensor) -> None:
    target.copy_(value)


def _update_any_(param: Tensor, grad: Tensor, state: dict[str, Tensor], *, bits: int, use_bnb: bool,
                 block_size: int, hyper: dict, write, checked: bool = True) -> None:
    """checked=False: the caller guarantees a finite grad (the guarded path), so the 8-bit twin skips the moment
    codec's value checks (a device synchronisation each)."""
    if bits == 32:
        _update_32bit_(param, grad, state, write=write, **hyper)
    elif use_bnb:
        _update_8bit_bnb_(param, grad, state, block_size=block_size, write=write, **hyper)
    else:
        _update_8bit_twin_(param, grad, state, block_size=block_size, write=write, checked=checked, **hyper)


GUARD_CHUNK_ELEMENTS = 1 << 20


def _update_guarded_(param: Tensor, grad: Tensor, state: dict[str, Tensor], keep_old: Tensor, *, bits: int,
                     use_bnb: bool, block_size: int, hyper: dict, make_write) -> None:
    """The update chunk by chunk over flat views, each chunk restored where keep_old (see float_adamw_update_).
    make_write(offset) gives the write of a chunk whose first element has flat index `offset`."""
    if not param.is_contiguous():   # no flat view to chunk: guard the whole tensor
        before = {k: v.clone() for k, v in state.items() if k != "step"}
        old_param = param.clone()
        _update_any_(param, grad, state, bits=bits, use_bnb=use_bnb, block_size=block_size, hyper=hyper,
                     write=make_write(0), checked=False)
        param.copy_(torch.where(keep_old, old_param, param))
        for k, v in before.items():
            state[k].copy_(torch.where(keep_old, v, state[k]))
        return
    param_flat, grad_flat = param.view(-1), grad.reshape(-1)
    chunk = GUARD_CHUNK_ELEMENTS if bits == 32 else max(block_size, GUARD_CHUNK_ELEMENTS // block_size * block_size)
    numel = param_flat.numel()
    for e0 in range(0, numel, chunk):
        e1 = min(numel, e0 + chunk)
        if bits == 32:
            sub = {k: state[k].view(-1)[e0:e1] for k in _KEYS32}
        else:
            b0, b1 = e0 // block_size, -(-e1 // block_size)
            sub = {}
            for name in ("exp_avg", "exp_avg_sq"):
                sub[f"{name}_codes"] = state[f"{name}_codes"].view(-1)[e0:e1]
                sub[f"{name}_absmax"] = state[f"{name}_absmax"][b0:b1]
        p_chunk = param_flat[e0:e1]
        before = {k: v.clone() for k, v in sub.items()}
        old_param = p_chunk.clone()
        _update_any_(p_chunk, grad_flat[e0:e1], sub, bits=bits, use_bnb=use_bnb, block_size=block_size, hyper=hyper,
                     write=make_write(e0), checked=False)
        p_chunk.copy_(torch.where(keep_old, old_param, p_chunk))
        for k, v in before.items():
            sub[k].copy_(torch.where(keep_old, v, sub[k]))


def _update_32bit_(param: Tensor, grad: Tensor, state: dict[str, Tensor], *, lr: float, beta1: float,
                   beta2: float, eps: float, weight_decay: float, step: int, write) -> None:
    # Same op sequence as torch.optim.adamw's single-tensor path, on an fp32 view of the param.
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    g = grad.to(torch.float32)
    p = param if param.dtype == torch.float32 else param.float()
    p.mul_(1.0 - lr * weight_decay)
    exp_avg.lerp_(g, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** step)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
    if p is not param:
        write(param, p)


def _check_8bit_layout(param: Tensor, state: dict[str, Tensor], block_size: int) -> None:
    n_blocks = -(-param.numel() // block_size)
    for name in ("exp_avg", "exp_avg_sq"):
        codes, absmax = state[f"{name}_codes"], state[f"{name}_absmax"]
        if codes.dtype != torch.uint8 or codes.shape != param.shape:
            raise ValueError(f"state['{name}_codes'] must be uint8 of shape {tuple(param.shape)}, got "
                             f"{codes.dtype} {tuple(codes.shape)}")
        if absmax.dtype != torch.float32 or absmax.numel() != n_blocks:
            raise ValueError(f"state['{name}_absmax'] must be fp32 with {n_blocks} blocks for block_size "
                             f"{block_size}, got {absmax.dtype} with {absmax.numel()} (was the state made with "
                             f"another block_size?)")


def _adamw8_math(p: Tensor, g: Tensor, m: Tensor, v: Tensor, h: Tensor, decay: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(p, m, v) after one AdamW step in fp32, h = adam8_hyper, as the compiled kernel computes it (out of place):
    adam8_ratio (the direction m̂ / (√v̂ + ε) clamped to ±bound through the denominator's floor), the decoupled
    decay, then p + ratio · (-lr / (1-β1ᵗ)). `_adamw8_math_` is the eager twin's in-place form: the same bits."""
    ratio, m, v = adam8_ratio(g, m, v, h)
    if decay:
        p = p * h[6]
    return p + ratio * h[8], m, v


def _adamw8_math_(p: Tensor, g: Tensor, m: Tensor, v: Tensor, h: Tensor, decay: bool) -> None:
    """In place on p (an fp32 copy of the param), m and v (fresh decoded moments): _adamw8_math's op sequence with
    few full-size temporaries (what the memory planner counts for the twin)."""
    ratio = adam8_ratio_(g, m, v, h)
    if decay:
        p.mul_(h[6])
    p.add_(ratio.mul_(h[8]))


def _update_8bit_twin_(param: Tensor, grad: Tensor, state: dict[str, Tensor], *, lr: float, beta1: float,
                       beta2: float, eps: float, weight_decay: float, step: int, block_size: int, write,
                       checked: bool = True) -> None:
    # The stored absmax values were written by quantize_moment8 (finite, >= 0): no value check on the way in.
    exp_avg = dequantize_moment8(state["exp_avg_codes"], state["exp_avg_absmax"], signed=True,
                                 block_size=block_size, dtype=torch.float32, check_values=False)
    exp_avg_sq = dequantize_moment8(state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], signed=False,
                                    block_size=block_size, dtype=torch.float32, squared=True, check_values=False)
    h = adam8_hyper(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step,
                    device=param.device)
    p = param.to(torch.float32, copy=True)
    _adamw8_math_(p, grad.to(torch.float32), exp_avg, exp_avg_sq, h, weight_decay > 0.0)
    # Quantize before writing anything: quant.moments8 rejects non-finite moments, and a NaN gradient must then
    # leave param and state as they were.
    encoded = {}
    for name, value, signed in (("exp_avg", exp_avg, True), ("exp_avg_sq", exp_avg_sq, False)):
        encoded[f"{name}_codes"], encoded[f"{name}_absmax"] = quantize_moment8(
            value, signed=signed, block_size=block_size, squared=not signed, check_values=checked)
    write(param, p)
    for key, value in encoded.items():
        state[key].copy_(value)


def _fused_applies(param: Tensor, grad: Tensor) -> bool:
    """Whether the compiled 8-bit step serves this call: compiled kernels in use (not under the live-bytes meter,
    which measures the twin), an fp32 or bf16 contiguous param (bf16 written to nearest or stochastically rounded
    inside the kernel; fp16 stays with the twin)."""
    return (compiled.use_kernels() and param.dtype in (torch.float32, torch.bfloat16) and param.is_contiguous()
            and param.numel() > 0 and grad.shape == param.shape)


def _adamw8_kernel(p: Tensor, g: Tensor, m_codes: Tensor, m_absmax: Tensor, v_codes: Tensor, v_absmax: Tensor,
                   m_tables: tuple[Tensor, Tensor, Tensor], v_tables: tuple[Tensor, Tensor, Tensor], h: Tensor,
                   keep_old: Tensor, sr_keys: Tensor | None, *, block_size: int, tail: bool,
                   decay: bool) -> tuple[Tensor, ...]:
    """One 8-bit AdamW step on flat p fp32 or bf16 (numel,), its codes uint8 (numel,) and absmax fp32 (nb,):
    decode, _adamw8_math in fp32, encode, the param written back in its dtype (bf16: rounded to nearest, or
    stochastically with the noise keyed by sr_keys, quant.bf16.sr_noise_keys), and where keep_old (0-dim bool) the
    old values kept. Returns the new (p, m codes, m absmax, v codes, v absmax); the caller copies them back.
    Writing them in place inside the kernel let inductor order a write of the first moment's codes before a later
    read of them (wrong bits)."""
    m_old = decode_traceable(m_codes, m_absmax, m_tables[0], block_size=block_size, tail=tail)
    v_old = decode_traceable(v_codes, v_absmax, v_tables[0], block_size=block_size, tail=tail)
    p_new, m_new, v_new = _adamw8_math(p.to(torch.float32), g.to(torch.float32), m_old, v_old, h, decay)
    if p.dtype == torch.bfloat16:
        p_new = p_new.to(torch.bfloat16) if sr_keys is None else sr_to_bf16_traceable(p_new, sr_keys)
    m_codes_new, m_absmax_new = encode_traceable(m_new, m_tables[1], m_tables[2], block_size=block_size, tail=tail)
    v_codes_new, v_absmax_new = encode_traceable(v_new, v_tables[1], v_tables[2], block_size=block_size, tail=tail)
    return tuple(_kept(keep_old, old, new) for old, new in (
        (p, p_new), (m_codes, m_codes_new), (m_absmax, m_absmax_new), (v_codes, v_codes_new), (v_absmax, v_absmax_new)))


def _kept(keep: Tensor, old: Tensor, new: Tensor) -> Tensor:
    """torch.where(keep, old, new). uint8 codes are chosen in int32 and bf16 values in fp32 (both exact), where
    inductor's CPU loop stays vectorised (a select on uint8 compiled to a scalar loop, ~2x slower for the whole
    fused kernel)."""
    if old.dtype == torch.uint8:
        return torch.where(keep, old.to(torch.int32), new.to(torch.int32)).to(torch.uint8)
    if old.dtype == torch.bfloat16:
        return torch.where(keep, old.to(torch.float32), new.to(torch.float32)).to(torch.bfloat16)
    return torch.where(keep, old, new)


def _update_8bit_fused_(param: Tensor, grad: Tensor, state: dict[str, Tensor], keep_old: Tensor | None, *,
                        block_size: int, hyper: dict, sr_key: tuple[int, int] | None) -> None:
    """_update_8bit_twin_ (plus the keep_old guard) as one compiled kernel per flat chunk, same bits. sr_key:
    (seed, stream) of a bf16 param's stochastic rounding (None: nearest)."""
    device = param.device
    decay = hyper["weight_decay"] > 0.0
    h = adam8_hyper(device=device, **hyper)
    keep = torch.zeros((), dtype=torch.bool, device=device) if keep_old is None else keep_old
    flat = {k: state[k].view(-1) for k in ("exp_avg_codes", "exp_avg_sq_codes")}
    stochastic = sr_key is not None and param.dtype == torch.bfloat16

    def eager(*args, **static):
        with torch.no_grad():
            return _adamw8_kernel(*args, **static)

    # Flat chunks of whole blocks: the kernel returns its results before they are copied back, so a chunk bounds
    # that transient (6 bytes per element) the way the twin's guarded chunks bound theirs.
    chunk = max(block_size, GUARD_CHUNK_ELEMENTS // block_size * block_size)
    numel = param.numel()
    m_tables, v_tables = codec_tables(True, device), codec_tables(False, device, squared=True)
    for e0 in range(0, numel, chunk):
        e1 = min(numel, e0 + chunk)
        b0, b1 = e0 // block_size, -(-e1 // block_size)
        targets = (param.view(-1)[e0:e1], flat["exp_avg_codes"][e0:e1], state["exp_avg_absmax"][b0:b1],
                   flat["exp_avg_sq_codes"][e0:e1], state["exp_avg_sq_absmax"][b0:b1])
        # the noise of element i is the whole tensor's counter i (sr_to_bf16 with offset 0 over the whole param)
        sr_keys = (sr_noise_keys(e1 - e0, seed=sr_key[0], stream=sr_key[1], step=hyper["step"], offset=e0,
                                 device=device) if stochastic else None)
        results = compiled.call("float_adamw8", _adamw8_kernel, eager, targets[0], grad.reshape(-1)[e0:e1],
                                *targets[1:], m_tables, v_tables, h, keep, sr_keys, block_size=block_size,
                                tail=(e1 - e0) % block_size != 0, decay=decay)
        for target, value in zip(targets, results):
            target.copy_(value)


_QMAPS: dict[tuple[str, bool], Tensor] = {}


def _bnb_qmap(device: torch.device, signed: bool) -> Tensor:
    # quant.moments8's maps: the signed one equals bitsandbytes.functional.create_dynamic_map(True); the second
    # moment's is the squared unsigned map (the kernel searches the nearest entry of whatever sorted map it gets).
    key = (str(device), signed)
    if key not in _QMAPS:
        _QMAPS[key] = dynamic_map(signed, squared=not signed).to(device=device, dtype=torch.float32)
    return _QMAPS[key]


def _update_8bit_bnb_(param: Tensor, grad: Tensor, state: dict[str, Tensor], *, lr: float, beta1: float,
                      beta2: float, eps: float, weight_decay: float, step: int, block_size: int, write) -> None:
    # Any device bnb has the op for (CUDA; recent bnb also ships a CPU version, which the unit tests use).
    if block_size != _BNB_BLOCK_SIZE or grad.dtype != param.dtype or param.dtype not in _BNB_DTYPES:
        raise ValueError(f"bnb's 8-bit Adam kernel needs block_size {_BNB_BLOCK_SIZE} and grad dtype == param dtype "
                         f"in {_BNB_DTYPES}; got block_size {block_size}, grad {grad.dtype} / param {param.dtype}")
    if not param.is_contiguous():
        raise ValueError("bnb's 8-bit Adam kernel needs a contiguous param")
    import bitsandbytes.functional as bnbf
    # stochastic rounding of a bf16 param: the kernel updates an fp32 copy, which is then rounded by `write`
    target = param if write is _copy_nearest_ else param.float()
    bnbf.optimizer_update_8bit_blockwise(
        "adam", grad.to(target.dtype).contiguous(), target, state["exp_avg_codes"], state["exp_avg_sq_codes"],
        beta1=beta1, beta2=beta2, beta3=0.0, alpha=0.0, eps=eps, step=step, lr=lr,
        qmap1=_bnb_qmap(param.device, True), qmap2=_bnb_qmap(param.device, False),
        absmax1=state["exp_avg_absmax"], absmax2=state["exp_avg_sq_absmax"], weight_decay=weight_decay,
        gnorm_scale=1.0, skip_zeros=False)
    if target is not param:
        write(param, target)


class FloatAdamW(torch.optim.Optimizer):
    """AdamW over `float_adamw_update_`: 8-bit moments for params with numel >= `min_numel_8bit`, else 32-bit.

    Param groups carry lr, betas, eps, weight_decay, bits, min_numel_8bit, block_size. The state of each param is
    the tensor dict of `init_float_adamw_state`, so `state_dict()` holds tensors only and `load_state_dict()`
    restores it exactly (fp32 moments are NOT cast to a bf16 param's dtype, unlike torch.optim.Optimizer's
    default), and a resumed optimizer continues bit-identically.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, bits: int = 8, min_numel_8bit: int = 4096,
                 block_size: int = 256):
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if bits not in STATE_BITS:
            raise ValueError(f"bits must be one of {STATE_BITS}, got {bits!r}")
        if block_size <= 0 or min_numel_8bit < 0:
            raise ValueError(f"block_size must be > 0 and min_numel_8bit >= 0, got {block_size}, {min_numel_8bit}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, bits=bits,
                        min_numel_8bit=min_numel_8bit, block_size=block_size)
        super().__init__(params, defaults)

    @staticmethod
    def bits_for(param: Tensor, group: dict[str, Any]) -> int:
        """The state width this optimizer gives `param` in `group` (small params fall back to 32 bits)."""
        return 32 if group["bits"] == 32 or param.numel() < group["min_numel_8bit"] else 8

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(init_float_adamw_state(p, bits=self.bits_for(p, group),
                                                        block_size=group["block_size"]))
                float_adamw_update_(p, p.grad, state, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                                    weight_decay=group["weight_decay"], block_size=group["block_size"])
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch's loader casts floating state to the param dtype (fp32 moments -> bf16 for a bf16 param) and may
        # alias the caller's tensors; put back exact copies of what was saved, only moved to the param's device.
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for param_id, p in zip(saved_group["params"], group["params"]):
                if param_id in saved_state:
                    self.state[p] = {k: (v.clone() if k == "step" else v.to(device=p.device, copy=True))
                                     for k, v in saved_state[param_id].items()}
