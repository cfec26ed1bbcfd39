"""Top-r right singular subspace of a gradient by randomized subspace iteration (DESIGN §3.2).

Halko–Martinsson–Tropp Alg. 4.4 run on the right side: from a Gaussian block Ω (n, r + p) alternate
Y = G Q_right and Z = Gᵀ Q_left with a QR after every product, then one SVD of the small (r + p) × (r + p)
triangular factor. Only `op.matmul` / `op.rmatmul` are used, so a FactoredGrad (G = Aᵀ X) is never formed.

One "pass" is the pair of products G·, Gᵀ·; the first pass is the range finder itself and every further pass is
one power iteration. Cost: 2·(q + 1) products of width r + p, QRs of (m, r + p) and (n, r + p), one tiny SVD.

Rank-deficient gradients (fewer tokens T than the rank: G = Aᵀ X has rank <= T) need no fallback: when
rank(G) = k <= r + p, the sketch G Ω spans range(G) exactly (Ω Gaussian), so the top-k right singular vectors come
out exact (to fp32 rounding) and the remaining r - k basis columns are orthonormal directions of G's null space,
as arbitrary as the trailing vectors of a full SVD, whose singular values are 0 too. The numerical rank is
reported (`SubspaceResult.numerical_rank`), and the full SVD is kept for non-finite or non-orthonormal results.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lowmem.optim.linop import GradOperator

# A basis whose Gram matrix is farther than this from I (max entry) is treated as broken. Householder QR in fp32
# keeps |PᵀP - I| near 1e-6, so only a numerical failure crosses 1e-3.
ORTHONORMALITY_TOL = 1e-3
# Sketch singular values below RANK_RTOL·σ_1 count as zero (numerical_rank). fp32 rounding in the products leaves
# ~1e-7·σ_1 in the directions of an exactly rank-deficient gradient (measured, dense and factored), so 1e-5 sits
# 100x above that noise while real gradient spectra at ranks 32-512 stay far above it.
RANK_RTOL = 1e-5


@dataclass
class SubspaceResult:
    """basis fp32 (n, r) orthonormal columns: top-r right singular vectors of G, in decreasing order.
    singular_values fp32 (r,): their estimates. iterations: power iterations actually run (0 = range finder only).
    fell_back: the full-SVD fallback produced this result. numerical_rank: how many singular values exceed
    RANK_RTOL·σ_1 (r for a full-rank gradient; the columns beyond it span part of G's null space), read from the
    device only when asked for (the training path never asks: no host synchronisation)."""

    basis: Tensor
    singular_values: Tensor
    iterations: int
    fell_back: bool

    @property
    def numerical_rank(self) -> int:
        return _numerical_rank(self.singular_values)


def _check_rank(op: GradOperator, rank: int) -> None:
    if not isinstance(op, GradOperator):
        raise TypeError(f"op must be a GradOperator (DenseGrad, FactoredGrad, SumGrad), got {type(op).__name__}")
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    m, n = op.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must lie in [1, min(m, n)] = [1, {min(m, n)}] for a gradient of shape {op.shape}, "
                         f"got {rank}")


def subspace_similarity(P_old: Tensor, P_new: Tensor) -> float:
    """s = ||P_oldᵀ P_new||_F² / r for orthonormal P_old (n, r_old), P_new (n, r_new); r = max(r_old, r_new).

    Invariant to signs and rotations within either subspace; 1 for the same subspace, 0 for orthogonal ones.
    A Python float (one host synchronisation); `subspace_similarity_t` keeps it on the device.
    """
    return float(subspace_similarity_t(P_old, P_new))


def subspace_similarity_t(P_old: Tensor, P_new: Tensor) -> Tensor:
    """`subspace_similarity` as a 0-dim fp64 tensor on P_old's device (clamped to [0, 1]; the same value as a
    Python float: the fp32 sum is widened before the division, as float() did)."""
    for name, P in (("P_old", P_old), ("P_new", P_new)):
        if not isinstance(P, Tensor) or P.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor (n, r)")
    if P_old.shape[0] != P_new.shape[0]:
        raise ValueError(f"P_old and P_new need the same row count, got {tuple(P_old.shape)} and {tuple(P_new.shape)}")
    r = max(P_old.shape[1], P_new.shape[1])
    if r == 0:
        raise ValueError("projectors with zero columns have no subspace to compare")
    overlap = P_old.float().T @ P_new.to(device=P_old.device, dtype=torch.float32)
    return (overlap.pow(2).sum().double() / r).clamp(0.0, 1.0)


def exact_right_subspace(op: GradOperator, rank: int) -> SubspaceResult:
    """Reference: torch.linalg.svd of op.dense() (m·n memory), top-r right singular vectors.

    Non-finite entries are treated as zero so the stored projector stays finite; the caller still sees them in
    R = G P and decides what to do with the step.
    """
    _check_rank(op, rank)
    _, S, Vh = _finite_svd(op)
    return SubspaceResult(basis=Vh[:rank].T.contiguous(), singular_values=S[:rank].contiguous(), iterations=0,
                          fell_back=False)


def _finite_svd(op: GradOperator) -> tuple[Tensor, Tensor, Tensor]:
    """(U, S, Vh) fp32 of torch.linalg.svd(G, full_matrices=False) for G = op.dense(), non-finite entries read as 0
    (unconditionally: a test of whether any is non-finite would be a host synchronisation); one fp64 retry when
    LAPACK does not converge on a badly scaled input."""
    G = op.dense()
    G = torch.where(torch.isfinite(G), G, torch.zeros((), dtype=G.dtype, device=G.device))
    try:
        return torch.linalg.svd(G, full_matrices=False)
    except RuntimeError:  # LinAlgError
        U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
        return U.float(), S.float(), Vh.float()


def _numerical_rank(singular_values: Tensor) -> int:
    """Number of singular values (sorted, decreasing) above RANK_RTOL · σ_1; 0 for a zero or non-finite σ_1."""
    top = singular_values[0]
    if not bool(torch.isfinite(top)) or float(top) <= 0.0:
        return 0
    return int((singular_values > top * RANK_RTOL).sum())


def exact_left_subspace(op: GradOperator, rank: int) -> SubspaceResult:
    """Top-r LEFT singular vectors of op (basis fp32 (m, r)) from torch.linalg.svd of G itself, as GaLore computes
    its left projector: the same subspace as exact_right_subspace(op.t()), but with the column signs of
    torch.linalg.svd(G) (those of Gᵀ's right vectors can differ)."""
    _check_rank(op, rank)
    U, S, _ = _finite_svd(op)
    return SubspaceResult(basis=U[:, :rank].contiguous(), singular_values=S[:rank].contiguous(), iterations=0,
                          fell_back=False)


def _orthonormal(Y: Tensor) -> Tensor:
    return torch.linalg.qr(Y, mode="reduced").Q


def _top_right(Q_right: Tensor, R_factor: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Gᵀ Q_left = Q_right R_factor, so Q_leftᵀ G = R_factorᵀ Q_rightᵀ: its right singular vectors are Q_right times
    the left singular vectors of the small R_factor, and its singular values are R_factor's."""
    U_small, S, _ = torch.linalg.svd(R_factor)
    return Q_right @ U_small[:, :rank], S[:rank]


def _is_broken(basis: Tensor, singular_values: Tensor) -> Tensor:
    """Non-finite, not orthonormal, or a zero gradient (σ_1 = 0: nothing to find). A rank-deficient but nonzero
    gradient is not broken: its whole range is in the sketch (module docstring). A 0-dim bool tensor (the caller
    reads it)."""
    finite = torch.isfinite(basis).all() & torch.isfinite(singular_values).all()
    eye = torch.eye(basis.shape[1], dtype=basis.dtype, device=basis.device)
    gram_error = (basis.T @ basis - eye).abs().max()
    return ~(finite & (gram_error <= ORTHONORMALITY_TOL) & (singular_values[0] > 0))


def _start_block(n: int, width: int, warm_start: Tensor | None, generator: torch.Generator | None,
                 device: torch.device) -> Tensor:
    """Ω (n, width) fp32 Gaussian; a warm start (n, r0) overwrites the first r0 columns. The full block is always
    drawn so the generator advances by the same amount with or without a warm start."""
    gen_device = generator.device if generator is not None else device
    omega = torch.randn(n, width, generator=generator, dtype=torch.float32, device=gen_device).to(device)
    if warm_start is not None:
        omega[:, : warm_start.shape[1]] = warm_start.to(device=device, dtype=torch.float32)
    return omega


def randomized_right_subspace(op: GradOperator, rank: int, *, oversampling: int = 8, power_iters: int = 2,
                              warm_start: Tensor | None = None, generator: torch.Generator | None = None,
                              tol: float | None = None, defer: bool = False) -> SubspaceResult | PendingSubspace:
    """Top-r right singular subspace of op (m, n) from products only.

    oversampling p: extra sketch columns (width min(r + p, m, n)). power_iters q: maximum number of power
    iterations. warm_start (n, r0), r0 <= r + p, any float: the previous basis, placed in the first columns of Ω.
    For a rank-deficient G the sketch holds all of range(G) when G Ω has rank(G) independent columns: always
    for a cold start, and with a warm start unless the previous basis is orthogonal to part of G's row space
    beyond what the p Gaussian columns make up (the same exposure as for a full-rank G).
    generator: draws Ω (on its own device, then moved). tol: stop once the similarity between successive top-r
    iterates exceeds 1 - tol; the warm start counts as the iterate before the first pass, so a warm start that is
    still right stops after the range finder (iterations = 0). Falls back to exact_right_subspace (fell_back=True)
    when the result is non-finite, not orthonormal or the gradient is zero (see _is_broken); a rank-deficient
    gradient is handled by the sketch itself (module docstring) and reported in numerical_rank.
    defer=True: return a PendingSubspace instead, whose fallback decision is still on the device; resolve_subspaces
    reads the decisions of several range finders at once (one host synchronisation for all of them).
    """
    _check_rank(op, rank)
    if isinstance(oversampling, bool) or not isinstance(oversampling, int) or oversampling < 0:
        raise ValueError(f"oversampling must be an int >= 0, got {oversampling!r}")
    if isinstance(power_iters, bool) or not isinstance(power_iters, int) or power_iters < 0:
        raise ValueError(f"power_iters must be an int >= 0, got {power_iters!r}")
    if tol is not None and not (0.0 < tol < 1.0 and math.isfinite(tol)):
        raise ValueError(f"tol must be None or in (0, 1), got {tol!r}")
    m, n = op.shape
    width = min(rank + oversampling, m, n)
    previous = None
    if warm_start is not None:
        if not isinstance(warm_start, Tensor) or warm_start.dim() != 2 or warm_start.shape[0] != n:
            got = tuple(warm_start.shape) if isinstance(warm_start, Tensor) else type(warm_start).__name__
            raise ValueError(f"warm_start must be a (n, r0) = ({n}, r0) tensor, got {got}")
        if not 1 <= warm_start.shape[1] <= width:
            raise ValueError(f"warm_start has {warm_start.shape[1]} columns; the sketch holds 1..{width}")
        if tol is not None:
            previous = _orthonormal(warm_start.to(device=op.device, dtype=torch.float32))

    try:
        basis, singular_values, iterations = _iterate(op, rank, width, power_iters, warm_start, previous, generator,
                                                      tol)
        # The range finder's one host synchronisation (made by resolve_subspaces): whether to fall back, and how
        # many iterations ran.
        flags = _is_broken(basis, singular_values).to(torch.int64).reshape(1)
        if isinstance(iterations, Tensor):
            flags = torch.cat([flags, iterations.to(flags.device, torch.int64).reshape(1)])
            iterations = None
        pending = PendingSubspace(op, rank, basis, singular_values, flags, iterations)
    except torch.linalg.LinAlgError:  # the small SVD refuses non-finite input (a NaN/Inf gradient)
        pending = PendingSubspace(op, rank, None, None, None, power_iters)
    return pending if defer else resolve_subspaces([pending])[0]


@dataclass
class PendingSubspace:
    """A randomized_right_subspace(defer=True) result whose fallback decision is not read yet. flags: int64 (1,)
    [broken] or (2,) [broken, iterations] on the basis's device (iterations None then); None when the small SVD
    already refused the input (a fallback, decided without a read)."""

    op: GradOperator
    rank: int
    basis: Tensor | None
    singular_values: Tensor | None
    flags: Tensor | None
    iterations: int | None

    def _resolve(self, values: list[int] | None) -> SubspaceResult:
        broken, iterations = (True, self.iterations) if values is None else (bool(values[0]), self.iterations)
        if values is not None and len(values) > 1:
            iterations = int(values[1])
        if broken:
            exact = exact_right_subspace(self.op, self.rank)
            return SubspaceResult(exact.basis, exact.singular_values, iterations=iterations, fell_back=True)
        return SubspaceResult(self.basis.contiguous(), self.singular_values.contiguous(), iterations=iterations,
                              fell_back=False)


def resolve_subspaces(results: list) -> list[SubspaceResult]:
    """SubspaceResults for a list of PendingSubspace (or already final SubspaceResult) items, in order: the
    pending fallback decisions are read from the device in ONE host synchronisation (one per device), then each
    broken one is replaced by the exact SVD. Results are those of the same calls made without defer."""
    pending = [r for r in results if isinstance(r, PendingSubspace) and r.flags is not None]
    values: dict[int, list[int]] = {}
    by_device: dict[torch.device, list[PendingSubspace]] = {}
    for r in pending:
        by_device.setdefault(r.flags.device, []).append(r)
    for group in by_device.values():
        flat = torch.cat([r.flags for r in group]).tolist()
        offset = 0
        for r in group:
            values[id(r)] = flat[offset:offset + r.flags.numel()]
            offset += r.flags.numel()
    return [r._resolve(values.get(id(r))) if isinstance(r, PendingSubspace) else r for r in results]


def _iterate(op: GradOperator, rank: int, width: int, power_iters: int, warm_start: Tensor | None,
             previous: Tensor | None, generator: torch.Generator | None,
             tol: float | None) -> tuple[Tensor, Tensor, int | Tensor]:
    """The subspace iteration proper: (basis (n, r), singular values (r,), power iterations run: an int, or a 0-dim
    int64 tensor with a tol).

    The early stop is decided on the device: once two successive iterates agree to 1 - tol, the iterate is frozen
    (torch.where) and the remaining iterations' results are discarded, so the basis is bit for bit the one an
    early `break` gives, without a host synchronisation per iteration. The price: with a tol, a refresh always
    computes power_iters + 1 passes over the gradient (the skipped ones are computed and thrown away)."""
    Q_right = _start_block(op.shape[1], width, warm_start, generator, op.device)
    iterations: int | Tensor = 0
    done: Tensor | None = None
    for it in range(power_iters + 1):
        Q_left = _orthonormal(op.matmul(Q_right))                                 # (m, width)
        Q_next, R_next = torch.linalg.qr(op.rmatmul(Q_left), mode="reduced")     # (n, width), (width, width)
        if done is None:
            Q_right, R_factor, iterations = Q_next, R_next, it
        else:
            Q_right = torch.where(done, Q_right, Q_next)
            R_factor = torch.where(done, R_factor, R_next)
            iterations = torch.where(done, iterations, it)
        if tol is None or it == power_iters:
            continue
        current, _ = _top_right(Q_right, R_factor, rank)
        if previous is not None:
            stop = subspace_similarity_t(previous, current) > 1.0 - tol
            done = stop if done is None else done | stop
        previous = current
    basis, singular_values = _top_right(Q_right, R_factor, rank)
    return basis, singular_values, iterations
