"""The generic model adapter: what any Hugging Face decoder's linear layers are, and the identity mapping to its
checkpoint (DESIGN §3.2 cross-head projection, §3.10 architectures). lowmem.model.adapters holds the subclasses for
layouts that differ and `find_adapter`.

`ModelAdapter` reads the attention head layout from the config (num_attention_heads / n_head / ..., key/value heads,
head_dim), checks it against the q/k shapes it finds by their usual names, and warns once when it finds none that
fits (q/k then train as ordinary linears). A subclass names its fused projections (`fused`), which split_fused turns
into SplitLinear parts and to_hf_state_dict / model_tensors_from_hf map back and forth.

lm_head (the output embedding, often tied to the input one) is never listed: lowmem.model.trainables decides it.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import Tensor, nn

from lowmem.model.fused_split import FusedLayout, SplitLinear, split_linear
from lowmem.model.int8_embedding import Int8Embedding
from lowmem.model.int8_linear import Int8Linear

ROLES = ("q", "k", "v", "o", "mlp", "other")

# "...layers.3..." (LLaMA family) or "...h.3..." (GPT-2, Falcon): the decoder layer a module belongs to.
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")

# Last name component -> role. Names shared by attention and MLP ("dense", "c_proj", "out_proj") are "o" under a
# module whose name mentions attention, "mlp" otherwise.
_ROLE_NAMES = {
    "q": ("q_proj", "query", "q", "wq", "query_proj"),
    "k": ("k_proj", "key", "k", "wk", "key_proj"),
    "v": ("v_proj", "value", "v", "wv", "value_proj"),
    "o": ("o_proj", "wo"),
    "mlp": ("gate_proj", "up_proj", "down_proj", "fc1", "fc2", "c_fc", "dense_h_to_4h", "dense_4h_to_h",
            "w1", "w2", "w3", "gate_up_proj", "fc_in", "fc_out"),
}
_ROLE_OF = {name: role for role, names in _ROLE_NAMES.items() for name in names}
_ATTENTION_OR_MLP = ("dense", "c_proj", "out_proj")

# Config attribute names for the head layout, in order of preference (transformers' own, then older spellings).
_HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads", "n_heads")
_KV_HEAD_KEYS = ("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num")
_HEAD_DIM_KEYS = ("head_dim", "head_size", "kv_channels", "attention_head_size")
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")


@dataclass(frozen=True)
class LinearSpec:
    """One convertible linear layer.

    name: dotted module name, e.g. "model.layers.0.self_attn.q_proj".
    role: "q" | "k" | "v" | "o" | "mlp" | "other".
    layer_index: decoder layer index, -1 when the module is outside the decoder stack.
    head_dim: size of one attention head, for q/k with a known head layout (None otherwise).
    num_heads: attention heads for q, key/value heads for k (grouped-query attention); None when head_dim is.
    """

    name: str
    role: str
    layer_index: int
    head_dim: int | None = None
    num_heads: int | None = None


def _layer_index(name: str) -> int:
    match = _LAYER_INDEX.search(name + ".")
    return int(match.group(1)) if match else -1


def _role(name: str) -> str:
    parent, _, last = name.rpartition(".")
    if last in _ATTENTION_OR_MLP:
        return "o" if "att" in parent.split(".")[-1].lower() else "mlp"
    return _ROLE_OF.get(last, "other")


def _config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        raise TypeError(
            f"expected a Hugging Face model with a .config.model_type, got {type(model).__name__} without one"
        )
    return config


def _first_int(config, keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


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
    """The generic adapter (any decoder whose module names match its checkpoint); subclasses set `model_types`
    and `fused`: {last name component of a fused nn.Linear: method name building its FusedLayout from the model}."""

    model_types: tuple[str, ...] = ()
    fused: dict[str, str] = {}

    def num_layers(self, model: nn.Module) -> int:
        """Decoder layer count from the config."""
        return int(_first_int(_config(model), ("num_hidden_layers", "n_layer", "num_layers")))

    def attention_shape(self, model: nn.Module) -> tuple[int, int, int]:
        """(head_dim, num_attention_heads, num_key_value_heads) from the config; kv heads default to all heads,
        head_dim to hidden / heads. ValueError when the config names no head count or the sizes do not divide."""
        config = _config(model)
        num_heads = _first_int(config, _HEAD_KEYS)
        if num_heads is None:
            raise ValueError(f"the config of model_type {config.model_type!r} has none of {', '.join(_HEAD_KEYS)}")
        num_kv_heads = _first_int(config, _KV_HEAD_KEYS)
        if num_kv_heads is None:
            num_kv_heads = 1 if getattr(config, "multi_query", False) else num_heads
        head_dim = _first_int(config, _HEAD_DIM_KEYS)
        if head_dim is None:
            hidden = _first_int(config, _HIDDEN_KEYS)
            if hidden is None or hidden % num_heads:
                raise ValueError(f"hidden size {hidden} is not divisible by {num_heads} attention heads")
            head_dim = hidden // num_heads
        return int(head_dim), num_heads, num_kv_heads

    # ---- fused projections ----

    def split_fused(self, model: nn.Module) -> None:
        """Replace each fused projection (a module named in `fused`) by a SplitLinear of separate nn.Linear parts,
        in place. Idempotent; works on a skeleton whose parameters are on `meta` (no data is read)."""
        _config(model)
        with torch.no_grad():
            for name, module in list(model.named_modules()):
                for child_name, child in list(module.named_children()):
                    builder = self.fused.get(child_name)
                    if builder is not None and isinstance(child, nn.Linear):   # a SplitLinear is not one
                        setattr(module, child_name, split_linear(child, getattr(self, builder)(model, child)))

    def _check_unconverted(self, model: nn.Module) -> None:
        for name, module in model.named_modules():
            if name.split(".")[-1] in self.fused and isinstance(module, (nn.Linear, Int8Linear)):
                raise ValueError(f"{name} is still a fused projection: call adapter.split_fused(model) first")

    def _qkv_blocks(self, model: nn.Module, linear: nn.Linear) -> FusedLayout:
        """[q | k | v] one after the other (phi3 qkv_proj)."""
        head_dim, heads, kv_heads = self.attention_shape(model)
        return FusedLayout((("q_proj", heads * head_dim), ("k_proj", kv_heads * head_dim),
                            ("v_proj", kv_heads * head_dim)))

    def _qkv_per_head(self, model: nn.Module, linear: nn.Linear) -> FusedLayout:
        """[q_0 k_0 v_0 | q_1 k_1 v_1 | ...], one group per head (gpt_neox, bloom query_key_value)."""
        head_dim, heads, _ = self.attention_shape(model)
        return FusedLayout((("q_proj", head_dim), ("k_proj", head_dim), ("v_proj", head_dim)), groups=heads)

    def _qkv_blocks_or_per_head(self, model: nn.Module, linear: nn.Linear) -> FusedLayout:
        """Multi-query (one key/value head): [q | k | v]; otherwise per head (falcon, gpt_bigcode)."""
        _, _, kv_heads = self.attention_shape(model)
        return self._qkv_blocks(model, linear) if kv_heads == 1 else self._qkv_per_head(model, linear)

    def _gate_up_halves(self, model: nn.Module, linear: nn.Linear) -> FusedLayout:
        """[gate | up], halves of the output (phi3 / glm4 gate_up_proj: `gate, up = y.chunk(2, dim=-1)`)."""
        if linear.out_features % 2:
            raise ValueError(f"gate_up_proj has an odd out_features {linear.out_features}")
        half = linear.out_features // 2
        return FusedLayout((("gate_proj", half), ("up_proj", half)))

    # ---- head layout ----

    def linear_specs(self, model: nn.Module) -> list[LinearSpec]:
        """Every nn.Linear (or Int8Linear it was converted to) the runtime trains, in module order, without lm_head.

        q/k get their head layout when the config's (attention_shape) matches their out_features; otherwise, or
        when no q/k is found, one warning says cross-head projection is off for this model and q/k train as
        ordinary linears."""
        self._check_unconverted(model)
        config = _config(model)
        try:
            head_dim, num_heads, num_kv_heads = self.attention_shape(model)
            problem = None
        except ValueError as err:
            head_dim = num_heads = num_kv_heads = None
            problem = str(err)
        skip = _output_embedding_ids(model)
        specs, found = [], set()
        for name, module in model.named_modules():
            if not isinstance(module, (nn.Linear, Int8Linear)) or isinstance(module, Int8Embedding) \
                    or id(module) in skip:
                continue
            role = _role(name)
            heads = {"q": num_heads, "k": num_kv_heads}.get(role)
            if role in ("q", "k"):
                found.add(role)
                if heads is not None and module.out_features != heads * head_dim:
                    # A wrong cross-head split would silently mix heads: train this one as an ordinary linear.
                    problem = problem or (f"{name}: out_features {module.out_features} != {heads} heads x head_dim "
                                          f"{head_dim} from the config")
                    heads = None
            specs.append(LinearSpec(name=name, role=role, layer_index=_layer_index(name),
                                    head_dim=head_dim if heads is not None else None, num_heads=heads))
        if problem is None and found != {"q", "k"}:
            problem = (f"no {' and no '.join(sorted({'q', 'k'} - found))} projection found by the names "
                       f"{', '.join(_ROLE_NAMES['q'] + _ROLE_NAMES['k'])}")
        if problem is not None:
            warnings.warn(f"lowmem: cross-head projection is off for model_type {config.model_type!r} ({problem}); "
                          "q/k without a head layout train as ordinary linears", stacklevel=2)
        return specs

    # ---- checkpoint names and layouts ----

    def to_hf_state_dict(self, model: nn.Module, sd: dict) -> dict:
        """Rename / re-layout an export state dict into what the original Hugging Face architecture loads.

        sd: ordered {name: entry} under the prepared model's module names, every linear weight (nn.Linear or
        Int8Linear) already under "<module>.weight" in nn.Linear layout (out, in). Entries are
        `lowmem.checkpoint.export.LazyTensor`s (frozen dataclasses with shape, dtype, load() -> Tensor): a mapping
        builds new entries with dataclasses.replace and composes their load(), so nothing is materialised here.
        Returns a new ordered dict: each SplitLinear's parts fused back under "<module>.weight" / ".bias" (in the
        place of its first part), everything else unchanged.
        """
        fused: dict[str, list[tuple]] = {}  # first key of a SplitLinear -> the fused (name, entry) pairs in its place
        consumed: set[str] = set()
        for name, module in model.named_modules(remove_duplicate=False):
            if not isinstance(module, SplitLinear):
                continue
            weights = [f"{name}.{part}.weight" for part in module.part_names]
            biases = [f"{name}.{part}.bias" for part in module.part_names]
            missing = [key for key in weights if key not in sd]
            if missing:
                raise ValueError(f"{name}: cannot fuse for export, no entries for {missing}")
            has_bias = [key in sd for key in biases]
            if any(has_bias) and not all(has_bias):
                raise ValueError(f"{name}: some parts of the fused projection have a bias and some do not")
            parts = [sd[key] for key in weights]
            if len({tuple(entry.shape[1:]) for entry in parts}) != 1 or any(len(e.shape) != 2 for e in parts):
                raise ValueError(f"{name}: part weights must be 2-D with one in_features, got "
                                 f"{[tuple(entry.shape) for entry in parts]}")
            entries = [(f"{name}.weight", self._fused_entry(module.layout, parts))]
            if all(has_bias):
                entries.append((f"{name}.bias", self._fused_entry(module.layout, [sd[key] for key in biases])))
            part_keys = set(weights) | set(biases)
            fused[next(key for key in sd if key in part_keys)] = entries
            consumed |= part_keys
        out = {}
        for key, entry in sd.items():
            if key in consumed:
                out.update(fused.get(key, ()))
            else:
                out[key] = entry
        return out

    @staticmethod
    def _fused_entry(layout: FusedLayout, parts: list):
        return replace(parts[0], shape=(layout.out_features, *parts[0].shape[1:]),
                       load=partial(_load_fused, layout, parts))

    def model_tensors_from_hf(self, model: nn.Module, hf_name: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        """The inverse of to_hf_state_dict for one checkpoint tensor: (name in the split model, tensor) pairs.

        model: split by split_fused (its parameters may be on `meta`); hf_name: a key of the original checkpoint
        (model.state_dict() names before the split); tensor: its value in the checkpoint's layout. A fused weight
        or bias becomes one tensor per part (contiguous); anything else passes through unchanged.
        """
        prefix, _, leaf = hf_name.rpartition(".")
        module = _submodule(model, prefix)
        if isinstance(module, SplitLinear) and leaf in ("weight", "bias"):
            pieces = module.layout.split(tensor)
            return [(f"{prefix}.{part}.{leaf}", piece.contiguous()) for part, piece in zip(module.part_names, pieces)]
        return [(hf_name, tensor)]


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name) if name else model
    except AttributeError:
        return None


def _load_fused(layout: FusedLayout, parts: list) -> Tensor:
    """parts: entries of the parts' (rows_i * groups, ...) tensors -> the fused tensor, one part loaded at a time."""
    fused, offset = None, 0
    for entry, (_, rows) in zip(parts, layout.parts):
        tensor = entry.load()
        rest = tuple(tensor.shape[1:])
        if fused is None:
            fused = tensor.new_empty((layout.out_features, *rest))
        grouped = fused.view(layout.groups, layout.group_rows, *rest)
        grouped[:, offset:offset + rows] = tensor.reshape(layout.groups, rows, *rest)
        offset += rows
        del tensor  # freed before the next part is loaded
    return fused
