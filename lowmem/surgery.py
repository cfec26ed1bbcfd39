"""Model surgery: turn the target nn.Linear layers of a model into Int8Linear, one layer at a time.

Each layer is quantised and its float weight released before the next one is touched, so the peak is the model plus
one layer, never two copies of the model. GPT-2-style fused projections are split first (lowmem.adapters) so q and k
are separate weights that cross-head projection can treat.
"""
from __future__ import annotations

from torch import nn

from lowmem.config import LowMemConfig
from lowmem.int8_linear import Int8Linear
from lowmem.trainables import is_lowrank_target


def split_fused_projections(model: nn.Module) -> None:
    """Apply the architecture adapter's split of fused q/k/v, when the model has an adapter that needs it."""
    try:
        from lowmem.adapters import find_adapter
        adapter = find_adapter(model)
    except (TypeError, ValueError):
        return
    adapter.split_fused(model)


def convert_linears_to_int8(model: nn.Module, cfg: LowMemConfig) -> list[str]:
    """Replace every target nn.Linear (cfg.target_modules minus exclude_modules, trainable, not frozen) by an
    Int8Linear holding the round-to-nearest quantised weight. Returns the converted module names."""
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and is_lowrank_target(name, module, cfg)]
    converted = []
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        quantised = Int8Linear.from_linear(linear, block_size=cfg.weight_block_size,
                                           compute_dtype=linear.weight.dtype)
        setattr(parent, child, quantised)
        # Release the float weight now (the module may still be referenced elsewhere, e.g. by a hook list).
        linear.weight = None
        converted.append(name)
    return converted
