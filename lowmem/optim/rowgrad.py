"""Gradient operators for weights whose gradient touches few rows (an embedding) and a generic transpose.

`RowScatterGrad`: an embedding W (V, h) looked up at token ids (T,) receives G = Sᵀ D, S (T, V) the one-hot rows of
the ids and D (T, h) the output gradient. Only the batch's distinct ids (at most T rows) are nonzero, so the operator
keeps them compacted in U = min(T, V) slots: slot ids (U,) sorted and distinct, and their summed gradient rows
(U, h) fp32. Products cost U·h·k; nothing (V, h) is formed except in dense().

Shapes are static (no op that waits for the device, DESIGN §3.7): the number of distinct ids is a device value, so
the slots are not trimmed to it. The U slots hold every id of the batch plus the smallest absent ids, whose rows are
zero; a slot whose id lies outside [0, V) (after `rows()`) is empty too. A token's slot is found by counting
(cumsum of a (V,) presence mask), not by `unique`, and the rows are summed by one index_add_ in token order, so
each row is the same fp32 sum, bit for bit, as nn.Embedding's gradient row summed in token order.

`TransposedGrad`: Gᵀ of any operator that can restrict its columns (`columns(index)`), so rows of Gᵀ stay cheap.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lowmem.optim.linop import GradOperator, _check_operand, _split_flat_index, squared_norm


class RowScatterGrad(GradOperator):
    """G (V, n) whose slots `ids` (U,) int64, sorted and distinct, hold `rows` (U, n) fp32; every other row is 0.

    A slot whose id lies outside [0, V) is empty (its row is ignored). `present` (U,) bool: the slots that hold a
    looked-up id (None: all of them); only `touched_rows` reads it. Build one from a lookup with
    `RowScatterGrad.from_lookup(ids (T,), grad_out (T, n), num_rows=V)`, which sums the gradient of repeated ids
    (as nn.Embedding's backward does) and gives ids equal to `padding_idx` no gradient.
    """

    def __init__(self, ids: Tensor, rows: Tensor, num_rows: int, present: Tensor | None = None):
        if ids.dim() != 1 or rows.dim() != 2 or rows.shape[0] != ids.shape[0]:
            raise ValueError(f"ids (U,) and rows (U, n) must agree, got {tuple(ids.shape)} and {tuple(rows.shape)}")
        self._ids = ids.long()
        self._rows = rows.float()
        self._present = present
        self.shape = (int(num_rows), int(rows.shape[1]))

    @classmethod
    def from_lookup(cls, ids: Tensor, grad_out: Tensor, num_rows: int, padding_idx: int | None = None
                    ) -> "RowScatterGrad":
        """ids (T,) or any shape, int; grad_out (T, n) or ids' shape + (n,), any float -> the operator (class doc).
        Transients: three (V,) int64 vectors and (T,) indices; no op waits for the device."""
        ids = ids.reshape(-1).long()
        tokens, vocab = ids.numel(), int(num_rows)
        grad_out = grad_out.reshape(tokens, -1)
        slots = min(tokens, vocab)
        device = grad_out.device
        present = torch.zeros(vocab, dtype=torch.bool, device=device)
        keep = None if padding_idx is None else ids != padding_idx
        if keep is None:
            present.index_fill_(0, ids, True)
        else:   # every write of one id carries the same value: the order of duplicate writes does not matter
            present.index_put_((ids,), keep)
        # The slots: every present id, then the smallest absent ones, `slots` in all, in ascending id order.
        n_present = present.sum()
        absent_before = torch.cumsum(~present, 0) - 1
        chosen = present | ((absent_before < slots - n_present) & ~present)
        slot_of_id = torch.cumsum(chosen, 0) - 1
        ids_range = torch.arange(vocab, device=device)
        # one spare entry takes the ids that are not chosen (any of them lands there; it is dropped)
        slot_ids = torch.zeros(slots + 1, dtype=torch.int64, device=device)
        slot_ids.scatter_(0, torch.where(chosen, slot_of_id, slots), ids_range)
        slot_present = torch.zeros(slots + 1, dtype=torch.bool, device=device)
        slot_present.scatter_(0, torch.where(chosen, slot_of_id, slots), present)
        # each token's slot; padding tokens go to a spare row that is dropped, so no row sums an extra term
        token_slot = slot_of_id.index_select(0, ids)
        if keep is not None:
            token_slot = torch.where(keep, token_slot, slots)
        rows = torch.zeros(slots + 1, grad_out.shape[1], dtype=torch.float32, device=device)
        rows.index_add_(0, token_slot, grad_out.float())
        return cls(slot_ids[:slots], rows[:slots], vocab, slot_present[:slots])

    @property
    def device(self) -> torch.device:
        return self._rows.device

    @property
    def touched_rows(self) -> Tensor:
        """The looked-up rows' ids (k,) int64, sorted. Its size is a device value: a host read (diagnostics and
        tests only)."""
        live = self._live() if self._present is None else self._live() & self._present
        return self._ids[live]

    def _live(self) -> Tensor:
        """(U,) bool: slots whose id lies in [0, V)."""
        return (self._ids >= 0) & (self._ids < self.shape[0])

    def _scatter_rows(self, values: Tensor) -> Tensor:
        """(V, k) fp32 zeros with `values` (U, k) at the slots' ids; empty slots go to a spare row (dropped)."""
        out = torch.zeros(self.shape[0] + 1, values.shape[1], dtype=torch.float32, device=self.device)
        out.index_copy_(0, torch.where(self._live(), self._ids, self.shape[0]), values)
        return out[:self.shape[0]]

    def _safe_ids(self) -> Tensor:
        """Slot ids clamped into [0, V) (empty slots then read some row and their zero rows cancel it)."""
        return self._ids.clamp(0, max(self.shape[0] - 1, 0))

    def _live_rows(self) -> Tensor:
        return torch.where(self._live()[:, None], self._rows, torch.zeros((), device=self.device))

    def matmul(self, M: Tensor) -> Tensor:
        M = _check_operand(M, self.shape[1], "matmul", self.device)
        return self._scatter_rows(self._rows @ M)

    def rmatmul(self, M: Tensor) -> Tensor:
        M = _check_operand(M, self.shape[0], "rmatmul", self.device)
        return self._live_rows().T @ M.index_select(0, self._safe_ids())

    def _positions(self, row_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(slot of each int64 row id, clamped into range; whether that slot holds the id)."""
        pos = torch.searchsorted(self._ids, row_ids).clamp(max=self._ids.numel() - 1)
        return pos, self._ids.index_select(0, pos) == row_ids

    def gather(self, flat_idx: Tensor, *, check: bool = True) -> Tensor:
        i, j = _split_flat_index(flat_idx, self.shape, self.device, check=check)
        if not self._ids.numel():
            return torch.zeros(i.numel(), dtype=torch.float32, device=self.device)
        pos, found = self._positions(i)
        return torch.where(found, self._rows[pos, j], torch.zeros((), device=self.device))

    def rows(self, row_start: int, row_end: int) -> "RowScatterGrad":
        """G[row_start:row_end]: the same slots, ids shifted (those now outside the range are empty)."""
        self._check_rows(row_start, row_end)
        return RowScatterGrad(self._ids - row_start, self._rows, row_end - row_start, self._present)

    def take_rows(self, row_index: Tensor, *, check: bool = True) -> "RowScatterGrad":
        row_index = self._check_row_index(row_index, check=check)
        out = torch.zeros(row_index.numel(), self.shape[1], dtype=torch.float32, device=self.device)
        if self._ids.numel():
            pos, found = self._positions(row_index)
            out = torch.where(found[:, None], self._rows.index_select(0, pos), out)
        return RowScatterGrad(torch.arange(row_index.numel(), device=self.device), out, row_index.numel())

    def columns(self, index: Tensor) -> "RowScatterGrad":
        """G[:, index] for an int64 (k,) column index."""
        return RowScatterGrad(self._ids, self._rows.index_select(1, index.to(self.device)), self.shape[0],
                              self._present)

    def t(self) -> "TransposedGrad":
        return TransposedGrad(self)

    def dense(self) -> Tensor:
        return self._scatter_rows(self._rows)

    def sq_norm(self) -> Tensor:
        return squared_norm(self._live_rows())


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

    def gather(self, flat_idx: Tensor, *, check: bool = True) -> Tensor:
        i, j = _split_flat_index(flat_idx, self.shape, self.device, check=check)
        return self._op.gather(j * self._op.shape[1] + i, check=False)

    def rows(self, row_start: int, row_end: int) -> "TransposedGrad":
        self._check_rows(row_start, row_end)
        return TransposedGrad(self._op.columns(torch.arange(row_start, row_end, device=self.device)))

    def take_rows(self, row_index: Tensor, *, check: bool = True) -> "TransposedGrad":
        return TransposedGrad(self._op.columns(self._check_row_index(row_index, check=check)))

    def t(self) -> GradOperator:
        return self._op

    def dense(self) -> Tensor:
        return self._op.dense().T.contiguous()

    def sq_norm(self) -> Tensor:
        return self._op.sq_norm()
