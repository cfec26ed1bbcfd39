"""Low-rank Adam moments M', V' (DESIGN §3.4): storage at 8/16/32 bits, the Adam step, and transfer on refresh.

The moments have the shape of the projected gradient R: (m, r) for a right projection, (r, n) for a left one, or
(m, n) when the rank covers the whole matrix (no projection). At 8 bits they are kept in bitsandbytes' blockwise
dynamic format (signed map for M'; the squared unsigned map for V', so that sqrt(V') has the gradient's dynamic range
and small entries do not underflow to 0 while M' survives -- quant.moments8), through `quant.moments8`; at 16 bits as
bf16; at 32 bits as fp32. All arithmetic is fp32: a moment is dequantised, updated and stored back.

Bias correction after a refresh (DESIGN §3.3). Adam divides M' by 1 - β1ᵗ and V' by 1 - β2ᵗ: the weight the
exponential averages have accumulated since they started from zero (their "mass"). A refresh that resets or rotates
the moments changes that mass, so the global t no longer describes it. Once a transfer other than "keep" has run, the
state carries the mass per projected coordinate: "bias1"/"bias2" fp32 (r,), each Adam step updates them as
b ← β b + (1 - β) (which is 1 - βᵗ for a moment started at zero), and the step divides by them instead of the global
formula. "reset" restarts every coordinate at mass 0 (the next step is a fresh Adam started at the refresh);
"rotate" maps the mass like the second moment, b_new = (C∘C) b_old, so a direction the old subspace did not hold
starts afresh and one it held keeps its history. Before any such transfer (and always for "keep", GaLore's rule)
the keys are absent and the global 1 - βᵗ applies: those states are bit-identical to plain Adam's. At 8 bits both
kinds of state take one compiled kernel (decode, Adam, encode): with masses, the global step's scalars 1/sqrt(1-β2ᵗ),
1/((1-β1ᵗ)·bound) and 1/(1-β1ᵗ) become per-element scales (mass_scales), the op sequence is the same.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from quant import compiled
from quant.moments8 import (codec_tables, decode_traceable, dequantize_moment8, encode_traceable,
                            quantize_moment8)

MOMENT_BITS = (8, 16, 32)
_NAMES = ("exp_avg", "exp_avg_sq")
BIAS_KEYS = ("bias1", "bias2")


def _check_bits(bits: int) -> None:
    if bits not in MOMENT_BITS:
        raise ValueError(f"optim_bits must be one of {MOMENT_BITS}, got {bits!r}")


def init_moments(shape: tuple[int, ...], *, bits: int, block_size: int = 256,
                 device: torch.device | str | None = None) -> dict[str, Tensor]:
    """Zero moments of `shape`. Keys: exp_avg / exp_avg_sq (16/32 bit) or *_codes uint8 + *_absmax fp32 (8 bit)."""
    _check_bits(bits)
    state: dict[str, Tensor] = {}
    _store_zero_moments_(state, tuple(shape), bits=bits, block_size=block_size, device=device)
    return state


def _store_zero_moments_(state: dict[str, Tensor], shape: tuple[int, ...], *, bits: int, block_size: int,
                         device) -> None:
    """Zero moments of `shape` into `state`: at 8 bits the codes and absmax an encoding of zeros gives (all-zero
    blocks: absmax 0, codes 0), written directly (no encoder call)."""
    if bits != 8:
        zeros = torch.zeros(shape, dtype=torch.float32, device=device)
        store_moments_(state, zeros, zeros, bits=bits, block_size=block_size)
        return
    num_blocks = -(-math.prod(shape) // block_size)
    for name in _NAMES:
        state[f"{name}_codes"] = torch.zeros(shape, dtype=torch.uint8, device=device)
        state[f"{name}_absmax"] = torch.zeros(num_blocks, dtype=torch.float32, device=device)


def load_moments(state: dict[str, Tensor], *, bits: int, block_size: int = 256) -> tuple[Tensor, Tensor]:
    """Dequantised (M', V') as fp32 tensors of the stored shape (fresh tensors, safe to modify)."""
    _check_bits(bits)
    if bits == 8:
        out = []
        for name, signed in zip(_NAMES, (True, False)):
            out.append(dequantize_moment8(state[f"{name}_codes"], state[f"{name}_absmax"], signed=signed,
                                          block_size=block_size, check_values=False, squared=not signed))
        return out[0], out[1]
    return state["exp_avg"].float().clone(), state["exp_avg_sq"].float().clone()


def store_moments_(state: dict[str, Tensor], exp_avg: Tensor, exp_avg_sq: Tensor, *, bits: int,
                   block_size: int = 256) -> None:
    """Write fp32 (M', V') into `state` in the storage format of `bits` (replacing whatever was there)."""
    _check_bits(bits)
    if bits == 8:
        for name, value, signed in zip(_NAMES, (exp_avg, exp_avg_sq), (True, False)):
            # Moments are only ever updated from gradients the caller verified finite: skip the kernel's own
            # value checks (a device synchronisation each on CUDA).
            codes, absmax = quantize_moment8(value.float(), signed=signed, block_size=block_size,
                                             check_values=False, squared=not signed)
            state[f"{name}_codes"] = codes
            state[f"{name}_absmax"] = absmax
    else:
        dtype = torch.bfloat16 if bits == 16 else torch.float32
        state["exp_avg"] = exp_avg.to(dtype).clone()
        state["exp_avg_sq"] = exp_avg_sq.to(dtype).clone()


def moment_shape(state: dict[str, Tensor]) -> tuple[int, ...]:
    """Shape of the stored moments, whatever their format."""
    key = "exp_avg" if "exp_avg" in state else "exp_avg_codes"
    return tuple(state[key].shape)


def adam_direction_bound(step: int, beta1: float, beta2: float) -> float:
    """Largest |N| exact Adam can produce at step t: max over all gradient sequences of
    |m̂_t| / sqrt(v̂_t) (ε = 0), from Cauchy-Schwarz on m_t = (1-β1) Σ β1^(t-i) g_i against
    v_t = (1-β2) Σ β2^(t-i) g_i²:

        |m̂_t| / sqrt(v̂_t) <= (1-β1)/(1-β1ᵗ) · sqrt((1-β2ᵗ)/(1-β2)) · sqrt(Σ_{k<t} γᵏ),   γ = β1²/β2,

    tight (reached by g_i ∝ (β1/β2)^(t-i)); 1 at t = 1, about 7.3 for large t at β = (0.9, 0.999). 8-bit moments
    clamp N to it: it never binds on exact moments, and it caps what a second moment that quantised to 0 beside a
    surviving first moment would otherwise turn into m/ε.
    """
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    if beta2 == 0.0:  # v = g_t² alone: m̂ / |g_t| is unbounded as g_t -> 0
        return math.inf
    gamma = beta1 * beta1 / beta2
    geometric = float(step) if gamma == 1.0 else (1.0 - gamma ** step) / (1.0 - gamma)
    return ((1.0 - beta1) / (1.0 - beta1 ** step) * math.sqrt((1.0 - beta2 ** step) / (1.0 - beta2))
            * math.sqrt(geometric))


def adam8_hyper(*, step: int, beta1: float, beta2: float, eps: float, device, lr: float = -1.0,
                weight_decay: float = 0.0) -> Tensor:
    """fp32 (9,) [β1, 1-β1, β2, 1-β2, 1/sqrt(1-β2ᵗ), ε, 1-lr·λ, 1/((1-β1ᵗ)·bound), -lr/(1-β1ᵗ)] with bound =
    adam_direction_bound(t): one Adam step's scalars as tensor data, rounded to fp32 once, so an eager twin and a
    compiled kernel multiply by the same values (and a new step or learning rate compiles nothing). The defaults
    (lr -1, no decay) make the last entry 1/(1-β1ᵗ): the bias-corrected direction of the low-rank step."""
    bias_correction1 = 1.0 - beta1 ** step
    bound = adam_direction_bound(step, beta1, beta2)
    # shared by every weight of a step (read only): one host-to-device copy per step and setting
    return compiled.cached_constants((beta1, 1.0 - beta1, beta2, 1.0 - beta2, 1.0 / math.sqrt(1.0 - beta2 ** step),
                                      eps, 1.0 - lr * weight_decay, 1.0 / (bias_correction1 * bound),
                                      -lr / bias_correction1), dtype=torch.float32, device=torch.device(device))


def adam8_ratio(g: Tensor, m: Tensor, v: Tensor, h: Tensor,
                scales: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(m' / denom, m', v') of one Adam step in fp32 (h = adam8_hyper), out of place: the op sequence of the
    compiled 8-bit steps (this module's low-rank one, lowmem.optim.float_adamw's). denom = sqrt(v')/sqrt(1-β2ᵗ) + ε,
    floored at |m'| / ((1-β1ᵗ)·bound) so that the bias-corrected direction (ratio · h[8]) stays within ±bound.
    scales: None, or fp32 tensors broadcastable to g that replace h[4] and h[7] element by element (per-coordinate
    bias masses: mass_scales). `adam8_ratio_` is the eager twins' in-place form; each op is one IEEE rounding, so
    both give the same bits."""
    root_scale, floor_scale = (h[4], h[7]) if scales is None else scales
    m = m * h[0] + g * h[1]
    v = v * h[2] + (g * g) * h[3]
    denom = correctly_rounded_sqrt(v) * root_scale + h[5]
    denom = torch.maximum(denom, torch.abs(m) * floor_scale)
    return m / denom, m, v


_SQRT_CHUNK = 1 << 16


def correctly_rounded_sqrt(v: Tensor) -> Tensor:
    """sqrt of an fp32 tensor, correctly rounded (the same bits on every backend), fp32.

    CPU: through fp64. Eager torch.sqrt on fp32 CPU tensors is not correctly rounded (torch 2.13: 443 of 2250
    values off by an ulp; inductor's C++ root is); the fp64 root rounded to fp32 is the correctly rounded fp32 root
    (53 >= 2 * 24 + 2 bits: no double-rounding error). Other devices: the fp32 root itself. CUDA's sqrtf is
    correctly rounded unless built with fast math (PyTorch is not: -prec-sqrt=true is nvcc's default) and inductor
    lowers sqrt to Triton's tl.sqrt_rn (round to nearest), while fp64 runs at 1/64 of the fp32 rate on consumer
    GPUs. The branch is on the device type, static for torch.compile."""
    if v.device.type == "cpu":
        return torch.sqrt(v.to(torch.float64)).to(torch.float32)
    return torch.sqrt(v)


def adam8_ratio_(g: Tensor, m: Tensor, v: Tensor, h: Tensor,
                 scales: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """adam8_ratio in place on m and v (fresh decoded moments, contiguous, g's shape), few full-size temporaries;
    on the CPU the fp64 root chunk by chunk. Returns the ratio (a new tensor)."""
    root_scale, floor_scale = (h[4], h[7]) if scales is None else scales
    m.mul_(h[0]).add_(g * h[1])
    v.mul_(h[2]).add_((g * g).mul_(h[3]))
    denom = torch.empty_like(v)
    flat_v, flat_d = v.view(-1), denom.view(-1)
    if v.device.type == "cpu":   # the fp64 root chunk by chunk (correctly_rounded_sqrt)
        for start in range(0, flat_v.numel(), _SQRT_CHUNK):
            flat_d[start:start + _SQRT_CHUNK].copy_(flat_v[start:start + _SQRT_CHUNK].to(torch.float64).sqrt_())
    else:
        torch.sqrt(v, out=denom)
    denom.mul_(root_scale).add_(h[5])
    torch.maximum(denom, m.abs().mul_(floor_scale), out=denom)
    return torch.div(m, denom, out=denom)


def mass_scales(bias1: Tensor, bias2: Tensor, *, bound: float, coord_dim: int) -> Tensor:
    """Per-coordinate counterparts of adam8_hyper's h[4], h[7], h[8] for a state with bias masses b1, b2 fp32 (r,)
    (after this step's advance, so > 0): fp32 (3, r, 1) for coord_dim 0 (moments (r, n)) or (3, 1, r) for
    coord_dim 1 (moments (m, r)), rows [1/sqrt(b2), 1/(b1·bound), 1/b1], each formed in fp64 and rounded to fp32
    once (like adam8_hyper), so the compiled step and its twin multiply by the same values."""
    b1, b2 = bias1.double(), bias2.double()
    scales = torch.stack([torch.rsqrt(b2), 1.0 / (b1 * bound), 1.0 / b1]).to(torch.float32)
    return scales.unsqueeze(2) if coord_dim == 0 else scales.unsqueeze(1)


def _lowrank_adam8_kernel(g: Tensor, m_codes: Tensor, m_absmax: Tensor, v_codes: Tensor, v_absmax: Tensor,
                          m_tables: tuple[Tensor, Tensor, Tensor], v_tables: tuple[Tensor, Tensor, Tensor], h: Tensor,
                          *, block_size: int, tail: bool, scales: tuple[Tensor, Tensor, Tensor] | None = None
                          ) -> tuple[Tensor, ...]:
    """The 8-bit low-rank Adam step on flat R fp32 (numel,), codes uint8 (numel,), absmax fp32 (nb,): decode,
    adam8_ratio, encode. Returns (direction fp32, V' fp32, M' codes, M' absmax, V' codes, V' absmax).
    scales: None (the global bias correction of h), or three fp32 (numel,) tensors replacing h[4], h[7], h[8]."""
    m_old = decode_traceable(m_codes, m_absmax, m_tables[0], block_size=block_size, tail=tail)
    v_old = decode_traceable(v_codes, v_absmax, v_tables[0], block_size=block_size, tail=tail)
    ratio, m_new, v_new = adam8_ratio(g, m_old, v_old, h, None if scales is None else scales[:2])
    m_codes_new, m_absmax_new = encode_traceable(m_new, m_tables[1], m_tables[2], block_size=block_size, tail=tail)
    v_codes_new, v_absmax_new = encode_traceable(v_new, v_tables[1], v_tables[2], block_size=block_size, tail=tail)
    direction = ratio * (h[8] if scales is None else scales[2])
    return direction, v_new, m_codes_new, m_absmax_new, v_codes_new, v_absmax_new


def _lowrank_adam8_masses_kernel(g: Tensor, m_codes: Tensor, m_absmax: Tensor, v_codes: Tensor, v_absmax: Tensor,
                                 m_tables: tuple[Tensor, Tensor, Tensor], v_tables: tuple[Tensor, Tensor, Tensor],
                                 h: Tensor, element_scales: Tensor, *, block_size: int, tail: bool
                                 ) -> tuple[Tensor, ...]:
    """_lowrank_adam8_kernel for a state with per-coordinate bias masses: element_scales fp32 (3, numel), mass_scales
    spread over R's elements. Spread by the caller, not broadcast in the graph: inductor would gather each element's
    scales through an integer division by a dynamic size (measured 1.8x the global step's time, one thread)."""
    return _lowrank_adam8_kernel(g, m_codes, m_absmax, v_codes, v_absmax, m_tables, v_tables, h,
                                 block_size=block_size, tail=tail,
                                 scales=(element_scales[0], element_scales[1], element_scales[2]))


def _lowrank_adam8_twin(g: Tensor, m_codes: Tensor, m_absmax: Tensor, v_codes: Tensor, v_absmax: Tensor,
                        m_tables, v_tables, h: Tensor, element_scales: Tensor | None = None, *, block_size: int,
                        tail: bool) -> tuple[Tensor, ...]:
    """The eager twin of both kernels (quant.moments8's codec, adam8_ratio_): the same bits."""
    del m_tables, v_tables, tail   # the eager codec finds its own tables and partial block
    m = dequantize_moment8(m_codes, m_absmax, signed=True, block_size=block_size, check_values=False)
    v = dequantize_moment8(v_codes, v_absmax, signed=False, block_size=block_size, check_values=False, squared=True)
    if element_scales is None:
        direction = adam8_ratio_(g, m, v, h).mul_(h[8])
    else:
        direction = adam8_ratio_(g, m, v, h, (element_scales[0], element_scales[1])).mul_(element_scales[2])
    m_codes_new, m_absmax_new = quantize_moment8(m, signed=True, block_size=block_size, check_values=False)
    v_codes_new, v_absmax_new = quantize_moment8(v, signed=False, block_size=block_size, check_values=False,
                                                 squared=True)
    return direction, v, m_codes_new, m_absmax_new, v_codes_new, v_absmax_new


def _advance_masses_(state: dict[str, Tensor], beta1: float, beta2: float) -> None:
    """Per-coordinate masses since the last reset/rotation, advanced in place like the moments they describe:
    b <- βb + (1 - β)."""
    state["bias1"].mul_(beta1).add_(1.0 - beta1)
    state["bias2"].mul_(beta2).add_(1.0 - beta2)


def adam8_step_inputs(state: dict[str, Tensor], grad: Tensor, *, step: int, beta1: float, beta2: float, eps: float,
                      coord_dim: int) -> tuple[Tensor, Tensor | None]:
    """(h, element_scales) of one 8-bit low-rank Adam step on R of grad's shape: h = adam8_hyper; element_scales
    None (global bias correction) or fp32 (3, numel) per-element mass scales when the state carries bias masses,
    which this advances (call it once per step)."""
    h = adam8_hyper(step=step, beta1=beta1, beta2=beta2, eps=eps, device=grad.device)
    if "bias1" not in state:
        return h, None
    _advance_masses_(state, beta1, beta2)
    coord_scales = mass_scales(state["bias1"], state["bias2"], bound=adam_direction_bound(step, beta1, beta2),
                               coord_dim=coord_dim)
    return h, coord_scales.expand(3, *grad.shape).reshape(3, -1)   # a copy: 12 bytes per element


def moment_codes(state: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The 8-bit state's (M' codes flat, M' absmax, V' codes flat, V' absmax), as the kernels take them."""
    return (state["exp_avg_codes"].reshape(-1), state["exp_avg_absmax"],
            state["exp_avg_sq_codes"].reshape(-1), state["exp_avg_sq_absmax"])


def store_moment_codes_(state: dict[str, Tensor], shape, m_codes: Tensor, m_absmax: Tensor, v_codes: Tensor,
                        v_absmax: Tensor) -> None:
    """Put a kernel's new flat codes (viewed as `shape`) and absmax into the 8-bit state."""
    state["exp_avg_codes"], state["exp_avg_absmax"] = m_codes.view(shape), m_absmax
    state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"] = v_codes.view(shape), v_absmax


def _adam8_direction_(state: dict[str, Tensor], grad: Tensor, *, step: int, beta1: float, beta2: float, eps: float,
                      block_size: int, coord_dim: int) -> tuple[Tensor, Tensor]:
    """adam_direction_ at 8 bits: one compiled kernel (decode, Adam, encode) where kernels are in use, else its
    eager twin; the same bits either way (tests/unit/lowmem/optim). The bias correction is the global one, or the
    state's per-coordinate masses (advanced here) when it carries them."""
    shape = grad.shape
    h, element_scales = adam8_step_inputs(state, grad, step=step, beta1=beta1, beta2=beta2, eps=eps,
                                          coord_dim=coord_dim)
    static = dict(block_size=block_size, tail=grad.numel() % block_size != 0)
    if element_scales is not None:
        name, kernel, extra = "lowrank_adam8_masses", _lowrank_adam8_masses_kernel, (h, element_scales)
    else:
        name, kernel, extra = "lowrank_adam8", _lowrank_adam8_kernel, (h,)
    args = (grad.reshape(-1), *moment_codes(state))
    if compiled.use_kernels() and grad.numel() > 0:
        tables = (codec_tables(True, grad.device), codec_tables(False, grad.device, squared=True))
        out = compiled.call(name, kernel, _lowrank_adam8_twin, *args, *tables, *extra, **static)
    else:
        out = _lowrank_adam8_twin(*args, None, None, *extra, **static)
    direction, exp_avg_sq, *codes = out
    store_moment_codes_(state, shape, *codes)
    return direction.view(shape), exp_avg_sq.view(shape)


def _coordinate_view(mass: Tensor, ndim: int, coord_dim: int) -> Tensor:
    """(r,) per-coordinate mass shaped to broadcast along the moments' coordinate dimension."""
    shape = [1] * ndim
    shape[coord_dim] = mass.numel()
    return mass.view(shape)


def adam_direction_(state: dict[str, Tensor], grad_lowrank: Tensor, *, step: int, beta1: float, beta2: float,
                    eps: float, bits: int, block_size: int = 256, coord_dim: int = 1) -> tuple[Tensor, Tensor]:
    """One Adam moment update on the projected gradient, in place on `state`.

    grad_lowrank: fp32 R, the moments' shape. step: t >= 1 (this update's index, for bias correction).
    coord_dim: the dimension of R that indexes projected coordinates (1 for a right projection (m, r), 0 for a left
    one (r, n)); only read when the state carries per-coordinate bias masses (see the module docstring).
    Returns (N, V'): N = (M'/b1) / (sqrt(V'/b2) + eps) with b1 = 1-β1ᵗ, b2 = 1-β2ᵗ (or the per-coordinate masses),
    fp32 like R, and the updated V' (not bias corrected, fp32; the sparse residual needs it). V' is stored back
    clamped at 0 (8-bit rounding cannot make it negative, but bf16 storage of tiny values must not produce -0
    surprises). At 8 and 16 bits N is clamped to ±adam_direction_bound(t), which exact Adam never exceeds: at 8 bits
    V' of a coordinate far below its block's largest can still decode to 0 (below 5e-14 of it, i.e. a gradient ratio
    over ~4e6 in one block) while M' survives, and at both widths rounding overshoots the bound slightly in the first
    steps. With per-coordinate masses the bound still uses the global t: it grows with t, so it is looser than the
    coordinate's own but never cuts an exact Adam update.
    """
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    if bits == 8:
        if tuple(state["exp_avg_codes"].shape) != tuple(grad_lowrank.shape):
            raise ValueError(f"moment shape {tuple(state['exp_avg_codes'].shape)} does not match gradient "
                             f"{tuple(grad_lowrank.shape)}")
        return _adam8_direction_(state, grad_lowrank.float(), step=step, beta1=beta1, beta2=beta2, eps=eps,
                                 block_size=block_size, coord_dim=coord_dim)
    exp_avg, exp_avg_sq = load_moments(state, bits=bits, block_size=block_size)
    if exp_avg.shape != grad_lowrank.shape:
        raise ValueError(f"moment shape {tuple(exp_avg.shape)} does not match gradient {tuple(grad_lowrank.shape)}")
    grad = grad_lowrank.float()
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    if "bias1" in state:
        _advance_masses_(state, beta1, beta2)
        bias1 = _coordinate_view(state["bias1"], exp_avg.dim(), coord_dim)
        bias2 = _coordinate_view(state["bias2"], exp_avg.dim(), coord_dim)
        denom = (exp_avg_sq.sqrt() / bias2.sqrt()).add_(eps)
    else:
        bias1 = 1.0 - beta1 ** step
        bias2 = 1.0 - beta2 ** step
        # Same order of operations as torch.optim.AdamW (step size folded after the division) so that the
        # full-rank, 32-bit case reproduces it to float rounding.
        denom = (exp_avg_sq.sqrt() / (bias2 ** 0.5)).add_(eps)
    direction = (exp_avg / bias1) / denom
    if bits != 32:  # rounded moments can overshoot what exact Adam can reach; 32-bit stays torch's AdamW exactly
        bound = adam_direction_bound(step, beta1, beta2)
        direction.clamp_(-bound, bound)
    store_moments_(state, exp_avg, exp_avg_sq.clamp_(min=0.0), bits=bits, block_size=block_size)
    return direction, exp_avg_sq


def transfer_moments_(state: dict[str, Tensor], proj_old: Tensor, proj_new: Tensor, *, side: str, mode: str,
                      bits: int, steps_done: int, betas: tuple[float, float], block_size: int = 256) -> None:
    """Carry the moments into the new projector's coordinates after a refresh (DESIGN §3.3).

    proj_old, proj_new: fp32 (d, r) with orthonormal columns (d = n for a right projection, m for a left one).
    steps_done: Adam updates the moments have seen so far (the state's "step"); betas: (β1, β2). Together they give
    the moments' current mass 1 - βᵗ when no per-coordinate mass is stored yet.
    mode "keep": leave them (GaLore, global bias correction continues); "reset": zero them and restart the bias
    correction of every coordinate (mass 0); "rotate": with C = P_newᵀ P_old (r, r), the bias-corrected moments
    are carried into the new coordinates, m̂ ← C m̂ (left) / m̂ Cᵀ (right) and v̂ ← (C∘C) v̂ (the second moment as if
    the coordinates were independent), and the masses b ← (C∘C) b: row i of C∘C sums to the fraction of new
    direction i that the old subspace held, so a direction the old subspace held keeps its moments and history, a
    new one starts afresh (mass 0), one in between is a blend. The stored moments are m̂·b1 and v̂·b2 (no division
    by a tiny mass). v̂ dropping the cross terms can make it smaller than m̂² in the new coordinates (a normalised
    update above 1 under a constant gradient); v̂ is raised to at least m̂² (a variance cannot be negative).
    """
    if mode == "keep":
        return
    if isinstance(steps_done, bool) or not isinstance(steps_done, int) or steps_done < 0:
        raise ValueError(f"steps_done must be an int >= 0, got {steps_done!r}")
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if mode not in ("rotate", "reset"):
        raise ValueError(f"moment_transfer must be 'keep', 'rotate' or 'reset', got {mode!r}")
    rank = proj_new.shape[1]
    if mode == "reset":   # every coordinate restarts at mass 0 with zero moments: nothing to decode or encode
        device = state["exp_avg_codes" if bits == 8 else "exp_avg"].device
        state["bias1"] = torch.zeros(rank, dtype=torch.float32, device=device)
        state["bias2"] = torch.zeros(rank, dtype=torch.float32, device=device)
        _store_zero_moments_(state, moment_shape(state), bits=bits, block_size=block_size, device=device)
        return
    exp_avg, exp_avg_sq = load_moments(state, bits=bits, block_size=block_size)
    coord_dim = 1 if side == "right" else 0
    if "bias1" in state:
        mass1, mass2 = state["bias1"], state["bias2"]
    else:
        mass1 = torch.full((rank,), 1.0 - betas[0] ** steps_done, dtype=torch.float32, device=exp_avg.device)
        mass2 = torch.full((rank,), 1.0 - betas[1] ** steps_done, dtype=torch.float32, device=exp_avg.device)
    coupling = proj_new.float().T @ proj_old.float()
    coupling_sq = coupling * coupling
    old1 = _coordinate_view(mass1, exp_avg.dim(), coord_dim)
    old2 = _coordinate_view(mass2, exp_avg.dim(), coord_dim)
    m_hat = torch.where(old1 > 0, exp_avg / old1.clamp(min=1e-30), 0.0)
    v_hat = torch.where(old2 > 0, exp_avg_sq / old2.clamp(min=1e-30), 0.0)
    if side == "left":
        m_hat, v_hat = coupling @ m_hat, coupling_sq @ v_hat
    else:
        m_hat, v_hat = m_hat @ coupling.T, v_hat @ coupling_sq.T
    v_hat = torch.maximum(v_hat.clamp_(min=0.0), m_hat.square())
    mass1, mass2 = coupling_sq @ mass1, coupling_sq @ mass2
    exp_avg = m_hat * _coordinate_view(mass1, exp_avg.dim(), coord_dim)
    exp_avg_sq = v_hat * _coordinate_view(mass2, exp_avg.dim(), coord_dim)
    state["bias1"], state["bias2"] = mass1.contiguous(), mass2.contiguous()
    store_moments_(state, exp_avg, exp_avg_sq, bits=bits, block_size=block_size)
