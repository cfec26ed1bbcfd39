"""Export a prepared model as one GGUF file for llama.cpp, Ollama and LM Studio (DESIGN §2), streaming.

    export_gguf(model, "out/model.gguf", tokenizer=tok, gguf_type="q8_0")   # or "bf16", "f16"

Architectures: the Hugging Face model types llama.cpp reads under an architecture the `gguf` package maps and
lowmem trains: llama and mistral (GGUF "llama"), qwen2, qwen3. Any other model is refused (ValueError naming these)
before anything is written. Names: the HF state dict of lowmem.checkpoint.export.lazy_hf_state_dict (tied aliases
dropped: a tied lm_head is no "output.weight", llama.cpp then reuses token_embd), mapped by gguf.TensorNameMap.
LLaMA-family q_proj / k_proj rows (weights and biases) are permuted as llama.cpp's converter does (its rotary
embedding pairs adjacent elements, HF's pairs the two halves of a head); qwen2 / qwen3 keep HF's order.
Metadata: sizes, head counts, head_dim (key/value length), norm epsilon, rope base; rope scaling 'linear' as
metadata and Llama 3.1's 'llama3' as the `rope_freqs.weight` tensor; other rope scalings are refused. A sliding
window (Mistral v0.1) is not written: llama.cpp's llama architecture attends to the whole context, as it does for
files from its own converter. The tokenizer: lowmem.checkpoint.gguf_vocab.

Types: 1-D tensors (norms, biases) are F32, as llama.cpp wants them. 2-D tensors are Q8_0, BF16 or F16 per
gguf_type; a Q8_0 tensor whose rows are not a multiple of 32 long is written F16 (as llama.cpp's converter does).
Q8_0 of an INT8 weight comes from its codes and scales (quant.q8_0.q8_0_from_int8: the codes are reused exactly
when the block size is a multiple of 32, the default 256 is; only the scales are rounded to fp16). BF16 / F16 of an
INT8 weight are q * s formed in fp32 and rounded once, as the HF export does. F16 refuses values beyond 65504.

Memory: tensors are written one at a time, each in row chunks of about 1 Mi elements (dequantised, requantised or
cast, then written): beyond the model, one chunk's buffers live at a time. A float parameter is read in place.

Atomicity: the file is written into a temporary directory beside it, fsync'ed, and renamed onto the target path
(os.replace: an existing file is replaced only by a complete one); an error removes the temporary directory.
"""
from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from gguf import (GGML_QUANT_VERSION, MODEL_ARCH, MODEL_ARCH_NAMES, GGMLQuantizationType, GGUFWriter, LlamaFileType,
                  RopeScalingType, get_tensor_name_map)
from torch import Tensor, nn

from quant.int8 import dequantize_int8
from quant.q8_0 import QK8_0, q8_0_from_int8, q8_0_row_bytes, quantize_q8_0

from lowmem.checkpoint.export import _fsync_path, _temporary_sibling, lazy_hf_state_dict
from lowmem.checkpoint.gguf_vocab import add_tokenizer_metadata, tokenizer_metadata
from lowmem.model.int8_linear import Int8Linear

GGUF_TYPES = ("q8_0", "bf16", "f16")
GGUF_FILE_NAME = "model.gguf"
# HF model_type -> GGUF architecture; mistral is llama to llama.cpp (its converter registers MistralForCausalLM so)
ARCHITECTURES = {"llama": MODEL_ARCH.LLAMA, "mistral": MODEL_ARCH.LLAMA, "qwen2": MODEL_ARCH.QWEN2,
                 "qwen3": MODEL_ARCH.QWEN3}
_PERMUTES_QK = {MODEL_ARCH.LLAMA}
_CHUNK_ELEMS = 1 << 20   # rows per chunk: ~4 MiB per fp32 buffer; Q8_0 holds ~7 such at once
_FILE_TYPES = {"q8_0": LlamaFileType.MOSTLY_Q8_0, "bf16": LlamaFileType.MOSTLY_BF16, "f16": LlamaFileType.MOSTLY_F16}
_MATRIX_TYPES = {"q8_0": GGMLQuantizationType.Q8_0, "bf16": GGMLQuantizationType.BF16,
                 "f16": GGMLQuantizationType.F16}
_TORCH_TYPES = {GGMLQuantizationType.F32: torch.float32, GGMLQuantizationType.F16: torch.float16,
                GGMLQuantizationType.BF16: torch.bfloat16}


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the file before it exists: GGUF name, shape (rows, cols) or (n,) in PyTorch order, type,
    byte size, and chunks() -> the bytes as uint8 numpy arrays of whole rows, in order (nbytes in all)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    nbytes: int
    chunks: Callable[[], Iterator[np.ndarray]]


def gguf_architecture(model) -> MODEL_ARCH:
    """The GGUF architecture of a model (its .config) or a config's model_type; ValueError naming the supported
    types otherwise."""
    config = getattr(model, "config", model)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"GGUF export does not support model_type {model_type!r}; supported: "
                         f"{', '.join(ARCHITECTURES)} (export a Hugging Face directory instead)")
    return ARCHITECTURES[model_type]


def _check_gguf_type(gguf_type) -> None:
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")


def _qk_row_order(rows: int, heads: int) -> Tensor:
    """Row i of llama.cpp's q/k is HF row order[i]: per head, (2, d/2) pairs interleaved to (d/2, 2)."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(rows)


def _encode(values: Tensor, ggml_type: GGMLQuantizationType, name: str) -> np.ndarray:
    """fp32 rows (r, n) (or 1-D) -> their bytes in `ggml_type` as uint8 numpy."""
    if ggml_type == GGMLQuantizationType.Q8_0:
        return quantize_q8_0(values).numpy()
    if ggml_type == GGMLQuantizationType.F16 and values.numel() and values.abs().max() > 65504:
        raise ValueError(f"{name}: |value| {float(values.abs().max()):.6g} exceeds float16's largest value 65504; "
                         "export with gguf_type='bf16' or 'q8_0'")
    out = values.to(_TORCH_TYPES[ggml_type]).contiguous()
    return out.view(torch.uint8).numpy().reshape(-1)


def _row_chunks(rows: int, cols: int) -> Iterator[tuple[int, int]]:
    step = max(1, _CHUNK_ELEMS // max(cols, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _int8_chunks(module: Int8Linear, order: Tensor | None, ggml_type: GGMLQuantizationType,
                 name: str) -> Iterator[np.ndarray]:
    q, scales = module.weight_q.detach(), module.weight_scales.detach()
    rows, cols = q.shape
    for start, end in _row_chunks(rows, cols):
        if order is None:
            q_rows, s_rows = q[start:end], scales[start:end]
        else:
            index = order[start:end].to(q.device)
            q_rows, s_rows = q.index_select(0, index), scales.index_select(0, index)
        if ggml_type == GGMLQuantizationType.Q8_0:
            yield q8_0_from_int8(q_rows, s_rows, block_size=module.block_size).numpy()
        else:
            yield _encode(dequantize_int8(q_rows, s_rows, block_size=module.block_size).cpu(), ggml_type, name)


def _float_chunks(load: Callable[[], Tensor], order: Tensor | None, ggml_type: GGMLQuantizationType,
                  name: str) -> Iterator[np.ndarray]:
    tensor = load().detach()
    if tensor.dim() == 1:
        values = tensor if order is None else tensor[order.to(tensor.device)]
        yield _encode(values.to(device="cpu", dtype=torch.float32), ggml_type, name)
        return
    rows, cols = tensor.shape
    for start, end in _row_chunks(rows, cols):
        part = tensor[start:end] if order is None else tensor.index_select(0, order[start:end].to(tensor.device))
        yield _encode(part.to(device="cpu", dtype=torch.float32), ggml_type, name)


def _tensor_type(shape: tuple[int, ...], gguf_type: str) -> GGMLQuantizationType:
    if len(shape) == 1:
        return GGMLQuantizationType.F32
    if gguf_type == "q8_0" and shape[-1] % QK8_0:
        return GGMLQuantizationType.F16
    return _MATRIX_TYPES[gguf_type]


def _nbytes(shape: tuple[int, ...], ggml_type: GGMLQuantizationType) -> int:
    if ggml_type == GGMLQuantizationType.Q8_0:
        return math.prod(shape[:-1]) * q8_0_row_bytes(shape[-1])
    return math.prod(shape) * _TORCH_TYPES[ggml_type].itemsize


def _head_counts(config) -> tuple[int, int, int]:
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return heads, kv_heads, head_dim


def plan_gguf_tensors(model: nn.Module, gguf_type: str = "q8_0") -> list[GGUFTensor]:
    """Every tensor of the GGUF file, in the HF state dict's order; nothing is materialised.

    Raises ValueError for an unsupported architecture or gguf_type, or a tensor TensorNameMap cannot name.
    """
    _check_gguf_type(gguf_type)
    arch = gguf_architecture(model)
    config = model.config
    heads, kv_heads, _ = _head_counts(config)
    names = get_tensor_name_map(arch, int(config.num_hidden_layers))
    int8 = {name: module for name, module in model.named_modules(remove_duplicate=False)
            if isinstance(module, Int8Linear)}
    own = model.state_dict(keep_vars=True)
    planned = []
    for hf_name, entry in lazy_hf_state_dict(model, dtype=torch.float32).items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"{hf_name}: no GGUF tensor name for it in architecture "
                             f"{MODEL_ARCH_NAMES[arch]!r} (gguf.TensorNameMap)")
        order = None
        if arch in _PERMUTES_QK and hf_name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight",
                                                      "k_proj.bias")):
            order = _qk_row_order(entry.shape[0], heads if ".q_proj." in hf_name else kv_heads)
        ggml_type = _tensor_type(entry.shape, gguf_type)
        module = int8.get(hf_name.removesuffix(".weight"))
        if module is not None and hf_name.endswith(".weight") \
                and entry.shape == (module.out_features, module.in_features):
            chunks = partial(_int8_chunks, module, order, ggml_type, gguf_name)
        else:
            tensor = own.get(hf_name)
            load = (lambda tensor=tensor: tensor) if tensor is not None and tuple(tensor.shape) == entry.shape \
                else entry.load
            chunks = partial(_float_chunks, load, order, ggml_type, gguf_name)
        planned.append(GGUFTensor(gguf_name, entry.shape, ggml_type, _nbytes(entry.shape, ggml_type), chunks))
    return planned


def _rope(config) -> dict:
    return dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})


def _rope_theta(config) -> float:
    return float(_rope(config).get("rope_theta", getattr(config, "rope_theta", None) or 10000.0))


def llama3_rope_factors(config) -> Tensor:
    """fp32 (head_dim / 2,): per rotary frequency, by how much Llama 3.1's rope scaling divides it (1 for short
    wavelengths, `factor` for long ones, a smooth blend between): llama.cpp's `rope_freqs.weight`."""
    rope = _rope(config)
    _, _, head_dim = _head_counts(config)
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    context = float(rope["original_max_position_embeddings"])
    inv_freq = 1.0 / _rope_theta(config) ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    wavelength = 2 * math.pi / inv_freq
    smooth = (context / wavelength - low) / (high - low)
    factors = 1 / ((1 - smooth) / factor + smooth)
    factors = torch.where(wavelength < context / high, torch.ones_like(factors), factors)
    return torch.where(wavelength > context / low, torch.full_like(factors, factor), factors)


def _rope_metadata(writer: GGUFWriter, config, arch: MODEL_ARCH) -> list[GGUFTensor]:
    """Rotary metadata; returns the extra tensors it needs (Llama 3.1's rope_freqs)."""
    rope = _rope(config)
    writer.add_rope_freq_base(_rope_theta(config))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "llama3" and arch == MODEL_ARCH.LLAMA:
        factors = llama3_rope_factors(config)
        return [GGUFTensor("rope_freqs.weight", tuple(factors.shape), GGMLQuantizationType.F32, factors.numel() * 4,
                           lambda: iter([factors.numpy()]))]
    elif kind != "default":
        raise ValueError(f"GGUF export writes rotary embeddings of rope_type 'default', 'linear' or (llama) "
                         f"'llama3', not {kind!r} (config.rope_parameters of this {config.model_type} model)")
    return []


def _add_model_metadata(writer: GGUFWriter, model: nn.Module, arch: MODEL_ARCH,
                        gguf_type: str) -> list[GGUFTensor]:
    """Architecture metadata; returns the extra tensors it calls for (rope_freqs)."""
    config = model.config
    heads, kv_heads, head_dim = _head_counts(config)
    source = str(getattr(config, "_name_or_path", "") or "").rstrip("/")
    writer.add_name(Path(source).name or f"{config.model_type}-lowmem")
    writer.add_type("model")
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_key_length(head_dim)      # as llama.cpp's converter: Qwen3's head_dim is not hidden / heads
    writer.add_value_length(head_dim)
    if arch == MODEL_ARCH.LLAMA:
        writer.add_vocab_size(int(config.vocab_size))
        writer.add_rope_dimension_count(head_dim)
    extra = _rope_metadata(writer, config, arch)
    writer.add_file_type(_FILE_TYPES[gguf_type])
    writer.add_quantization_version(GGML_QUANT_VERSION)
    return extra


def gguf_path(out: str | os.PathLike) -> Path:
    """The file an export to `out` writes: `out` itself when it ends in .gguf, else out/model.gguf."""
    out = Path(out).expanduser().absolute()
    return out if out.suffix == ".gguf" else out / GGUF_FILE_NAME


def _write(writer: GGUFWriter, path: Path, tensors: list[GGUFTensor]) -> None:
    for tensor in tensors:
        writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), tensor.nbytes,
                               raw_dtype=tensor.ggml_type)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    fout = writer.fout[0]
    for tensor in tensors:
        writer.write_padding(fout, fout.tell())      # each tensor's data starts on the file's alignment
        written = 0
        with torch.no_grad():
            for chunk in tensor.chunks():
                fout.write(memoryview(np.ascontiguousarray(chunk)))
                written += chunk.nbytes
        if written != tensor.nbytes:
            raise RuntimeError(f"{tensor.name}: wrote {written} bytes, its header says {tensor.nbytes}")
    writer.flush()


def export_gguf(model: nn.Module, out: str | os.PathLike, *, tokenizer=None, gguf_type: str = "q8_0",
                tokenizer_pre: str | None = None) -> Path:
    """Write the model (and its tokenizer) as one GGUF file; returns its absolute path (gguf_path(out)).

    tokenizer: a Hugging Face fast tokenizer (lowmem.checkpoint.gguf_vocab); without one the file holds no
    vocabulary, and llama.cpp cannot run it. tokenizer_pre: the pre-tokenizer name to write instead of the one
    recognised from the tokenizer. Streaming and atomic (module docstring).

    Raises ValueError for an unsupported architecture, gguf_type, rope scaling or tokenizer (before anything is
    written), PermissionError when the target's directory is not writable, IsADirectoryError when the target .gguf
    path is a directory.
    """
    _check_gguf_type(gguf_type)
    arch = gguf_architecture(model)
    path = gguf_path(out)
    tensors = plan_gguf_tensors(model, gguf_type)
    writer = GGUFWriter(None, MODEL_ARCH_NAMES[arch])
    tensors += _add_model_metadata(writer, model, arch, gguf_type)
    if tokenizer is not None:
        vocab_rows = next(t.shape[0] for t in tensors if t.name == "token_embd.weight")
        add_tokenizer_metadata(writer, tokenizer_metadata(tokenizer, vocab_rows, pre=tokenizer_pre))
    if path.is_dir():
        raise IsADirectoryError(f"cannot export GGUF to {path}: it is a directory")
    work_dir = _temporary_sibling(path)
    try:
        work_file = work_dir / path.name
        try:
            _write(writer, work_file, tensors)
        finally:
            writer.close()
        _fsync_path(work_file)
        os.replace(work_file, path)
        _fsync_path(path.parent)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return path
