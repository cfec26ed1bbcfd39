"""GradOperator products against the formed gradient G = Aᵀ X computed in fp64 (the reference twin)."""
import pytest
import torch

import lowmem.optim.linop as linop
from lowmem.optim.linop import DenseGrad, FactoredGrad, GradOperator, SumGrad

T, M, N = 7, 12, 9


def _factors(seed, t=T, m=M, n=N, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, m, generator=g).to(dtype), torch.randn(t, n, generator=g).to(dtype)


def _reference(A, X):
    return A.double().T @ X.double()


def _cases():
    """(name, builder) -> (operator, reference G fp64)."""

    def dense():
        A, X = _factors(0)
        return DenseGrad(A.T @ X), _reference(A, X)

    def dense_bf16():
        G = (torch.randn(M, N, generator=torch.Generator().manual_seed(1))).bfloat16()
        return DenseGrad(G), G.double()

    def factored():
        A, X = _factors(2)
        return FactoredGrad(A, X), _reference(A, X)

    def factored_bf16():
        A, X = _factors(3, dtype=torch.bfloat16)
        return FactoredGrad(A, X), _reference(A, X)

    def factored_many_tokens():  # T·(m+n) >= m·n: sq_norm forms G in row blocks
        A, X = _factors(4, t=40)
        return FactoredGrad(A, X), _reference(A, X)

    def sum_mixed():
        A1, X1 = _factors(5)
        A2, X2 = _factors(6, t=3)
        G3 = torch.randn(M, N, generator=torch.Generator().manual_seed(7))
        op = SumGrad([(0.5, FactoredGrad(A1, X1)), (-2.0, FactoredGrad(A2, X2)), (1.5, DenseGrad(G3))])
        return op, 0.5 * _reference(A1, X1) - 2.0 * _reference(A2, X2) + 1.5 * G3.double()

    def sum_factored():
        A1, X1 = _factors(8)
        A2, X2 = _factors(9, t=5)
        op = SumGrad([(0.25, FactoredGrad(A1, X1)), (3.0, FactoredGrad(A2, X2))])
        return op, 0.25 * _reference(A1, X1) + 3.0 * _reference(A2, X2)

    def factored_transposed():
        A, X = _factors(10)
        return FactoredGrad(A, X).t(), _reference(A, X).T

    def dense_transposed():
        A, X = _factors(11)
        return DenseGrad(A.T @ X).t(), _reference(A, X).T

    def sum_transposed():
        op, G = sum_mixed()
        return op.t(), G.T

    return [dense, dense_bf16, factored, factored_bf16, factored_many_tokens, sum_mixed, sum_factored,
            factored_transposed, dense_transposed, sum_transposed]


CASES = _cases()
IDS = [c.__name__ for c in CASES]
RTOL, ATOL = 1e-5, 1e-5


def _close(got, want):
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("build", CASES, ids=IDS)
def test_shape_and_dense(build):
    op, G = build()
    assert isinstance(op, GradOperator)
    assert op.shape == tuple(G.shape)
    _close(op.dense(), G)


@pytest.mark.parametrize("build", CASES, ids=IDS)
def test_matmul_rmatmul(build):
    op, G = build()
    m, n = op.shape
    g = torch.Generator().manual_seed(20)
    Mr = torch.randn(n, 5, generator=g)
    Ml = torch.randn(m, 3, generator=g).bfloat16()  # operands of any float dtype
    _close(op.matmul(Mr), G @ Mr.double())
    _close(op.rmatmul(Ml), G.T @ Ml.double())


@pytest.mark.parametrize("build", CASES, ids=IDS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_gather(build, index_dtype):
    op, G = build()
    m, n = op.shape
    idx = torch.randperm(m * n, generator=torch.Generator().manual_seed(21))[:40].to(index_dtype)
    _close(op.gather(idx), G.flatten()[idx.long()])
    assert op.gather(idx[:0]).shape == (0,)


def test_gather_in_small_chunks(monkeypatch):
    monkeypatch.setattr(linop, "CHUNK_ELEMENTS", 2 * T)  # two indices per chunk
    A, X = _factors(22)
    idx = torch.arange(0, M * N, 3)
    _close(FactoredGrad(A, X).gather(idx), _reference(A, X).flatten()[idx])


@pytest.mark.parametrize("build", CASES, ids=IDS)
def test_rows_and_take_rows(build):
    op, G = build()
    m = op.shape[0]
    _close(op.rows(2, m - 1).dense(), G[2 : m - 1])
    assert op.rows(3, 3).shape == (0, op.shape[1])
    index = torch.tensor([m - 1, 0, 4, 4])
    _close(op.take_rows(index).dense(), G[index])
    # rows of rows and products through a slice
    sub = op.rows(1, m).rows(1, 4)
    Mr = torch.randn(op.shape[1], 2, generator=torch.Generator().manual_seed(23))
    _close(sub.matmul(Mr), G[2:5] @ Mr.double())


@pytest.mark.parametrize("build", CASES, ids=IDS)
def test_transpose(build):
    op, G = build()
    opt = op.t()
    assert opt.shape == (op.shape[1], op.shape[0])
    _close(opt.dense(), G.T)
    _close(opt.t().dense(), G)


@pytest.mark.parametrize("build", CASES, ids=IDS)
def test_sq_norm(build):
    op, G = build()
    got = op.sq_norm()
    assert got.dim() == 0 and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), G.pow(2).sum(), rtol=1e-5, atol=1e-5)


def test_sq_norm_row_blocks(monkeypatch):
    monkeypatch.setattr(linop, "CHUNK_ELEMENTS", N)  # one row per block
    A, X = _factors(24, t=50)
    torch.testing.assert_close(FactoredGrad(A, X).sq_norm().double(), _reference(A, X).pow(2).sum(), rtol=1e-5,
                               atol=0)


def test_sq_norm_token_blocks(monkeypatch):
    # T·(m+n) < m·n selects Σ (AAᵀ)∘(XXᵀ); forming G in row blocks (the base method) must not be reached
    t = 3
    monkeypatch.setattr(linop, "CHUNK_ELEMENTS", 2 * t)  # two tokens per block
    monkeypatch.setattr(GradOperator, "sq_norm", lambda self: pytest.fail("formed G instead of the (T, T) route"))
    A, X = _factors(25, t=t)
    torch.testing.assert_close(FactoredGrad(A, X).sq_norm().double(), _reference(A, X).pow(2).sum(), rtol=1e-5,
                               atol=0)


def test_bf16_inputs_are_upcast_not_rounded_again():
    A, X = _factors(26, dtype=torch.bfloat16)
    op = FactoredGrad(A, X)
    assert op.factors[0].dtype == torch.float32
    # the product is fp32 arithmetic on the bf16 values, far tighter than bf16 output rounding (2^-8)
    torch.testing.assert_close(op.dense().double(), _reference(A, X), rtol=1e-6, atol=1e-5)


def test_errors():
    A, X = _factors(27)
    op = FactoredGrad(A, X)
    with pytest.raises(ValueError, match="same token count"):
        FactoredGrad(A, X[:-1])
    with pytest.raises(ValueError, match="2-D"):
        DenseGrad(torch.zeros(3))
    with pytest.raises(TypeError, match="floating"):
        DenseGrad(torch.zeros(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="rows"):
        op.matmul(torch.zeros(M, 2))
    with pytest.raises(ValueError, match="rows"):
        op.rmatmul(torch.zeros(N, 2))
    with pytest.raises(TypeError, match="int32 or int64"):
        op.gather(torch.zeros(3))
    with pytest.raises(ValueError, match="out of range"):
        op.gather(torch.tensor([M * N]))
    with pytest.raises(ValueError, match="out of range"):
        op.rows(3, M + 1)
    with pytest.raises(ValueError, match="row_index"):
        op.take_rows(torch.tensor([M]))
    with pytest.raises(ValueError, match="at least one"):
        SumGrad([])
    with pytest.raises(ValueError, match="one shape"):
        SumGrad([(1.0, op), (1.0, op.t())])
    with pytest.raises(TypeError, match="pair"):
        SumGrad([(1.0, A)])
