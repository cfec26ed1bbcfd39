"""A GGUF file converted into a Hugging Face directory of safetensors shards, one tensor at a time.

    convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "cache/smollm2")   # config.json, tokenizer, model-*.safetensors

transformers reads GGUF by dequantising every tensor into one state dict (the whole float model in host memory).
This does the same conversion with transformers' own pieces (the config and tokenizer parsers, the architecture's
tensor processor, e.g. LLaMA's q/k row order, and the GGUF-to-HF name map) but tensor by tensor: each tensor is
dequantised (gguf.dequantize, fp32), processed, renamed and added to the current shard, and a shard is written
once it holds `shard_bytes`. The host holds at most one shard plus one tensor. The shards' tensors equal what
`from_pretrained(dir, gguf_file=..., dtype=float32)` builds, bit for bit (tested on the shipped SmolLM2).

Architectures whose processor merges several GGUF tensors into one (MoE experts) keep their state in
transformers' `parsed_parameters["tensors"]`; whatever a processor leaves there is written with the next shard.
The directory is written into a temporary sibling and renamed (atomic).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

SHARD_BYTES = 1 << 30


def _write_shard(tensors: dict[str, torch.Tensor], folder: Path, index: int, weight_map: dict[str, str]) -> None:
    from safetensors.torch import save_file

    name = f"model-{index:05d}.safetensors"
    save_file(tensors, folder / name, metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(tensors, name))


def convert_gguf(gguf: str | os.PathLike, target: str | os.PathLike, *, shard_bytes: int = SHARD_BYTES,
                 progress: bool = True) -> Path:
    """Write `target` (a Hugging Face model directory: config.json, tokenizer files, fp32 safetensors shards with
    their index) from the GGUF file `gguf`. Returns `target`."""
    from accelerate import init_empty_weights
    from gguf import GGUFReader, dequantize
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map, load_gguf_checkpoint)

    gguf, target = Path(gguf), Path(target)
    metadata = load_gguf_checkpoint(str(gguf), return_tensors=False)   # config and tokenizer fields only
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)      # only for the name map: no memory
    reader = GGUFReader(str(gguf))
    architecture = str(bytes(reader.fields["general.architecture"].parts[-1]), encoding="utf-8")
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=metadata["config"])
    names = get_gguf_hf_weights_map(skeleton, processor)
    parsed = {**metadata, "tensors": {}}
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        weight_map: dict[str, str] = {}
        shard: dict[str, torch.Tensor] = {}
        shard_size = shards = 0
        for tensor in tqdm(reader.tensors, desc=f"converting {gguf.name}", unit="tensor", disable=not progress):
            result = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name,
                                       tensor_key_mapping=names, parsed_parameters=parsed)
            ready = dict(parsed["tensors"])      # what a merging processor finished
            parsed["tensors"].clear()
            if result.name in names:
                ready[names[result.name]] = torch.from_numpy(np.copy(result.weights))
            for name, value in ready.items():
                shard[name] = value.contiguous()
                shard_size += value.numel() * value.element_size()
            if shard_size >= shard_bytes:
                shards += 1
                _write_shard(shard, tmp, shards, weight_map)
                shard, shard_size = {}, 0
        if shard:
            shards += 1
            _write_shard(shard, tmp, shards, weight_map)
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                     indent=1), encoding="utf-8")
        if hasattr(config, "quantization_config"):    # the weights are plain fp32 now
            delattr(config, "quantization_config")
        config.architectures = [type(skeleton).__name__]   # what save_pretrained of the loaded model records
        config.dtype = torch.float32
        config.save_pretrained(tmp)
        skeleton.generation_config.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
