"""The LM head's weight gradient as an operator, recomputed by vocabulary blocks (never a (tokens, vocab) tensor).

For logits z = X Wᵀ (X (T, h) the head's input, W (V, h)) and the mean cross-entropy over the valid tokens, the
gradient of the head is G = Aᵀ X with A (T, V):

    A[t, v] = c_t · (softmax(z_t)[v] − [v = y_t]),   c_t = dL/dloss · valid_t / n_valid

`SoftmaxCEGrad` is a `GradOperator` (lowmem.optim.linop) that holds only X, the per-token log-sum-exp (T,) fp32 saved
by the forward, the labels and c; every product rebuilds A one block of vocabulary rows at a time from W's rows
(`HeadRows`: a float weight or the INT8 codes of an Int8Linear, dequantised block by block). So the runtime's low-rank
update of an INT8 head (R += G P, refresh sketches, residual gathers) never needs the (T, V) logits gradient, at the
price of one head matmul per product. A block of `block_rows` rows costs T·block_rows fp32 elements (plus the row
block's float copy).

A is rounded to the compute dtype before use, as autograd's bf16 logits gradient is on the plain path, so both paths
see the same factors up to the summation order of the log-sum-exp.

The operator reads W when a product is asked for, so W must not change between the forward and the last product:
it records the INT8 codes' version counter and raises if they were rewritten (the runtime asks for every product
before it writes the weight).
"""
from __future__ import annotations

import torch
from torch import Tensor

from quant.int8 import dequantize_int8

from lowmem.optim.linop import GradOperator, _check_operand, _split_flat_index
from lowmem.optim.rowgrad import TransposedGrad

# Elements of one (T, block_rows) fp32 logits block of the fused loss and of this operator: 16 MiB, as linop's
# transients. The memory planner (lowmem.memory.cost_model) charges the same number.
LOGITS_BLOCK_ELEMENTS = 1 << 22


def block_rows_for(tokens: int, vocab: int, block_elements: int = LOGITS_BLOCK_ELEMENTS) -> int:
    """Vocabulary rows per block so that a (tokens, rows) fp32 block holds at most `block_elements` (>= 1 row)."""
    return max(1, min(vocab, block_elements // max(tokens, 1)))


class HeadRows:
    """Row blocks of the head weight W (V, h) in a compute dtype: a float tensor, or an Int8Linear's codes."""

    def __init__(self, weight: Tensor | None = None, *, module=None, phase: str = "forward"):
        if (weight is None) == (module is None):
            raise ValueError("HeadRows needs exactly one of a float weight or an Int8Linear module")
        self.weight = None if weight is None else weight.detach()
        self.module = module
        # ZeRO-3 gathers the codes for this use (module.codes); otherwise these are the module's own buffers
        self._codes = None if module is None else module.codes(phase)
        src = self.weight if module is None else self._codes[0]
        self.shape = (int(src.shape[0]), int(src.shape[1]))
        self.device = src.device
        self._version = None if module is None else self._codes[0]._version

    def check_unchanged(self) -> None:
        if self._codes is not None and self._codes[0]._version != self._version:
            raise RuntimeError("the INT8 head weight was rewritten after the forward that this gradient belongs to; "
                               "ask for every product of the gradient before writing the weight")

    def rows(self, start: int, end: int, dtype: torch.dtype) -> Tensor:
        """W[start:end] (end - start, h) in `dtype` (a view of a float weight when the dtype already matches)."""
        if self.weight is not None:
            return self.weight[start:end].to(dtype)
        self.check_unchanged()
        q, scales = self._codes
        return dequantize_int8(q[start:end], scales[start:end], block_size=self.module.block_size, dtype=dtype,
                               check_values=False)

    def take(self, index: Tensor, dtype: torch.dtype) -> Tensor:
        """W[index] (k, h) in `dtype` for an int64 (k,) index."""
        if self.weight is not None:
            return self.weight.index_select(0, index).to(dtype)
        self.check_unchanged()
        q, scales = self._codes
        return dequantize_int8(q.index_select(0, index), scales.index_select(0, index),
                               block_size=self.module.block_size, dtype=dtype, check_values=False)


def logits_gradient(hidden: Tensor, w_rows: Tensor, lse: Tensor, labels: Tensor, token_weight: Tensor, *,
                    row_start: int | None = None, row_ids: Tensor | None = None) -> Tensor:
    """A[:, rows] (T, k) in hidden's dtype: c_t (exp(z - lse_t) - [row = y_t]), computed in fp32.

    hidden (T, h) compute dtype; w_rows (k, h) same dtype: W's rows row_start .. row_start + k, or W[row_ids] for an
    int64 (k,) index; lse (T,) fp32; labels (T,) int64 (any value where token_weight is 0); token_weight (T,) fp32.
    Transients: one (T, k) fp32 block (plus the compute-dtype matmul output when that is not fp32).
    """
    a = (hidden @ w_rows.T).float()
    a.sub_(lse[:, None]).exp_()
    if row_ids is None:
        # -1 at each token's label column when the label falls in this block: a scatter over every token (the
        # others add +0.0 somewhere in their row, which changes no value: exp() is never -0.0), so the shapes do
        # not depend on the labels and nothing waits for the device
        pos = labels - row_start
        in_block = (pos >= 0) & (pos < a.shape[1])
        minus_one = torch.where(in_block, -1.0, 0.0).to(a.dtype)
        a.scatter_add_(1, pos.clamp(0, a.shape[1] - 1)[:, None], minus_one[:, None])
    else:
        a.sub_((labels[:, None] == row_ids[None, :]).to(a.dtype))
    a.mul_(token_weight[:, None])
    return a.to(hidden.dtype)


class SoftmaxCEGrad(GradOperator):
    """G = Aᵀ X[:, cols] of a linear + cross-entropy head, A rebuilt from W by vocabulary blocks (module docstring).

    hidden (T, h) compute dtype: the head's input (used for the logits); lse, labels, token_weight (T,): see
    `logits_gradient`; head: HeadRows of W (V, h). `row_ids` (k,) int64 restricts G to those vocabulary rows (None:
    all V); `x` (T, n) fp32 is the right factor (default hidden in fp32; a column subset for the transpose's rows).
    """

    def __init__(self, hidden: Tensor, lse: Tensor, labels: Tensor, token_weight: Tensor, head: HeadRows, *,
                 row_range: tuple[int, int] | None = None, row_ids: Tensor | None = None, x: Tensor | None = None,
                 block_elements: int = LOGITS_BLOCK_ELEMENTS):
        self._hidden = hidden.detach()   # products run outside autograd (after the backward, too)
        self._lse = lse
        self._labels = labels
        self._weight = token_weight
        self._head = head
        self._range = (0, head.shape[0]) if row_range is None else row_range
        self._ids = row_ids
        self._x = self._hidden.float() if x is None else x
        self._block_elements = block_elements
        rows = self._range[1] - self._range[0] if row_ids is None else int(row_ids.numel())
        self.shape = (rows, int(self._x.shape[1]))

    def _derive(self, **changes) -> "SoftmaxCEGrad":
        kw = dict(row_range=self._range, row_ids=self._ids, x=self._x, block_elements=self._block_elements)
        kw.update(changes)
        return SoftmaxCEGrad(self._hidden, self._lse, self._labels, self._weight, self._head, **kw)

    @property
    def device(self) -> torch.device:
        return self._hidden.device

    def _blocks(self):
        """(local start, local end, A block (T, k) fp32) over this operator's rows, block by block."""
        T = self._hidden.shape[0]
        step = block_rows_for(T, max(self.shape[0], 1), self._block_elements)
        dtype = self._hidden.dtype
        for s in range(0, self.shape[0], step):
            e = min(self.shape[0], s + step)
            # no local keeps a block: the consumer drops it (del) before asking for the next one, so one block is
            # alive at a time
            if self._ids is None:
                lo = self._range[0]
                yield s, e, logits_gradient(self._hidden, self._head.rows(lo + s, lo + e, dtype), self._lse,
                                            self._labels, self._weight, row_start=lo + s).float()
            else:
                ids = self._ids[s:e]
                yield s, e, logits_gradient(self._hidden, self._head.take(ids, dtype), self._lse, self._labels,
                                            self._weight, row_ids=ids).float()

    def matmul(self, M: Tensor) -> Tensor:
        M = _check_operand(M, self.shape[1], "matmul", self.device)
        xm = self._x @ M
        out = torch.empty(self.shape[0], M.shape[1], dtype=torch.float32, device=self.device)
        for s, e, a in self._blocks():
            torch.mm(a.T, xm, out=out[s:e])
            del a
        return out

    def rmatmul(self, M: Tensor) -> Tensor:
        M = _check_operand(M, self.shape[0], "rmatmul", self.device)
        am = torch.zeros(self._x.shape[0], M.shape[1], dtype=torch.float32, device=self.device)
        for s, e, a in self._blocks():
            am.addmm_(a, M[s:e])
            del a
        return self._x.T @ am

    def gather(self, flat_idx: Tensor, *, check: bool = True) -> Tensor:
        """G.flatten()[flat_idx] (L,) fp32. Block by block, dense rows of G = Aᵀ X are formed (at most
        `block_elements` fp32 at a time) and every index reads its entry there, kept where its row lies in them:
        static shapes (which indices fall in a block is a device value), at the cost of one dense() worth of matmul
        and L-element selects per row group."""
        i, j = _split_flat_index(flat_idx, self.shape, self.device, check=check)
        out = torch.zeros(i.numel(), dtype=torch.float32, device=self.device)
        n = self.shape[1]
        group = max(1, self._block_elements // max(n, 1))
        for s, e, a in self._blocks():
            for lo in range(s, e, group):
                hi = min(e, lo + group)
                rows = a[:, lo - s:hi - s].T @ self._x          # G[lo:hi] (hi - lo, n)
                in_rows = (i >= lo) & (i < hi)
                local = (i - lo).clamp(0, hi - lo - 1) * n + j
                out = torch.where(in_rows, rows.reshape(-1).index_select(0, local), out)
                del rows
            del a
        return out

    def rows(self, row_start: int, row_end: int) -> "SoftmaxCEGrad":
        self._check_rows(row_start, row_end)
        if self._ids is not None:
            return self._derive(row_ids=self._ids[row_start:row_end])
        lo = self._range[0]
        return self._derive(row_range=(lo + row_start, lo + row_end))

    def take_rows(self, row_index: Tensor, *, check: bool = True) -> "SoftmaxCEGrad":
        local = self._check_row_index(row_index, check=check)
        ids = self._ids[local] if self._ids is not None else local + self._range[0]
        return self._derive(row_ids=ids, row_range=None)

    def columns(self, index: Tensor) -> "SoftmaxCEGrad":
        """G[:, index] for an int64 (k,) column index (the transpose's rows)."""
        return self._derive(x=self._x.index_select(1, index.to(self.device)))

    def t(self) -> GradOperator:
        return TransposedGrad(self)

    def dense(self) -> Tensor:
        out = torch.empty(self.shape, dtype=torch.float32, device=self.device)
        for s, e, a in self._blocks():
            torch.mm(a.T, self._x, out=out[s:e])
            del a
        return out
