"""Export a prepared model (Int8Linear layers, split GPT-2 attention) as a bf16 Hugging Face checkpoint (DESIGN §2).

The export is what the ORIGINAL architecture loads with `AutoModelForCausalLM.from_pretrained(out_dir)`:
  - every Int8Linear "<m>.weight_q" int8 (out, in) + "<m>.weight_scales" fp32 (out, ceil(in/block)) becomes
    "<m>.weight" = q * s formed in fp32 and rounded once to `dtype` (nn.Linear layout (out, in));
  - float parameters and persistent buffers are cast to `dtype`, other buffers kept as they are; non-persistent
    buffers are absent (model.state_dict() already leaves them out, as HF does);
  - a tensor reachable under several names (tied embeddings) is written once, under the name HF keeps (its
    save_pretrained drops the tied alias, e.g. "lm_head.weight"; from_pretrained re-ties it);
  - architecture-specific names and layouts come from the adapter (`ModelAdapter.to_hf_state_dict`): GPT-2 re-fuses
    q/k/v into Conv1D "c_attn" (in, 3*hidden) and transposes c_proj / c_fc back to Conv1D (in, out).

Memory: the state dict is first built lazily (`LazyTensor`: shape, dtype, load()), so shards are planned from shapes
alone; `export_hf` then materialises one shard at a time (its dict is the only model-sized thing held, up to
max_shard_bytes) and each load() dequantizes one layer, in row chunks, straight into its output tensor. All exported
tensors are on the CPU.

Atomicity: files go into a temporary sibling directory of out_dir, are fsync'ed, and the directory is renamed onto
out_dir; an existing export is moved aside only after the new one is complete, then deleted. An error (or a
KeyboardInterrupt) while writing removes the temporary directory and leaves out_dir as it was. A crash between the
two renames of a replacement leaves both complete exports on disk as hidden siblings ".<name>.old-*" / ".<name>.tmp-*".
"""
from __future__ import annotations

import copy
import errno
import json
import math
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import safetensors.torch
import torch
from torch import Tensor, nn

from quant.int8 import dequantize_int8

from lowmem.model.adapters import find_adapter
from lowmem.model.int8_linear import Int8Linear

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_DEQUANT_CHUNK_ELEMS = 1 << 22  # fp32 rows dequantized at once: ~16 MiB, whatever the layer size


@dataclass(frozen=True)
class LazyTensor:
    """One tensor of the export before it exists.

    shape, dtype: of the tensor load() returns (known up front, so shards are planned without materialising).
    load: () -> Tensor on the CPU, built on demand (dequantize / cast / transpose); a fresh tensor, or for a
    whole-storage tensor already in the target dtype on the CPU, the model's own tensor (no copy).
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _check_dtype(dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype (e.g. torch.bfloat16), got {dtype!r}")


def _cast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    out = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
    if out.untyped_storage().nbytes() != out.numel() * out.element_size():
        # A view into a larger buffer (a flat parameter store): older safetensors refuse entries sharing storage.
        out = out.clone()
    return out


def _dequantize_int8_linear(module: Int8Linear, dtype: torch.dtype) -> Tensor:
    """W (out, in) `dtype` on the CPU: q * s in fp32 by row chunks, each rounded once to `dtype` into the output."""
    q, scales = module.weight_q.detach(), module.weight_scales.detach()
    rows, cols = q.shape
    out = torch.empty(rows, cols, dtype=dtype)
    step = max(1, _DEQUANT_CHUNK_ELEMS // max(cols, 1))
    for start in range(0, rows, step):
        end = min(rows, start + step)
        out[start:end] = dequantize_int8(q, scales, block_size=module.block_size, row_start=start, row_end=end)
    return out


def _tied_targets(model: nn.Module) -> set[str]:
    """Full names HF declares as tied aliases (`_tied_weights_keys`: a list before transformers 5, {alias: source})."""
    targets = set()
    for prefix, module in model.named_modules():
        keys = getattr(module, "_tied_weights_keys", None) or ()
        targets.update(f"{prefix}.{key}" if prefix else key for key in keys)
    return targets


def _check_ties(model: nn.Module) -> None:
    """A config promising tied embeddings must still have them tied: from_pretrained would re-tie and drop one."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    inp = get_in() if callable(get_in) else None
    out = get_out() if callable(get_out) else None
    if inp is not None and out is not None and getattr(out, "weight", None) is not getattr(inp, "weight", None):
        raise ValueError(
            f"config.tie_word_embeddings is True but the output embedding ({type(out).__name__}) no longer shares "
            "the input embedding's weight; from_pretrained would overwrite one with the other. Re-tie them, or set "
            "model.config.tie_word_embeddings = False to export both"
        )


def _untied_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """model.state_dict(keep_vars=True) with each aliased tensor under one name (HF's choice: not the tied alias)."""
    sd = model.state_dict(keep_vars=True)
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        sd.pop(key, None)
    aliases: dict[tuple, list[str]] = {}
    for key, tensor in sd.items():
        if tensor.device.type == "meta":
            raise ValueError(f"{key} is on the meta device: export needs materialised weights")
        if tensor.numel():
            ident = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
            aliases.setdefault(ident, []).append(key)
    targets = _tied_targets(model)
    for names in aliases.values():
        if len(names) > 1:
            keep = next((name for name in names if name not in targets), names[0])
            for name in names:
                if name != keep:
                    del sd[name]
    return sd


def lazy_hf_state_dict(model: nn.Module, *, dtype: torch.dtype = torch.bfloat16) -> dict[str, LazyTensor]:
    """The export state dict in HF's names and layouts, as {name: LazyTensor}; nothing is materialised yet."""
    _check_dtype(dtype)
    adapter = find_adapter(model)
    _check_ties(model)
    int8 = {name: module for name, module in model.named_modules(remove_duplicate=False)
            if isinstance(module, Int8Linear)}
    entries: dict[str, LazyTensor] = {}
    for key, tensor in _untied_state_dict(model).items():
        prefix, _, leaf = key.rpartition(".")
        module = int8.get(prefix)
        if module is not None and leaf in ("weight_q", "weight_scales"):
            if leaf == "weight_q":  # the scales travel with it
                name = f"{prefix}.weight" if prefix else "weight"
                entries[name] = LazyTensor((module.out_features, module.in_features), dtype,
                                           partial(_dequantize_int8_linear, module, dtype))
            continue
        to = dtype if tensor.is_floating_point() else tensor.dtype
        entries[key] = LazyTensor(tuple(tensor.shape), to, partial(_cast, tensor, to))
    return adapter.to_hf_state_dict(model, entries)


def hf_state_dict(model: nn.Module, *, dtype: torch.dtype = torch.bfloat16) -> dict[str, Tensor]:
    """The state dict the original Hugging Face architecture expects, all tensors on the CPU (see module docstring).

    Materialises everything at once (model-sized in `dtype`); export_hf streams instead. A float tensor already in
    `dtype` on the CPU (and not a view into a larger buffer) is the model's own tensor, as in nn.Module.state_dict.
    """
    with torch.no_grad():
        return {name: entry.load() for name, entry in lazy_hf_state_dict(model, dtype=dtype).items()}


def _plan_shards(entries: dict[str, LazyTensor], max_shard_bytes: int) -> list[list[str]]:
    """Greedy in order (as HF): a new shard when the next tensor would pass the limit; a bigger tensor gets its own."""
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, entry in entries.items():
        if shards[-1] and shard_bytes + entry.nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += entry.nbytes
    return shards


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _write_weights(model: nn.Module, directory: Path, dtype: torch.dtype, max_shard_bytes: int) -> None:
    entries = lazy_hf_state_dict(model, dtype=dtype)
    shards = _plan_shards(entries, max_shard_bytes)
    count = len(shards)
    weight_map = {}
    for index, names in enumerate(shards, start=1):
        filename = SAFE_WEIGHTS_NAME if count == 1 else f"model-{index:05d}-of-{count:05d}.safetensors"
        # The only model-sized object alive: this shard's tensors; each load() holds one transient layer at most.
        with torch.no_grad():
            tensors = {name: entries[name].load() for name in names}
        # Looked up at call time (not imported by name) so the writer can be replaced, e.g. by a failing one in tests.
        safetensors.torch.save_file(tensors, str(directory / filename), metadata={"format": "pt"})
        del tensors
        weight_map.update(dict.fromkeys(names, filename))
    if count > 1:
        total_bytes = sum(entry.nbytes for entry in entries.values())
        _write_json(directory / SAFE_WEIGHTS_INDEX_NAME,
                    {"metadata": {"total_size": total_bytes}, "weight_map": weight_map})


def _write_config(model: nn.Module, directory: Path, dtype: torch.dtype) -> None:
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    # transformers >= 4.56 names it `dtype` (`torch_dtype` becomes a deprecated property); older ones `torch_dtype`.
    if isinstance(getattr(type(config), "torch_dtype", None), property):
        config.dtype = dtype
    else:
        config.torch_dtype = dtype
    config.save_pretrained(directory)
    generation_config = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", None)
    if generation_config is not None and (not callable(can_generate) or can_generate()):
        generation_config.save_pretrained(directory)


def _temporary_sibling(out_dir: Path) -> Path:
    """Create the hidden work directory beside out_dir; clear errors when the parent cannot take it."""
    parent = out_dir.parent
    if parent.exists() and not parent.is_dir():
        raise NotADirectoryError(f"cannot export to {out_dir}: its parent {parent} is not a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(f"cannot export to {out_dir}: cannot create its parent directory {parent} ({err})") \
            from err
    hint = "the export is written into a temporary directory beside out_dir and renamed onto it"
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot export to {out_dir}: its parent directory {parent} is not writable ({hint})")
    try:
        return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=parent))
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise PermissionError(
                f"cannot export to {out_dir}: its parent directory {parent} is not writable ({hint}): {err}"
            ) from err
        raise


def _check_replaceable(out_dir: Path) -> None:
    """Only an empty directory or a previous export (it has config.json) is ever replaced."""
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise FileExistsError(f"cannot export to {out_dir}: it exists and is a file or a symlink, not a directory")
    if any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
        raise FileExistsError(
            f"refusing to replace {out_dir}: it is a non-empty directory without config.json, not a previous export"
        )


def _publish(work_dir: Path, out_dir: Path) -> None:
    """Rename the complete work_dir onto out_dir; an existing out_dir is moved aside first and deleted after."""
    if not out_dir.exists():
        os.rename(work_dir, out_dir)
    else:
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out_dir, old)
        try:
            os.rename(work_dir, out_dir)
        except BaseException:
            os.rename(old, out_dir)
            raise
        shutil.rmtree(old)
    _fsync_path(out_dir.parent)


def export_hf(model: nn.Module, out_dir: str | os.PathLike, *, tokenizer=None, dtype: torch.dtype = torch.bfloat16,
              max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write a Hugging Face model directory that `AutoModelForCausalLM.from_pretrained(out_dir)` loads.

    Files: config.json (dtype / torch_dtype = `dtype`, architectures = the model class), generation_config.json
    when the model can generate, model.safetensors -- or model-0000i-of-0000N.safetensors plus
    model.safetensors.index.json when the weights pass max_shard_bytes -- and the tokenizer's files when given.
    Atomic and streaming (module docstring). Returns out_dir as an absolute Path.

    Raises PermissionError when out_dir's parent is not writable, FileExistsError when out_dir is a file or a
    non-empty directory that is not a previous export, TypeError / ValueError for bad arguments.
    """
    _check_dtype(dtype)
    if not isinstance(max_shard_bytes, int) or isinstance(max_shard_bytes, bool) or max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
    find_adapter(model)  # fail on an unsupported model before touching the disk
    out_dir = Path(out_dir).expanduser().absolute()
    _check_replaceable(out_dir)
    work_dir = _temporary_sibling(out_dir)
    try:
        _write_config(model, work_dir, dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(work_dir))
        _write_weights(model, work_dir, dtype, max_shard_bytes)
        for root, _, files in os.walk(work_dir):
            for name in files:
                _fsync_path(Path(root) / name)
            _fsync_path(Path(root))
        _publish(work_dir, out_dir)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    return out_dir
