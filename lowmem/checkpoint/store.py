"""Atomic, resumable checkpoints (DESIGN §3.8): safetensors only, a JSON sidecar, write-to-temp + fsync + rename.

Layout of one checkpoint, `root/step-{step:08d}/`:
  model.safetensors  model.state_dict(): INT8 codes (int8), scales (fp32), float params; a tensor reachable under
                     several names (tied embeddings) is stored once and re-aliased on load
  optim.safetensors  runtime_state["state"] flattened as "state/{index}/{key}" (moments, projectors, counters, ...)
  rng.safetensors    "cpu": torch's CPU generator state (uint8), "cuda/{i}": each CUDA device's state when CUDA is
                     initialised; only with rng=True
  meta.json          {"schema_version", "step", "lowmem": runtime_state["lowmem"], "meta": caller's JSON-able dict,
                      "aliases": {file: {dropped_name: kept_name}}, "files": {name: {"bytes", "sha256"}},
                      "complete": true}

Why a crash at any moment leaves only complete checkpoints under a final name: everything is built in
`root/.tmp-step-XXXXXXXX-<pid>/`, every file and the directory are fsynced, and only then is the directory renamed
(one atomic metadata operation) and the root fsynced. A checkpoint that leaves a final name — replaced by a newer
save of the same step, or pruned — is first renamed to `root/.old-step-XXXXXXXX-<pid>/` and deleted from there,
so a kill during the deletion leaves only a hidden directory. The next save removes stale `.tmp-*`/`.old-*`
directories of dead processes; an `.old-*` whose step has no final checkpoint any more (a kill between the two
renames of a replacement) is complete and is renamed back instead.

Loading uses safetensors and json only (no pickle: `weights_only` semantics by construction).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

# 2: 8-bit second moments (low-rank and float AdamW "exp_avg_sq_codes") index the squared unsigned map
#    (quant.moments8); version 1 indexed the plain unsigned map, and decoding those codes now would shrink V.
SCHEMA_VERSION = 2
_SCHEMA_CHANGES = {1: "8-bit second moments were stored on the plain unsigned map; this version stores them on the "
                      "squared map (no underflow of small V) and cannot reinterpret the old codes"}

_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_HIDDEN_DIR = re.compile(r"^\.(tmp|old)-step-(\d{8,})-(\d+)$")
_MODEL, _OPTIM, _RNG, _META = "model.safetensors", "optim.safetensors", "rng.safetensors", "meta.json"
_HASH_CHUNK_BYTES = 8 << 20
_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, found or read; the message names the path, the cause and the fix."""


# -- small file-system helpers ---------------------------------------------------------------------------------------
def _fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory fsync makes the names inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # some file systems cannot fsync a directory; nothing more we can do there
            raise
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers (an earlier failed save in this process) are stale too
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- tensors -> storable dicts ----------------------------------------------------------------------------------------
def _storable(named: dict[str, Tensor], what: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Make {name: tensor} writable by safetensors: one entry per distinct tensor, contiguous, no shared storage.

    Names that view exactly the same memory (tied weights) are stored once: returns (tensors, {alias: kept_name}).
    A tensor that shares storage with another but is a different view is cloned (rare; costs its bytes once).
    """
    out: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen_views: dict[tuple, str] = {}
    seen_storages: set[tuple] = set()
    for name, tensor in named.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{what}: {name!r} is a {type(tensor).__name__}; checkpoints hold tensors only")
        if tensor.is_sparse or tensor.device.type == "meta":
            raise TypeError(f"{what}: {name!r} is a {tensor.layout} tensor on {tensor.device}; checkpoints hold "
                            "dense, materialised tensors")
        tensor = tensor.detach()
        if tensor.numel() == 0:
            out[name] = tensor.contiguous()
            continue
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        view = (*storage, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if view in seen_views:
            aliases[name] = seen_views[view]
            continue
        seen_views[view] = name
        shared = storage in seen_storages
        seen_storages.add(storage)
        out[name] = tensor.clone(memory_format=torch.contiguous_format) if shared else tensor.contiguous()
    return out, aliases


def _flatten_optim(state: dict) -> dict[str, Tensor]:
    flat: dict[str, Tensor] = {}
    for index, tensors in state.items():
        if isinstance(index, bool) or not isinstance(index, (int, str)) or not str(index).isdigit():
            raise TypeError(f"runtime_state['state'] keys must be non-negative ints (trainable indices), got "
                            f"{index!r}")
        if not isinstance(tensors, dict):
            raise TypeError(f"runtime_state['state'][{index!r}] must be a dict of tensors, got "
                            f"{type(tensors).__name__}")
        for key, tensor in tensors.items():
            flat[f"state/{int(index)}/{key}"] = tensor
    return flat


def _unflatten_optim(flat: dict[str, Tensor]) -> dict[int, dict[str, Tensor]]:
    state: dict[int, dict[str, Tensor]] = {}
    for name, tensor in flat.items():
        prefix, index, key = name.split("/", 2)
        if prefix != "state":
            raise CheckpointError(f"unexpected tensor {name!r} in {_OPTIM}")
        state.setdefault(int(index), {})[key] = tensor
    return state


def _rng_tensors() -> dict[str, Tensor]:
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda/{i}"] = state
    return tensors


def _restore_rng(tensors: dict[str, Tensor]) -> None:
    torch.set_rng_state(tensors["cpu"])
    cuda = [tensors[f"cuda/{i}"] for i in range(sum(k.startswith("cuda/") for k in tensors))]
    if not cuda:
        return
    if not torch.cuda.is_available():
        warnings.warn(f"the checkpoint holds {len(cuda)} CUDA RNG states but CUDA is not available here: only the "
                      "CPU generator was restored")
        return
    count = torch.cuda.device_count()
    if count != len(cuda):
        warnings.warn(f"the checkpoint holds {len(cuda)} CUDA RNG states, this process sees {count} devices: "
                      f"restoring the first {min(count, len(cuda))}")
    for i in range(min(count, len(cuda))):
        torch.cuda.set_rng_state(cuda[i], device=i)


def python_random_state() -> list:
    """Python `random`'s state as JSON-able lists, to put in `meta` (restore with set_python_random_state)."""
    version, internal, gauss_next = random.getstate()
    return [version, list(internal), gauss_next]


def set_python_random_state(state: list) -> None:
    """Inverse of python_random_state() (after a JSON round trip)."""
    version, internal, gauss_next = state
    random.setstate((version, tuple(internal), gauss_next))


# -- completeness ----------------------------------------------------------------------------------------------------
def _read_complete_meta(path: Path) -> tuple[dict | None, str]:
    """(meta_json, "") for a complete checkpoint directory, else (None, why it is not one)."""
    meta_path = path / _META
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        return None, f"{meta_path} is missing (not a checkpoint, or one whose save never finished)"
    except (OSError, ValueError) as exc:
        return None, f"{meta_path} cannot be read as JSON ({exc})"
    if not isinstance(meta, dict) or meta.get("complete") is not True:
        return None, f"{meta_path} is not marked complete"
    files = meta.get("files")
    if meta.get("distributed"):
        # A data-parallel checkpoint (lowmem.checkpoint.distributed): every rank's model and optimizer files are listed.
        wanted = [f"{rank}/{name}" for rank in meta.get("ranks", []) for name in (_MODEL, _OPTIM)]
        if not isinstance(files, dict) or not wanted or any(name not in files for name in wanted):
            return None, f"{meta_path} does not list every rank's {_MODEL} and {_OPTIM}"
    elif not isinstance(files, dict) or _MODEL not in files or _OPTIM not in files:
        return None, f"{meta_path} does not list {_MODEL} and {_OPTIM}"
    for name, info in files.items():
        try:
            size = (path / name).stat().st_size
        except OSError:
            return None, f"{path / name} is missing"
        recorded = info.get("bytes") if isinstance(info, dict) else None
        if size != recorded:
            return None, f"{path / name} has {size} bytes, meta.json records {recorded} (truncated?)"
    return meta, ""


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints `root/step-*` (meta.json parses, complete, every listed file has its recorded size),
    sorted by step. Cheap: sizes only; lowmem.checkpoint.verify checks headers and hashes (load_checkpoint does)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir() and _read_complete_meta(entry)[0] is not None:
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step under root, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


# -- save ------------------------------------------------------------------------------------------------------------
def _failure_message(path: Path, exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {' '.join(str(exc).split())}"  # one paragraph, whatever the cause says
    disk_full = (isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS) or "No space left" in str(exc) \
        or "os error 28" in str(exc)
    if disk_full:
        return (f"could not write checkpoint {path}: the disk is full ({text}). Nothing was left under that name and "
                "the previous checkpoints are intact. Free space on that file system (or lower keep_last), or point "
                "output_dir at another disk, then save again or resume from the last complete checkpoint.")
    return (f"could not write checkpoint {path} ({text}). Nothing was left under that name and the previous "
            "checkpoints are intact. Check that the directory is writable and has free space, or choose another "
            "output_dir, then save again or resume from the last complete checkpoint.")


def _clean_stale(root: Path) -> None:
    """Remove `.tmp-*`/`.old-*` left by dead processes; put back an `.old-*` whose final name is empty."""
    for entry in root.iterdir():
        match = _HIDDEN_DIR.match(entry.name)
        if not match or _pid_alive(int(match.group(3))):
            continue
        final = _step_dir(root, int(match.group(2)))
        if match.group(1) == "old" and not final.exists() and _read_complete_meta(entry)[0] is not None:
            os.rename(entry, final)
            _fsync_path(root)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def _retire(root: Path, path: Path) -> None:
    """Take a checkpoint off its final name (atomically), then delete it."""
    hidden = root / f".old-{path.name}-{os.getpid()}"
    os.rename(path, hidden)
    _fsync_path(root)
    shutil.rmtree(hidden)


def _storable_groups(model: nn.Module, runtime_state: dict, rng: bool) -> dict[str, tuple[dict, dict]]:
    """{file name: (tensors to write, aliases)}; validates every tensor before anything touches the disk."""
    groups = {_MODEL: _storable(model.state_dict(), "model.state_dict()"),
              _OPTIM: _storable(_flatten_optim(runtime_state["state"]), "runtime_state['state']")}
    if rng:
        groups[_RNG] = _storable(_rng_tensors(), "RNG state")
    return groups


def _write_files(tmp: Path, groups: dict[str, tuple[dict, dict]], sidecar: dict) -> None:
    files = {}
    for name, (tensors, _) in groups.items():
        save_file(tensors, tmp / name, metadata={"format": "pt", "lowmem_schema": str(SCHEMA_VERSION)})
        _fsync_path(tmp / name)
        files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
    sidecar = {**sidecar, "aliases": {name: aliases for name, (_, aliases) in groups.items()}, "files": files,
               "complete": True}
    with open(tmp / _META, "w") as fh:
        json.dump(sidecar, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_path(tmp)


def save_checkpoint(root: str | os.PathLike, *, step: int, model: nn.Module, runtime_state: dict,
                    meta: dict | None = None, rng: bool = True, keep_last: int | None = 3) -> Path:
    """Write `root/step-{step:08d}/` atomically (module docstring) and prune to the newest `keep_last` checkpoints.

    model: its state_dict() is saved (tensors on any device; copied to the CPU by safetensors).
    runtime_state: Runtime.state_dict(): {"state": {index: {key: Tensor}}, "lowmem": JSON-able counters}.
    meta: JSON-able (config, data position, python_random_state(), ...); tuples come back as lists.
    keep_last: complete checkpoints kept after this save (the one just written always stays); None keeps all.
    Returns the final path. Raises CheckpointError (nothing new left under a final name) when writing fails.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be a positive int (or None to keep every checkpoint), got {keep_last!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(runtime_state, dict) or not {"state", "lowmem"} <= set(runtime_state):
        raise TypeError("runtime_state must be Runtime.state_dict(): a dict with 'state' and 'lowmem'")
    try:
        # Through text and back: the sidecar holds a copy, and what load returns is exactly what was written.
        sidecar = {"schema_version": SCHEMA_VERSION, "step": step,
                   "lowmem": json.loads(json.dumps(runtime_state["lowmem"], allow_nan=False)),
                   "meta": json.loads(json.dumps({} if meta is None else meta, allow_nan=False))}
    except (TypeError, ValueError) as exc:
        raise TypeError(f"meta and runtime_state['lowmem'] must be JSON-able (dicts, lists, str, int, finite "
                        f"float, bool, None): {exc}") from None
    groups = _storable_groups(model, runtime_state, rng)

    root = Path(root)
    final = _step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        _clean_stale(root)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _write_files(tmp, groups, sidecar)
        del groups
        if final.exists():
            # Replace only now that the new one is complete; a kill between the renames leaves the old one in
            # .old-*, which the next save puts back.
            backup = root / f".old-{final.name}-{os.getpid()}"
            os.rename(final, backup)
            try:
                os.rename(tmp, final)
            except BaseException:
                os.rename(backup, final)
                raise
            _fsync_path(root)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_path(root)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_failure_message(final, exc)) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    if keep_last is not None:
        older = [path for path in list_checkpoints(root) if path != final]
        for path in older[:max(0, len(older) - (keep_last - 1))]:
            try:
                _retire(root, path)
            except OSError as exc:  # the new checkpoint is safe; a failed prune must not fail the save
                warnings.warn(f"could not prune old checkpoint {path}: {exc}")
    return final


# -- load ------------------------------------------------------------------------------------------------------------
def load_checkpoint(path: str | os.PathLike, *, verify: bool = True) -> tuple[dict, dict, dict]:
    """Read a checkpoint directory -> (model_state_dict, runtime_state, meta_json). CPU tensors, no pickle.

    model_state_dict has every name of the saved model.state_dict() (tied names share one tensor), ready for
    model.load_state_dict(strict=True). runtime_state = {"state": {int index: {key: Tensor}}, "lowmem": {...}}.
    verify: first check the checkpoint is intact (lowmem.checkpoint.verify.damage: sizes, safetensors headers and
    each file's sha256 against meta.json, streamed); pass False only when that was just done. The RNG states (when
    saved) are restored last, after everything else was read, and meta_json["rng_restored"] says whether that
    happened.
    """
    path = Path(path)
    meta, why = _read_complete_meta(path)
    if meta is None:
        raise CheckpointError(f"{path} is not a complete lowmem checkpoint: {why}. Resume from another one "
                              f"(list_checkpoints(root)) or start without resume.")
    if meta.get("schema_version") != SCHEMA_VERSION:
        change = _SCHEMA_CHANGES.get(meta.get("schema_version"))
        raise CheckpointError(f"{path} has checkpoint schema_version {meta.get('schema_version')!r}; this lowmem "
                              f"reads schema_version {SCHEMA_VERSION}" + (f" ({change})" if change else "") +
                              ". Load it with the lowmem version that wrote it (and export it), or start a fresh "
                              "run from its exported weights.")
    if verify:
        from lowmem.checkpoint.verify import damage
        why = damage(path)
        if why is not None:
            raise CheckpointError(f"checkpoint {path} is damaged: {why}. Resume from another checkpoint "
                                  "(list_checkpoints(root)).")
    aliases = meta.get("aliases", {})
    try:
        loaded = {name: load_file(path / name, device="cpu") for name in meta["files"]}
    except Exception as exc:
        raise CheckpointError(f"cannot read {path} ({type(exc).__name__}: {exc}); the files are corrupt. Resume "
                              "from another checkpoint (list_checkpoints(root)).") from exc
    for name, tensors in loaded.items():
        for alias, kept in aliases.get(name, {}).items():
            tensors[alias] = tensors[kept]
    model_state = loaded[_MODEL]
    runtime_state = {"state": _unflatten_optim(loaded[_OPTIM]), "lowmem": meta["lowmem"]}
    meta["rng_restored"] = _RNG in loaded
    if _RNG in loaded:
        _restore_rng(loaded[_RNG])
    return model_state, runtime_state, meta


def resolve_resume(root: str | os.PathLike, resume: str | os.PathLike | None) -> Path | None:
    """The checkpoint a run should resume from, by completeness and sizes only (no hashes; launch.finetune and
    Runtime.load use lowmem.checkpoint.verify.select_resume, which verifies and reports what it skips).

    "auto": the latest complete checkpoint under root, or None when there is none; "none", "" or None: None;
    anything else is a path to one checkpoint directory (absolute, relative to the working directory, or a name
    under root such as "step-00000100"); a missing or incomplete one raises CheckpointError.
    """
    if resume is None or (isinstance(resume, str) and resume.strip().lower() in ("", "none")):
        return None
    if isinstance(resume, str) and resume.strip().lower() == "auto":
        return latest_checkpoint(root)
    path = Path(resume)
    if not path.exists() and not path.is_absolute() and (Path(root) / path).exists():
        path = Path(root) / path
    if not path.is_dir():
        raise CheckpointError(f"resume={str(resume)!r}: {path} does not exist or is not a directory. Pass a "
                              f"checkpoint directory (root/step-XXXXXXXX), resume=auto for the latest under {root}, "
                              "or resume=none.")
    meta, why = _read_complete_meta(path)
    if meta is None:
        latest = latest_checkpoint(root)
        hint = f"the latest complete one under {root} is {latest}" if latest else f"there is none under {root}"
        raise CheckpointError(f"resume={str(resume)!r}: {path} is not a complete checkpoint ({why}); {hint}. Pass "
                              "another checkpoint directory, resume=auto, or resume=none.")
    return path
