"""Low-rank Adam moments M', V' (DESIGN §3.4): storage at 8/16/32 bits, the Adam step, and transfer on refresh.

The moments have the shape of the projected gradient R: (m, r) for a right projection, (r, n) for a left one, or
(m, n) when the rank covers the whole matrix (no projection). At 8 bits they are kept in bitsandbytes' blockwise
dynamic format (signed map for M'; the squared unsigned map for V', so that sqrt(V') has the gradient's dynamic range
and small entries do not underflow to 0 while M' survives -- quant.moments8), through `quant.moments8`; at 16 bits as
bf16; at 32 bits as fp32. All arithmetic is fp32: a moment is dequantised, updated and stored back.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from quant.moments8 import dequantize_moment8, quantize_moment8

MOMENT_BITS = (8, 16, 32)
_NAMES = ("exp_avg", "exp_avg_sq")


def _check_bits(bits: int) -> None:
    if bits not in MOMENT_BITS:
        raise ValueError(f"optim_bits must be one of {MOMENT_BITS}, got {bits!r}")


def init_moments(shape: tuple[int, ...], *, bits: int, block_size: int = 256,
                 device: torch.device | str | None = None) -> dict[str, Tensor]:
    """Zero moments of `shape`. Keys: exp_avg / exp_avg_sq (16/32 bit) or *_codes uint8 + *_absmax fp32 (8 bit)."""
    _check_bits(bits)
    zeros = torch.zeros(shape, dtype=torch.float32, device=device)
    state: dict[str, Tensor] = {}
    store_moments_(state, zeros, zeros, bits=bits, block_size=block_size)
    return state


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


def adam_direction_(state: dict[str, Tensor], grad_lowrank: Tensor, *, step: int, beta1: float, beta2: float,
                    eps: float, bits: int, block_size: int = 256) -> tuple[Tensor, Tensor]:
    """One Adam moment update on the projected gradient, in place on `state`.

    grad_lowrank: fp32 R, the moments' shape. step: t >= 1 (this update's index, for bias correction).
    Returns (N, V'): N = (M'/(1-β1ᵗ)) / (sqrt(V'/(1-β2ᵗ)) + eps), fp32 like R, and the updated V' (not bias
    corrected, fp32; the sparse residual needs it). V' is stored back clamped at 0 (8-bit rounding cannot make it
    negative, but bf16 storage of tiny values must not produce -0 surprises). At 8 and 16 bits N is clamped to
    ±adam_direction_bound(t), which exact Adam never exceeds: at 8 bits V' of a coordinate far below its block's
    largest can still decode to 0 (below 5e-14 of it, i.e. a gradient ratio over ~4e6 in one block) while M'
    survives, and at both widths rounding overshoots the bound slightly in the first steps.
    """
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    exp_avg, exp_avg_sq = load_moments(state, bits=bits, block_size=block_size)
    if exp_avg.shape != grad_lowrank.shape:
        raise ValueError(f"moment shape {tuple(exp_avg.shape)} does not match gradient {tuple(grad_lowrank.shape)}")
    grad = grad_lowrank.float()
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    bias1 = 1.0 - beta1 ** step
    bias2 = 1.0 - beta2 ** step
    # Same order of operations as torch.optim.AdamW (step size folded after the division) so that the full-rank,
    # 32-bit case reproduces it to float rounding.
    denom = (exp_avg_sq.sqrt() / (bias2 ** 0.5)).add_(eps)
    direction = (exp_avg / bias1) / denom
    if bits != 32:  # rounded moments can overshoot what exact Adam can reach; 32-bit stays torch's AdamW exactly
        bound = adam_direction_bound(step, beta1, beta2)
        direction.clamp_(-bound, bound)
    store_moments_(state, exp_avg, exp_avg_sq.clamp_(min=0.0), bits=bits, block_size=block_size)
    return direction, exp_avg_sq


def transfer_moments_(state: dict[str, Tensor], proj_old: Tensor, proj_new: Tensor, *, side: str, mode: str,
                      bits: int, block_size: int = 256) -> None:
    """Carry the moments into the new projector's coordinates after a refresh (DESIGN §3.3).

    proj_old, proj_new: fp32 (d, r) with orthonormal columns (d = n for a right projection, m for a left one).
    mode "keep": leave them (GaLore); "reset": zero them; "rotate": with C = P_newᵀ P_old (r, r),
    M ← C M (left) / M Cᵀ (right) and V ← (C∘C) V / V (C∘C)ᵀ clamped at 0: the coordinates of the old moment in the
    new basis, and the second moment mapped as if the coordinates were independent.
    """
    if mode == "keep":
        return
    exp_avg, exp_avg_sq = load_moments(state, bits=bits, block_size=block_size)
    if mode == "reset":
        exp_avg.zero_()
        exp_avg_sq.zero_()
    elif mode == "rotate":
        coupling = proj_new.float().T @ proj_old.float()
        coupling_sq = coupling * coupling
        if side == "left":
            exp_avg = coupling @ exp_avg
            exp_avg_sq = (coupling_sq @ exp_avg_sq).clamp_(min=0.0)
        elif side == "right":
            exp_avg = exp_avg @ coupling.T
            exp_avg_sq = (exp_avg_sq @ coupling_sq.T).clamp_(min=0.0)
        else:
            raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    else:
        raise ValueError(f"moment_transfer must be 'keep', 'rotate' or 'reset', got {mode!r}")
    store_moments_(state, exp_avg, exp_avg_sq, bits=bits, block_size=block_size)
