"""Int8Linear against reference twins: a plain float linear with the dequantized weight, autograd's weight gradient."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lowmem.model.int8_linear import Int8Linear
from lowmem.optim.linop import DenseGrad, FactoredGrad

IN, OUT, BLOCK = 100, 48, 64  # 100 = one full block + a padded one


def _reference_dequant(q, scales, block_size):
    """Twin of blockwise dequantization: each scale covers block_size consecutive input features."""
    return q.float() * scales.float().repeat_interleave(block_size, dim=1)[:, : q.shape[1]]


def _linear(bias=True, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    lin = nn.Linear(IN, OUT, bias=bias)
    if bias:
        nn.init.normal_(lin.bias)
    return lin.to(dtype)


class Recorder:
    """A grad sink that stores the dense gradient of every call, per module."""

    def __init__(self):
        self.calls = []

    def __call__(self, module, op):
        self.calls.append((module, type(op), op.shape, op.dense().clone()))


def _reference_grads(layer, x, grad_out):
    """Autograd of F.linear with the dequantized weight as a float leaf: (y, grad_x, grad_W, grad_b)."""
    W = _reference_dequant(layer.weight_q, layer.weight_scales, layer.block_size).requires_grad_(True)
    b = None if layer.bias is None else layer.bias.detach().float().clone().requires_grad_(True)
    xr = x.detach().float().clone().requires_grad_(True)
    y = F.linear(xr, W, b)
    y.backward(grad_out.float())
    return y.detach(), xr.grad, W.grad, None if b is None else b.grad


def test_from_linear_round_to_nearest():
    lin = _linear()
    layer = Int8Linear.from_linear(lin, block_size=BLOCK)
    assert layer.weight_q.dtype == torch.int8 and layer.weight_q.shape == (OUT, IN)
    assert layer.weight_scales.dtype == torch.float32 and layer.weight_scales.shape == (OUT, 2)
    assert layer.compute_dtype == torch.float32
    W = layer.dequantized_weight()
    torch.testing.assert_close(W, _reference_dequant(layer.weight_q, layer.weight_scales, BLOCK), rtol=0, atol=0)
    # Round to nearest: every element within half a quantization step of the float weight.
    step = layer.weight_scales.repeat_interleave(BLOCK, dim=1)[:, :IN]
    assert ((W - lin.weight.detach()).abs() <= step / 2 * (1 + 1e-5) + 1e-12).all()
    torch.testing.assert_close(layer.bias.detach(), lin.bias.detach(), rtol=0, atol=0)
    assert not any(name == "weight" for name, _ in layer.named_parameters())


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, IN), (2, 5, IN)])
def test_forward_matches_plain_linear(bias, shape):
    layer = Int8Linear.from_linear(_linear(bias), block_size=BLOCK)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    W = _reference_dequant(layer.weight_q, layer.weight_scales, BLOCK)
    ref = F.linear(x, W, None if layer.bias is None else layer.bias.detach())
    y = layer(x)
    assert y.shape == (*shape[:-1], OUT)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dense_grad", [False, True])
@pytest.mark.parametrize("shape", [(7, IN), (2, 5, IN)])
def test_backward_grad_input_sink_and_bias(dense_grad, shape):
    layer = Int8Linear.from_linear(_linear(), block_size=BLOCK)
    layer.dense_grad = dense_grad
    rec = Recorder()
    layer.grad_sink = rec
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(*shape, generator=gen).requires_grad_(True)
    grad_out = torch.randn(*shape[:-1], OUT, generator=gen)
    layer(x).backward(grad_out)
    _, gx, gW, gb = _reference_grads(layer, x, grad_out)
    torch.testing.assert_close(x.grad, gx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, gb, rtol=1e-5, atol=1e-5)
    assert len(rec.calls) == 1
    module, op_type, op_shape, G = rec.calls[0]
    assert module is layer and op_shape == (OUT, IN)
    assert op_type is (DenseGrad if dense_grad else FactoredGrad)
    torch.testing.assert_close(G, gW, rtol=1e-5, atol=1e-5)
    assert layer.weight_q.grad is None and not layer.weight_q.requires_grad


def test_backward_without_sink():
    layer = Int8Linear.from_linear(_linear(), block_size=BLOCK)
    x = torch.randn(3, IN, requires_grad=True)
    grad_out = torch.randn(3, OUT)
    layer(x).backward(grad_out)
    _, gx, _, gb = _reference_grads(layer, x, grad_out)
    torch.testing.assert_close(x.grad, gx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, gb, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_input_without_grad_still_feeds_sink(bias):
    layer = Int8Linear.from_linear(_linear(bias), block_size=BLOCK)
    rec = Recorder()
    layer.grad_sink = rec
    x = torch.randn(4, IN)  # e.g. the first layer after a frozen embedding
    grad_out = torch.randn(4, OUT)
    y = layer(x)
    assert y.requires_grad
    y.backward(grad_out)
    assert x.grad is None
    _, _, gW, gb = _reference_grads(layer, x, grad_out)
    assert len(rec.calls) == 1
    torch.testing.assert_close(rec.calls[0][3], gW, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(layer.bias.grad, gb, rtol=1e-5, atol=1e-5)


def test_frozen_layer_without_sink_builds_no_graph():
    layer = Int8Linear.from_linear(_linear(bias=False), block_size=BLOCK)
    y = layer(torch.randn(2, IN))
    assert y.grad_fn is None


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_no_grad_and_inference_mode(context):
    layer = Int8Linear.from_linear(_linear(), block_size=BLOCK)
    rec = Recorder()
    layer.grad_sink = rec
    x = torch.randn(2, 3, IN, requires_grad=True)
    with context():
        y = layer(x)
    assert not y.requires_grad and y.grad_fn is None
    ref = F.linear(x.detach(), _reference_dequant(layer.weight_q, layer.weight_scales, BLOCK), layer.bias.detach())
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    assert rec.calls == []


def test_eval_mode_same_output_and_still_trains():
    layer = Int8Linear.from_linear(_linear(), block_size=BLOCK)
    x = torch.randn(3, IN, requires_grad=True)
    y_train = layer(x)
    layer.eval()
    rec = Recorder()
    layer.grad_sink = rec
    y_eval = layer(x)
    torch.testing.assert_close(y_eval, y_train, rtol=0, atol=0)
    y_eval.sum().backward()
    assert len(rec.calls) == 1  # eval() changes nothing about gradients; only no_grad does


def _two_layer(seed=3):
    torch.manual_seed(seed)
    lin1, lin2 = nn.Linear(IN, OUT), nn.Linear(OUT, IN)
    return Int8Linear.from_linear(lin1, block_size=BLOCK), Int8Linear.from_linear(lin2, block_size=BLOCK)


def _block(l1, l2, x):
    return l2(F.gelu(l1(x)))


def test_activation_checkpointing_fires_sink_once_with_same_gradients():
    l1, l2 = _two_layer()
    x0 = torch.randn(2, 5, IN, generator=torch.Generator().manual_seed(4))
    results = {}
    for use_ckpt in (False, True):
        rec = Recorder()
        l1.grad_sink = l2.grad_sink = rec
        for layer in (l1, l2):
            layer.bias.grad = None
        x = x0.clone().requires_grad_(True)
        y = checkpoint(_block, l1, l2, x, use_reentrant=False) if use_ckpt else _block(l1, l2, x)
        (y.pow(2).sum()).backward()
        assert [m for m, *_ in rec.calls] == [l2, l1]  # one call per layer, in backward order
        results[use_ckpt] = (x.grad, [G for *_, G in rec.calls], l1.bias.grad.clone(), l2.bias.grad.clone())
    plain, ckpt = results[False], results[True]
    torch.testing.assert_close(ckpt[0], plain[0], rtol=1e-6, atol=1e-6)
    for a, b in zip(ckpt[1], plain[1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ckpt[2], plain[2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ckpt[3], plain[3], rtol=1e-6, atol=1e-6)


def test_checkpointing_twice_counts_one_per_backward():
    l1, l2 = _two_layer()
    counts = {}
    l1.grad_sink = l2.grad_sink = lambda module, op: counts.__setitem__(id(module), counts.get(id(module), 0) + 1)
    for step in range(1, 3):
        x = torch.randn(3, IN, requires_grad=True)
        checkpoint(_block, l1, l2, x, use_reentrant=False).sum().backward()
        assert counts == {id(l1): step, id(l2): step}


def test_sink_may_rewrite_weight_in_place_after_grad_input():
    layer = Int8Linear.from_linear(_linear(), block_size=BLOCK)
    x = torch.randn(3, IN, requires_grad=True)
    grad_out = torch.randn(3, OUT)
    _, gx, _, _ = _reference_grads(layer, x, grad_out)

    def sink(module, op):
        module.weight_q.zero_()  # a fused update writing the new codes

    layer.grad_sink = sink
    layer(x).backward(grad_out)
    torch.testing.assert_close(x.grad, gx, rtol=1e-5, atol=1e-5)  # computed from the forward-time weight
    assert layer.weight_q.abs().sum() == 0


def test_weight_rewritten_before_its_backward_is_an_error():
    layer = Int8Linear.from_linear(_linear(), block_size=BLOCK)
    x = torch.randn(3, IN, requires_grad=True)
    y = layer(x)
    layer.weight_q.mul_(-1)  # would make grad_input use a weight the forward never saw
    with pytest.raises(RuntimeError, match="inplace"):
        y.sum().backward()


def test_in_place_sink_under_checkpointing():
    """A fused update rewriting each layer's codes inside backward must not leak into earlier layers' gradients."""
    l1, l2 = _two_layer(seed=9)
    x0 = torch.randn(2, 4, IN, generator=torch.Generator().manual_seed(10))
    rec = Recorder()
    l1.grad_sink = l2.grad_sink = rec
    x = x0.clone().requires_grad_(True)
    _block(l1, l2, x).pow(2).sum().backward()
    expected = (x.grad, [G for *_, G in rec.calls])

    calls = []

    def updating_sink(module, op):
        calls.append(op.dense().clone())
        module.weight_q.mul_(-1)  # stands in for the stochastic-rounding update

    l1.grad_sink = l2.grad_sink = updating_sink
    x = x0.clone().requires_grad_(True)
    checkpoint(_block, l1, l2, x, use_reentrant=False).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, expected[0], rtol=1e-6, atol=1e-6)
    assert len(calls) == 2
    for a, b in zip(calls, expected[1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_state_dict_round_trip():
    layer = Int8Linear.from_linear(_linear(), block_size=BLOCK)
    state = layer.state_dict()
    assert set(state) == {"weight_q", "weight_scales", "bias"}
    fresh = Int8Linear(IN, OUT, block_size=BLOCK)
    assert not torch.equal(fresh.weight_q, layer.weight_q)
    fresh.load_state_dict(state)
    for key in state:
        assert torch.equal(fresh.state_dict()[key], state[key])
    x = torch.randn(2, IN)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    no_bias = Int8Linear(IN, OUT, bias=False, block_size=BLOCK)
    assert set(no_bias.state_dict()) == {"weight_q", "weight_scales"}


def test_default_init_and_bad_arguments():
    torch.manual_seed(5)
    layer = Int8Linear(IN, OUT)
    assert layer.weight_scales.shape == (OUT, 1)
    bound = 1 / IN**0.5
    assert layer.dequantized_weight().abs().max() <= bound * (1 + 1e-5)
    assert layer.bias.abs().max() <= bound
    with pytest.raises(ValueError, match="input"):
        layer(torch.randn(2, IN + 1))
    with pytest.raises(TypeError, match="nn.Linear"):
        Int8Linear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="block_size"):
        Int8Linear(IN, OUT, block_size=0)
    with pytest.raises(TypeError, match="compute_dtype"):
        Int8Linear(IN, OUT, compute_dtype=torch.int8)
    meta = Int8Linear(IN, OUT, device="meta")
    assert meta.weight_q.is_meta and meta.weight_q.dtype == torch.int8


def test_bf16_compute_dtype():
    """bf16 path against an fp32 reference. Tolerance: bf16 keeps 8 significant bits (relative rounding 2^-9 per
    value); inputs, weight and output are each rounded once and the IN-term sums accumulate in fp32 inside the
    matmul, so errors stay within a few 2^-8 of the output scale: atol = rtol = 2e-2 x max|reference|."""
    lin = _linear(dtype=torch.bfloat16)
    layer = Int8Linear.from_linear(lin, block_size=BLOCK)
    assert layer.compute_dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert layer.dequantized_weight().dtype == torch.bfloat16
    rec = Recorder()
    layer.grad_sink = rec
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 5, IN, generator=gen).to(torch.bfloat16).requires_grad_(True)
    grad_out = torch.randn(2, 5, OUT, generator=gen).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.backward(grad_out)
    ref_y, gx, gW, gb = _reference_grads(layer, x, grad_out)

    def close(actual, expected):
        tol = 2e-2 * expected.abs().max().item()
        torch.testing.assert_close(actual.float(), expected, rtol=2e-2, atol=tol)

    close(y, ref_y)
    assert x.grad.dtype == torch.bfloat16
    close(x.grad, gx)
    close(layer.bias.grad, gb)
    G = rec.calls[0][3]
    assert G.dtype == torch.float32
    close(G, gW)


def test_fp32_input_to_bf16_layer_is_cast():
    layer = Int8Linear.from_linear(_linear(dtype=torch.bfloat16), block_size=BLOCK)
    x = torch.randn(3, IN, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32


class _CompiledBlock(nn.Module):
    """Float ops around two Int8Linear layers, so compiled graphs exist on both sides of each layer."""

    def __init__(self, l1, l2):
        super().__init__()
        self.l1, self.l2 = l1, l2

    def forward(self, x):
        return self.l2(F.gelu(self.l1(x * 1.5))).tanh()


@pytest.mark.slow
def test_torch_compile():
    """A compiled model traces Int8Linear whole (fullgraph, no break): same outputs, input gradients and sink calls
    as eager, one sink call per backward."""
    l1, l2 = _two_layer(seed=7)
    counts = {}
    l1.grad_sink = l2.grad_sink = lambda module, op: counts.__setitem__(id(module), counts.get(id(module), 0) + 1)
    model = _CompiledBlock(l1, l2)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)   # fullgraph: a graph break would raise
    gen = torch.Generator().manual_seed(8)
    for step in range(1, 3):
        x0 = torch.randn(2, 3, IN, generator=gen)
        x_eager, x_comp = x0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
        y_eager = model(x_eager)
        y_eager.pow(2).sum().backward()
        y_comp = compiled(x_comp)
        y_comp.pow(2).sum().backward()
        torch.testing.assert_close(y_comp, y_eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x_comp.grad, x_eager.grad, rtol=1e-5, atol=1e-5)
        assert counts == {id(l1): 2 * step, id(l2): 2 * step}  # one eager + one compiled backward per step

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(torch.randn(2, IN, requires_grad=True))
    assert explanation.graph_break_count == 0


class _CodeWriter:
    """A sink that records G = Aᵀ X and then rewrites the layer's codes in place (as the runtime's SR write does):
    a compiled backward must form grad_input before it, and the next forward must read the new codes."""

    def __init__(self):
        self.grads = []

    def __call__(self, module, op):
        G = op.dense()
        self.grads.append(G.clone())
        with torch.no_grad():
            module.weight_q.sub_(torch.sign(G[:, : module.in_features]).to(torch.int8)).clamp_(-127, 127)


@pytest.mark.slow
def test_torch_compile_sink_rewriting_codes_matches_eager():
    """Eager model vs a compiled deep copy, over three steps in which the sinks rewrite the codes: the same outputs,
    input gradients, weight gradients and codes (the copy's sinks reach the copy's layers, not the original's)."""
    import copy

    l1, l2 = _two_layer(seed=11)
    eager = _CompiledBlock(l1, l2)
    twin = copy.deepcopy(eager)
    sinks = {}
    for name, model in (("eager", eager), ("compiled", twin)):
        sinks[name] = (_CodeWriter(), _CodeWriter())
        model.l1.grad_sink, model.l2.grad_sink = sinks[name]
    assert twin.l1._sink_key != eager.l1._sink_key and twin.l2._sink_key != eager.l2._sink_key
    torch._dynamo.reset()
    compiled = torch.compile(twin, fullgraph=True)
    gen = torch.Generator().manual_seed(12)
    for _ in range(3):
        x0 = torch.randn(4, IN, generator=gen)
        x_eager, x_comp = x0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
        y_eager, y_comp = eager(x_eager), compiled(x_comp)
        y_eager.pow(2).sum().backward()
        y_comp.pow(2).sum().backward()
        torch.testing.assert_close(y_comp, y_eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x_comp.grad, x_eager.grad, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(sinks["compiled"], sinks["eager"]):
        assert len(mine.grads) == len(theirs.grads) == 3
        for g_comp, g_eager in zip(mine.grads, theirs.grads):
            torch.testing.assert_close(g_comp, g_eager, rtol=1e-4, atol=1e-5)
    for a, b in ((twin.l1, eager.l1), (twin.l2, eager.l2)):
        assert not torch.equal(a.weight_q, _two_layer(seed=11)[0 if a is twin.l1 else 1].weight_q)  # rewritten
        assert torch.equal(a.weight_q, b.weight_q)


@pytest.mark.slow
def test_torch_compile_sink_fires_without_input_grad():
    """Input and bias need no gradient, a sink is set: the traced layer (no break: the shared anchor leaf) still
    fires the sink once per backward, with autograd's weight gradient."""
    torch.manual_seed(13)
    layer = Int8Linear.from_linear(nn.Linear(IN, OUT), block_size=BLOCK)
    layer.bias.requires_grad_(False)
    rec = Recorder()
    layer.grad_sink = rec
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(3, IN, generator=torch.Generator().manual_seed(14))
    grad_out = torch.randn(3, OUT, generator=torch.Generator().manual_seed(15))
    compiled(x).backward(grad_out)
    assert len(rec.calls) == 1
    torch.testing.assert_close(rec.calls[0][3], _reference_grads(layer, x, grad_out)[2], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("feature", ["int8_matmul", "weight_gather"])
def test_torch_compile_eager_only_features_break_the_graph(feature):
    """int8_matmul and ZeRO-3's weight_gather keep the layer eager under torch.compile: graph breaks at the layers
    (every one for that reason), the same output as the uncompiled layer."""
    l1, l2 = _two_layer(seed=16)
    for layer in (l1, l2):
        if feature == "int8_matmul":
            layer.int8_matmul = True
        else:
            layer.weight_gather = lambda module, phase: (module.weight_q, module.weight_scales)
    model = _CompiledBlock(l1, l2)
    x = torch.randn(2, IN, generator=torch.Generator().manual_seed(17))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count >= 2
    assert all("eager-only Int8Linear feature" in r.reason for r in explanation.break_reasons)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_layers_compiled_one_by_one_share_a_graph_and_reach_their_own_sinks():
    """Regional compilation (each layer compiled on its own, more layers than dynamo's recompile limit of 8): one
    graph serves every layer (the registry key is a tensor input, not a specialised int), and each layer's backward
    reaches its own sink with the gradient eager autograd gives."""
    torch.manual_seed(18)
    layers = [Int8Linear.from_linear(nn.Linear(32, 32), block_size=16) for _ in range(12)]
    received = []
    for layer in layers:
        layer.grad_sink = lambda module, op: received.append((module, op.dense().clone()))
    x0 = torch.randn(4, 32, generator=torch.Generator().manual_seed(19))

    def run(x):
        for layer in layers:
            x = torch.tanh(layer(x))
        x.pow(2).sum().backward()

    run(x0.clone().requires_grad_(True))
    eager = dict((id(m), g) for m, g in received)
    received.clear()
    torch._dynamo.reset()
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]   # the eager run's own kernels count too
    for layer in layers:
        layer.compile()
    run(x0.clone().requires_grad_(True))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before == 1
    assert sorted(id(m) for m, _ in received) == sorted(id(layer) for layer in layers)
    for module, grad in received:
        torch.testing.assert_close(grad, eager[id(module)], rtol=1e-4, atol=1e-6)
