"""GaLore+ sparse coded residuals (DESIGN §3.5; GaLore+ Algorithm 2 and Appendix A).

Low-rank Adam only sees Ĝ = backproject(R), the part of the gradient inside the subspace. On a fixed set L of flat
positions (the top ρ of |backproject(M')| at the end of warm-up) we also keep the residual moments ΔM, ΔV of what
the subspace misses, ΔG = G − Ĝ, and add the correction δ to the update at L:

    ΔM ← β1 ΔM + (1−β1) ΔG
    ΔV ← β2 ΔV + 2(1−β2) Ĝ ⊙ ΔG                    (first-order expansion of G² − Ĝ², as in the paper)
    δ  = (ΔM / (1−β1ᵗ)) / (√(max(0, backproject(V')/(1−β2ᵗ) + ΔV/(1−β2ᵗ))) + ε)

Everything here works on the |L| gathered values only: the caller gathers G[L], Ĝ[L] and backproject(V')[L]
(O(|L|·r) each, never the full m×n). The radicand can go negative because backproject(V') = P V' is not an
elementwise square (it even changes with the signs of P's columns) and ΔV is a first-order term; it is clamped at 0
and the clamps are counted.

Measured caveat (tests/unit/lowmem/test_residual.py, headline test): a clamped radicand makes δ = ΔM̂/ε, and with
a dense projector most radicands at L are clamped, so `residual_step` as specified moves the update far AWAY from
full-rank Adam. `exact_residual_step` is an alternative with the same memory (two values per index) and the same
gathers (G[L] and backproject(N)[L] each step; backproject(M')[L] and (P∘P)V' at L once): it keeps full-rank Adam
moments at L and returns the correction that makes the update at L equal full-rank Adam's.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["residual_index_dtype", "select_residual_indices", "residual_step", "init_exact_residual",
           "exact_residual_step", "residual_state_bytes"]

_INT32_LIMIT = 2 ** 31
_VALUE_DTYPES = (torch.float32, torch.bfloat16)


def residual_index_dtype(numel: int) -> torch.dtype:
    """int32 when every flat index of a matrix with `numel` elements fits (numel < 2³¹), else int64."""
    if isinstance(numel, bool) or not isinstance(numel, int):
        raise TypeError(f"numel must be an int, got {type(numel).__name__}")
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    return torch.int32 if numel < _INT32_LIMIT else torch.int64


def num_selected(ratio: float, numel: int) -> int:
    """How many residual indices a weight of `numel` entries gets: ceil(ratio·numel), at least 1 (static: every
    data-parallel rank knows it without asking the owner)."""
    # The tiny slack keeps float noise (0.07 * 100 = 7.000000000000001) from adding an index.
    return min(numel, max(1, math.ceil(ratio * numel - 1e-9)))


def select_residual_indices(first_moment_back: Tensor, ratio: float, *, check_finite: bool = True) -> Tensor:
    """Sorted flat indices of the top ceil(ratio·m·n) entries of |first_moment_back|.

    first_moment_back: float (m, n), backproject(M') at the end of warm-up. ratio in (0, 1].
    Returns a 1-D tensor of residual_index_dtype(m·n) on the input's device, ascending (ties broken by torch.topk).
    check_finite=False skips the finiteness check (a host synchronisation on CUDA) for input finite by construction.
    """
    if not isinstance(first_moment_back, Tensor) or first_moment_back.dim() != 2:
        raise ValueError("first_moment_back must be a 2-D tensor (m, n)")
    if not first_moment_back.is_floating_point():
        raise TypeError(f"first_moment_back must be a float tensor, got {first_moment_back.dtype}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"ratio must be a float, got {type(ratio).__name__}")
    if not (0.0 < ratio <= 1.0):
        raise ValueError(f"ratio must lie in (0, 1], got {ratio}")
    numel = first_moment_back.numel()
    if numel == 0:
        raise ValueError("first_moment_back is empty: no entries to select")
    magnitude = first_moment_back.detach().reshape(-1).float().abs()
    if check_finite and not bool(torch.isfinite(magnitude).all()):   # a host synchronisation on CUDA
        raise ValueError("first_moment_back has NaN/Inf entries; cannot rank them")
    k = num_selected(float(ratio), numel)
    flat = torch.topk(magnitude, k, sorted=False).indices
    return torch.sort(flat).values.to(residual_index_dtype(numel))


def _check_vector(name: str, t: Tensor, length: int | None) -> None:
    if not isinstance(t, Tensor) or t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor (L,)")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got {t.dtype}")
    if length is not None and t.numel() != length:
        raise ValueError(f"{name} has {t.numel()} entries, expected L = {length} like delta_m")


def _check_hyper(first: Tensor, second: Tensor, step: int, beta1: float, beta2: float, eps: float) -> None:
    for t in (first, second):
        if t.dtype not in _VALUE_DTYPES:
            raise TypeError(f"residual moments must be stored as float32 or bfloat16, got {t.dtype}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an int >= 1 (t is 1-based), got {step!r}")
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not (0.0 <= beta < 1.0):
            raise ValueError(f"{name} must lie in [0, 1), got {beta}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def residual_step(delta_m: Tensor, delta_v: Tensor, grad_at_idx: Tensor, ghat_at_idx: Tensor,
                  vback_at_idx: Tensor, *, step: int, beta1: float, beta2: float, eps: float) -> tuple[Tensor, Tensor]:
    """One residual update at the |L| stored positions; returns (δ fp32 (L,), number of clamped radicands as a 0-dim
    int64 tensor on the moments' device).

    delta_m, delta_v: (L,) fp32 or bf16, the stored residual moments, updated IN PLACE (math in fp32, one rounding
    on store). grad_at_idx = G[L], ghat_at_idx = backproject(R)[L], vback_at_idx = backproject(V')[L] with V' the
    low-rank second moment already updated this step and not bias-corrected; all (L,) float. step: t >= 1.
    δ is computed from the fp32 moments before they are rounded for storage.
    The clamp count stays a tensor, so the call never synchronises with the device.
    """
    _check_vector("delta_m", delta_m, None)
    length = delta_m.numel()
    for name, t in (("delta_v", delta_v), ("grad_at_idx", grad_at_idx), ("ghat_at_idx", ghat_at_idx),
                    ("vback_at_idx", vback_at_idx)):
        _check_vector(name, t, length)
    _check_hyper(delta_m, delta_v, step, beta1, beta2, eps)

    device = delta_m.device
    grad = grad_at_idx.to(device=device, dtype=torch.float32)
    ghat = ghat_at_idx.to(device=device, dtype=torch.float32)
    vback = vback_at_idx.to(device=device, dtype=torch.float32)
    resid = grad - ghat                                                   # ΔG at L

    # .float() aliases an fp32 store (updated in place right here) and copies a bf16 one.
    m = delta_m.float().mul_(beta1).add_(resid, alpha=1.0 - beta1)
    v = delta_v.float().mul_(beta2).addcmul_(ghat, resid, value=2.0 * (1.0 - beta2))

    bias1 = 1.0 - beta1 ** step
    bias2 = 1.0 - beta2 ** step
    radicand = (vback + v).div_(bias2)
    negative = radicand < 0
    clamped = negative.sum()
    denom = radicand.clamp_(min=0.0).sqrt_().add_(eps)
    delta = (m / bias1).div_(denom)

    delta_m.copy_(m)
    delta_v.copy_(v)
    return delta, clamped


def init_exact_residual(mback_at_idx: Tensor, vback_sq_at_idx: Tensor, value_dtype: torch.dtype = torch.float32
                        ) -> tuple[Tensor, Tensor]:
    """Full-rank moments at L for `exact_residual_step`, estimated from the low-rank ones when L is chosen.

    mback_at_idx = backproject(M')[L] (the first moment inside the subspace), vback_sq_at_idx = the back-projection
    of V' through the elementwise-squared projector, (P∘P) V' (right: V' (P∘P)ᵀ), at L: non-negative and invariant
    to the signs of P's columns, unlike P V'. Returns (m, v), (L,) each, in value_dtype (float32 or bfloat16).
    """
    _check_vector("mback_at_idx", mback_at_idx, None)
    _check_vector("vback_sq_at_idx", vback_sq_at_idx, mback_at_idx.numel())
    if value_dtype not in _VALUE_DTYPES:
        raise TypeError(f"value_dtype must be float32 or bfloat16, got {value_dtype}")
    m = mback_at_idx.detach().to(dtype=value_dtype, copy=True)
    v = vback_sq_at_idx.detach().float().clamp(min=0.0).to(value_dtype)
    return m, v


def exact_residual_step(m_at_idx: Tensor, v_at_idx: Tensor, grad_at_idx: Tensor, lowrank_update_at_idx: Tensor, *,
                        step: int, beta1: float, beta2: float, eps: float, scale: float = 1.0) -> Tensor:
    """Proposed alternative to `residual_step`: full-rank Adam at L; returns δ fp32 (L,).

    m_at_idx, v_at_idx: (L,) fp32 or bf16 full-rank moments at L (from `init_exact_residual`), updated IN PLACE.
    grad_at_idx = G[L]; lowrank_update_at_idx = backproject(N)[L], the unscaled low-rank Adam direction at L.
    δ = m̂/(√v̂ + ε) − scale·lowrank_update, so scale·backproject(N) + δ equals full-rank Adam's direction at L.
    Nothing is clamped: v is a sum of squares.
    """
    _check_vector("m_at_idx", m_at_idx, None)
    length = m_at_idx.numel()
    for name, t in (("v_at_idx", v_at_idx), ("grad_at_idx", grad_at_idx),
                    ("lowrank_update_at_idx", lowrank_update_at_idx)):
        _check_vector(name, t, length)
    _check_hyper(m_at_idx, v_at_idx, step, beta1, beta2, eps)
    device = m_at_idx.device
    grad = grad_at_idx.to(device=device, dtype=torch.float32)
    m = m_at_idx.float().mul_(beta1).add_(grad, alpha=1.0 - beta1)
    v = v_at_idx.float().mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = (v / (1.0 - beta2 ** step)).sqrt_().add_(eps)
    delta = (m / (1.0 - beta1 ** step)).div_(denom)
    delta.sub_(lowrank_update_at_idx.to(device=device, dtype=torch.float32), alpha=scale)
    m_at_idx.copy_(m)
    v_at_idx.copy_(v)
    return delta


def residual_state_bytes(num_indices: int, index_dtype: torch.dtype, value_dtype: torch.dtype) -> int:
    """Bytes held by a residual of |L| = num_indices: the indices plus ΔM and ΔV, |L|·(index + 2·value)."""
    if isinstance(num_indices, bool) or not isinstance(num_indices, int) or num_indices < 0:
        raise ValueError(f"num_indices must be an int >= 0, got {num_indices!r}")
    for name, dtype in (("index_dtype", index_dtype), ("value_dtype", value_dtype)):
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"{name} must be a torch.dtype, got {type(dtype).__name__}")
    if index_dtype not in (torch.int32, torch.int64):
        raise ValueError(f"index_dtype must be torch.int32 or torch.int64, got {index_dtype}")
    return num_indices * (index_dtype.itemsize + 2 * value_dtype.itemsize)
