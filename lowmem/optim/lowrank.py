"""The per-parameter low-rank update of a linear weight (DESIGN §3.2-3.6), in two phases.

One optimizer step of one weight W (m, n) is split so that the same code serves a plain `optimizer.step()` after a
full backward and the fused runtime that sees gradients one micro-batch at a time:

    accum = {}
    for k in range(K):                      # K micro-batches of the step
        accumulate_(spec, cfg, state, accum, grad_op_k, global_step=s, micro_index=k, num_micro_batches=K)
    finish_(spec, cfg, state, accum, weight, global_step=s, lr=lr)

`accumulate_` only ever multiplies the micro-batch gradient operator by thin matrices (G = Aᵀ X is never formed on the
factored path): it adds the projected gradient, the gathered residual entries, and (with error feedback) the dense
gradient into fp32 accumulators. All of these are linear in G, so accumulation over micro-batches is exact.

Refresh under accumulation: a refresh step computes a candidate projector from the FIRST micro-batch (randomized
subspace iteration warm-started from the previous projector). With K > 1 and `refresh_sketch="rayleigh_ritz"` the
micro-batches are then projected on the wider basis B = orth([P_cand, Ω]) (r + oversampling columns), and `finish_`
picks the top-r subspace of the whole step's gradient inside span(B) (Rayleigh-Ritz on the accumulated sketch
S = G B). The projected gradient R of that subspace is then exact: R = S V_r. With K = 1, P = P_cand (GaLore).

State (tensors only, safetensors-friendly): "step" (updates done), refresh bookkeeping (lowmem.optim.refresh), moments
(lowmem.optim.moments), the encoded projector "proj_data"/"proj_scales" once one exists (and "proj_heads", the heads a
cross-head projector was computed from), "fallback_count", residual
"res_idx"/"res_m"/"res_v"/"res_clamp_count", error-feedback "ef" or "ef_q"/"ef_scales".

Length: one state machine (begin, accumulate, settle, commit, follow) whose phases share private helpers over the same
state dict; split apart, those helpers would become a public surface with no second user.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lowmem.config import LowMemConfig
from lowmem.optim import fused_update
from lowmem.optim.linop import DenseGrad, GradOperator, ReducedGrad, SumGrad
from lowmem.optim.moments import BIAS_KEYS, adam_direction_, init_moments, load_moments, transfer_moments_
from lowmem.optim.projector import (CrossHead, backproject, backproject_gather, backproject_rows, compute_projector,
                                   decode_projector, encode_projector, is_full_rank, project, projection_side,
                                   select_heads)
from lowmem.optim.refresh import REFRESH_STATE_KEYS, init_refresh_state, make_policy
from lowmem.optim.residual import (exact_residual_step, init_exact_residual, num_selected, residual_index_dtype,
                                   residual_step, select_residual_indices)
from lowmem.optim.rsvd import resolve_subspaces, subspace_similarity, subspace_similarity_t
from lowmem.optim.weights import WeightTarget
from quant.int8 import dequantize_int8, quantize_int8


@dataclass(frozen=True)
class LowRankSpec:
    """Static facts about one low-rank weight (not state: rebuilt from the model on load).

    param_index: stable index of the parameter in the model; keys its noise stream and projector randomness.
    cross_head: head layout for q/k weights (None: ordinary projection). residual: sparse residuals on this weight.
    """

    name: str
    shape: tuple[int, int]
    param_index: int
    layer_index: int = 0
    num_layers: int = 1
    cross_head: CrossHead | None = None
    residual: bool = False


def projection_side_for(spec: LowRankSpec, cfg: LowMemConfig) -> str:
    """Cross-head projection always projects the shared input side (right); otherwise the smaller side."""
    if cfg.cross_head and spec.cross_head is not None:
        return "right"
    return projection_side(spec.shape)


def effective_rank(spec: LowRankSpec, cfg: LowMemConfig) -> int:
    return min(cfg.rank, min(spec.shape))


def lowrank_moment_shape(spec: LowRankSpec, cfg: LowMemConfig) -> tuple[int, int]:
    m, n = spec.shape
    if is_full_rank(spec.shape, cfg.rank):
        return (m, n)
    r = effective_rank(spec, cfg)
    return (m, r) if projection_side_for(spec, cfg) == "right" else (r, n)


def uses_residual(spec: LowRankSpec, cfg: LowMemConfig) -> bool:
    return spec.residual and cfg.residual_ratio > 0 and not is_full_rank(spec.shape, cfg.rank)


def uses_error_feedback(spec: LowRankSpec, cfg: LowMemConfig) -> bool:
    return cfg.error_feedback != "off" and not is_full_rank(spec.shape, cfg.rank)


def init_lowrank_state(spec: LowRankSpec, cfg: LowMemConfig, device=None) -> dict[str, Tensor]:
    # Counters and refresh bookkeeping stay on the CPU: policies read them as Python numbers every step, and a
    # device tensor would cost a synchronisation per read (HOST_STATE_KEYS).
    state: dict[str, Tensor] = {"step": torch.zeros((), dtype=torch.int64),
                                "fallback_count": torch.zeros((), dtype=torch.int64)}
    state.update(init_refresh_state(spec.layer_index, spec.num_layers, base_interval_steps=cfg.refresh_interval_steps,
                                    stagger=cfg.stagger, window=cfg.lazy_window))
    state.update(init_moments(lowrank_moment_shape(spec, cfg), bits=cfg.optim_bits, block_size=cfg.moment_block_size,
                              device=device))
    if uses_residual(spec, cfg):
        # On the weight's device: it counts device-side clamps without reading them (no synchronisation).
        state["res_clamp_count"] = torch.zeros((), dtype=torch.int64, device=device)
    if uses_error_feedback(spec, cfg):
        _store_error_feedback(state, cfg, torch.zeros(spec.shape, dtype=torch.float32, device=device))
    return state


# Tensors of a low-rank state that live on the CPU whatever the model's device: reading them never synchronises.
HOST_STATE_KEYS = ("step", "fallback_count") + tuple(REFRESH_STATE_KEYS)

# State every data-parallel rank keeps for a weight it does not own: what it needs to project its own gradient and
# to stay in lockstep (projector, refresh bookkeeping, residual indices, counters). Everything else (moments,
# residual values, error feedback) lives on the owner only.
_REPLICATED_KEYS = ("step", "fallback_count", "proj_data", "proj_scales", "proj_heads", "res_idx")


def follower_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The part of a weight's state a non-owning rank keeps (see _REPLICATED_KEYS and lowmem.optim.refresh)."""
    return {k: v for k, v in state.items() if k in _REPLICATED_KEYS or k in REFRESH_STATE_KEYS}


def _policy(cfg: LowMemConfig):
    return make_policy(cfg.refresh, base_interval_steps=cfg.refresh_interval_steps,
                       max_interval_steps=cfg.max_refresh_interval_steps, threshold=cfg.lazy_threshold,
                       low_threshold=cfg.lazy_low_threshold, window=cfg.lazy_window,
                       geometric_start_step=cfg.geometric_start_step, geometric_factor=cfg.geometric_factor)


def _generator(cfg: LowMemConfig, spec: LowRankSpec, global_step: int, device) -> torch.Generator:
    """Projector randomness keyed by (seed, parameter, step): identical on every rank and on resume."""
    key = (cfg.seed * 1_000_003 + spec.param_index) * 1_000_033 + global_step
    gen = torch.Generator(device=device if device is not None else "cpu")
    gen.manual_seed(key % (2 ** 63 - 1))
    return gen


def stored_projector(spec: LowRankSpec, cfg: LowMemConfig, state: dict[str, Tensor]) -> Tensor | None:
    """The current projector as fp32 (d, r), dequantised into a transient buffer; None before the first refresh."""
    if "proj_data" not in state:
        return None
    side = projection_side_for(spec, cfg)
    d = spec.shape[1] if side == "right" else spec.shape[0]
    stored = {"data": state["proj_data"], "scales": state["proj_scales"]}
    # Read every step: the value checks (host synchronisations) ran when the projector was encoded.
    return decode_projector(stored, cfg.projector_bits, (d, effective_rank(spec, cfg)),
                            group_size=cfg.projector_group_size, check_values=False)


def _load_error_feedback(state: dict[str, Tensor], cfg: LowMemConfig) -> Tensor:
    if cfg.error_feedback == "int8":
        return dequantize_int8(state["ef_q"], state["ef_scales"], block_size=cfg.weight_block_size)
    return state["ef"].float()


def _store_error_feedback(state: dict[str, Tensor], cfg: LowMemConfig, value: Tensor) -> None:
    if cfg.error_feedback == "int8":
        state["ef_q"], state["ef_scales"] = quantize_int8(value, block_size=cfg.weight_block_size)
    else:
        state["ef"] = value.to(torch.bfloat16)


def _begin(spec: LowRankSpec, cfg: LowMemConfig, state: dict[str, Tensor], accum: dict, op: GradOperator,
           global_step: int, num_micro_batches: int, reduce_mean_) -> GradOperator:
    """First micro-batch: fold in error feedback, decide and start a refresh, fix the projection basis.

    reduce_mean_: data-parallel runs pass an in-place all-reduce mean; the range finder then works on the mean
    gradient of all ranks (ReducedGrad: only its thin products travel) so every rank finds the same projector.
    """
    if uses_error_feedback(spec, cfg):
        op = SumGrad([(1.0, op), (cfg.error_feedback_weight, DenseGrad(_load_error_feedback(state, cfg)))])
    accum["refresh"] = False
    if is_full_rank(spec.shape, cfg.rank):
        accum["basis"] = None
        return op
    side = projection_side_for(spec, cfg)
    proj_old = stored_projector(spec, cfg, state)
    if proj_old is not None and not _policy(cfg).due(state, global_step):
        accum["basis"] = proj_old
        return op
    rank = effective_rank(spec, cfg)
    device = op.device
    generator = _generator(cfg, spec, global_step, device)
    target = op if reduce_mean_ is None else ReducedGrad(op, reduce_mean_)
    cross_head = spec.cross_head if cfg.cross_head else None
    heads = None if cross_head is None else select_heads(cross_head, rank, generator)
    pending = [compute_projector(target, rank, side=side, method=cfg.projection, oversampling=cfg.oversampling,
                                 power_iters=cfg.power_iters, warm_start=proj_old, generator=generator,
                                 tol=cfg.rsvd_tol, cross_head=cross_head, heads=heads, defer=True)]
    if heads is not None and proj_old is not None and "proj_heads" in state:
        # The refresh policy compares subspaces of the same heads: the old projector came from the old heads' rows,
        # the new one from a fresh draw, so their similarity would measure the draw, not drift. The old heads' rows
        # of this gradient give the like-for-like subspace (warm-started from the old projector: a stationary
        # gradient converges at once). Its heads stay where they are stored (no copy to the host).
        pending.append(compute_projector(target, rank, side=side, method=cfg.projection,
                                         oversampling=cfg.oversampling, power_iters=cfg.power_iters,
                                         warm_start=proj_old, generator=generator, tol=cfg.rsvd_tol,
                                         cross_head=cross_head, heads=state["proj_heads"], defer=True))
    # The refresh's one host read: both range finders' fallback decisions together.
    result, *same_heads = resolve_subspaces(pending)
    if same_heads:
        accum["similarity_basis"] = same_heads[0].basis
    basis = result.basis
    accum.update(refresh=True, proj_old=proj_old, fell_back=result.fell_back, power_iterations=result.iterations,
                 heads=heads)
    wide = num_micro_batches > 1 and cfg.refresh_sketch == "rayleigh_ritz"
    if wide:
        extra = torch.randn(basis.shape[0], cfg.oversampling, generator=generator, device=device)
        # QR keeps span(P_cand) in the first r columns and adds `oversampling` fresh random directions.
        basis = torch.linalg.qr(torch.cat([basis, extra], dim=1))[0]
    else:
        basis = _fix_projector(cfg, accum, basis)
    accum.update(rayleigh_ritz=wide, basis=basis)
    return op


def _align_signs(proj_old: Tensor | None, proj: Tensor) -> Tensor:
    """proj (d, r) with each column's sign flipped so that it points the way the previous projector's column did
    (diag(P_oldᵀ P) >= 0). An SVD fixes singular vectors only up to sign (and torch's sign for the left vectors of G
    differs from that of the right vectors of Gᵀ): without this, moments kept across a refresh would pair
    coordinates of opposite sign."""
    if proj_old is None:
        return proj
    dots = (proj_old.to(device=proj.device, dtype=torch.float32) * proj).sum(0)
    return proj * torch.where(dots < 0, -1.0, 1.0).to(proj.dtype)


def _fix_projector(cfg: LowMemConfig, accum: dict, proj: Tensor) -> Tensor:
    """The projector of a refresh as this step and every later one will use it: signs aligned with the previous
    projector, then rounded through its storage format (INT4 ...). The encoded form waits in accum["proj_stored"]
    for the commit, so R is projected with exactly the matrix the update is back-projected with."""
    proj = _align_signs(accum.get("proj_old"), proj)
    # No value checks (each a host read): the range finder returns only finite bases (a non-finite sketch falls
    # back to the exact SVD), and the decode reads what was just encoded.
    stored = encode_projector(proj, cfg.projector_bits, group_size=cfg.projector_group_size, check_values=False)
    accum["proj_stored"] = stored
    return decode_projector(stored, cfg.projector_bits, tuple(proj.shape), group_size=cfg.projector_group_size,
                            check_values=False)


def accumulate_(spec: LowRankSpec, cfg: LowMemConfig, state: dict[str, Tensor], accum: dict, op: GradOperator, *,
                global_step: int, micro_index: int, num_micro_batches: int = 1, reduce_mean_=None) -> None:
    """Add one micro-batch's gradient (an operator for G_k, shape (m, n)) to the step's fp32 accumulators.

    reduce_mean_: see _begin (data-parallel refreshes); the accumulators themselves stay local (the caller reduces
    them once per step).
    """
    if tuple(op.shape) != tuple(spec.shape):
        raise ValueError(f"{spec.name}: gradient shape {tuple(op.shape)} does not match weight {spec.shape}")
    if micro_index == 0:
        accum.clear()
        op = _begin(spec, cfg, state, accum, op, global_step, num_micro_batches, reduce_mean_)
    elif "basis" not in accum:
        raise RuntimeError(f"{spec.name}: micro-batch {micro_index} accumulated before micro-batch 0 of the step")
    side = projection_side_for(spec, cfg)
    basis = accum["basis"]
    sketch = op.dense() if basis is None else project(op, basis, side)
    accum["sketch"] = sketch if "sketch" not in accum else accum["sketch"].add_(sketch)
    if "res_idx" in state:
        gathered = op.gather(state["res_idx"], check=False)   # validated when chosen (select_residual_indices)
        accum["grad_at_idx"] = gathered if "grad_at_idx" not in accum else accum["grad_at_idx"].add_(gathered)
    if uses_error_feedback(spec, cfg):
        dense = op.dense()
        accum["grad_dense"] = dense if "grad_dense" not in accum else accum["grad_dense"].add_(dense)


def _settle_projection(cfg: LowMemConfig, accum: dict, side: str, rank: int) -> tuple[Tensor, Tensor | None]:
    """(R, P) for this step from the accumulated sketch; Rayleigh-Ritz when the basis was widened.

    Rayleigh-Ritz: P is the top-r subspace of the step's gradient within span(B), fixed (signs, storage rounding) by
    _fix_projector, and R = (G B)(Bᵀ P): the gradient within span(B) projected on that P. Exact when P lies in
    span(B), i.e. up to the storage rounding of P (which R and the back-projection then share)."""
    sketch, basis = accum["sketch"], accum["basis"]
    if basis is None:
        return sketch, None
    if not accum.get("rayleigh_ritz", False):
        return sketch, basis
    left_vecs, _, right_vecs_h = torch.linalg.svd(sketch, full_matrices=False)
    if side == "right":          # sketch = G B (m, k): top right singular vectors within span(B)
        proj = _fix_projector(cfg, accum, basis @ right_vecs_h[:rank].T)
        return sketch @ (basis.T @ proj), proj
    proj = _fix_projector(cfg, accum, basis @ left_vecs[:, :rank])   # sketch = Bᵀ G (k, n)
    return (basis.T @ proj).T @ sketch, proj


def settle_(spec: LowRankSpec, cfg: LowMemConfig, accum: dict) -> Tensor:
    """Fix this step's projected gradient R (Rayleigh-Ritz if the basis was widened) and return ||R||² as a 0-dim
    fp32 tensor on R's device (NaN/Inf when the gradient was not finite; reading it is the caller's choice of when
    to synchronise). Idempotent; `commit_` needs it to have run."""
    if "sketch" not in accum:
        raise RuntimeError(f"{spec.name}: no accumulated gradient to settle")
    if "grad_lowrank" not in accum:
        grad_lowrank, proj = _settle_projection(cfg, accum, projection_side_for(spec, cfg),
                                                effective_rank(spec, cfg))
        accum["grad_lowrank"], accum["proj_step"] = grad_lowrank, proj
        sq = grad_lowrank.pow(2).sum()
        if "grad_at_idx" in accum:
            sq = sq + 0.0 * accum["grad_at_idx"].sum()   # NaN/Inf in the residual entries poisons the norm too
        accum["grad_sq"] = sq
    return accum["grad_sq"]


class UpdateExchange(abc.ABC):
    """How one weight's step is shared between data-parallel ranks (lowmem.distributed builds these).

    owner: this rank holds the weight's moments / residual values and computes the update direction.
    writes_weight: this rank applies the update to its copy of the weight (every rank at ZeRO 0-2; the owner of
    the partition at ZeRO 3).
    share_update(direction, sparse, skipped, *, direction_shape, sparse_numel) -> (direction, sparse, skipped):
    called by every rank; the owner passes its values, the others None, and all get the owner's (direction fp32 of
    `direction_shape`, sparse fp32 (sparse_numel,) or None, skipped). The owner's `skipped` is a bool decided on
    the host or a 0-dim bool device tensor (commit_'s skip=...); the others receive it as a 0-dim bool tensor,
    so no rank waits for the device. Ranks that do not write the weight may receive only `skipped`.
    share_indices(idx, count) -> idx: the owner's newly selected residual indices (count of them: a static number,
    so the others allocate without a read), on every rank.
    """

    owner: bool = True
    writes_weight: bool = True

    @abc.abstractmethod
    def share_update(self, direction, sparse, skipped, *, direction_shape, sparse_numel):
        """See the class docstring."""

    @abc.abstractmethod
    def share_indices(self, idx, count: int):
        """See the class docstring."""


def clip_coefficient(grad_sq: Tensor, grad_clip: float) -> Tensor:
    """min(1, grad_clip / (sqrt(grad_sq) + 1e-6)) on grad_sq's device, no host synchronisation: a 0-dim fp32 tensor.
    Evaluated in fp64 and rounded once to fp32, as the host formula in Python floats was (same bits); NaN for a
    non-finite grad_sq (callers replace the update of a non-finite gradient anyway)."""
    norm = grad_sq.double().sqrt().add_(1e-6)
    return torch.clamp(grad_clip / norm, max=1.0).float()


def _clip_coefficient(cfg: LowMemConfig, grad_sq: Tensor, clip_coef: float | None) -> float | Tensor:
    if clip_coef is not None:
        return clip_coef
    if cfg.clip_mode == "per_tensor" and cfg.grad_clip is not None:
        return clip_coefficient(grad_sq, cfg.grad_clip)
    return 1.0


def _record_refresh(spec: LowRankSpec, cfg: LowMemConfig, state: dict[str, Tensor], accum: dict, proj: Tensor | None,
                    global_step: int, *, transfer: bool, similarity: float | None = None,
                    book: bool = True) -> tuple[Tensor | None, float | None]:
    """A refresh step's bookkeeping: moment transfer (owner only), policy record, the projector stored (INT4...).
    proj is already the decoded stored projector (_fix_projector); returns it (the one this and every later step
    projects and back-projects with) and the similarity (computed here unless the caller already read it).
    book=False leaves the policy record (and the similarity) to the caller (commit_'s deferred bookkeeping)."""
    if not accum["refresh"]:
        return proj, None
    proj_old = accum["proj_old"]
    if proj_old is not None:
        if similarity is None and book:
            similarity = subspace_similarity(proj_old, accum.get("similarity_basis", proj))
        if transfer:
            transfer_moments_(state, proj_old, proj, side=projection_side_for(spec, cfg), mode=cfg.moment_transfer,
                              bits=cfg.optim_bits, block_size=cfg.moment_block_size, steps_done=int(state["step"]),
                              betas=cfg.betas)
    if book:
        _policy(cfg).record(state, global_step, similarity)
    stored = accum["proj_stored"]   # proj is its decoded form (_fix_projector): R was projected with it
    state["proj_data"], state["proj_scales"] = stored["data"], stored["scales"]
    if accum.get("heads") is not None:
        state["proj_heads"] = accum["heads"]      # int64 (k,): the heads the stored projector was computed from
    else:
        state.pop("proj_heads", None)
    if accum.get("fell_back"):
        state["fallback_count"] += 1
    return proj, similarity


def _apply_update(spec: LowRankSpec, cfg: LowMemConfig, state: dict[str, Tensor], weight: WeightTarget,
                  direction: Tensor, sparse: Tensor | None, proj: Tensor | None, *, lr: float,
                  global_step: int, keep_old: Tensor | None = None) -> None:
    """W += -lr·scale·backproject(N) - lr·δ at the residual indices - lr·wd·W, row chunk by row chunk.
    keep_old: 0-dim bool device tensor; where True the weight keeps its old bytes (device-side skip)."""
    side = projection_side_for(spec, cfg)
    n = spec.shape[1]
    low_rank_lr = lr * cfg.scale
    decay = lr * cfg.weight_decay
    res_idx = state.get("res_idx")

    def delta_rows(row_start: int, row_end: int, w_rows: Tensor) -> Tensor:
        if proj is None:
            delta = direction[row_start:row_end] * (-low_rank_lr)
        else:
            delta = backproject_rows(direction, proj, side, row_start, row_end).mul_(-low_rank_lr)
        if sparse is not None:
            # Every residual entry is visited per chunk, those outside it as +0 at local index 0: no host-side
            # slicing of res_idx (a synchronisation per chunk on CUDA); x + (-0.0) == x, so the sum is unchanged.
            local = res_idx.long() - row_start * n
            inside = (local >= 0) & (local < (row_end - row_start) * n)
            values = torch.where(inside, sparse, torch.zeros((), dtype=sparse.dtype, device=sparse.device))
            delta.view(-1).index_add_(0, torch.where(inside, local, 0), values, alpha=-lr)
        if decay:
            # the product rounded on its own, then the sum (add's alpha form is one fused multiply-add on some
            # backends): the ops of the one-call path (lowmem.optim.fused_update), so both give the same bits
            delta.add_(w_rows * -decay)
        return delta

    delta_rows.reads_weight = bool(decay)  # without decay the SR write need not dequantize the rows for us
    weight.apply_(delta_rows, step=global_step, keep_old=keep_old)


def _expects_sparse(spec: LowRankSpec, cfg: LowMemConfig, state: dict[str, Tensor], accum: dict,
                    proj: Tensor | None) -> bool:
    """Whether this step's update carries a sparse residual (decidable on every rank from replicated state)."""
    return uses_residual(spec, cfg) and proj is not None and "res_idx" in state and "grad_at_idx" in accum


def commit_(spec: LowRankSpec, cfg: LowMemConfig, state: dict[str, Tensor], accum: dict, weight: WeightTarget, *,
            global_step: int, lr: float, clip_coef: float | Tensor | None = None,
            exchange: UpdateExchange | None = None, skip: Tensor | bool | None = None) -> dict:
    """Close the step: refresh bookkeeping, Adam on R, residuals, error feedback, and write the weight.

    clip_coef: a global clipping coefficient decided by the caller (two-pass clipping); None applies cfg's
    per-tensor rule on ||R||. Returns stats: grad_sq (||R||² before clipping, a 0-dim tensor), refreshed,
    similarity, skipped, nonfinite (this weight's own gradient was not finite), clip_coef.
    exchange: data-parallel sharing (None: this process does everything). A rank that is not the owner follows the
    owner's decision and direction (`_follow_`); the owner shares them once computed.

    Two ways to treat a non-finite gradient:
    - skip=None (host decision, one process only): ||R||² is read on the host (a synchronisation); a non-finite
      gradient writes nothing (state and weight untouched) and returns skipped=True.
    - skip = a 0-dim bool tensor on R's device (the fused runtime: True when an earlier layer of this backward was
      non-finite): no synchronisation on an ordinary step. The update is computed from a gradient zeroed where
      `skip | ~isfinite(||R||²)` holds, and the new moments, residual values, error feedback and weight bytes are
      then chosen between old and new on the device (torch.where), so a skipped weight keeps exactly its old state.
      stats["skipped"] and stats["nonfinite"] are 0-dim bool tensors; state["step"] advances as if written and the
      caller undoes that for skipped weights once it reads the flags (`undo_skipped_commit_`). On a refresh step
      (and the step that selects the residual indices) the host bookkeeping that depends on the flag is deferred:
      stats["pending"] = (finish(skipped, similarity), similarity tensor or None); the caller reads the similarity
      with the flags and calls finish, which books the refresh in the policy, or puts back the projector, refresh
      counters and residual selection of a skipped weight. stats["refreshed"] is then provisional.
    - skip=False: the caller has verified the gradient finite (two-pass clipping): no check, no synchronisation.
    """
    if exchange is not None and skip is None:
        raise ValueError("commit_ with an exchange needs skip= a 0-dim bool device tensor or False (every rank must "
                         "take the same decision without reading the device)")
    if exchange is not None and not exchange.owner:
        return _follow_(spec, cfg, state, accum, weight, global_step=global_step, lr=lr, exchange=exchange,
                        guarded=isinstance(skip, Tensor))
    grad_sq = settle_(spec, cfg, accum)
    shape = lowrank_moment_shape(spec, cfg)
    nonfinite = ~torch.isfinite(grad_sq)
    similarity = None
    if skip is None:
        if not math.isfinite(float(grad_sq)):
            return _skipped(accum, grad_sq)
    elif skip is not False:
        skip = skip.to(grad_sq.device) | nonfinite
    side = projection_side_for(spec, cfg)
    grad_lowrank, proj = accum["grad_lowrank"], accum["proj_step"]
    grad_at_idx = accum.get("grad_at_idx")
    clip_coef = _clip_coefficient(cfg, grad_sq, clip_coef)
    # R and the residual entries are scaled and masked in place: they are this step's own buffers (accum is cleared
    # below) and at full rank R is the whole (m, n) gradient, so copies would hold it two more times
    if isinstance(clip_coef, Tensor) or clip_coef != 1.0:
        grad_lowrank = grad_lowrank.mul_(clip_coef)
        if grad_at_idx is not None:
            grad_at_idx = grad_at_idx.mul_(clip_coef)
    guarded = isinstance(skip, Tensor)
    pending = None
    if guarded:   # a skipped weight's update is computed from zeros (finite) and then discarded
        grad_lowrank = grad_lowrank.masked_fill_(skip, 0.0)
        grad_at_idx = None if grad_at_idx is None else grad_at_idx.masked_fill_(skip, 0.0)
        old = _guarded_state(state)
        if accum["refresh"] or (uses_residual(spec, cfg) and "res_idx" not in state):
            pending = _deferred_bookkeeping(spec, cfg, state, accum, global_step)

    refreshed = bool(accum["refresh"])
    proj, similarity = _record_refresh(spec, cfg, state, accum, proj, global_step, transfer=True,
                                       similarity=similarity, book=pending is None)
    expects_sparse = _expects_sparse(spec, cfg, state, accum, proj)
    had_indices = "res_idx" in state
    step = int(state["step"]) + 1
    plain = exchange is None and not uses_residual(spec, cfg) and not uses_error_feedback(spec, cfg)
    if fused_update.applies(weight, optim_bits=cfg.optim_bits, plain=plain):
        # Adam, back-projection, decay and the INT8 write as one compiled call: the bits of the path below
        fused_update.lowrank_update_(state, grad_lowrank, proj, weight, side=side, step=step, global_step=global_step,
                                     beta1=cfg.betas[0], beta2=cfg.betas[1], eps=cfg.eps,
                                     moment_block=cfg.moment_block_size, low_rank_lr=lr * cfg.scale,
                                     decay=lr * cfg.weight_decay, keep=skip if guarded else None)
    else:
        direction, exp_avg_sq = adam_direction_(state, grad_lowrank, step=step, beta1=cfg.betas[0],
                                                beta2=cfg.betas[1], eps=cfg.eps, bits=cfg.optim_bits,
                                                block_size=cfg.moment_block_size,
                                                coord_dim=1 if side == "right" else 0)
        sparse = _sparse_residual(spec, cfg, state, grad_lowrank, grad_at_idx, proj, direction, exp_avg_sq, side,
                                  step)
        if exchange is not None:
            # Collective order, mirrored by _follow_: the update (or the skip) first, then newly selected indices.
            exchange.share_update(direction, sparse, skip if guarded else False, direction_shape=shape,
                                  sparse_numel=sparse.numel() if expects_sparse else 0)
            if not had_indices and "res_idx" in state:
                exchange.share_indices(state["res_idx"], state["res_idx"].numel())
        if exchange is None or exchange.writes_weight:
            _apply_update(spec, cfg, state, weight, direction, sparse, proj, lr=lr, global_step=global_step,
                          keep_old=skip if guarded else None)

    if uses_error_feedback(spec, cfg):
        grad_dense = accum["grad_dense"] * clip_coef
        if guarded:
            grad_dense = grad_dense.masked_fill_(skip, 0.0)
        _store_error_feedback(state, cfg, grad_dense - backproject(grad_lowrank, proj, side))
    if guarded:
        _keep_old_state_(state, old, skip)
    state["step"] += 1
    accum.clear()
    return {"grad_sq": grad_sq, "refreshed": refreshed, "similarity": similarity,
            "skipped": skip if guarded else False, "nonfinite": nonfinite if guarded else False,
            "clip_coef": clip_coef, "pending": pending}


def _skipped(accum: dict, grad_sq: Tensor, *, nonfinite: bool | Tensor = True) -> dict:
    accum.clear()
    return {"grad_sq": grad_sq, "refreshed": False, "similarity": None, "skipped": True, "nonfinite": nonfinite,
            "clip_coef": 0.0}


_RESIDUAL_KEYS = ("res_idx", "res_m", "res_v")


def _deferred_bookkeeping(spec: LowRankSpec, cfg: LowMemConfig, state: dict[str, Tensor], accum: dict,
                          global_step: int):
    """(finish(skipped, similarity), similarity tensor or None) for a device-mode commit whose host bookkeeping
    depends on the skip flag (see commit_): what it needs to book the refresh later or to undo it."""
    host_before = {k: state[k].clone() for k in (*REFRESH_STATE_KEYS, "fallback_count") if k in state}
    kept = {k: state[k] for k in ("proj_data", "proj_scales", "proj_heads", *_RESIDUAL_KEYS) if k in state}
    # a reset / rotate transfer adds per-coordinate bias masses on a weight's first refresh; a skipped weight must
    # not keep them (its values are put back on the device by _keep_old_state_ only where they existed before)
    had_masses = {k for k in BIAS_KEYS if k in state}
    similarity = None
    if accum["refresh"] and accum.get("proj_old") is not None:
        # cross-head q/k: the old projector against the same heads' subspace of this gradient (like with like)
        similarity = subspace_similarity_t(accum["proj_old"], accum.get("similarity_basis", accum["proj_step"]))
    refresh = bool(accum["refresh"])

    def finish(skipped: bool, similarity_value: float | None) -> None:
        if skipped:
            for key, value in host_before.items():
                state[key].copy_(value)
            for key in ("proj_data", "proj_scales", "proj_heads", *_RESIDUAL_KEYS):
                if key in kept:
                    state[key] = kept[key]
                else:
                    state.pop(key, None)
            for key in BIAS_KEYS:
                if key not in had_masses:
                    state.pop(key, None)
        elif refresh:
            _policy(cfg).record(state, global_step, similarity_value)
    return finish, similarity


# State a commit may rewrite (moments, residual values and counts, error feedback); host-side counters ("step",
# refresh bookkeeping) are handled by the caller. Stored per key: the tensor before the commit (a clone for those
# updated in place; moments and error feedback are replaced by new tensors, so the old reference suffices).
_IN_PLACE_KEYS = ("res_m", "res_v", "res_clamp_count", "bias1", "bias2")   # bias masses: lowmem.optim.moments


def _guarded_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: (v.clone() if k in _IN_PLACE_KEYS else v) for k, v in state.items()
            if k.startswith(("exp_avg", "ef")) or k in _IN_PLACE_KEYS}


def _keep_old_state_(state: dict[str, Tensor], old: dict[str, Tensor], skip: Tensor) -> None:
    """state[k] <- old[k] where skip (0-dim bool), on the device; bytes of the written values otherwise."""
    for key, before in old.items():
        after = state[key]
        if key in _IN_PLACE_KEYS:
            after.copy_(torch.where(skip, before, after))
        else:
            state[key] = torch.where(skip, before, after)


def undo_skipped_commit_(state: dict[str, Tensor]) -> None:
    """The host-side part of a device-skipped commit: the update counter goes back (see commit_, skip=...)."""
    state["step"] -= 1


def _follow_(spec: LowRankSpec, cfg: LowMemConfig, state: dict[str, Tensor], accum: dict, weight: WeightTarget, *,
             global_step: int, lr: float, exchange: UpdateExchange, guarded: bool = False) -> dict:
    """commit_ on a rank that does not own the weight's moments: take the owner's decision and direction, keep the
    replicated state (projector, refresh bookkeeping, residual indices, step counter) in lockstep, write the weight
    when this rank holds it. grad_sq is not known here (reported as 0; the owner reports it).
    guarded (the owner committed with a skip tensor): the owner's skip flag arrives as a device tensor; the weight
    write keeps its old bytes where it holds, "step" advances as if written (the caller undoes it), and the
    refresh bookkeeping is deferred as in commit_ (stats["pending"])."""
    settle_(spec, cfg, accum)   # fixes this step's projector (identical on every rank); the local R is not used
    proj = accum["proj_step"]
    refreshed = bool(accum["refresh"])
    expects_sparse = _expects_sparse(spec, cfg, state, accum, proj)
    step = int(state["step"]) + 1
    direction, sparse, skipped = exchange.share_update(
        None, None, False, direction_shape=lowrank_moment_shape(spec, cfg),
        sparse_numel=state["res_idx"].numel() if expects_sparse else 0)
    pending = None   # not guarded: the owner was told the gradient is finite (skip=False), so it did not skip
    if guarded and (accum["refresh"] or (uses_residual(spec, cfg) and "res_idx" not in state)):
        pending = _deferred_bookkeeping(spec, cfg, state, accum, global_step)
    proj, similarity = _record_refresh(spec, cfg, state, accum, accum["proj_step"], global_step, transfer=False,
                                       book=pending is None)
    if uses_residual(spec, cfg) and proj is not None and "res_idx" not in state and step >= cfg.residual_warmup_steps:
        numel = spec.shape[0] * spec.shape[1]
        state["res_idx"] = exchange.share_indices(None, num_selected(float(cfg.residual_ratio), numel)).to(
            residual_index_dtype(numel))
    if exchange.writes_weight:
        _apply_update(spec, cfg, state, weight, direction, sparse if expects_sparse else None, proj, lr=lr,
                      global_step=global_step, keep_old=skipped if guarded else None)
    state["step"] += 1
    accum.clear()
    return {"grad_sq": 0.0, "refreshed": refreshed, "similarity": similarity,
            "skipped": skipped if guarded else False, "clip_coef": None, "pending": pending}


def finish_(spec: LowRankSpec, cfg: LowMemConfig, state: dict[str, Tensor], accum: dict, weight: WeightTarget, *,
            global_step: int, lr: float, clip_coef: float | None = None) -> dict:
    """settle_ then commit_: the whole end of a step for one weight."""
    settle_(spec, cfg, accum)
    return commit_(spec, cfg, state, accum, weight, global_step=global_step, lr=lr, clip_coef=clip_coef)


def _sparse_residual(spec, cfg, state, grad_lowrank, grad_at_idx, proj, direction, exp_avg_sq, side, step
                     ) -> Tensor | None:
    """Sparse residual δ at the stored indices L (added as -lr·δ), or None (warm-up, disabled, just selected).

    residual_mode "exact" (default): full-rank Adam moments at L, so that the update at L is scale × full-rank Adam;
    δ = scale·(m̂/(√v̂+ε) − backproject(N)[L]). "paper": GaLore+ Algorithm 2 (DESIGN §3.5) with the clamp counted.
    """
    if not uses_residual(spec, cfg) or proj is None:
        return None
    n = spec.shape[1]
    if "res_idx" not in state:
        if step >= cfg.residual_warmup_steps:
            exp_avg, _ = load_moments(state, bits=cfg.optim_bits, block_size=cfg.moment_block_size)
            # One-time (m, n) transient at the end of warm-up: the top-ρ entries of |backproject(M')|.
            # Moments are finite by construction (only finite or zeroed gradients reach them).
            idx = select_residual_indices(backproject(exp_avg, proj, side), cfg.residual_ratio, check_finite=False)
            idx = idx.to(residual_index_dtype(spec.shape[0] * spec.shape[1]))
            value_dtype = torch.bfloat16 if cfg.residual_dtype == "bf16" else torch.float32
            if cfg.residual_mode == "exact":
                # Start the full-rank moments at L from the low-rank ones; (P∘P) keeps V non-negative and
                # independent of the projector's column signs.
                res_m, res_v = init_exact_residual(backproject_gather(exp_avg, proj, side, idx, n, check=False),
                                                   backproject_gather(exp_avg_sq, proj * proj, side, idx, n,
                                                                      check=False),
                                                   value_dtype)
            else:
                res_m = torch.zeros(idx.numel(), dtype=value_dtype, device=idx.device)
                res_v = torch.zeros(idx.numel(), dtype=value_dtype, device=idx.device)
            state["res_idx"], state["res_m"], state["res_v"] = idx, res_m, res_v
        return None
    if grad_at_idx is None:
        return None
    idx = state["res_idx"]
    if cfg.residual_mode == "exact":
        lowrank_at_idx = backproject_gather(direction, proj, side, idx, n, check=False)
        delta = exact_residual_step(state["res_m"], state["res_v"], grad_at_idx, lowrank_at_idx, step=step,
                                    beta1=cfg.betas[0], beta2=cfg.betas[1], eps=cfg.eps, scale=1.0)
        return delta.mul_(cfg.scale)
    ghat = backproject_gather(grad_lowrank, proj, side, idx, n, check=False)
    vback = backproject_gather(exp_avg_sq, proj, side, idx, n, check=False)
    delta, clamped = residual_step(state["res_m"], state["res_v"], grad_at_idx, ghat, vback, step=step,
                                   beta1=cfg.betas[0], beta2=cfg.betas[1], eps=cfg.eps)
    state["res_clamp_count"] += clamped
    return delta


def lowrank_update_(spec: LowRankSpec, cfg: LowMemConfig, state: dict[str, Tensor], op: GradOperator,
                    weight: WeightTarget, *, global_step: int, lr: float, clip_coef: float | None = None) -> dict:
    """One whole step from one gradient (K = 1): the function `optimizer.step()` calls per weight."""
    accum: dict = {}
    accumulate_(spec, cfg, state, accum, op, global_step=global_step, micro_index=0, num_micro_batches=1)
    return finish_(spec, cfg, state, accum, weight, global_step=global_step, lr=lr, clip_coef=clip_coef)
