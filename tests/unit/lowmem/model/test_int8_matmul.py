"""INT8 x INT8 matmuls (int8_matmul): against a float64 reference with the rounding bounds the module docstring
states, exactness where it says exact, and an unchanged weight-update path."""
import pytest
import torch
from torch import nn

from lowmem.config import LowMemConfig
from lowmem.model import int8_matmul
from lowmem.model.int8_linear import Int8Linear
from lowmem.model.surgery import convert_linears_to_int8
from quant.int8 import quantize_int8

BLOCK = 32


def _reference_dequant(q, scales, block_size):
    return q.double() * scales.double().repeat_interleave(block_size, dim=1)[:, : q.shape[1]]


def _weight(m, n, seed=0, spread=True):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=gen)
    if spread:   # blocks of very different magnitude, so the per-row re-expression really rounds
        w *= torch.logspace(-1, 0.5, n).roll(7)[None, :]
    return quantize_int8(w, block_size=BLOCK)


@pytest.mark.parametrize("n", [96, 100])   # whole blocks, and a short tail block
def test_row_codes_within_half_a_row_step_and_exact_where_stated(n):
    q, s = _weight(24, n)
    codes, row_scale = int8_matmul.row_codes(q, s, BLOCK)
    assert codes.dtype == torch.int8 and row_scale.shape == (24,)
    assert torch.equal(row_scale, s.amax(dim=1))
    exact = _reference_dequant(q, s, BLOCK)
    approx = codes.double() * row_scale.double()[:, None]
    # at most half a step of the row scale (plus fp32 rounding of the ratio)
    assert ((approx - exact).abs() <= row_scale.double()[:, None] * (0.5 + 1e-5)).all()
    # the block holding the row's largest scale keeps its codes
    largest = s.argmax(dim=1)
    for i in range(q.shape[0]):
        b = int(largest[i])
        assert torch.equal(codes[i, b * BLOCK:(b + 1) * BLOCK], q[i, b * BLOCK:(b + 1) * BLOCK])
    assert not torch.equal(codes, q)   # the spread weights really were re-expressed


def test_row_codes_exact_when_a_row_has_one_scale():
    q = torch.randint(-127, 128, (5, 3 * BLOCK), dtype=torch.int8)
    s = torch.rand(5, 1).expand(5, 3).contiguous()
    codes, row_scale = int8_matmul.row_codes(q, s, BLOCK)
    assert torch.equal(codes, q) and torch.equal(row_scale, s[:, 0])
    zero_codes, zero_scale = int8_matmul.row_codes(torch.zeros_like(q), torch.zeros_like(s), BLOCK)
    assert not zero_codes.any() and not zero_scale.any()


def _bound(x, w_abs, x_scale, row_scale):
    """|error| bound per output element of x Wᵀ with x rounded per token (±s_x/2 per element) and W per row
    (±S_j/2): Σ_k (s_x/2 · |W_jk| + |x_tk| · S_j/2 + s_x/2 · S_j/2)."""
    n = x.shape[1]
    return (x_scale[:, None] / 2 * w_abs.sum(1)[None, :] + x.abs().sum(1)[:, None] * row_scale[None, :] / 2
            + n * x_scale[:, None] * row_scale[None, :] / 4)


def test_forward_and_grad_input_within_the_rounding_bounds():
    q, s = _weight(40, 100, seed=1)
    codes, row_scale = int8_matmul.row_codes(q, s, BLOCK)
    W = _reference_dequant(q, s, BLOCK)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(33, 100, generator=gen)
    y = int8_matmul.linear_int8(x, codes, row_scale).double()
    y_ref = x.double() @ W.T
    x_scale = x.abs().amax(1).double() / 127
    bound = _bound(x.double(), W.abs(), x_scale, row_scale.double()) * (1 + 1e-4)
    assert ((y - y_ref).abs() <= bound).all()
    assert (y - y_ref).abs().max() > 0   # approximate, as documented
    assert torch.corrcoef(torch.stack([y.flatten(), y_ref.flatten()]))[0, 1] > 0.999

    g = torch.randn(33, 40, generator=gen)
    dx = int8_matmul.grad_input_int8(g, codes, row_scale).double()
    dx_ref = g.double() @ W
    g_scaled = g.double() * row_scale.double()[None, :]          # g' = g S, quantised per token
    g_scale = g_scaled.abs().amax(1) / 127
    # dx = Σ_i g'_ti c_ij: g' rounding (±s_g/2) times |c|, plus |g| times the weight rounding (±S_i/2)
    bound = (g_scale[:, None] / 2 * codes.double().abs().sum(0)[None, :]
             + (g.double().abs() * row_scale.double()[None, :] / 2).sum(1)[:, None]) * (1 + 1e-4)
    assert ((dx - dx_ref).abs() <= bound).all()
    assert torch.corrcoef(torch.stack([dx.flatten(), dx_ref.flatten()]))[0, 1] > 0.999


class Recorder:
    def __init__(self):
        self.ops = []

    def __call__(self, module, op):
        self.ops.append(op.dense().clone())


@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_uses_int8_products_and_keeps_the_exact_weight_gradient(bias):
    torch.manual_seed(0)
    layer = Int8Linear(100, 40, bias=bias, block_size=BLOCK)
    x = torch.randn(2, 9, 100, requires_grad=True)
    g = torch.randn(2, 9, 40)
    results = {}
    for mode in (False, True):
        layer.int8_matmul = mode
        sink = Recorder()
        layer.grad_sink = sink
        y = layer(x)
        y.backward(g)
        results[mode] = (y.detach(), x.grad.clone(), sink.ops[0])
        x.grad = None
    codes, row_scale = int8_matmul.row_codes(layer.weight_q, layer.weight_scales, BLOCK)
    expected_y = int8_matmul.linear_int8(x.detach().reshape(18, 100), codes, row_scale).reshape(2, 9, 40)
    if bias:
        expected_y = expected_y + layer.bias.detach()
    assert torch.equal(results[True][0], expected_y)
    expected_dx = int8_matmul.grad_input_int8(g.reshape(18, 40), codes, row_scale).reshape(2, 9, 100)
    assert torch.equal(results[True][1], expected_dx)
    # the optimizer's gradient G = Aᵀ X is built from the unquantised activations: identical either way
    assert torch.equal(results[True][2], results[False][2])
    assert not torch.equal(results[True][0], results[False][0])
    with torch.no_grad():   # the inference path takes the same products
        assert torch.equal(layer(x), results[True][0])


def test_config_sets_the_layers():
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 64))
    names = convert_linears_to_int8(model, LowMemConfig(int8_matmul=True, weight_block_size=BLOCK,
                                                        exclude_modules=()))
    assert names and all(m.int8_matmul for m in model if isinstance(m, Int8Linear))
    default = nn.Sequential(nn.Linear(64, 32))
    convert_linears_to_int8(default, LowMemConfig(weight_block_size=BLOCK, exclude_modules=()))
    assert not default[0].int8_matmul


def test_fits():
    assert int8_matmul.fits(1, 3, 5, torch.device("cpu"))
    cuda = torch.device("cuda")
    assert not int8_matmul.fits(16, 64, 64, cuda) and not int8_matmul.fits(32, 60, 64, cuda)
    assert int8_matmul.fits(32, 64, 64, cuda)
