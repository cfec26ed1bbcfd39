"""A weight gradient we can multiply by without forming it.

A linear layer's gradient is G = Aᵀ X (DESIGN §3.2) with A (T, m) the output gradient and X (T, n) the layer
input over T tokens; W and G are (m, n) = (out, in). Everything downstream of the backward pass (range finder,
projection, sparse residual gather) needs only products with G, so the operators here expose those products and
form the (m, n) matrix only in `dense()` (the reference twin and the paths that truly need it).

All results are fp32 whatever the input dtype (bf16 activations are upcast once, at construction).
"""
from __future__ import annotations

import abc

import torch
from torch import Tensor

# Upper bound on the elements of one transient buffer built while gathering entries, computing ||G||² or forming
# G in row blocks: 2**22 fp32 = 16 MiB, small next to a layer's activations, large enough to keep matmuls efficient.
CHUNK_ELEMENTS = 1 << 22


def _check_float_matrix(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _split_flat_index(flat_idx: Tensor, shape: tuple[int, int], device: torch.device,
                      check: bool = True) -> tuple[Tensor, Tensor]:
    """Row-major flat indices (L,) int32/int64 -> (row, col) int64 (L,), after checking dtype and range.
    check=False skips the range check (a host synchronisation on CUDA) for indices already validated."""
    if not isinstance(flat_idx, Tensor) or flat_idx.dtype not in (torch.int32, torch.int64):
        got = flat_idx.dtype if isinstance(flat_idx, Tensor) else type(flat_idx).__name__
        raise TypeError(f"flat_idx must be an int32 or int64 tensor, got {got}")
    if flat_idx.dim() != 1:
        raise ValueError(f"flat_idx must be 1-D (L,), got shape {tuple(flat_idx.shape)}")
    m, n = shape
    idx = flat_idx.to(device=device, dtype=torch.int64)
    if check and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= m * n):
        raise ValueError(f"flat_idx out of range for shape {shape}: entries must lie in [0, {m * n})")
    return idx // n, idx % n


def _check_operand(M: Tensor, rows: int, what: str, device: torch.device) -> Tensor:
    _check_float_matrix("M", M)
    if M.shape[0] != rows:
        raise ValueError(f"{what}: M must have {rows} rows, got shape {tuple(M.shape)}")
    return M.to(device=device, dtype=torch.float32)



def squared_norm(tensor: Tensor) -> Tensor:
    """||tensor||² as a 0-d fp32 tensor, accumulated in fp32 without an fp32 or squared copy of the input
    (matters for big float gradients: the embedding of a 128k-vocabulary model is ~0.5 G elements)."""
    return torch.linalg.vector_norm(tensor, dtype=torch.float32).square()


class GradOperator(abc.ABC):
    """A gradient G (m, n) known through products. Subclasses: DenseGrad, FactoredGrad, SumGrad."""

    shape: tuple[int, int]

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """Device the products are computed on."""

    @abc.abstractmethod
    def matmul(self, M: Tensor) -> Tensor:
        """M (n, k) any float -> G @ M (m, k) fp32."""

    @abc.abstractmethod
    def rmatmul(self, M: Tensor) -> Tensor:
        """M (m, k) any float -> Gᵀ @ M (n, k) fp32."""

    @abc.abstractmethod
    def gather(self, flat_idx: Tensor, *, check: bool = True) -> Tensor:
        """Row-major flat indices (L,) int32/int64 -> G.flatten()[flat_idx] (L,) fp32. check=False skips the range
        check (one host synchronisation on CUDA) for indices that were validated when they were chosen."""

    @abc.abstractmethod
    def rows(self, row_start: int, row_end: int) -> "GradOperator":
        """G[row_start:row_end, :] as an operator (a view where the storage allows)."""

    @abc.abstractmethod
    def take_rows(self, row_index: Tensor, *, check: bool = True) -> "GradOperator":
        """G[row_index, :] for an int64 (k,) index: stacks arbitrary rows (cross-head projection)."""

    @abc.abstractmethod
    def t(self) -> "GradOperator":
        """Gᵀ (n, m) as an operator."""

    @abc.abstractmethod
    def dense(self) -> Tensor:
        """G (m, n) fp32. Allocates m·n floats: reference path only."""

    def sq_norm(self) -> Tensor:
        """||G||_F² as a 0-d fp32 tensor. Default: form G in row blocks of at most CHUNK_ELEMENTS entries."""
        m, n = self.shape
        block_rows = max(1, CHUNK_ELEMENTS // max(n, 1))
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for start in range(0, m, block_rows):
            block = self.rows(start, min(m, start + block_rows)).dense()
            total += squared_norm(block)
        return total

    def _check_rows(self, row_start: int, row_end: int) -> None:
        m = self.shape[0]
        if not (0 <= row_start <= row_end <= m):
            raise ValueError(f"rows({row_start}, {row_end}) out of range for {m} rows: need 0 <= start <= end <= {m}")

    def _check_row_index(self, row_index: Tensor, check: bool = True) -> Tensor:
        """dtype and shape always; the range (a host synchronisation on CUDA) unless check=False."""
        if not isinstance(row_index, Tensor) or row_index.dtype not in (torch.int32, torch.int64):
            raise TypeError("row_index must be an int32/int64 tensor")
        if row_index.dim() != 1:
            raise ValueError(f"row_index must be 1-D, got shape {tuple(row_index.shape)}")
        m = self.shape[0]
        if check and row_index.numel() and (int(row_index.min()) < 0 or int(row_index.max()) >= m):
            raise ValueError(f"row_index entries must lie in [0, {m})")
        return row_index.to(device=self.device, dtype=torch.int64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape})"


class DenseGrad(GradOperator):
    """G held as a matrix. G (m, n) any float dtype; kept as fp32 (no copy when it already is fp32)."""

    def __init__(self, G: Tensor):
        _check_float_matrix("G", G)
        self._G = G.float()
        self.shape = (int(G.shape[0]), int(G.shape[1]))

    @property
    def device(self) -> torch.device:
        return self._G.device

    def matmul(self, M: Tensor) -> Tensor:
        return self._G @ _check_operand(M, self.shape[1], "matmul", self.device)

    def rmatmul(self, M: Tensor) -> Tensor:
        return self._G.T @ _check_operand(M, self.shape[0], "rmatmul", self.device)

    def gather(self, flat_idx: Tensor, *, check: bool = True) -> Tensor:
        i, j = _split_flat_index(flat_idx, self.shape, self.device, check)
        return self._G[i, j]  # advanced indexing: no copy of G even when it is a transposed view

    def rows(self, row_start: int, row_end: int) -> "DenseGrad":
        self._check_rows(row_start, row_end)
        return DenseGrad(self._G[row_start:row_end])

    def take_rows(self, row_index: Tensor, *, check: bool = True) -> "DenseGrad":
        return DenseGrad(self._G.index_select(0, self._check_row_index(row_index, check)))

    def t(self) -> "DenseGrad":
        return DenseGrad(self._G.T)

    def dense(self) -> Tensor:
        return self._G.clone()

    def sq_norm(self) -> Tensor:
        return squared_norm(self._G)


class FactoredGrad(GradOperator):
    """G = Aᵀ X, never formed except in dense(). A (T, m), X (T, n), any float dtype, upcast once to fp32.

    Products cost T·(m+n)·k instead of m·n·k and need no (m, n) buffer (DESIGN §3.2).
    """

    def __init__(self, A: Tensor, X: Tensor):
        _check_float_matrix("A", A)
        _check_float_matrix("X", X)
        if A.shape[0] != X.shape[0]:
            raise ValueError(f"A (T, m) and X (T, n) need the same token count T, got {A.shape[0]} and {X.shape[0]}")
        if A.device != X.device:
            raise ValueError(f"A and X must be on one device, got {A.device} and {X.device}")
        self._A = A.float()
        self._X = X.float()
        self.shape = (int(A.shape[1]), int(X.shape[1]))

    @property
    def device(self) -> torch.device:
        return self._A.device

    @property
    def tokens(self) -> int:
        return int(self._A.shape[0])

    @property
    def factors(self) -> tuple[Tensor, Tensor]:
        """(A, X) as stored, fp32."""
        return self._A, self._X

    def matmul(self, M: Tensor) -> Tensor:
        M = _check_operand(M, self.shape[1], "matmul", self.device)
        return self._A.T @ (self._X @ M)

    def rmatmul(self, M: Tensor) -> Tensor:
        M = _check_operand(M, self.shape[0], "rmatmul", self.device)
        return self._X.T @ (self._A @ M)

    def gather(self, flat_idx: Tensor, *, check: bool = True) -> Tensor:
        i, j = _split_flat_index(flat_idx, self.shape, self.device, check)
        out = torch.empty(i.numel(), dtype=torch.float32, device=self.device)
        # Two (T, chunk) gathers per chunk: bound them instead of materialising (T, L).
        chunk = max(1, CHUNK_ELEMENTS // max(self.tokens, 1))
        for s in range(0, i.numel(), chunk):
            e = min(i.numel(), s + chunk)
            a = self._A.index_select(1, i[s:e])
            x = self._X.index_select(1, j[s:e])
            out[s:e] = (a * x).sum(0)
        return out

    def rows(self, row_start: int, row_end: int) -> "FactoredGrad":
        self._check_rows(row_start, row_end)
        return FactoredGrad(self._A[:, row_start:row_end], self._X)

    def take_rows(self, row_index: Tensor, *, check: bool = True) -> "FactoredGrad":
        return FactoredGrad(self._A.index_select(1, self._check_row_index(row_index, check)), self._X)

    def t(self) -> "FactoredGrad":
        return FactoredGrad(self._X, self._A)

    def dense(self) -> Tensor:
        return self._A.T @ self._X

    def sq_norm(self) -> Tensor:
        T = self.tokens
        m, n = self.shape
        # ||AᵀX||² = Σ (AAᵀ)∘(XXᵀ): T²(m+n) flops against T·m·n for forming G; both computed in blocks.
        if T * (m + n) >= m * n:
            return super().sq_norm()
        block = max(1, CHUNK_ELEMENTS // max(T, 1))
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for s in range(0, T, block):
            e = min(T, s + block)
            total += ((self._A[s:e] @ self._A.T) * (self._X[s:e] @ self._X.T)).sum()
        return total


class SumGrad(GradOperator):
    """G = Σ_i w_i G_i over operators of one shape (gradient accumulation, error feedback).

    terms: non-empty list of (weight float, GradOperator).
    """

    def __init__(self, terms: list[tuple[float, GradOperator]]):
        terms = list(terms)
        if not terms:
            raise ValueError("SumGrad needs at least one (weight, operator) term")
        for k, term in enumerate(terms):
            if not (isinstance(term, tuple) and len(term) == 2 and isinstance(term[1], GradOperator)):
                raise TypeError(f"term {k} must be a (float, GradOperator) pair, got {term!r}")
        shape = terms[0][1].shape
        for w, op in terms:
            if op.shape != shape:
                raise ValueError(f"all SumGrad terms need one shape, got {shape} and {op.shape}")
            if op.device != terms[0][1].device:
                raise ValueError(f"all SumGrad terms need one device, got {terms[0][1].device} and {op.device}")
        self._terms = [(float(w), op) for w, op in terms]
        self.shape = shape

    @property
    def device(self) -> torch.device:
        return self._terms[0][1].device

    @property
    def terms(self) -> list[tuple[float, GradOperator]]:
        return list(self._terms)

    def _combine(self, parts):
        total = None
        for (w, _), part in zip(self._terms, parts):
            total = part * w if total is None else total.add_(part, alpha=w)
        return total

    def matmul(self, M: Tensor) -> Tensor:
        M = _check_operand(M, self.shape[1], "matmul", self.device)
        return self._combine(op.matmul(M) for _, op in self._terms)

    def rmatmul(self, M: Tensor) -> Tensor:
        M = _check_operand(M, self.shape[0], "rmatmul", self.device)
        return self._combine(op.rmatmul(M) for _, op in self._terms)

    def gather(self, flat_idx: Tensor, *, check: bool = True) -> Tensor:
        return self._combine(op.gather(flat_idx, check=check) for _, op in self._terms)

    def rows(self, row_start: int, row_end: int) -> "SumGrad":
        self._check_rows(row_start, row_end)
        return SumGrad([(w, op.rows(row_start, row_end)) for w, op in self._terms])

    def take_rows(self, row_index: Tensor, *, check: bool = True) -> "SumGrad":
        return SumGrad([(w, op.take_rows(row_index, check=check)) for w, op in self._terms])

    def t(self) -> "SumGrad":
        return SumGrad([(w, op.t()) for w, op in self._terms])

    def dense(self) -> Tensor:
        return self._combine(op.dense() for _, op in self._terms)

    def sq_norm(self) -> Tensor:
        # Cross terms do not vanish, so ||Σ w_i G_i||² is not Σ w_i² ||G_i||². Factored terms fold into one
        # factored operator (weights into A, tokens concatenated); anything else is formed in row blocks.
        if all(isinstance(op, FactoredGrad) for _, op in self._terms):
            A = torch.cat([w * op.factors[0] for w, op in self._terms])
            X = torch.cat([op.factors[1] for _, op in self._terms])
            return FactoredGrad(A, X).sq_norm()
        return super().sq_norm()


class ReducedGrad(GradOperator):
    """The data-parallel mean gradient G = (1/W) Σ_ranks G_rank, known through each rank's local operator.

    Every product is computed locally and then averaged across ranks by `reduce_mean_` (an in-place all-reduce
    mean, supplied by the caller so this module stays free of any communication library). The range finder only
    calls matmul / rmatmul, so a refresh moves (m + n)·width floats per power iteration instead of the (m, n)
    gradient. All ranks must call the same products in the same order (they do: the range finder is deterministic).
    """

    def __init__(self, local: GradOperator, reduce_mean_):
        if not isinstance(local, GradOperator):
            raise TypeError(f"local must be a GradOperator, got {type(local).__name__}")
        self.local = local
        self.shape = local.shape
        self._reduce_mean_ = reduce_mean_

    @property
    def device(self) -> torch.device:
        return self.local.device

    def _reduced(self, value: Tensor) -> Tensor:
        value = value.contiguous()
        self._reduce_mean_(value)
        return value

    def matmul(self, M: Tensor) -> Tensor:
        return self._reduced(self.local.matmul(M))

    def rmatmul(self, M: Tensor) -> Tensor:
        return self._reduced(self.local.rmatmul(M))

    def gather(self, flat_idx: Tensor, *, check: bool = True) -> Tensor:
        return self._reduced(self.local.gather(flat_idx, check=check))

    def rows(self, row_start: int, row_end: int) -> "ReducedGrad":
        return ReducedGrad(self.local.rows(row_start, row_end), self._reduce_mean_)

    def take_rows(self, row_index: Tensor, *, check: bool = True) -> "ReducedGrad":
        return ReducedGrad(self.local.take_rows(row_index, check=check), self._reduce_mean_)

    def t(self) -> "ReducedGrad":
        return ReducedGrad(self.local.t(), self._reduce_mean_)

    def dense(self) -> Tensor:
        # Dense traffic: only the explicit full-SVD projection and its fallback get here.
        return self._reduced(self.local.dense())
