"""Which linear layers a Hugging Face model has, and what each one is (DESIGN §3.2, cross-head projection).

The runtime converts every decoder nn.Linear to Int8Linear and picks a projector per layer; q and k get the
cross-head projector, which needs the head size and the head count (key/value heads for k under grouped-query
attention). An adapter answers those questions for one family of `config.model_type`s:

    adapter = find_adapter(model)
    adapter.split_fused(model)            # GPT-2: fused c_attn -> q/k/v nn.Linear; no-op for LLaMA-style models
    specs = adapter.linear_specs(model)   # [LinearSpec(name, role, layer_index, head_dim, num_heads), ...]
    adapter.to_hf_state_dict(model, sd)   # export: lowmem module names/layouts -> the original HF checkpoint's

lm_head (the output embedding, often tied to the input one) is never listed: it is trained as a float parameter.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import nn

from lowmem.model.int8_embedding import Int8Embedding
from lowmem.model.int8_linear import Int8Linear

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
        """Every nn.Linear (or Int8Linear it was converted to) the runtime trains, in module order, without lm_head."""
        self._check_unconverted(model)
        head_dim, num_heads, num_kv_heads = self.attention_shape(model)
        skip = _output_embedding_ids(model)
        specs = []
        for name, module in model.named_modules():
            if not isinstance(module, (nn.Linear, Int8Linear)) or isinstance(module, Int8Embedding) \
                    or id(module) in skip:
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


    def to_hf_state_dict(self, model: nn.Module, sd: dict) -> dict:
        """Rename / re-layout an export state dict into what the original Hugging Face architecture loads.

        sd: ordered {name: entry} under the prepared model's module names, every linear weight (nn.Linear or
        Int8Linear) already under "<module>.weight" in nn.Linear layout (out, in). Entries are
        `lowmem.checkpoint.export.LazyTensor`s (frozen dataclasses with shape, dtype, load() -> Tensor): a mapping builds new
        entries with dataclasses.replace and composes their load(), so nothing is materialised here.
        Returns a new ordered dict. LLaMA-style models keep HF's names and layouts: identity.
        """
        return dict(sd)


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


    # Conv1D modules of the original GPT-2 block; split_fused turned them into nn.Linear / SplitLinear.
    _conv1d_names = ("c_attn", "c_proj", "c_fc")

    def to_hf_state_dict(self, model: nn.Module, sd: dict) -> dict:
        """Undo split_fused for export: SplitLinear q/k/v -> "<...>.c_attn.weight" (in, 3*hidden) and ".bias",
        converted c_proj / c_fc weights (out, in) -> Conv1D layout (in, out). Modules still Conv1D pass through.

        Each fused weight is filled one part at a time, so its load() holds the (in, 3*hidden) output and one
        part's (hidden, in) weight at most.
        """
        fused: dict[str, list[tuple]] = {}  # first key of a SplitLinear -> the fused (name, entry) pairs in its place
        consumed: set[str] = set()
        for name, module in model.named_modules(remove_duplicate=False):
            if not isinstance(module, SplitLinear) or name.split(".")[-1] != "c_attn":
                continue
            weights = [f"{name}.{part}.weight" for part in module.part_names]
            biases = [f"{name}.{part}.bias" for part in module.part_names]
            missing = [key for key in weights if key not in sd]
            if missing:
                raise ValueError(f"{name}: cannot fuse for export, no entries for {missing}")
            has_bias = [key in sd for key in biases]
            if any(has_bias) and not all(has_bias):
                raise ValueError(f"{name}: some q/k/v parts have a bias and some do not; GPT-2's c_attn needs all")
            parts = [sd[key] for key in weights]
            if len({tuple(entry.shape[1:]) for entry in parts}) != 1 or any(len(e.shape) != 2 for e in parts):
                raise ValueError(f"{name}: q/k/v weights must be 2-D with one in_features, got "
                                 f"{[tuple(entry.shape) for entry in parts]}")
            total_out = sum(entry.shape[0] for entry in parts)
            entries = [(f"{name}.weight", replace(parts[0], shape=(parts[0].shape[1], total_out),
                                                  load=partial(self._fused_conv1d_weight, parts)))]
            if all(has_bias):
                bias_parts = [sd[key] for key in biases]
                entries.append((f"{name}.bias", replace(bias_parts[0], shape=(total_out,),
                                                        load=partial(self._concatenated, bias_parts))))
            part_keys = set(weights) | set(biases)
            fused[next(key for key in sd if key in part_keys)] = entries
            consumed |= part_keys

        out = {}
        for key, entry in sd.items():
            if key in consumed:
                out.update(fused.get(key, ()))
                continue
            prefix, _, leaf = key.rpartition(".")
            if leaf == "weight" and prefix.split(".")[-1] in self._conv1d_names and len(entry.shape) == 2:
                module = model.get_submodule(prefix)
                if not _is_conv1d(module):  # converted by split_fused: back to (in, out)
                    entry = replace(entry, shape=tuple(entry.shape[::-1]), load=partial(self._transposed, entry))
            out[key] = entry
        return out

    @staticmethod
    def _fused_conv1d_weight(parts: list) -> torch.Tensor:
        """parts: entries of Linear weights (out_i, in) -> Conv1D weight (in, Σ out_i), one part loaded at a time."""
        total_out = sum(entry.shape[0] for entry in parts)
        fused, offset = None, 0
        for entry in parts:
            weight = entry.load()
            if fused is None:
                fused = weight.new_empty((weight.shape[1], total_out))
            fused[:, offset:offset + weight.shape[0]] = weight.T
            offset += weight.shape[0]
            del weight  # freed before the next part is loaded
        return fused

    @staticmethod
    def _concatenated(parts: list) -> torch.Tensor:
        return torch.cat([entry.load() for entry in parts])

    @staticmethod
    def _transposed(entry) -> torch.Tensor:
        return entry.load().T.contiguous()


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
