"""Int8Linear: a linear layer whose weight lives as blockwise INT8 and is never a float leaf (DESIGN §3.1, §3.7).

Storage (all buffers, saved in state_dict):
  weight_q       int8 (out, in)             symmetric absmax codes in [-127, 127]
  weight_scales  fp32 (out, ceil(in/block)) one scale per block of `block_size` consecutive input features
  bias           nn.Parameter (out,) float, or None: an ordinary trainable parameter

Forward dequantizes the weight into one transient (out, in) tensor of `compute_dtype` and computes y = x Wᵀ + b.
Backward dequantizes it again (rather than keeping the forward copy alive until backward: that would hold one float
weight per layer for the whole forward/backward gap) and computes grad_input = grad_out @ W. The weight gradient is
never formed here: if `grad_sink` is set, it is called once per backward with the operator
FactoredGrad(A = grad_out (T, out), X = input (T, in)), G = Aᵀ X (or DenseGrad(G) when `dense_grad`), and the
runtime updates the INT8 weight from it inside the backward pass. No weight gradient is returned to autograd.

Ordering the runtime can rely on: grad_input is computed from the forward-time weight before `grad_sink` runs, so
the sink may rewrite weight_q / weight_scales in place. The int8 buffers are saved for backward as references (no
copy); rewriting them in place between a forward and that forward's backward raises autograd's "modified by an
inplace operation" error rather than producing a wrong gradient.

Activation checkpointing (torch.utils.checkpoint, use_reentrant=False) recomputes the forward during backward; the
recomputed graph is never backpropagated, so the sink still fires exactly once per backward.

torch.compile (torch 2.13, CPU, inductor; tests/unit/lowmem/model/test_int8_linear.py::test_torch_compile*): a
compiled model containing Int8Linear traces each layer into its graph, forward and backward (no graph break; the
model compiles with fullgraph=True): the dequantisation is plain q * scales ops in the graph (one fused kernel forms
the matmul's operand), grad_input is traced the same way, and the weight gradient reaches the sink through one opaque custom op
(`lowmem::int8_linear_grad_sink`, registered as side-effectful so no compiler pass drops or hoists it). The op takes
grad_input (or grad_out) as an input it does not read, so it runs after grad_input is formed: the sink may rewrite
the codes it was formed from. The op finds its layer by a per-module key (a registry of weak references), renewed
when a module is copied or unpickled, and passed as a CPU tensor so that layers compiled one by one share a graph.
  - When neither the input nor the bias needs a gradient but a sink is set, the traced path passes the shared leaf
    COMPILE_ANCHOR (made at import: a compiled graph cannot create a tensor that requires grad) so that autograd
    still runs the layer's backward.
  - Eager-only features keep the layer out of the graph (torch.compiler.disable on that path, one graph break per
    layer): ZeRO-3's weight_gather (a collective per use) and int8_matmul (torch._int_mm).

ZeRO-3 (`weight_gather`, hooks.zero3): the forward saves the module's buffers (empty placeholders on a rank that does
not own the weight) and the backward gathers the codes again, so no gathered weight lives from forward to
backward. A checkpoint's recompute is the exception: it runs inside the backward, right before the backward of the
same layer, so it leaves the codes it gathered in `codes_for_backward` and that backward takes them (one gather per
use saved). Not as saved tensors: the checkpoint checks that a recompute saves tensors of the shapes the first
forward saved (the placeholders), and the recompute's own autograd node is never backpropagated.
"""
from __future__ import annotations

import itertools
import math
import weakref
from typing import Callable

import torch
from torch import Tensor, nn

from quant.int8 import dequantize_int8, quantize_int8

from lowmem.model import int8_matmul
from lowmem.optim.linop import DenseGrad, FactoredGrad, GradOperator

GradSink = Callable[["Int8Linear", GradOperator], None]


@torch.compiler.disable(reason="the grad sink is a Python side effect")
def _deliver(module: "Int8Linear", A: Tensor, X: Tensor) -> None:
    """Hand G = Aᵀ X (A (T, out), X (T, in)) to module.grad_sink, then drop it.

    Never traced: the sink is an arbitrary Python side effect (it updates weights and optimizer state), which a
    compiled graph would either reject or run once at trace time instead of every backward.
    """
    op = DenseGrad(A.T.float() @ X.float()) if module.dense_grad else FactoredGrad(A, X)
    module.grad_sink(module, op)
    del op  # the sink keeps what it needs (low-rank products); the (T, m) / (T, n) factors are freed here


# Layers by key, for the custom op below (a compiled graph can carry an int, not a module). Weak: the registry
# never keeps a model alive.
_LAYERS: "weakref.WeakValueDictionary[int, Int8Linear]" = weakref.WeakValueDictionary()
_NEXT_KEY = itertools.count()


def _register(module: "Int8Linear") -> int:
    key = next(_NEXT_KEY)
    _LAYERS[key] = module
    return key


def layer_by_key(key: int) -> "Int8Linear":
    """The live Int8Linear (or subclass) registered under `key` (its `_sink_key`)."""
    return _LAYERS[key]


def key_tensor(key: int) -> Tensor:
    """The registry key as a 0-dim int64 CPU tensor: what the traced paths pass to the custom ops. A tensor, not an
    int, so that layers compiled one by one (regional compilation) share one graph: torch.compile specialises on
    a module's int attributes and would recompile per layer. Read on the host, so never a device sync."""
    return torch.tensor(key, dtype=torch.int64)


@torch.library.custom_op("lowmem::int8_linear_grad_sink", mutates_args=())
def _grad_sink_op(A: Tensor, X: Tensor, after: Tensor, layer_key: Tensor) -> None:
    """_deliver(layer, A, X) as an operator a compiled backward calls at run time. `after` is not read: a data
    dependency that orders this call after grad_input (formed from the codes the sink may rewrite)."""
    del after
    _deliver(layer_by_key(int(layer_key)), A, X)


@_grad_sink_op.register_fake
def _(A: Tensor, X: Tensor, after: Tensor, layer_key: Tensor) -> None:
    return None


# An op with no outputs and no declared mutation looks dead to FX and inductor; this keeps every call.
torch.fx.node.has_side_effect(torch.ops.lowmem.int8_linear_grad_sink.default)

# The traced paths' anchor: a leaf that requires grad, so autograd runs a layer's backward (and its sink) when
# nothing else of its inputs needs a gradient. One shared empty CPU tensor made here, outside any graph (torch.compile
# cannot create a tensor that requires grad); its gradient is always None, so it never holds memory.
COMPILE_ANCHOR = torch.empty(0, requires_grad=True)


def inside_backward() -> bool:
    """Whether autograd's engine is running a backward on this thread (a checkpoint's recompute runs there)."""
    return torch._C._current_graph_task_id() != -1


class _Int8LinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b with W = dequant(q, scales); backward hands G = Aᵀ X to the module's sink.

    Inputs: x (..., in) compute dtype; bias (out,) or None; anchor: an empty tensor requiring grad, passed only
    when nothing else requires grad but the sink must still fire; weight_q / weight_scales: the module's buffers;
    module: the Int8Linear (for block_size, compute_dtype, sink).
    """

    @staticmethod
    def forward(ctx, x, bias, anchor, weight_q, weight_scales, module):
        codes = module.codes("forward")
        y = _int8_forward(module, x, codes)
        if y is None:
            weight = dequantize_int8(*codes, block_size=module.block_size, dtype=x.dtype, check_values=False)
            y = nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))
            del weight
        elif bias is not None:
            y = y + bias.to(x.dtype)
        if module.weight_gather is not None and inside_backward():
            module.codes_for_backward = codes    # a checkpoint's recompute: this layer's backward comes next
        del codes
        # Save x and the int8 codes (references, no copy) -- not the float weight: backward dequantizes again.
        ctx.save_for_backward(x, weight_q, weight_scales)
        ctx.module = module
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight_q, weight_scales = ctx.saved_tensors
        module = ctx.module
        out_features, in_features = module.out_features, module.in_features
        # Under autocast grad_out may come back in another dtype than the forward compute dtype.
        grad_out = grad_out.to(x.dtype)
        grad_x = grad_bias = None
        kept, module.codes_for_backward = module.codes_for_backward, None
        if ctx.needs_input_grad[0]:
            if module.weight_gather is not None:
                weight_q, weight_scales = kept if kept is not None else module.codes("backward")
            grad_x = _int8_grad_input(module, grad_out, (weight_q, weight_scales))
            if grad_x is None:
                weight = dequantize_int8(weight_q, weight_scales, block_size=module.block_size, dtype=x.dtype,
                                         check_values=False)
                grad_x = grad_out @ weight
                del weight
        A = grad_out.reshape(-1, out_features)
        if ctx.needs_input_grad[1]:
            grad_bias = A.sum(0).to(ctx.bias_dtype)
        if module.grad_sink is not None:
            _deliver(module, A, x.reshape(-1, in_features))
        return grad_x, grad_bias, None, None, None, None


class _TracedInt8LinearFunction(torch.autograd.Function):
    """_Int8LinearFunction's path for a caller's torch.compile: y = x Wᵀ + b, W = dequant(q, scales), every op
    traceable; backward forms grad_input the same way and hands A, X to the sink through the custom op.

    Inputs: x (..., in) compute dtype; bias (out,) or None; anchor: COMPILE_ANCHOR when neither x nor bias requires
    grad (else None); weight_q int8 (out, in), weight_scales fp32 (out, blocks); layer_key: the module's registry
    key (key_tensor); has_sink: whether the backward hands the gradient over; block_size.
    """

    @staticmethod
    def forward(ctx, x, bias, anchor, weight_q, weight_scales, layer_key, has_sink, block_size):
        weight = dequantize_int8(weight_q, weight_scales, block_size=block_size, dtype=x.dtype, check_values=False)
        y = nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))
        ctx.save_for_backward(x, weight_q, weight_scales, layer_key)
        ctx.has_sink, ctx.block_size = has_sink, block_size
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight_q, weight_scales, layer_key = ctx.saved_tensors
        grad_out = grad_out.to(x.dtype)
        A = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = dequantize_int8(weight_q, weight_scales, block_size=ctx.block_size, dtype=x.dtype,
                                     check_values=False)
            grad_x = grad_out @ weight
        if ctx.needs_input_grad[1]:
            grad_bias = A.sum(0).to(ctx.bias_dtype)
        if ctx.has_sink:
            torch.ops.lowmem.int8_linear_grad_sink(A, x.reshape(-1, x.shape[-1]),
                                                   grad_x if grad_x is not None else A, layer_key)
        return grad_x, grad_bias, None, None, None, None, None, None


def _int8_forward(module: "Int8Linear", x: Tensor, codes: tuple[Tensor, Tensor]) -> Tensor | None:
    """x Wᵀ through torch._int_mm when module.int8_matmul and the shape fits (lowmem.model.int8_matmul), else None."""
    tokens = x.numel() // module.in_features
    if not module.int8_matmul or not int8_matmul.fits(tokens, module.in_features, module.out_features, x.device):
        return None
    weight_codes, row_scale = int8_matmul.row_codes(*codes, module.block_size)
    y = int8_matmul.linear_int8(x.reshape(tokens, module.in_features), weight_codes, row_scale)
    return y.to(x.dtype).reshape(*x.shape[:-1], module.out_features)


def _int8_grad_input(module: "Int8Linear", grad_out: Tensor, codes: tuple[Tensor, Tensor]) -> Tensor | None:
    """grad_out W through torch._int_mm when module.int8_matmul and the shape fits, else None."""
    tokens = grad_out.numel() // module.out_features
    if not module.int8_matmul or not int8_matmul.fits(tokens, module.out_features, module.in_features,
                                                      grad_out.device):
        return None
    weight_codes, row_scale = int8_matmul.row_codes(*codes, module.block_size)
    grad_x = int8_matmul.grad_input_int8(grad_out.reshape(tokens, module.out_features), weight_codes, row_scale)
    return grad_x.to(grad_out.dtype).reshape(*grad_out.shape[:-1], module.in_features)


class Int8Linear(nn.Module):
    """Linear layer with a blockwise INT8 weight (see module docstring for storage, forward, backward).

    in_features, out_features: weight shape (out, in). block_size: input features per scale (DESIGN default 256).
    compute_dtype: dtype of the transient dequantized weight and of the matmul; inputs are cast to it.
    A freshly constructed layer is initialised like nn.Linear (uniform ±1/sqrt(in)), then quantized.
    """

    dense_grad: bool = False
    # forward and grad_input through torch._int_mm with per-token activation quantisation (approximate; see
    # lowmem.model.int8_matmul); the config's int8_matmul sets it
    int8_matmul: bool = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        block_size: int = 256,
        compute_dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        for what, value in (("in_features", in_features), ("out_features", out_features), ("block_size", block_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{what} must be a positive int, got {value!r}")
        if not isinstance(compute_dtype, torch.dtype) or not compute_dtype.is_floating_point:
            raise TypeError(f"compute_dtype must be a floating torch.dtype, got {compute_dtype!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = block_size
        self.compute_dtype = compute_dtype
        self.grad_sink: GradSink | None = None
        self._sink_key = _register(self)  # how a compiled backward's custom op finds this layer
        self._sink_key_tensor = key_tensor(self._sink_key)
        # ZeRO-3: when set, the codes live on another rank and weight_q / weight_scales are empty placeholders;
        # weight_gather(module, phase) returns the full (weight_q, weight_scales) for this use only.
        self.weight_gather: Callable[["Int8Linear", str], tuple[Tensor, Tensor]] | None = None
        # ZeRO-3 under checkpointing: the codes a recompute gathered, until the backward that follows takes them.
        self.codes_for_backward: tuple[Tensor, Tensor] | None = None
        num_blocks = math.ceil(in_features / block_size)
        device = torch.device(device) if device is not None else None
        if device is not None and device.type == "meta":
            weight_q = torch.empty(out_features, in_features, dtype=torch.int8, device=device)
            weight_scales = torch.empty(out_features, num_blocks, dtype=torch.float32, device=device)
        else:
            bound = 1.0 / math.sqrt(in_features)
            init = torch.empty(out_features, in_features, dtype=torch.float32, device=device).uniform_(-bound, bound)
            weight_q, weight_scales = quantize_int8(init, block_size=block_size)
            del init
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("weight_scales", weight_scales)
        if bias:
            b = torch.empty(out_features, dtype=compute_dtype, device=device)
            if b.device.type != "meta":
                b.uniform_(-1.0 / math.sqrt(in_features), 1.0 / math.sqrt(in_features))
            self.bias = nn.Parameter(b)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, block_size: int = 256, compute_dtype: torch.dtype | None = None
    ) -> "Int8Linear":
        """Quantize an nn.Linear (round-to-nearest). compute_dtype defaults to linear.weight.dtype.

        The bias is copied (same dtype) into a new nn.Parameter; the float weight is not kept.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        if linear.weight.device.type == "meta":
            raise ValueError("from_linear needs a materialised weight, got one on the meta device")
        compute_dtype = linear.weight.dtype if compute_dtype is None else compute_dtype
        # Built on meta (validates the arguments, allocates nothing), then given the real storage.
        module = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            block_size=block_size,
            compute_dtype=compute_dtype,
            device="meta",
        )
        with torch.no_grad():
            module.weight_q, module.weight_scales = quantize_int8(linear.weight.detach().float(), block_size=block_size)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return module

    def codes(self, phase: str = "forward") -> tuple[Tensor, Tensor]:
        """(weight_q, weight_scales) for one use: the buffers, or gathered from their owner under ZeRO-3 (phase
        "forward" / "backward" tells the gatherer which layer to prefetch next)."""
        if self.weight_gather is None:
            return self.weight_q, self.weight_scales
        return self.weight_gather(self, phase)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """W (out, in) in `dtype` (default compute_dtype): a fresh transient tensor, not a view of the storage."""
        weight_q, weight_scales = self.codes("forward")
        return dequantize_int8(weight_q, weight_scales, block_size=self.block_size, dtype=dtype or self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) any float -> (..., out) in compute_dtype. Under torch.compile the layer joins the caller's
        graph unless an eager-only feature is on (module docstring)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Int8Linear expects input (..., {self.in_features}), got {tuple(x.shape)}")
        if torch.compiler.is_compiling() and (self.weight_gather is not None or self.int8_matmul):
            return self._forward_eager(x)
        return self._forward(x)

    @torch.compiler.disable(reason="an eager-only Int8Linear feature is on; see lowmem/model/int8_linear.py")
    def _forward_eager(self, x: Tensor) -> Tensor:
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        x = x.to(self.compute_dtype)
        bias = self.bias
        wants_grad = x.requires_grad or (bias is not None and bias.requires_grad)
        if not torch.is_grad_enabled() or not (wants_grad or self.grad_sink is not None):
            # Plain path: nothing is saved; the transient weight dies with this call. The codes are fetched once
            # (under ZeRO-3 each fetch is a gather).
            codes = self.codes("forward")
            y = _int8_forward(self, x, codes)
            if y is not None:
                return y if bias is None else y + bias.to(self.compute_dtype)
            # the scales' finiteness check is a host read, which a compiled graph cannot hold
            weight = dequantize_int8(*codes, block_size=self.block_size, dtype=self.compute_dtype,
                                     check_values=not torch.compiler.is_compiling())
            return nn.functional.linear(x, weight, None if bias is None else bias.to(self.compute_dtype))
        if torch.compiler.is_compiling():
            return _TracedInt8LinearFunction.apply(x, bias, None if wants_grad else COMPILE_ANCHOR, self.weight_q,
                                                   self.weight_scales, self._sink_key_tensor,
                                                   self.grad_sink is not None, self.block_size)
        # The anchor makes autograd call backward (so the sink fires) when neither x nor bias requires grad.
        anchor = None if wants_grad else torch.empty(0, device=x.device, requires_grad=True)
        return _Int8LinearFunction.apply(x, bias, anchor, self.weight_q, self.weight_scales, self)

    def __setstate__(self, state: dict) -> None:
        # copy.deepcopy and pickle restore __dict__ without __init__: the copy gets a registry key of its own (a
        # shared key would route the copy's weight gradient to the original's sink)
        super().__setstate__(state)
        self._sink_key = _register(self)
        self._sink_key_tensor = key_tensor(self._sink_key)
        self.codes_for_backward = None      # never carried over (and absent from older pickles)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"block_size={self.block_size}, compute_dtype={self.compute_dtype}"
        )
