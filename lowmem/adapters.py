"""Which linear layers a Hugging Face model has, and what each one is (DESIGN §3.2, cross-head projection).

The runtime converts every decoder nn.Linear to Int8Linear and picks a projector per layer; q and k get the
cross-head projector, which needs the head size and the head count (key/value heads for k under grouped-query
attention). An adapter answers those questions for one family of `config.model_type`s:

    adapter = find_adapter(model)
    adapter.split_fused(model)            # GPT-2: fused c_attn -> q/k/v nn.Linear; no-op for LLaMA-style models
    specs = adapter.linear_specs(model)   # [LinearSpec(name, role, layer_index, head_dim, num_heads), ...]

lm_head (the output embedding, often tied to the input one) is never listed: it is trained as a float parameter.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

ROLES = ("q", "k", "v", "o", "mlp", "other")

# "...layers.3..." (LLaMA family) or "...h.3..." (GPT-2): the decoder layer a module belongs to.
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


@dataclass(frozen=True)
class LinearSpec:
    """One convertible linear layer.

    name: dotted module name, e.g. "model.layers.0.self_attn.q_proj".
    role: "q" | "k" | "v" | "o" | "mlp" | "other".
    layer_index: decoder layer index, -1 when the module is outside the decoder stack.
    head_dim: size of one attention head, for q/k only (None otherwise).
    num_heads: attention heads for q, key/value heads for k (grouped-query attention); None for other roles.
    """

    name: str
    role: str
    layer_index: int
    head_dim: int | None = None
    num_heads: int | None = None


def _layer_index(name: str) -> int:
    match = _LAYER_INDEX.search(name + ".")
    return int(match.group(1)) if match else -1


def _config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        raise TypeError(
            f"expected a Hugging Face model with a .config.model_type, got {type(model).__name__} without one"
        )
    return config


def _output_embedding_ids(model: nn.Module) -> set[int]:
    """ids of the modules that produce the logits (lm_head); excluded from the specs."""
    ids = {id(module) for name, module in model.named_modules() if name.split(".")[-1] == "lm_head"}
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        out = get_out()
        if out is not None:
            ids.add(id(out))
    return ids


class ModelAdapter:
    """Per-architecture knowledge. Subclasses set `model_types` and `_roles` (last name component -> role)."""

    model_types: tuple[str, ...] = ()
    _roles: dict[str, str] = {}

    def num_layers(self, model: nn.Module) -> int:
        """Decoder layer count from the config."""
        return int(_config(model).num_hidden_layers)

    def attention_shape(self, model: nn.Module) -> tuple[int, int, int]:
        """(head_dim, num_attention_heads, num_key_value_heads) from the config; kv heads default to all heads."""
        config = _config(model)
        num_heads = int(config.num_attention_heads)
        num_kv_heads = getattr(config, "num_key_value_heads", None)
        num_kv_heads = num_heads if num_kv_heads is None else int(num_kv_heads)
        head_dim = getattr(config, "head_dim", None)
        if head_dim is None:
            hidden = int(config.hidden_size)
            if hidden % num_heads:
                raise ValueError(f"hidden_size {hidden} is not divisible by num_attention_heads {num_heads}")
            head_dim = hidden // num_heads
        return int(head_dim), num_heads, num_kv_heads

    def split_fused(self, model: nn.Module) -> None:
        """Replace fused projections with separate nn.Linear modules in place. Nothing is fused here: no-op."""
        _config(model)

    def _check_unconverted(self, model: nn.Module) -> None:
        """Hook for adapters whose models hold linears that split_fused must convert first."""

    def linear_specs(self, model: nn.Module) -> list[LinearSpec]:
        """Every nn.Linear the runtime may convert, in module order, without lm_head."""
        self._check_unconverted(model)
        head_dim, num_heads, num_kv_heads = self.attention_shape(model)
        skip = _output_embedding_ids(model)
        specs = []
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear) or id(module) in skip:
                continue
            role = self._roles.get(name.split(".")[-1], "other")
            heads = {"q": num_heads, "k": num_kv_heads}.get(role)
            if heads is not None and module.out_features != heads * head_dim:
                # A mismatch means the config does not describe this module: a wrong cross-head split would
                # silently mix heads, so refuse.
                raise ValueError(
                    f"{name}: out_features {module.out_features} != {heads} heads x head_dim {head_dim} "
                    f"from the config; the adapter for {_config(model).model_type!r} does not fit this model"
                )
            specs.append(
                LinearSpec(
                    name=name,
                    role=role,
                    layer_index=_layer_index(name),
                    head_dim=head_dim if heads is not None else None,
                    num_heads=heads,
                )
            )
        return specs


class LlamaAdapter(ModelAdapter):
    """LLaMA-style decoders: separate q/k/v/o_proj, gated MLP (gate/up/down_proj)."""

    model_types = ("llama", "mistral", "qwen2", "qwen3", "smollm")
    _roles = {
        "q_proj": "q",
        "k_proj": "k",
        "v_proj": "v",
        "o_proj": "o",
        "gate_proj": "mlp",
        "up_proj": "mlp",
        "down_proj": "mlp",
    }


class SplitLinear(nn.Module):
    """Separate nn.Linear parts whose outputs, concatenated on the last dim, replace one fused projection.

    parts: (name, nn.Linear) pairs sharing in_features; forward x (..., in) -> (..., Σ out_i).
    """

    def __init__(self, parts: list[tuple[str, nn.Linear]]):
        super().__init__()
        if not parts:
            raise ValueError("SplitLinear needs at least one part")
        self.part_names = tuple(name for name, _ in parts)
        for name, linear in parts:
            self.add_module(name, linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([getattr(self, name)(x) for name in self.part_names], dim=-1)


def _conv1d_to_linear(conv: nn.Module, out_slice: slice | None = None) -> nn.Linear:
    """transformers Conv1D (weight (in, out), y = x W + b) -> nn.Linear (weight (out, in)) with the same output.

    out_slice picks a range of output features (to split a fused projection).
    """
    weight = conv.weight if out_slice is None else conv.weight[:, out_slice]
    bias = None if conv.bias is None else (conv.bias if out_slice is None else conv.bias[out_slice])
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=bias is not None, device="meta")
    # Built on meta so no random init is paid for; real storage is assigned below.
    linear.weight = nn.Parameter(weight.detach().T.contiguous(), requires_grad=conv.weight.requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=conv.bias.requires_grad)
    return linear


def _is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


class GPT2Adapter(ModelAdapter):
    """GPT-2: Conv1D layers (weight (in, out)) and one fused c_attn producing [q | k | v]."""

    model_types = ("gpt2",)
    _roles = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "c_fc": "mlp"}

    def attention_shape(self, model: nn.Module) -> tuple[int, int, int]:
        config = _config(model)
        hidden, num_heads = int(config.hidden_size), int(config.num_attention_heads)
        if hidden % num_heads:
            raise ValueError(f"n_embd {hidden} is not divisible by n_head {num_heads}")
        return hidden // num_heads, num_heads, num_heads

    def split_fused(self, model: nn.Module) -> None:
        """attn.c_attn -> SplitLinear(q_proj, k_proj, v_proj); every other Conv1D -> nn.Linear. Idempotent."""
        _config(model)
        for name, module in list(model.named_modules()):
            if getattr(module, "is_cross_attention", False):
                raise ValueError(f"{name}: GPT-2 cross-attention is not supported (decoder-only models only)")
        with torch.no_grad():
            for name, module in list(model.named_modules()):
                for child_name, child in list(module.named_children()):
                    if not _is_conv1d(child):
                        continue
                    if child_name == "c_attn":
                        hidden = child.weight.shape[0]
                        if child.weight.shape[1] != 3 * hidden:
                            raise ValueError(
                                f"{name}.c_attn: expected weight (hidden, 3*hidden), got {tuple(child.weight.shape)}"
                            )
                        parts = [
                            (part, _conv1d_to_linear(child, slice(k * hidden, (k + 1) * hidden)))
                            for k, part in enumerate(("q_proj", "k_proj", "v_proj"))
                        ]
                        setattr(module, child_name, SplitLinear(parts))
                    else:
                        setattr(module, child_name, _conv1d_to_linear(child))

    def _check_unconverted(self, model: nn.Module) -> None:
        for name, module in model.named_modules():
            if _is_conv1d(module):
                raise ValueError(f"{name} is still a GPT-2 Conv1D: call adapter.split_fused(model) first")

    def linear_specs(self, model: nn.Module) -> list[LinearSpec]:
        specs = super().linear_specs(model)
        # c_proj is the attention output under attn., the MLP down projection under mlp.
        return [
            LinearSpec(s.name, "o" if s.name.endswith("attn.c_proj") else "mlp", s.layer_index)
            if s.name.split(".")[-1] == "c_proj"
            else s
            for s in specs
        ]


_ADAPTERS: tuple[ModelAdapter, ...] = (LlamaAdapter(), GPT2Adapter())


def supported_model_types() -> tuple[str, ...]:
    return tuple(t for adapter in _ADAPTERS for t in adapter.model_types)


def find_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for model.config.model_type; ValueError naming the supported types otherwise."""
    model_type = _config(model).model_type
    for adapter in _ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise ValueError(
        f"no lowmem adapter for model_type {model_type!r}; supported: {', '.join(supported_model_types())}"
    )
