"""Model surgery: turn the target nn.Linear layers of a model into Int8Linear (and target nn.Embedding layers into
Int8Embedding), one layer at a time.

Each layer is quantised and its float weight released before the next one is touched, so the peak is the model plus
one layer, never two copies of the model. Fused projections (GPT-2's c_attn, phi3's qkv_proj, ...) are split first
(lowmem.model.adapters) so q and k are separate weights that cross-head projection can treat.
"""
from __future__ import annotations

from torch import nn

from lowmem.config import LowMemConfig
from lowmem.model.int8_embedding import Int8Embedding
from lowmem.model.int8_linear import Int8Linear
from lowmem.model.trainables import is_lowrank_target, shared_weight_ids


def split_fused_projections(model: nn.Module) -> None:
    """Apply the architecture adapter's split of fused projections (a no-op for models without any, and for models
    that are not Hugging Face models)."""
    try:
        from lowmem.model.adapters import find_adapter
        adapter = find_adapter(model)
    except TypeError:
        return
    adapter.split_fused(model)


def convert_model(model: nn.Module, cfg: LowMemConfig) -> None:
    """What prepare() does to the modules, in place and on the model's current device: split fused projections,
    then (cfg.int8_weights) turn the targets into INT8 layers. Idempotent: converted layers are left as they are."""
    split_fused_projections(model)
    if cfg.int8_weights:
        convert_linears_to_int8(model, cfg)


def convert_linears_to_int8(model: nn.Module, cfg: LowMemConfig) -> list[str]:
    """Replace every target nn.Linear / nn.Embedding (cfg.target_modules minus exclude_modules, trainable, not
    frozen) by an Int8Linear / Int8Embedding holding the round-to-nearest quantised weight (an empty one for a
    weight on `meta`: int8_module_for). Returns the converted module names."""
    shared = shared_weight_ids(model)
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, (nn.Linear, nn.Embedding)) and is_lowrank_target(name, module, cfg, shared)]
    converted = []
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, int8_module_for(linear, cfg))
        # Release the float weight now (the module may still be referenced elsewhere, e.g. by a hook list).
        linear.weight = None
        converted.append(name)
    return converted


def int8_module_for(module: nn.Linear | nn.Embedding, cfg: LowMemConfig) -> Int8Linear:
    """The Int8Linear (or Int8Embedding) that replaces `module`: its weight quantised round-to-nearest, or, when the
    weight is on the `meta` device (a skeleton that the streaming loader fills later), an empty meta module of the
    same shape, compute dtype and bias."""
    block = cfg.weight_block_size
    if module.weight.device.type == "meta":
        if isinstance(module, nn.Embedding):
            quantised = Int8Embedding(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx,
                                      block_size=block, compute_dtype=module.weight.dtype, device="meta")
        else:
            quantised = Int8Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                   block_size=block, compute_dtype=module.weight.dtype, device="meta")
    elif isinstance(module, nn.Embedding):
        quantised = Int8Embedding.from_embedding(module, block_size=block)
    else:
        quantised = Int8Linear.from_linear(module, block_size=block, compute_dtype=module.weight.dtype)
    if isinstance(module, nn.Linear):
        quantised.int8_matmul = cfg.int8_matmul
    return quantised


def convert_int8_to_linears(model: nn.Module) -> list[str]:
    """The inverse of convert_linears_to_int8: every Int8Linear becomes an nn.Linear holding its dequantised weight
    (in the layer's compute dtype) and the same bias Parameter. Returns the converted module names."""
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, Int8Linear)]
    for name, quantised in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        weight = quantised.dequantized_weight(quantised.compute_dtype)
        if isinstance(quantised, Int8Embedding):
            embedding = nn.Embedding(weight.shape[0], weight.shape[1], padding_idx=quantised.padding_idx,
                                     device=weight.device, dtype=weight.dtype)
            embedding.weight = nn.Parameter(weight, requires_grad=True)
            setattr(parent, child, embedding)
            continue
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=quantised.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        linear.weight = nn.Parameter(weight, requires_grad=True)
        if quantised.bias is not None:
            linear.bias = quantised.bias
        setattr(parent, child, linear)
    return [name for name, _ in targets]
