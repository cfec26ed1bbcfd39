"""The streaming loader: from weight files on disk to an INT8 model on its device, never holding the float model.

    model = load_int8_model(hf_config, cfg, device="cuda", dtype=torch.bfloat16, weights=model_dir)

1. Skeleton: the Hugging Face model is built with its parameters on `meta` (no memory; non-persistent buffers such
   as rotary frequencies are real, on the host), tied weights tied, fused projections split by the architecture
   adapter, and every target linear / embedding replaced by an empty meta Int8Linear / Int8Embedding
   (lowmem.model.surgery: the same selection `prepare` makes).
2. Weights, one tensor at a time (lowmem.checkpoint.hf_files: safetensors memory-mapped, sharded or not; `.bin`
   with weights_only): a target weight is cast to `dtype` on the device, quantised there (round to nearest, the
   codes and scales `prepare(from_pretrained(...))` makes, bit for bit) and its float copies dropped; any other
   parameter or buffer is copied into its dtype on the device. Before any data is read, the file headers are
   checked against the skeleton: a missing tensor, a wrong shape or a non-float tensor where a float one belongs
   stops with the tensor's name and file (`LoadError`).
   Peak on the device: what the model keeps + the largest target tensor in `dtype` + one fp32 row chunk + its codes
   (lowmem.memory.load_cost predicts it). On the host: one tensor in the file's dtype (memory-mapped reads; a CPU
   device is the host).
3. From scratch (`weights="scratch"`): each module's float parameters are made on the host in fp32, initialised
   by the model's own `_init_weights` under the caller's torch seed, cast to `dtype`, moved and (targets) quantised,
   one module at a time. The values follow the model's initialisation distribution but not
   `from_config(...)`'s random stream (which first runs every layer's default init on a whole fp32 model).
4. `weights="empty"`: uninitialised storage on the device, for a resume that overwrites every tensor from a lowmem
   checkpoint (the base model's weights are not read at all).

A checkpoint whose tensor names need transformers' own conversion (for example per-expert MoE tensors that
transformers fuses while loading) cannot be streamed name by name; this is found from the headers, before any data
is read, and `load_int8_model` then loads through `from_pretrained` on the host (the float model is held there
once), converts there and moves only the INT8 model to the device, with a warning saying so.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from quant.int8 import quantize_int8

from lowmem.checkpoint.hf_files import TensorHeader, iter_tensors, read_headers, weight_files
from lowmem.config import LowMemConfig
from lowmem.model.int8_linear import Int8Linear
from lowmem.model.surgery import convert_linears_to_int8, split_fused_projections


class LoadError(ValueError):
    """The weight files do not fit the model: the message names the tensor(s) and the file."""


class NeedsConversion(LoadError):
    """The checkpoint's tensor names need transformers' own conversion (raised before any tensor data is read)."""


@dataclass
class _Slot:
    """One tensor the skeleton still needs. kind: "int8" (a target weight, quantised on arrival), "param" or
    "buffer". owners: every (module, attribute) that holds it (a tied weight has two)."""

    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    owners: list[tuple[nn.Module, str]]
    requires_grad: bool = True


def build_skeleton(hf_config, cfg: LowMemConfig, *, dtype: torch.dtype) -> nn.Module:
    """The model of `hf_config` with every parameter on `meta`, ties made, fused projections split and the target
    linears / embeddings converted to empty meta INT8 modules. Non-persistent buffers are real host tensors."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.tie_weights()   # init_empty_weights registers each parameter anew, which unties them
    split_fused_projections(model)
    if cfg.int8_weights:
        convert_linears_to_int8(model, cfg)
    return model


def _keep_fp32_patterns(model: nn.Module) -> list[str]:
    names = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    names |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    return sorted(names)


def _slots(model: nn.Module, dtype: torch.dtype) -> dict[str, _Slot]:
    """{state_dict-style name: _Slot} of every tensor the skeleton still lacks (on `meta`), tied names merged
    under the first name (the others are aliases, see _aliases)."""
    keep_fp32 = _keep_fp32_patterns(model)
    slots: dict[str, _Slot] = {}
    seen: dict[int, str] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, Int8Linear) and module.weight_q.is_meta:
            if id(module) not in seen:
                seen[id(module)] = f"{prefix}weight"
                slots[f"{prefix}weight"] = _Slot("int8", tuple(module.weight_q.shape), module.compute_dtype,
                                                 [(module, "weight")])
        for attr, param in module._parameters.items():
            if param is None or not param.is_meta:
                continue
            if id(param) in seen:
                slots[seen[id(param)]].owners.append((module, attr))
                continue
            target = param.dtype
            if param.is_floating_point() and any(part in f"{prefix}{attr}".split(".") for part in keep_fp32):
                target = torch.float32
            seen[id(param)] = f"{prefix}{attr}"
            slots[f"{prefix}{attr}"] = _Slot("param", tuple(param.shape), target, [(module, attr)],
                                             param.requires_grad)
        for attr, buffer in module._buffers.items():
            if buffer is None or not buffer.is_meta or isinstance(module, Int8Linear) and attr in (
                    "weight_q", "weight_scales"):
                continue
            if id(buffer) in seen:
                slots[seen[id(buffer)]].owners.append((module, attr))
                continue
            seen[id(buffer)] = f"{prefix}{attr}"
            slots[f"{prefix}{attr}"] = _Slot("buffer", tuple(buffer.shape), buffer.dtype, [(module, attr)])
    return slots


def _aliases(model: nn.Module, slots: dict[str, _Slot]) -> dict[str, str]:
    """Every other name of a slot's tensor (a tied head's 'lm_head.weight') -> the slot's name."""
    names = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
    out = {}
    for slot_name, slot in slots.items():
        for module, attr in slot.owners[1:]:
            module_name = names[id(module)]
            out[f"{module_name}.{attr}" if module_name else attr] = slot_name
    return out


def _adapter(model: nn.Module):
    try:
        from lowmem.model.adapters import find_adapter
        return find_adapter(model)
    except (TypeError, ValueError):
        return None


def _model_names(model: nn.Module, adapter, name: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
    """The skeleton's (name, tensor) pairs that one checkpoint tensor becomes: the adapter's inverse of its export
    mapping (fused projections split, Conv1D transposed; the name itself for most models)."""
    return [(name, tensor)] if adapter is None else list(adapter.model_tensors_from_hf(model, name, tensor))


class _Plan:
    """Where each checkpoint tensor goes, decided from the file headers alone."""

    def __init__(self, model: nn.Module, slots: dict[str, _Slot], headers: dict[str, TensorHeader]):
        self.model, self.slots = model, slots
        self.adapter = _adapter(model)
        aliases = _aliases(model, slots)
        prefix = getattr(model, "base_model_prefix", "") or ""
        self.unexpected: list[str] = []
        self.covered: set[str] = set()
        self.targets: dict[str, list[str]] = {}    # checkpoint name -> the slots it fills
        problems = []
        for file_name, header in headers.items():
            probe = torch.empty(header.shape, dtype=header.dtype, device="meta")
            for name, mapped in _model_names(model, self.adapter, file_name, probe):
                target = self.resolve(name, aliases, prefix)
                if target is None:
                    self.unexpected.append(file_name)
                    continue
                slot = slots[target]
                if tuple(mapped.shape) != slot.shape:
                    problems.append(f"{file_name} in {header.file}: shape {tuple(mapped.shape)}, the model's "
                                    f"{target} is {slot.shape}")
                elif slot.dtype.is_floating_point and not mapped.dtype.is_floating_point:
                    problems.append(f"{file_name} in {header.file}: dtype {mapped.dtype}, the model's {target} "
                                    f"needs a float tensor")
                self.covered.add(target)
                self.targets.setdefault(file_name, []).append(target)
        self._aliases, self._prefix = aliases, prefix
        if problems:
            raise LoadError("the weight files do not fit the model: " + "; ".join(problems[:8])
                            + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""))

    def resolve(self, name: str, aliases: dict[str, str] | None = None, prefix: str | None = None) -> str | None:
        """The slot a (mapped) checkpoint name fills, allowing for a missing or extra base-model prefix."""
        aliases = self._aliases if aliases is None else aliases
        prefix = self._prefix if prefix is None else prefix
        candidates = [name]
        if prefix:
            candidates += [f"{prefix}.{name}", name[len(prefix) + 1:] if name.startswith(prefix + ".") else None]
        for candidate in candidates:
            if candidate is None:
                continue
            candidate = aliases.get(candidate, candidate)
            if candidate in self.slots:
                return candidate
        return None

    def missing(self) -> list[str]:
        return [name for name, slot in self.slots.items() if name not in self.covered]


def _ignored(model: nn.Module, name: str) -> bool:
    """Names transformers itself drops when loading (e.g. rotary buffers older checkpoints saved)."""
    import re
    patterns = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    return any(re.search(pattern, name) for pattern in patterns) or name.endswith("rotary_emb.inv_freq")


def _set(slot: _Slot, value: Tensor) -> None:
    for module, attr in slot.owners:
        if slot.kind == "param":
            module._parameters[attr] = nn.Parameter(value, requires_grad=slot.requires_grad)
        else:
            module._buffers[attr] = value
    if slot.kind == "param":   # one Parameter object for every owner of a tied weight
        shared = slot.owners[0][0]._parameters[slot.owners[0][1]]
        for module, attr in slot.owners[1:]:
            module._parameters[attr] = shared


def _quantise_into(module: Int8Linear, weight: Tensor, *, device: torch.device, dtype: torch.dtype) -> None:
    """weight (out, in) any float dtype, any device -> the module's codes and scales on `device`, exactly as
    quantising the `dtype` copy of the weight on the device would (what prepare() does after from_pretrained)."""
    on_device = weight.to(device=device, dtype=dtype)
    # quantize_int8 converts one row chunk at a time to fp32 (the same codes as from a whole fp32 copy: tests/unit/
    # quant/test_int8.py), so no fp32 copy of the whole weight exists: 2 GiB less for Llama-3-8B's INT8 head
    codes, scales = quantize_int8(on_device, block_size=module.block_size)
    del on_device
    module._buffers["weight_q"], module._buffers["weight_scales"] = codes, scales


def _place(slot: _Slot, tensor: Tensor, *, device: torch.device, dtype: torch.dtype) -> None:
    if slot.kind == "int8":
        _quantise_into(slot.owners[0][0], tensor, device=device, dtype=dtype)
        return
    target = slot.dtype if tensor.is_floating_point() else tensor.dtype
    value = torch.empty(slot.shape, dtype=target, device=device)
    value.copy_(tensor.reshape(slot.shape))   # a copy, never a view of the memory-mapped file
    _set(slot, value)


def _host_buffers_to(model: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (rotary frequencies) were made on the host by the skeleton: move them."""
    for module in model.modules():
        for attr, buffer in module._buffers.items():
            if buffer is not None and not buffer.is_meta and buffer.device != device:
                module._buffers[attr] = buffer.to(device)


def _check_complete(model: nn.Module, source: str) -> None:
    left = [f"{name}" for name, p in model.named_parameters() if p.is_meta]
    left += [f"{name}" for name, b in model.named_buffers() if b.is_meta]
    if left:
        raise LoadError(f"{source} did not supply {', '.join(left[:8])}" + (f" (and {len(left) - 8} more)"
                                                                            if len(left) > 8 else ""))


def _placeholder_codes(module: Int8Linear, device: torch.device) -> None:
    """Full-shape codes and scales that hold one element each (stride-0 views): what a ZeRO-3 rank carries for a
    weight until the runtime has assigned owners (prepare() reads only shapes); fill_int8_from_files then gives
    the owned ones their codes and the partition drops the rest."""
    module._buffers["weight_q"] = torch.zeros((), dtype=torch.int8, device=device).expand(module.weight_q.shape)
    module._buffers["weight_scales"] = torch.zeros((), dtype=torch.float32, device=device).expand(
        module.weight_scales.shape)


def fill_from_files(model: nn.Module, model_dir: str | Path, *, device: torch.device, dtype: torch.dtype,
                    defer_int8: bool = False) -> None:
    """Read the weight files of `model_dir` into the skeleton `model` (build_skeleton), one tensor at a time.
    defer_int8: leave every INT8 weight as a placeholder (_placeholder_codes) without reading it."""
    files = weight_files(model_dir)
    slots = _slots(model, dtype)
    plan = _Plan(model, slots, read_headers(files))
    unexpected = [name for name in plan.unexpected if not _ignored(model, name)]
    if unexpected:
        raise NeedsConversion(f"{len(unexpected)} tensor name(s) of {model_dir} do not match the model's (e.g. "
                              f"{', '.join(unexpected[:3])})")
    missing = plan.missing()
    if missing:
        raise LoadError(f"the weight files of {model_dir} lack {len(missing)} tensor(s) the model needs: "
                        f"{', '.join(missing[:8])} (weight files: {', '.join(p.name for p in files[:4])}"
                        f"{' ...' if len(files) > 4 else ''})")
    if defer_int8:
        for slot in slots.values():
            if slot.kind == "int8":
                _placeholder_codes(slot.owners[0][0], device)
    wanted = {name for name, targets in plan.targets.items()
              if not defer_int8 or any(slots[t].kind != "int8" for t in targets)}
    for name, tensor, _ in iter_tensors(files, wanted):
        parts = _model_names(model, plan.adapter, name, tensor)
        del tensor
        while parts:   # each part dropped once placed: the host never holds two tensors
            mapped_name, mapped = parts.pop(0)
            target = plan.resolve(mapped_name)
            if target is not None and not (defer_int8 and slots[target].kind == "int8"):
                _place(slots[target], mapped, device=device, dtype=dtype)
            del mapped
    _host_buffers_to(model, device)
    _check_complete(model, str(model_dir))


def fill_int8_from_files(model: nn.Module, model_dir: str | Path, modules: list[Int8Linear], *,
                         device: torch.device, dtype: torch.dtype) -> None:
    """The codes of `modules` only (placeholders left by fill_from_files(defer_int8=True)), quantised from the
    weight files of `model_dir`; no other tensor's data is read."""
    files = weight_files(model_dir)
    chosen = {id(m) for m in modules}
    names = {id(module): name for name, module in model.named_modules()}
    slots = {f"{names[id(m)]}.weight": _Slot("int8", tuple(m.weight_q.shape), m.compute_dtype, [(m, "weight")])
             for m in modules}
    plan = _Plan(model, slots, read_headers(files))
    wanted = {name for name, targets in plan.targets.items() if targets}
    for name, tensor, _ in iter_tensors(files, wanted):
        parts = _model_names(model, plan.adapter, name, tensor)
        del tensor
        while parts:
            mapped_name, mapped = parts.pop(0)
            target = plan.resolve(mapped_name)
            if target is not None and id(slots[target].owners[0][0]) in chosen:
                _place(slots[target], mapped, device=device, dtype=dtype)
            del mapped
    left = [name for name, slot in slots.items() if slot.owners[0][0].weight_q.stride() == (0, 0)]
    if left:
        raise LoadError(f"the weight files of {model_dir} did not supply {', '.join(left[:8])}")


def empty_int8(modules: list[Int8Linear], *, device: torch.device) -> None:
    """Uninitialised codes and scales for `modules` (a resume's owned ZeRO-3 weights; the checkpoint fills them)."""
    for module in modules:
        module._buffers["weight_q"] = torch.empty(module.weight_q.shape, dtype=torch.int8, device=device)
        module._buffers["weight_scales"] = torch.empty(module.weight_scales.shape, dtype=torch.float32,
                                                       device=device)


def fill_empty(model: nn.Module, *, device: torch.device, dtype: torch.dtype, defer_int8: bool = False) -> None:
    """Uninitialised storage on `device` for every tensor of the skeleton (a resume overwrites all of them);
    defer_int8: INT8 weights as placeholders (see _placeholder_codes)."""
    for slot in _slots(model, dtype).values():
        if slot.kind == "int8":
            module = slot.owners[0][0]
            if defer_int8:
                _placeholder_codes(module, device)
            else:
                empty_int8([module], device=device)
        else:
            _set(slot, torch.empty(slot.shape, dtype=slot.dtype, device=device))
    _host_buffers_to(model, device)


def init_from_scratch(hf_config, cfg: LowMemConfig, *, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A randomly initialised model (module docstring, 3), built one module at a time under the current torch seed.

    The float skeleton is initialised before conversion: each module that owns parameters gets fp32 host storage,
    the model's `_init_weights(module)`, a cast to `dtype`, and its move to `device`; a target linear / embedding is
    then quantised into its INT8 module and its float weight dropped before the next module is touched."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from lowmem.model.surgery import int8_module_for
    from lowmem.model.trainables import is_lowrank_target, shared_weight_ids

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.tie_weights()
    split_fused_projections(model)
    shared = shared_weight_ids(model)
    keep_fp32 = _keep_fp32_patterns(model)
    done: dict[int, nn.Parameter] = {}
    for module_name, module in list(model.named_modules()):
        own = [(attr, p) for attr, p in module._parameters.items() if p is not None]
        if not own:
            continue
        # Decided on the skeleton's tensors: a tied weight is recognised by the identity of its meta parameter.
        is_target = (cfg.int8_weights and isinstance(module, (nn.Linear, nn.Embedding))
                     and is_lowrank_target(module_name, module, cfg, shared))
        fresh = [(attr, p) for attr, p in own if id(p) not in done]
        for attr, param in fresh:
            module._parameters[attr] = nn.Parameter(torch.empty(param.shape, dtype=torch.float32),
                                                    requires_grad=param.requires_grad)
        if fresh:
            model._init_weights(module)
        for attr, param in own:
            if id(param) in done:
                module._parameters[attr] = done[id(param)]
                continue
            target = dtype if param.is_floating_point() else param.dtype
            if any(part in f"{module_name}.{attr}".split(".") for part in keep_fp32):
                target = torch.float32
            value = nn.Parameter(module._parameters[attr].detach().to(device=device, dtype=target),
                                 requires_grad=param.requires_grad)
            module._parameters[attr] = value
            done[id(param)] = value
        if is_target:
            parent_name, _, child = module_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, int8_module_for(module, cfg))
            module.weight = None
    _host_buffers_to(model, device)
    _check_complete(model, "the initialisation")
    return model


def load_int8_model(hf_config, cfg: LowMemConfig, *, device: torch.device | str, dtype: torch.dtype,
                    weights: str | Path, defer_int8: bool = False) -> nn.Module:
    """The INT8 model on `device`, in training mode (module docstring); not yet attached to a runtime.

    weights: a Hugging Face model directory (its weight files are streamed), "scratch" (random initialisation,
    module by module, under the current torch seed) or "empty" (uninitialised, for a resume that loads every
    tensor from a lowmem checkpoint). defer_int8 (ZeRO-3, a directory or "empty"): every INT8 weight stays a
    placeholder without memory until the runtime has chosen owners; hooks.load.complete_deferred_int8 then fills
    the weights this rank owns and no other."""
    device = torch.device(device)
    if weights == "scratch":
        return init_from_scratch(hf_config, cfg, device=device, dtype=dtype)
    model = build_skeleton(hf_config, cfg, dtype=dtype)
    if weights == "empty":
        fill_empty(model, device=device, dtype=dtype, defer_int8=defer_int8)
        return model
    try:
        fill_from_files(model, weights, device=device, dtype=dtype, defer_int8=defer_int8)
    except NeedsConversion as why:
        return _load_converted_on_host(weights, cfg, device=device, dtype=dtype, why=str(why))
    _read_generation_config(model, Path(weights))
    return model


def _read_generation_config(model: nn.Module, model_dir: Path) -> None:
    """What from_pretrained also reads: generation_config.json (the export writes it back)."""
    if (model_dir / "generation_config.json").is_file():
        from transformers import GenerationConfig
        model.generation_config = GenerationConfig.from_pretrained(model_dir)


def _load_converted_on_host(model_dir, cfg: LowMemConfig, *, device: torch.device, dtype: torch.dtype,
                            why: str) -> nn.Module:
    """transformers' own loader on the host (it renames and re-lays tensors the skeleton cannot take by name), the
    INT8 conversion there, then only the INT8 model moves to the device."""
    import warnings

    from transformers import AutoModelForCausalLM

    warnings.warn(f"lowmem cannot stream this checkpoint tensor by tensor ({why}); loading it through "
                  "transformers on the host, which holds the float model in host memory once (the device receives "
                  "only the INT8 model)", stacklevel=3)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    split_fused_projections(model)
    if cfg.int8_weights:
        convert_linears_to_int8(model, cfg)
    return model.to(device).train()
