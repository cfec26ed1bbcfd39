"""Which tensors of a model are trained, and how: the one table the optimizer and the fused runtime share.

Every trained tensor gets a stable `param_index` (its noise stream for stochastic rounding and its projector
randomness), so a plain `optimizer.step()` and the fused backward produce the same bits. Kinds:

- "lowrank_int8": the INT8 weight of an `Int8Linear` or `Int8Embedding` (updated through stochastic rounding);
- "lowrank_float": the float weight of an `nn.Linear` or `nn.Embedding` selected by `target_modules` (GaLore on
  float weights);
- "float": every other trainable float parameter (tied or scaled embeddings, lm_head, norms, biases, MoE experts
  stored as 3-D tensors): full-rank AdamW. lm_head is excluded by default ('*lm_head'); without that exclusion an
  untied head is a low-rank linear (its gradient reaches the runtime as an operator from lowmem.model.fused_loss,
  or as any linear's factors on the plain path).

Low-rank weights are ordered as they appear in the model; the stagger of first refreshes spreads over all of them
(L = number of low-rank weights), so a steady-state step refreshes at most ⌈L/T0⌉+1 weights.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import Tensor, nn

from lowmem.config import LowMemConfig, matches
from lowmem.model.int8_linear import Int8Linear
from lowmem.optim.lowrank import LowRankSpec
from lowmem.optim.projector import CrossHead
from lowmem.optim.weights import FloatWeight, Int8Weight, WeightTarget


@dataclass
class Trainable:
    name: str                      # parameter name ("model.layers.0.self_attn.q_proj.weight")
    kind: str                      # "lowrank_int8" | "lowrank_float" | "float"
    tensor: Tensor                 # the Parameter, or the int8 data buffer of an Int8Linear
    config: LowMemConfig           # resolved for this module (overrides applied)
    module: nn.Module | None = None
    spec: LowRankSpec | None = None
    index: int = -1                # position in the table (stable across the optimizer and the runtime)


def _head_layouts(model: nn.Module) -> dict[str, tuple[str, int | None, int | None, int]]:
    """module name -> (role, head_dim, num_heads, layer_index) from the architecture adapter, if there is one."""
    try:
        from lowmem.model.adapters import find_adapter
        adapter = find_adapter(model)
    except TypeError:
        # Not a Hugging Face model: no head layout, so no cross-head projection.
        return {}
    return {s.name: (s.role, s.head_dim, s.num_heads, s.layer_index) for s in adapter.linear_specs(model)}


def shared_weight_ids(model: nn.Module) -> set[int]:
    """ids of parameters registered under more than one name (a head tied to the input embedding)."""
    seen: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[id(param)] = seen.get(id(param), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def is_lowrank_target(module_name: str, module: nn.Module, cfg: LowMemConfig,
                      shared: set[int] = frozenset()) -> bool:
    """A linear or embedding selected by target_modules, not excluded, whose weight is not shared with another module
    (`shared`: from shared_weight_ids; tied input and output embeddings keep one float weight and full-rank AdamW).
    An embedding whose class overrides the lookup (Gemma's scaled embedding multiplies by sqrt(hidden)) stays a
    float parameter: Int8Embedding is a plain lookup and would drop what the override adds."""
    if not isinstance(module, (nn.Linear, nn.Embedding, Int8Linear)):
        return False
    if isinstance(module, nn.Embedding) and type(module).forward is not nn.Embedding.forward:
        return False
    if isinstance(module, (nn.Linear, nn.Embedding)) and id(module.weight) in shared:
        return False
    return matches(module_name, cfg.target_modules) and not matches(module_name, cfg.exclude_modules)


def _vocabulary_tables(model: nn.Module) -> set[int]:
    """ids of the input embedding and output head modules (get_input_embeddings / get_output_embeddings), if any."""
    found = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError, TypeError):
            continue
        if module is not None:
            found.add(id(module))
    return found


def collect_trainables(model: nn.Module, cfg: LowMemConfig) -> list[Trainable]:
    """The ordered table of trained tensors. Frozen (requires_grad False or cfg.freeze) tensors are left out."""
    layouts = _head_layouts(model)
    lowrank_modules: dict[str, nn.Module] = {}
    shared = shared_weight_ids(model)
    for module_name, module in model.named_modules():
        if is_lowrank_target(module_name, module, cfg, shared):
            lowrank_modules[module_name] = module

    table: list[Trainable] = []
    lowrank_weight_ids = set()
    tables = _vocabulary_tables(model)
    for module_name, module in lowrank_modules.items():
        base = dataclasses.replace(cfg, scale=cfg.vocab_scale) if id(module) in tables else cfg
        module_cfg = base.for_module(module_name)
        if matches(f"{module_name}.weight", cfg.freeze):
            continue
        if isinstance(module, Int8Linear):
            tensor, kind = module.weight_q, "lowrank_int8"
        else:
            if not module.weight.requires_grad:
                continue
            tensor, kind = module.weight, "lowrank_float"
        lowrank_weight_ids.add(id(tensor))
        table.append(Trainable(f"{module_name}.weight", kind, tensor, module_cfg, module))

    num_lowrank = len(table)
    for ordinal, item in enumerate(table):
        module_name = item.name[: -len(".weight")]
        role, head_dim, num_heads, _ = layouts.get(module_name, ("other", None, None, -1))
        cross = None
        if role in ("q", "k") and head_dim and num_heads and matches(module_name, item.config.cross_head_modules):
            cross = CrossHead(head_dim=head_dim, num_heads=num_heads)
        shape = tuple(item.tensor.shape)
        item.spec = LowRankSpec(name=item.name, shape=shape, param_index=ordinal, layer_index=ordinal,
                                num_layers=num_lowrank, cross_head=cross,
                                residual=matches(module_name, item.config.residual_modules))

    for param_name, param in model.named_parameters():
        if id(param) in lowrank_weight_ids or not param.requires_grad or matches(param_name, cfg.freeze):
            continue
        if not param.is_floating_point():
            continue
        owner = param_name.rsplit(".", 1)[0] if "." in param_name else ""
        table.append(Trainable(param_name, "float", param, cfg.for_module(owner)))
    for index, item in enumerate(table):
        item.index = index
    return table


# Noise streams of full-rank float parameters start here, above every low-rank param_index, so no two tensors
# share a stream.
FLOAT_SR_STREAM_BASE = 1 << 40


def sr_key(item: Trainable) -> tuple[int, int] | None:
    """(seed, stream) of `item`'s stochastic-rounding noise, or None when config.stochastic_rounding is off.
    Low-rank weights use their param_index (as the INT8 path always did); full-rank float parameters
    FLOAT_SR_STREAM_BASE + their table index."""
    if not item.config.stochastic_rounding:
        return None
    if item.spec is not None:
        return item.config.seed, item.spec.param_index
    return item.config.seed, FLOAT_SR_STREAM_BASE + item.index


def weight_target(item: Trainable) -> WeightTarget:
    """Where a low-rank update of `item` lands: its INT8 data or its float weight, both with stochastic rounding
    keyed by the parameter index when config.stochastic_rounding (a float weight only rounds when it is bf16)."""
    if item.kind == "lowrank_int8":
        module = item.module
        return Int8Weight(module.weight_q, module.weight_scales, block_size=module.block_size,
                          seed=item.config.seed, stream=item.spec.param_index,
                          stochastic=item.config.stochastic_rounding)
    return FloatWeight(item.tensor.data, sr_key=sr_key(item))
