"""Low-rank projectors: which side, how to compute them, projection and back-projection, storage (DESIGN §3.2).

Conventions for a gradient G (m, n) = (out, in):
  right (m >= n):  P (n, r),  R = G P   (m, r),  back-projection R Pᵀ  (m, n)
  left  (m <  n):  P (m, r),  R = Pᵀ G  (r, n),  back-projection P R   (m, n)
The left projector of G is the right projector of Gᵀ, so everything is computed by lowmem.optim.rsvd on the right side.
Cross-head projection (q/k, GaLore+) is always a right projector computed from a few heads' row slices.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lowmem.optim.linop import CHUNK_ELEMENTS, GradOperator
from lowmem.optim.rsvd import (PendingSubspace, SubspaceResult, exact_left_subspace, exact_right_subspace,
                               randomized_right_subspace)

SIDES = ("right", "left")
METHODS = ("randomized", "svd")
PROJECTOR_BITS = (4, 8, 16, 32)


def _check_shape(shape) -> tuple[int, int]:
    if len(shape) != 2 or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise ValueError(f"shape must be two positive ints (m, n), got {shape!r}")
    return int(shape[0]), int(shape[1])


def _check_side(side: str) -> None:
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")


def projection_side(shape: tuple[int, int]) -> str:
    """'right' if m >= n else 'left': project onto the smaller dimension (GaLore)."""
    m, n = _check_shape(shape)
    return "right" if m >= n else "left"


def is_full_rank(shape: tuple[int, int], rank: int) -> bool:
    """True when rank >= min(m, n): projection would be the identity, so callers skip it."""
    m, n = _check_shape(shape)
    return rank >= min(m, n)


@dataclass(frozen=True)
class CrossHead:
    """Heads stacked along the rows of W: W (num_heads·head_dim, n). For W_k under GQA num_heads is
    num_key_value_heads."""

    head_dim: int
    num_heads: int

    def __post_init__(self):
        for name in ("head_dim", "num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CrossHead.{name} must be a positive int, got {value!r}")


def select_heads(cross_head: CrossHead, rank: int, generator: torch.Generator | None = None) -> Tensor | None:
    """⌈rank / head_dim⌉ distinct heads drawn with torch.randperm(generator), sorted, int64 (k,) on the generator's
    device (not copied to the CPU: that would be a host synchronisation on every refresh) — or None when that many
    heads is all of them (use the whole matrix; the generator is then not advanced)."""
    count = math.ceil(rank / cross_head.head_dim)
    if count >= cross_head.num_heads:
        return None
    gen_device = generator.device if generator is not None else "cpu"
    order = torch.randperm(cross_head.num_heads, generator=generator, device=gen_device)
    return order[:count].sort().values


def _head_rows(heads: Tensor, head_dim: int, device: torch.device) -> Tensor:
    """Row indices (k·head_dim,) int64 of the given heads' slices G[h·d:(h+1)·d, :], stacked in head order."""
    offsets = torch.arange(head_dim, dtype=torch.int64, device=heads.device)
    return (heads[:, None] * head_dim + offsets[None, :]).reshape(-1).to(device)


def compute_projector(op: GradOperator, rank: int, *, side: str, method: str = "randomized",
                      oversampling: int = 8, power_iters: int = 2, warm_start: Tensor | None = None,
                      generator: torch.Generator | None = None, tol: float | None = None,
                      cross_head: CrossHead | None = None, heads: Tensor | None = None,
                      defer: bool = False) -> SubspaceResult | PendingSubspace:
    """Projector P for op (m, n): basis fp32 (n, r) for side 'right', (m, r) for 'left'.

    method 'randomized' (lowmem.optim.rsvd.randomized_right_subspace with oversampling, power_iters, warm_start, tol)
    or 'svd' (exact, forms G). cross_head: right side only; the top-r right singular vectors of the stacked row
    slices of ⌈r/d⌉ random heads (chosen first with `generator`, which then also draws the sketch), or of the given
    `heads` (int64 (k,), sorted; then nothing is drawn for them). defer: the randomized method returns a
    PendingSubspace (lowmem.optim.rsvd.resolve_subspaces reads several fallback decisions at once).
    """
    if not isinstance(op, GradOperator):
        raise TypeError(f"op must be a GradOperator, got {type(op).__name__}")
    _check_side(side)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    m, n = op.shape
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be an int in [1, {min(m, n)}] for a gradient of shape {op.shape}, got {rank!r}")

    if cross_head is not None:
        if not isinstance(cross_head, CrossHead):
            raise TypeError(f"cross_head must be a CrossHead, got {type(cross_head).__name__}")
        if side != "right":
            raise ValueError("cross-head projection shares the input dimension: it is a right projector, "
                             f"pass side='right' (got {side!r})")
        if m != cross_head.head_dim * cross_head.num_heads:
            raise ValueError(f"cross-head projection needs m == head_dim * num_heads, got m={m} and "
                             f"{cross_head.head_dim} * {cross_head.num_heads}")
        if heads is None:
            heads = select_heads(cross_head, rank, generator)
        # The head rows come from the layout checked above (or the stored heads of this layout): in range.
        target = op if heads is None else op.take_rows(_head_rows(heads, cross_head.head_dim, op.device),
                                                        check=False)
    else:
        target = op if side == "right" else op.t()

    if method == "svd":
        if side == "left":   # GaLore's left projector: U of svd(G) (its column signs, not those of svd(Gᵀ))
            return exact_left_subspace(op, rank)
        return exact_right_subspace(target, rank)
    return randomized_right_subspace(target, rank, oversampling=oversampling, power_iters=power_iters,
                                     warm_start=warm_start, generator=generator, tol=tol, defer=defer)


def _check_projector(P: Tensor, rows: int, side: str, what: str) -> None:
    if not isinstance(P, Tensor) or P.dim() != 2 or not P.dtype.is_floating_point:
        raise ValueError(f"{what}: P must be a 2-D float tensor")
    if P.shape[0] != rows:
        dim = "n (in)" if side == "right" else "m (out)"
        raise ValueError(f"{what}: a {side} projector has {dim} = {rows} rows, got P of shape {tuple(P.shape)}")


def project(op: GradOperator, P: Tensor, side: str) -> Tensor:
    """R fp32: right G P (m, r) from P (n, r); left Pᵀ G (r, n) from P (m, r). Products only (no (m, n))."""
    _check_side(side)
    m, n = op.shape
    _check_projector(P, n if side == "right" else m, side, "project")
    if side == "right":
        return op.matmul(P)
    return op.rmatmul(P).T.contiguous()


def _factors(R: Tensor, P: Tensor, side: str) -> tuple[Tensor, Tensor]:
    """Back-projection as L_f (m, r) @ R_fᵀ with R_f (n, r), both fp32, after checking shapes."""
    _check_side(side)
    for name, t in (("R", R), ("P", P)):
        if not isinstance(t, Tensor) or t.dim() != 2 or not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a 2-D float tensor")
    if side == "right":  # R (m, r), P (n, r)
        if R.shape[1] != P.shape[1]:
            raise ValueError(f"right side: R (m, r) and P (n, r) need one r, got {tuple(R.shape)}, {tuple(P.shape)}")
        return R.float(), P.to(device=R.device, dtype=torch.float32)
    if P.shape[1] != R.shape[0]:  # left: P (m, r), R (r, n)
        raise ValueError(f"left side: P (m, r) and R (r, n) need one r, got {tuple(P.shape)}, {tuple(R.shape)}")
    return P.to(device=R.device, dtype=torch.float32), R.float().T


def backproject(R: Tensor, P: Tensor, side: str) -> Tensor:
    """(m, n) fp32: right R Pᵀ, left P R."""
    left, right = _factors(R, P, side)
    return left @ right.T


def backproject_rows(R: Tensor, P: Tensor, side: str, row_start: int, row_end: int) -> Tensor:
    """Rows row_start:row_end of the back-projection, (row_end - row_start, n) fp32, without the other rows."""
    left, right = _factors(R, P, side)
    if not 0 <= row_start <= row_end <= left.shape[0]:
        raise ValueError(f"rows [{row_start}, {row_end}) out of range for {left.shape[0]} rows")
    return left[row_start:row_end] @ right.T


def backproject_gather(R: Tensor, P: Tensor, side: str, flat_idx: Tensor, n_cols: int, *,
                       check: bool = True) -> Tensor:
    """Back-projection at row-major flat indices (L,) int32/int64 of an (m, n_cols) matrix -> (L,) fp32.

    Entry (i, j) is the dot product of row i of the left factor and row j of the right factor: O(L·r) work,
    computed in chunks so the (chunk, r) gathers stay under CHUNK_ELEMENTS; no (m, n) buffer. check=False skips
    the range check of flat_idx (a host synchronisation on CUDA) for indices validated when they were chosen.
    """
    left, right = _factors(R, P, side)
    m, n = left.shape[0], right.shape[0]
    if n_cols != n:
        raise ValueError(f"n_cols={n_cols} does not match the back-projection's {n} columns")
    if not isinstance(flat_idx, Tensor) or flat_idx.dtype not in (torch.int32, torch.int64) or flat_idx.dim() != 1:
        raise TypeError("flat_idx must be a 1-D int32 or int64 tensor")
    idx = flat_idx.to(device=left.device, dtype=torch.int64)
    if check and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= m * n):
        raise ValueError(f"flat_idx entries must lie in [0, {m * n}) for shape ({m}, {n})")
    rows, cols = idx // n, idx % n
    out = torch.empty(idx.numel(), dtype=torch.float32, device=left.device)
    chunk = max(1, CHUNK_ELEMENTS // max(left.shape[1], 1))
    for s in range(0, idx.numel(), chunk):
        e = min(idx.numel(), s + chunk)
        out[s:e] = (left.index_select(0, rows[s:e]) * right.index_select(0, cols[s:e])).sum(1)
    return out


def _check_bits(bits: int) -> None:
    if bits not in PROJECTOR_BITS:
        raise ValueError(f"projector bits must be one of {PROJECTOR_BITS}, got {bits!r}")


def encode_projector(P: Tensor, bits: int, group_size: int = 256, *, check_values: bool = True) -> dict[str, Tensor]:
    """Storage form of P (dim, r) float: {'data', 'scales'} tensors (checkpointable as they are). check_values=False
    skips the INT4 packer's finiteness check (a host synchronisation on CUDA) for a P finite by construction.

    4: packed INT4, two values per byte, symmetric per group of group_size elements (quant.int4);
    8: INT8 with one scale per block of group_size along the r columns (quant.int8);
    16: bf16; 32: fp32 copy. For 16/32 'scales' is an empty fp32 tensor so every form has the same keys.
    """
    _check_bits(bits)
    if not isinstance(P, Tensor) or P.dim() != 2 or not P.dtype.is_floating_point:
        raise ValueError("P must be a 2-D float tensor (dim, r)")
    if bits == 4:
        from quant.int4 import pack_int4

        data, scales = pack_int4(P.float(), group_size=group_size, check_values=check_values)
    elif bits == 8:
        from quant.int8 import quantize_int8

        data, scales = quantize_int8(P.float(), block_size=group_size)
    else:
        dtype = torch.bfloat16 if bits == 16 else torch.float32
        data = P.to(dtype=dtype, copy=True)
        scales = torch.empty(0, dtype=torch.float32, device=P.device)
    return {"data": data, "scales": scales}


def decode_projector(stored: dict[str, Tensor], bits: int, shape: tuple[int, int], group_size: int = 256, *,
                     check_values: bool = True) -> Tensor:
    """Inverse of encode_projector: a fresh fp32 tensor of `shape` (a transient buffer, not kept). check_values=False
    skips the decoders' value checks (host synchronisations on CUDA) for a projector this process stored."""
    _check_bits(bits)
    shape = _check_shape(tuple(shape))
    if not isinstance(stored, dict) or not {"data", "scales"} <= set(stored):
        raise ValueError("stored must be the dict from encode_projector, with keys 'data' and 'scales'")
    data, scales = stored["data"], stored["scales"]
    if bits == 4:
        from quant.int4 import unpack_int4

        P = unpack_int4(data, scales, shape, group_size=group_size, dtype=torch.float32, check_values=check_values)
    elif bits == 8:
        from quant.int8 import dequantize_int8

        P = dequantize_int8(data, scales, block_size=group_size, dtype=torch.float32, check_values=check_values)
    else:
        P = data.to(dtype=torch.float32, copy=True)
    if tuple(P.shape) != shape:
        raise ValueError(f"stored projector decodes to shape {tuple(P.shape)}, expected {shape}")
    return P
