"""`lowmem.load_pretrained`: a model from disk to a training runtime on its device, never the float model whole.

    from lowmem import LowMemConfig, load_pretrained
    model, runtime = load_pretrained("path/to/hf-model", LowMemConfig(rank=128), device="cuda")
    model, runtime = load_pretrained(AutoConfig.from_pretrained(...), LowMemConfig(), device="cuda")   # from scratch

The model is built on `meta`, its target linears become INT8 there, and the checkpoint is streamed into it one
tensor at a time, each weight quantised on the device as it arrives (lowmem.model.loader); then `prepare` attaches
the runtime. The result equals `prepare(AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device), config)`
bit for bit (codes, scales, float parameters, optimizer state), while the device only ever holds the INT8 model plus
one tensor in float. A transformers config instead of a path initialises a new model module by module under the
current torch seed (lowmem.model.loader.init_from_scratch).

ZeRO-3 (a `data_parallel` with zero_stage 3 over several processes): every INT8 weight stays a placeholder without
memory until `prepare` has assigned owners; then each rank reads and quantises only the weights it owns, so no rank
ever holds the whole INT8 model. Float parameters are replicated, as the runtime keeps them.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lowmem.config import LowMemConfig
from lowmem.distributed import DataParallel
from lowmem.model.loader import LoadError, empty_int8, fill_int8_from_files, load_int8_model

from hooks.runtime import Runtime, prepare


def resolve_model_dir(source: str | os.PathLike) -> Path:
    """A local Hugging Face model directory for `source`: the directory itself, or a Hub id already in the local
    cache (no network is used)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LoadError(f"{path} is not a Hugging Face model directory (it has no config.json)")
        return path
    if path.exists():
        raise LoadError(f"{path} is a file; give a Hugging Face model directory (config.json and weight files)")
    looks_like_hub_id = isinstance(source, str) and source.count("/") == 1 and not source.startswith((".", "/", "~"))
    if looks_like_hub_id:
        try:
            from huggingface_hub import snapshot_download
            return Path(snapshot_download(str(source), local_files_only=True))
        except Exception as err:  # noqa: BLE001 - any hub failure means "not usable from the local cache"
            raise LoadError(f"{source!r} is neither a local directory nor a model in the local Hugging Face cache "
                            f"({type(err).__name__}); download it first (hf download {source})") from None
    raise LoadError(f"model directory {path} does not exist")


def load_pretrained(source, config: LowMemConfig | None = None, *, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.bfloat16,
                    data_parallel: DataParallel | None = None) -> tuple[nn.Module, Runtime]:
    """(model, runtime) ready to train on `device` (default: CUDA when available, else CPU).

    source: a Hugging Face model directory, a Hub id in the local cache, or a `transformers.PretrainedConfig`
    (a new model, randomly initialised under the current torch seed). dtype: the compute dtype of the model
    (float parameters and the INT8 layers' matmuls). data_parallel: as for `prepare`.
    Raises LoadError (lowmem.model.loader) naming the tensor and file when the weight files do not fit the model.
    """
    from transformers import AutoConfig, PretrainedConfig

    cfg = config if config is not None else LowMemConfig()
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(source, PretrainedConfig):
        model = load_int8_model(source, cfg, device=device, dtype=dtype, weights="scratch")
        return model, prepare(model, cfg, data_parallel=data_parallel)
    folder = resolve_model_dir(source)
    defer = partitions_weights(data_parallel)
    model = load_int8_model(AutoConfig.from_pretrained(folder), cfg, device=device, dtype=dtype, weights=folder,
                            defer_int8=defer)
    runtime = prepare(model, cfg, data_parallel=data_parallel)
    if defer:
        complete_deferred_int8(runtime, folder, device=device, dtype=dtype)
    return model, runtime


def partitions_weights(data_parallel: DataParallel | None) -> bool:
    """Whether the runtime will partition the INT8 weights over ranks (ZeRO-3 with several processes): then a rank
    loads only the weights it will own (load_int8_model(defer_int8=True), complete_deferred_int8)."""
    return data_parallel is not None and data_parallel.zero_stage == 3 and data_parallel.world_size > 1


def complete_deferred_int8(runtime: Runtime, weights, *, device: torch.device, dtype: torch.dtype) -> int:
    """Give the INT8 weights this rank owns their codes, once `prepare` has partitioned a model loaded with
    defer_int8=True: quantised from the weight files of directory `weights`, or uninitialised for weights="empty"
    (a resume then loads them from its checkpoint). Returns how many weights were filled."""
    owned = [item for item in runtime.trainables if item.kind == "lowrank_int8"
             and item.module.weight_q.numel() and item.module.weight_q.stride() == (0,) * item.module.weight_q.dim()]
    modules = [item.module for item in owned]
    if weights == "empty":
        empty_int8(modules, device=device)
    elif modules:
        fill_int8_from_files(runtime.model, weights, modules, device=device, dtype=dtype)
    for item in owned:
        item.tensor = item.module.weight_q   # the runtime's table follows the module's new codes
    return len(modules)
