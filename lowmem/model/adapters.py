"""Which linear layers a Hugging Face model has, what each one is, and how its names map to the original checkpoint:
one adapter per layout (DESIGN §3.2, §3.10).

Every decoder-only transformers model has an adapter: the generic `ModelAdapter` (lowmem.model.generic_adapter) for
models whose module names match their checkpoint; the classes here only say what differs (fused projections,
GPT-2's Conv1D; the layouts are transformers 5's modeling code):

    adapter = find_adapter(model)
    adapter.split_fused(model)            # fused qkv / gate_up -> SplitLinear of separate nn.Linear; else no-op
    specs = adapter.linear_specs(model)   # [LinearSpec(name, role, layer_index, head_dim, num_heads), ...]
    adapter.to_hf_state_dict(model, sd)   # export: lowmem module names/layouts -> the original checkpoint's
    adapter.model_tensors_from_hf(model, hf_name, tensor)   # loading: one checkpoint tensor -> the split model's
"""
from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch
from torch import Tensor, nn

from lowmem.model.fused_split import FusedLayout, SplitLinear, split_linear
from lowmem.model.generic_adapter import ROLES, LinearSpec, ModelAdapter, _config, _submodule

__all__ = ["ROLES", "LinearSpec", "ModelAdapter", "SplitLinear", "FusedLayout", "Phi3Adapter", "Glm4Adapter",
           "GPTNeoXAdapter", "GPTBigCodeAdapter", "FalconAdapter", "GPT2Adapter", "find_adapter"]


class Phi3Adapter(ModelAdapter):
    """Phi-3: qkv_proj = [q | k | v], gate_up_proj = [gate | up]."""

    model_types = ("phi3",)
    fused = {"qkv_proj": "_qkv_blocks", "gate_up_proj": "_gate_up_halves"}


class Glm4Adapter(ModelAdapter):
    """GLM-4: separate q/k/v, gate_up_proj = [gate | up]."""

    model_types = ("glm4",)
    fused = {"gate_up_proj": "_gate_up_halves"}


class GPTNeoXAdapter(ModelAdapter):
    """GPT-NeoX (Pythia) and BLOOM: query_key_value interleaved per head, [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] (their
    forwards view the output as (..., heads, 3, head_dim)). No grouped-query attention."""

    model_types = ("gpt_neox", "bloom")
    fused = {"query_key_value": "_qkv_per_head"}

    def attention_shape(self, model: nn.Module) -> tuple[int, int, int]:
        head_dim, heads, _ = super().attention_shape(model)
        return head_dim, heads, heads


class GPTBigCodeAdapter(ModelAdapter):
    """GPTBigCode (StarCoder 1, SantaCoder): an nn.Linear c_attn, [q | k | v] with one key/value head under
    multi_query (the default), else interleaved per head as GPT-NeoX."""

    model_types = ("gpt_bigcode",)
    fused = {"c_attn": "_qkv_blocks_or_per_head"}

    def attention_shape(self, model: nn.Module) -> tuple[int, int, int]:
        # GPTBigCodeAttention's rule; the config's own num_key_value_heads can disagree (set from the default
        # n_head before a caller's n_head applies).
        head_dim, heads, _ = super().attention_shape(model)
        return head_dim, heads, 1 if getattr(_config(model), "multi_query", True) else heads


class FalconAdapter(ModelAdapter):
    """Falcon's query_key_value, three layouts (FalconAttention._split_heads):
    new_decoder_architecture: per key/value group [q heads of the group | k | v]; multi_query: [q | k | v] with one
    key/value head; otherwise per head [q_h k_h v_h] as GPT-NeoX."""

    model_types = ("falcon",)
    fused = {"query_key_value": "_falcon_qkv"}

    def attention_shape(self, model: nn.Module) -> tuple[int, int, int]:
        config = _config(model)
        head_dim, heads, _ = super().attention_shape(model)
        if getattr(config, "new_decoder_architecture", False):
            kv_heads = int(config.num_kv_heads)
        else:
            kv_heads = 1 if getattr(config, "multi_query", True) else heads
        return head_dim, heads, kv_heads

    def _falcon_qkv(self, model: nn.Module, linear: nn.Linear) -> FusedLayout:
        config = _config(model)
        head_dim, heads, kv_heads = self.attention_shape(model)
        if getattr(config, "new_decoder_architecture", False):
            if heads % kv_heads:
                raise ValueError(f"falcon: {heads} attention heads are not a multiple of {kv_heads} kv heads")
            return FusedLayout((("q_proj", heads // kv_heads * head_dim), ("k_proj", head_dim),
                                ("v_proj", head_dim)), groups=kv_heads)
        return self._qkv_blocks_or_per_head(model, linear)


def _conv1d_to_linear(conv: nn.Module) -> nn.Linear:
    """transformers Conv1D (weight (in, out), y = x W + b) -> nn.Linear (weight (out, in)) with the same output."""
    linear = nn.Linear(conv.weight.shape[0], conv.weight.shape[1], bias=conv.bias is not None, device="meta")
    # Built on meta so no random init is paid for; real storage (or meta again) is assigned below.
    linear.weight = nn.Parameter(conv.weight.detach().T.contiguous(), requires_grad=conv.weight.requires_grad)
    if conv.bias is not None:
        linear.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=conv.bias.requires_grad)
    return linear


def _is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


class GPT2Adapter(ModelAdapter):
    """GPT-2: Conv1D layers (weight (in, out)) and one fused c_attn producing [q | k | v]."""

    model_types = ("gpt2",)
    # Conv1D modules of the original GPT-2 block; split_fused turns them into nn.Linear / SplitLinear.
    _conv1d_names = ("c_attn", "c_proj", "c_fc")

    def split_fused(self, model: nn.Module) -> None:
        """attn.c_attn -> SplitLinear(q_proj, k_proj, v_proj); every other Conv1D -> nn.Linear. Idempotent; works
        on `meta` parameters."""
        _config(model)
        for name, module in list(model.named_modules()):
            if getattr(module, "is_cross_attention", False):
                raise ValueError(f"{name}: GPT-2 cross-attention is not supported (decoder-only models only)")
        with torch.no_grad():
            for name, module in list(model.named_modules()):
                for child_name, child in list(module.named_children()):
                    if not _is_conv1d(child):
                        continue
                    linear = _conv1d_to_linear(child)
                    if child_name == "c_attn":
                        hidden = linear.in_features
                        if linear.out_features != 3 * hidden:
                            raise ValueError(f"{name}.c_attn: expected weight (hidden, 3*hidden), got "
                                             f"{tuple(child.weight.shape)}")
                        linear = split_linear(linear, FusedLayout((("q_proj", hidden), ("k_proj", hidden),
                                                                   ("v_proj", hidden))))
                    setattr(module, child_name, linear)

    def _check_unconverted(self, model: nn.Module) -> None:
        for name, module in model.named_modules():
            if _is_conv1d(module):
                raise ValueError(f"{name} is still a GPT-2 Conv1D: call adapter.split_fused(model) first")

    def _converted_conv1d(self, model: nn.Module, key: str, ndim: int) -> bool:
        """key is the weight of a Conv1D that split_fused converted (so its layout is transposed in the checkpoint)."""
        prefix, _, leaf = key.rpartition(".")
        if leaf != "weight" or prefix.split(".")[-1] not in self._conv1d_names or ndim != 2:
            return False
        module = _submodule(model, prefix)
        return module is not None and not _is_conv1d(module)

    def to_hf_state_dict(self, model: nn.Module, sd: dict) -> dict:
        """Undo split_fused for export: q/k/v fused into "<...>.c_attn.weight" / ".bias", then every converted
        Conv1D weight (out, in) back to Conv1D layout (in, out). Modules still Conv1D pass through."""
        out = super().to_hf_state_dict(model, sd)
        for key, entry in out.items():
            if self._converted_conv1d(model, key, len(entry.shape)):
                out[key] = replace(entry, shape=tuple(entry.shape[::-1]), load=partial(_transposed, entry))
        return out

    def model_tensors_from_hf(self, model: nn.Module, hf_name: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        """Conv1D weights (in, out) transposed to nn.Linear's (out, in), c_attn split into q/k/v parts."""
        if self._converted_conv1d(model, hf_name, tensor.dim()):
            tensor = tensor.T
        return [(name, part.contiguous()) for name, part in super().model_tensors_from_hf(model, hf_name, tensor)]


def _transposed(entry) -> Tensor:
    return entry.load().T.contiguous()


_GENERIC = ModelAdapter()
_ADAPTERS: dict[str, ModelAdapter] = {
    model_type: adapter
    for adapter in (Phi3Adapter(), Glm4Adapter(), GPTNeoXAdapter(), GPTBigCodeAdapter(), FalconAdapter(),
                    GPT2Adapter())
    for model_type in adapter.model_types
}


def find_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for model.config.model_type: a specific one where the layout differs (fused projections,
    Conv1D), the generic ModelAdapter for every other Hugging Face model. TypeError for a model without a config."""
    return _ADAPTERS.get(_config(model).model_type, _GENERIC)
