"""Int8Embedding: an input embedding stored as blockwise INT8 rows, trained like a low-rank INT8 linear.

Storage is Int8Linear's, with (out, in) = (num_embeddings, embedding_dim): `weight_q` int8 (V, h), `weight_scales`
fp32 (V, ceil(h / block)), one scale per block of a row. The class derives from Int8Linear so the runtime's table of
trainables (lowmem.model.trainables), the INT8 update with stochastic rounding (lowmem.optim.weights.Int8Weight),
checkpoints and the export treat it as one more INT8 weight.

Forward dequantises only the looked-up rows (T, h) in `compute_dtype`. Backward hands the gradient to `grad_sink`
as `RowScatterGrad` (lowmem.optim.rowgrad): the batch's distinct ids and their summed output-gradient rows, never a
(V, h) tensor; repeated ids sum and `padding_idx` rows get no gradient, as in nn.Embedding.

Why low-rank state pays here: the projected gradient R = G P is (V, r), so Adam's moments are per token row and per
direction of an r-dim subspace of the hidden space: a rare token's row keeps its own second moment (its update is
normalised by its own history, not the frequent tokens'), and stochastic rounding keeps its small updates unbiased
in INT8 (round-to-nearest would drop every update below half a quantisation step).

Under a caller's torch.compile the lookup is traced into the graph (`_TracedInt8EmbeddingFunction`: index_select
and dequantisation as plain ops, the shared leaf COMPILE_ANCHOR in place of a per-call anchor) and the backward
hands (ids, grad_out) to the sink through the custom op `lowmem::int8_embedding_grad_sink` (side-effectful, found by
the module's registry key, as Int8Linear's); ZeRO-3's gathered weights keep the eager path.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from quant.int8 import dequantize_int8, quantize_int8

from lowmem.model.int8_linear import COMPILE_ANCHOR, Int8Linear, layer_by_key
from lowmem.optim.linop import DenseGrad
from lowmem.optim.rowgrad import RowScatterGrad


def _lookup(weight_q: Tensor, weight_scales: Tensor, ids: Tensor, *, block_size: int, dtype: torch.dtype) -> Tensor:
    """Rows ids (...) of the INT8 table, dequantised: (..., h) in `dtype`; only the looked-up rows are formed."""
    flat = ids.reshape(-1)
    rows = dequantize_int8(weight_q.index_select(0, flat), weight_scales.index_select(0, flat), block_size=block_size,
                           dtype=dtype, check_values=False)
    return rows.reshape(*ids.shape, weight_q.shape[1])


class _Int8EmbeddingFunction(torch.autograd.Function):
    """out = W[ids] with W = dequant(q, scales); backward hands RowScatterGrad to the module's sink.

    Inputs: ids (...) int64; anchor: an empty tensor requiring grad (ids never do, yet the sink must fire);
    weight_q / weight_scales: the module's buffers (saved as references: an in-place rewrite between forward and
    backward is caught by autograd's version check); module: the Int8Embedding.
    """

    @staticmethod
    def forward(ctx, ids, anchor, weight_q, weight_scales, module):
        rows = _lookup(*module.codes("forward"), ids, block_size=module.block_size, dtype=module.compute_dtype)
        ctx.save_for_backward(ids, weight_q, weight_scales)
        ctx.module = module
        return rows

    @staticmethod
    def backward(ctx, grad_out):
        ids, _, _ = ctx.saved_tensors
        if ctx.module.grad_sink is not None:
            _deliver_rows(ctx.module, ids, grad_out)
        return None, None, None, None, None


def _deliver_rows(module: "Int8Embedding", ids: Tensor, grad_out: Tensor) -> None:
    """Hand the lookup's gradient to module.grad_sink as RowScatterGrad (or its dense form), then drop it."""
    op = RowScatterGrad.from_lookup(ids, grad_out, module.out_features, module.padding_idx)
    module.grad_sink(module, DenseGrad(op.dense()) if module.dense_grad else op)
    del op


@torch.library.custom_op("lowmem::int8_embedding_grad_sink", mutates_args=())
def _grad_sink_op(ids: Tensor, grad_out: Tensor, layer_key: Tensor) -> None:
    """_deliver_rows for a compiled backward: an opaque call at run time (distinct ids are data-dependent)."""
    _deliver_rows(layer_by_key(int(layer_key)), ids, grad_out)


@_grad_sink_op.register_fake
def _(ids: Tensor, grad_out: Tensor, layer_key: Tensor) -> None:
    return None


torch.fx.node.has_side_effect(torch.ops.lowmem.int8_embedding_grad_sink.default)


class _TracedInt8EmbeddingFunction(torch.autograd.Function):
    """_Int8EmbeddingFunction for a caller's torch.compile. Inputs: ids (...) int; anchor (COMPILE_ANCHOR);
    weight_q int8 (V, h), weight_scales fp32 (V, blocks); layer_key (lowmem.model.int8_linear.key_tensor);
    block_size; dtype: the compute dtype."""

    @staticmethod
    def forward(ctx, ids, anchor, weight_q, weight_scales, layer_key, block_size, dtype):
        ctx.save_for_backward(ids, layer_key)
        return _lookup(weight_q, weight_scales, ids, block_size=block_size, dtype=dtype)

    @staticmethod
    def backward(ctx, grad_out):
        ids, layer_key = ctx.saved_tensors
        torch.ops.lowmem.int8_embedding_grad_sink(ids, grad_out, layer_key)
        return None, None, None, None, None, None, None


class Int8Embedding(Int8Linear):
    """nn.Embedding(num_embeddings, embedding_dim) with INT8 rows (module docstring). No bias; `padding_idx` as in
    nn.Embedding (its row gets no gradient). Build it with `from_embedding`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, padding_idx: int | None = None,
                 block_size: int = 256, compute_dtype: torch.dtype = torch.float32, device=None):
        super().__init__(embedding_dim, num_embeddings, bias=False, block_size=block_size,
                         compute_dtype=compute_dtype, device=device)
        self.padding_idx = padding_idx

    @property
    def num_embeddings(self) -> int:
        return self.out_features

    @property
    def embedding_dim(self) -> int:
        return self.in_features

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, *, block_size: int = 256) -> "Int8Embedding":
        """Quantise an nn.Embedding (round to nearest); compute dtype = its weight's dtype."""
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"from_embedding expects an nn.Embedding, got {type(embedding).__name__}")
        if embedding.max_norm is not None or embedding.scale_grad_by_freq or embedding.sparse:
            raise ValueError("Int8Embedding supports plain embeddings (no max_norm, scale_grad_by_freq or sparse)")
        weight = embedding.weight
        module = cls(embedding.num_embeddings, embedding.embedding_dim, padding_idx=embedding.padding_idx,
                     block_size=block_size, compute_dtype=weight.dtype, device="meta")
        with torch.no_grad():
            module.weight_q, module.weight_scales = quantize_int8(weight.detach().float(), block_size=block_size)
        return module

    def forward(self, ids: Tensor) -> Tensor:
        """ids (...) int64 -> (..., embedding_dim) in compute_dtype."""
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"Int8Embedding expects integer ids, got {ids.dtype}")
        if not torch.is_grad_enabled() or self.grad_sink is None:
            return _lookup(*self.codes("forward"), ids, block_size=self.block_size, dtype=self.compute_dtype)
        if torch.compiler.is_compiling() and self.weight_gather is None:
            return _TracedInt8EmbeddingFunction.apply(ids, COMPILE_ANCHOR, self.weight_q, self.weight_scales,
                                                      self._sink_key_tensor, self.block_size, self.compute_dtype)
        return self._lookup_eager(ids)

    @torch.compiler.disable(reason="ZeRO-3 gathers the embedding's codes eagerly; see lowmem/model/int8_embedding.py")
    def _lookup_eager(self, ids: Tensor) -> Tensor:
        anchor = torch.empty(0, device=ids.device, requires_grad=True)
        return _Int8EmbeddingFunction.apply(ids, anchor, self.weight_q, self.weight_scales, self)

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.out_features}, embedding_dim={self.in_features}, "
                f"padding_idx={self.padding_idx}, block_size={self.block_size}, compute_dtype={self.compute_dtype}")
