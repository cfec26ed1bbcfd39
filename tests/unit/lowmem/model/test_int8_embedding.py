"""Int8Embedding and its row-sparse gradient operator against references: nn.Embedding's dense gradient (a
straightforward scatter-add), the dense operator's products, and the runtime training an untied embedding."""
import pytest
import torch
from torch import nn

from lowmem.model.int8_embedding import Int8Embedding
from lowmem.optim.rowgrad import RowScatterGrad


def _close(a, b, rtol=1e-6):
    scale = b.abs().max().clamp(min=1e-30)
    assert float((a - b).abs().max() / scale) <= rtol


def test_lookup_matches_dequantised_table_and_gradient_matches_nn_embedding():
    torch.manual_seed(0)
    ref = nn.Embedding(50, 40, padding_idx=3)
    emb = Int8Embedding.from_embedding(ref, block_size=16)
    table = emb.dequantized_weight(torch.float32)
    ids = torch.tensor([[1, 3, 7, 7], [49, 0, 7, 3]])
    got = []
    emb.grad_sink = lambda module, op: got.append(op)
    out = emb(ids)
    assert torch.equal(out, table[ids])
    grad_out = torch.randn(2, 4, 40)
    out.backward(grad_out)
    # reference: nn.Embedding on the dequantised table (repeats sum, padding row gets nothing)
    check = nn.Embedding(50, 40, padding_idx=3)
    check.weight.data.copy_(table)
    check(ids).backward(grad_out)
    (op,) = got
    assert isinstance(op, RowScatterGrad)
    assert op.touched_rows.tolist() == [0, 1, 7, 49]
    G = check.weight.grad
    _close(op.dense(), G)
    g = torch.Generator().manual_seed(1)
    M, N = torch.randn(40, 3, generator=g), torch.randn(50, 5, generator=g)
    _close(op.matmul(M), G @ M)
    _close(op.rmatmul(N), G.T @ N)
    idx = torch.randint(0, 50 * 40, (300,), generator=g)
    _close(op.gather(idx), G.flatten()[idx])
    _close(op.rows(5, 49).dense(), G[5:49])
    rows = torch.tensor([7, 2, 49, 7])
    _close(op.take_rows(rows).dense(), G[rows])
    T = op.t()
    _close(T.dense(), G.T)
    _close(T.matmul(N), G.T @ N)
    _close(T.rows(3, 9).dense(), G.T[3:9])
    _close(T.gather(idx), G.T.flatten()[idx])
    _close(op.sq_norm(), (G * G).sum())


def test_empty_gradient_and_no_grad_path():
    emb = Int8Embedding.from_embedding(nn.Embedding(10, 8), block_size=8)
    op = RowScatterGrad.from_lookup(torch.tensor([2, 2]), torch.zeros(2, 8), 10, padding_idx=2)
    assert op.dense().abs().sum() == 0 and op.gather(torch.tensor([16, 17])).abs().sum() == 0
    with torch.no_grad():
        assert emb(torch.tensor([1, 2])).shape == (2, 8)
    with pytest.raises(TypeError):
        emb(torch.tensor([1.0]))


@pytest.mark.slow
def test_torch_compile_traces_lookup_and_hands_rows_to_the_sink():
    """Under torch.compile (fullgraph: no break) the lookup gives the eager rows, and the compiled backward hands the
    sink the same row gradient as eager (nn.Embedding's dense gradient on the dequantised table, padding row 0)."""
    torch.manual_seed(5)
    emb = Int8Embedding.from_embedding(nn.Embedding(30, 24, padding_idx=4), block_size=16)
    got = []
    emb.grad_sink = lambda module, op: got.append((module, op))

    def model(ids):
        return emb(ids).tanh() * 2.0

    ids = torch.tensor([[4, 9, 9, 29], [0, 4, 17, 9]])
    grad_out = torch.randn(2, 4, 24, generator=torch.Generator().manual_seed(6))
    eager_out = model(ids)
    eager_out.backward(grad_out)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    compiled_out = compiled(ids)
    compiled_out.backward(grad_out)
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-6, atol=1e-6)
    assert len(got) == 2 and got[0][0] is emb and got[1][0] is emb
    (_, eager_op), (_, compiled_op) = got
    assert isinstance(compiled_op, RowScatterGrad)
    assert compiled_op.touched_rows.tolist() == eager_op.touched_rows.tolist() == [0, 9, 17, 29]
    check = nn.Embedding(30, 24, padding_idx=4)
    check.weight.data.copy_(emb.dequantized_weight(torch.float32))
    (check(ids).tanh() * 2.0).backward(grad_out)
    _close(compiled_op.dense(), check.weight.grad, rtol=1e-5)
    _close(compiled_op.dense(), eager_op.dense(), rtol=1e-5)


def _unique_reference(ids, grad_out, num_rows, padding_idx):
    """The former algorithm (torch.unique + index_add_ of the kept tokens): (sorted distinct ids, summed rows)."""
    ids = ids.reshape(-1).long()
    grad_out = grad_out.reshape(ids.numel(), -1)
    if padding_idx is not None:
        keep = ids != padding_idx
        ids, grad_out = ids[keep], grad_out[keep]
    unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    rows = torch.zeros(unique.numel(), grad_out.shape[1]).index_add_(0, inverse, grad_out.float())
    dense = torch.zeros(num_rows, grad_out.shape[1]).index_copy_(0, unique, rows)
    return unique, dense


@pytest.mark.parametrize("tokens,vocab,padding_idx", [(64, 50, None), (64, 50, 3), (12, 500, 7), (5, 5, None),
                                                      (1, 9, 0)])
def test_static_shape_lookup_gradient_equals_the_unique_based_one_bit_for_bit(tokens, vocab, padding_idx):
    """Sort-free static slots (min(T, V) of them) sum each row's tokens in the same order as unique + index_add_
    did: the dense gradient is bit-identical, every batch id has a slot, extra slots are zero rows."""
    g = torch.Generator().manual_seed(tokens + vocab)
    ids = torch.randint(0, min(vocab, 20), (tokens,), generator=g)       # many repeats
    if padding_idx is not None:
        ids[::4] = padding_idx
    grad_out = torch.randn(tokens, 16, generator=g)
    op = RowScatterGrad.from_lookup(ids, grad_out, vocab, padding_idx)
    unique, dense = _unique_reference(ids, grad_out, vocab, padding_idx)
    assert torch.equal(op.dense(), dense)
    assert op.touched_rows.tolist() == unique.tolist()
    assert op._ids.numel() == min(tokens, vocab)
    assert torch.equal(op._ids, op._ids.sort().values) and op._ids.unique().numel() == op._ids.numel()
    idx = torch.randint(0, vocab * 16, (200,), generator=g)
    assert torch.equal(op.gather(idx), dense.flatten()[idx])
    assert torch.equal(op.rows(2, vocab - 1).dense(), dense[2:vocab - 1])
    rows = torch.tensor([0, vocab - 1, int(ids[0]), 0])
    assert torch.equal(op.take_rows(rows).dense(), dense[rows])
    M = torch.randn(16, 3, generator=g)
    _close(op.matmul(M), dense @ M)
    N = torch.randn(vocab - 1, 4, generator=g)
    _close(op.rows(1, vocab).rmatmul(N), dense[1:].T @ N)
    _close(op.sq_norm(), (dense * dense).sum())
