"""The weight files of a Hugging Face model directory, read one tensor at a time.

A directory holds `model.safetensors`, or shards listed by `model.safetensors.index.json`, or (older models)
`pytorch_model.bin` / its sharded index. safetensors files are memory-mapped: a tensor's bytes are read when it is
asked for, so the host holds one tensor (plus the page cache, which the kernel can drop) rather than a shard.
`.bin` files are read with `torch.load(weights_only=True, mmap=True)`: no pickled code runs, and the file is mapped,
not read whole.

    files = weight_files(model_dir)                  # [Path, ...] in shard order
    headers = read_headers(files)                    # {name: TensorHeader(file, shape, dtype)}, no tensor data read
    for name, tensor in iter_tensors(files):         # CPU tensors in the file's dtype, one at a time

Errors (`WeightFileError`) name the file and, where there is one, the tensor: a directory without weights, an
index naming a missing shard, a truncated or corrupt file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


class WeightFileError(ValueError):
    """A model directory's weight files are missing, incomplete or unreadable; the message names the file."""


@dataclass(frozen=True)
class TensorHeader:
    """What a weight file says about one tensor before its data is read."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


def weight_files(model_dir: str | Path) -> list[Path]:
    """The weight files of `model_dir`, in shard order; safetensors preferred over .bin."""
    folder = Path(model_dir)
    for index_name, single in ((SAFETENSORS_INDEX, SAFETENSORS_SINGLE), (BIN_INDEX, BIN_SINGLE)):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise WeightFileError(f"{index} is not a valid shard index ({err})") from None
            files = [folder / name for name in dict.fromkeys(weight_map.values())]
            missing = [str(path) for path in files if not path.is_file()]
            if missing:
                raise WeightFileError(f"{index} lists shards that do not exist: {', '.join(missing[:5])}")
            return files
        if (folder / single).is_file():
            return [folder / single]
    raise WeightFileError(f"{folder} holds no model weights (expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, "
                          f"{BIN_SINGLE} or {BIN_INDEX})")


def _is_safetensors(path: Path) -> bool:
    return path.suffix == ".safetensors"


def _open_bin(path: Path) -> dict[str, Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any failure to read is reported with the file's name
        raise WeightFileError(f"cannot read {path} ({type(err).__name__}: {err}); the file is corrupt or "
                              "truncated") from None


def read_headers(files: list[Path]) -> dict[str, TensorHeader]:
    """{tensor name: TensorHeader} over all files, from the safetensors headers (no tensor data is read; a .bin
    file is mapped). A truncated safetensors file (shorter than its header says) is refused here."""
    from safetensors import safe_open

    headers: dict[str, TensorHeader] = {}
    for path in files:
        if _is_safetensors(path):
            try:
                with safe_open(path, framework="pt", device="cpu") as handle:
                    for name in handle.keys():
                        view = handle.get_slice(name)
                        headers[name] = TensorHeader(path, tuple(view.get_shape()), _safetensors_dtype(view))
            except WeightFileError:
                raise
            except Exception as err:  # noqa: BLE001
                raise WeightFileError(f"cannot read {path} ({type(err).__name__}: {err}); the file is corrupt or "
                                      "truncated") from None
        else:
            for name, tensor in _open_bin(path).items():
                headers[name] = TensorHeader(path, tuple(tensor.shape), tensor.dtype)
    return headers


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                       "F8_E5M2": torch.float8_e5m2}


def _safetensors_dtype(view) -> torch.dtype:
    name = view.get_dtype()
    if name not in _SAFETENSORS_DTYPES:
        raise WeightFileError(f"unsupported safetensors dtype {name}")
    return _SAFETENSORS_DTYPES[name]


def iter_tensors(files: list[Path], wanted: set[str] | None = None) -> Iterator[tuple[str, Tensor, Path]]:
    """(name, tensor, file) for every tensor (or only the names in `wanted`: the others' data is never read), file
    by file: CPU tensors in the file's dtype, one alive at a time if the caller drops each before asking for the
    next."""
    from safetensors import safe_open

    for path in files:
        if _is_safetensors(path):
            with safe_open(path, framework="pt", device="cpu") as handle:
                for name in handle.keys():
                    if wanted is not None and name not in wanted:
                        continue
                    try:
                        tensor = handle.get_tensor(name)
                    except Exception as err:  # noqa: BLE001
                        raise WeightFileError(f"cannot read tensor {name} from {path} ({type(err).__name__}: "
                                              f"{err}); the file is corrupt or truncated") from None
                    yield name, tensor, path
                    del tensor
        else:
            state = _open_bin(path)
            for name in list(state):
                tensor = state.pop(name)
                if wanted is None or name in wanted:
                    yield name, tensor, path
