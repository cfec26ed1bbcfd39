"""Gradient operators for weights whose gradient touches few rows (an embedding) and a generic transpose.

`RowScatterGrad`: an embedding W (V, h) looked up at token ids (T,) receives G = Sᵀ D, S (T, V) the one-hot rows of
the ids and D (T, h) the output gradient. Only the batch's distinct ids (U <= T rows) are nonzero, so the operator
keeps them compacted: ids (U,) sorted and their summed gradient rows (U, h) fp32. Products cost U·h·k; nothing
(V, h) is formed except in dense().

`TransposedGrad`: Gᵀ of any operator that can restrict its columns (`columns(index)`), so rows of Gᵀ stay cheap.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lowmem.optim.linop import GradOperator, _check_operand, _split_flat_index, squared_norm


class RowScatterGrad(GradOperator):
    """G (V, n) whose rows `ids` (U,) int64, sorted and distinct, hold `rows` (U, n) fp32; every other row is 0.

    Build it from a lookup with `RowScatterGrad.from_lookup(ids (T,), grad_out (T, n), num_rows=V)`, which sums the
    gradient of repeated ids (as nn.Embedding's backward does) and drops ids equal to `padding_idx`.
    """

    def __init__(self, ids: Tensor, rows: Tensor, num_rows: int):
        if ids.dim() != 1 or rows.dim() != 2 or rows.shape[0] != ids.shape[0]:
            raise ValueError(f"ids (U,) and rows (U, n) must agree, got {tuple(ids.shape)} and {tuple(rows.shape)}")
        self._ids = ids.long()
        self._rows = rows.float()
        self.shape = (int(num_rows), int(rows.shape[1]))

    @classmethod
    def from_lookup(cls, ids: Tensor, grad_out: Tensor, num_rows: int, padding_idx: int | None = None
                    ) -> "RowScatterGrad":
        ids = ids.reshape(-1).long()
        grad_out = grad_out.reshape(ids.numel(), -1)
        if padding_idx is not None:
            keep = ids != padding_idx
            ids, grad_out = ids[keep], grad_out[keep]
        unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        rows = torch.zeros(unique.numel(), grad_out.shape[1], dtype=torch.float32, device=grad_out.device)
        rows.index_add_(0, inverse, grad_out.float())
        return cls(unique, rows, num_rows)

    @property
    def device(self) -> torch.device:
        return self._rows.device

    @property
    def touched_rows(self) -> Tensor:
        """The nonzero rows' ids (U,) int64, sorted."""
        return self._ids

    def matmul(self, M: Tensor) -> Tensor:
        M = _check_operand(M, self.shape[1], "matmul", self.device)
        out = torch.zeros(self.shape[0], M.shape[1], dtype=torch.float32, device=self.device)
        out.index_copy_(0, self._ids, self._rows @ M)
        return out

    def rmatmul(self, M: Tensor) -> Tensor:
        M = _check_operand(M, self.shape[0], "rmatmul", self.device)
        return self._rows.T @ M.index_select(0, self._ids)

    def _positions(self, row_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(position in self._ids clamped, found mask) of int64 row ids."""
        pos = torch.searchsorted(self._ids, row_ids).clamp(max=max(self._ids.numel() - 1, 0))
        found = (self._ids.index_select(0, pos) == row_ids) if self._ids.numel() else torch.zeros_like(
            row_ids, dtype=torch.bool)
        return pos, found

    def gather(self, flat_idx: Tensor) -> Tensor:
        i, j = _split_flat_index(flat_idx, self.shape, self.device)
        out = torch.zeros(i.numel(), dtype=torch.float32, device=self.device)
        if self._ids.numel():
            pos, found = self._positions(i)
            out[found] = self._rows[pos[found], j[found]]
        return out

    def rows(self, row_start: int, row_end: int) -> "RowScatterGrad":
        self._check_rows(row_start, row_end)
        lo = int(torch.searchsorted(self._ids, torch.tensor(row_start, device=self.device)))
        hi = int(torch.searchsorted(self._ids, torch.tensor(row_end, device=self.device)))
        return RowScatterGrad(self._ids[lo:hi] - row_start, self._rows[lo:hi], row_end - row_start)

    def take_rows(self, row_index: Tensor) -> "RowScatterGrad":
        row_index = self._check_row_index(row_index)
        out = torch.zeros(row_index.numel(), self.shape[1], dtype=torch.float32, device=self.device)
        if self._ids.numel():
            pos, found = self._positions(row_index)
            out[found] = self._rows[pos[found]]
        return RowScatterGrad(torch.arange(row_index.numel(), device=self.device), out, row_index.numel())

    def columns(self, index: Tensor) -> "RowScatterGrad":
        """G[:, index] for an int64 (k,) column index."""
        return RowScatterGrad(self._ids, self._rows.index_select(1, index.to(self.device)), self.shape[0])

    def t(self) -> "TransposedGrad":
        return TransposedGrad(self)

    def dense(self) -> Tensor:
        out = torch.zeros(self.shape, dtype=torch.float32, device=self.device)
        out.index_copy_(0, self._ids, self._rows)
        return out

    def sq_norm(self) -> Tensor:
        return squared_norm(self._rows)


class TransposedGrad(GradOperator):
    """Gᵀ of an operator `op` that has `columns(index)`: products swapped, rows of Gᵀ = columns of G."""

    def __init__(self, op: GradOperator):
        if not hasattr(op, "columns"):
            raise TypeError(f"TransposedGrad needs an operator with columns(), got {type(op).__name__}")
        self._op = op
        self.shape = (op.shape[1], op.shape[0])

    @property
    def device(self) -> torch.device:
        return self._op.device

    def matmul(self, M: Tensor) -> Tensor:
        return self._op.rmatmul(M)

    def rmatmul(self, M: Tensor) -> Tensor:
        return self._op.matmul(M)

    def gather(self, flat_idx: Tensor) -> Tensor:
        i, j = _split_flat_index(flat_idx, self.shape, self.device)
        return self._op.gather(j * self._op.shape[1] + i)

    def rows(self, row_start: int, row_end: int) -> "TransposedGrad":
        self._check_rows(row_start, row_end)
        return TransposedGrad(self._op.columns(torch.arange(row_start, row_end, device=self.device)))

    def take_rows(self, row_index: Tensor) -> "TransposedGrad":
        return TransposedGrad(self._op.columns(self._check_row_index(row_index)))

    def t(self) -> GradOperator:
        return self._op

    def dense(self) -> Tensor:
        return self._op.dense().T.contiguous()

    def sq_norm(self) -> Tensor:
        return self._op.sq_norm()
