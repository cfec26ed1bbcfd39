"""Is a checkpoint intact, and which one should a run resume from?

A checkpoint (lowmem.checkpoint.store or .distributed layout) is intact when its meta.json parses and is marked
complete, every file it lists exists with the recorded size, every safetensors header parses, and every file's
sha256 equals the one in meta.json. `damage(path)` returns the first thing wrong (one sentence) or None.

Cost: hashing reads every byte once, streamed in `store._HASH_CHUNK_BYTES` chunks (constant memory). sha256 with
the CPU's SHA extensions runs at about 1.4-1.8 GB/s per core (measured: `python -m benchmarks.checkpoint_hash`), so
a LLaMA-2-7B lowmem checkpoint (about 8.7 GB: INT8 weights and scales, bf16 float parameters, moments, projectors,
residuals) costs about 6 s of one core per resume or export, more on a busy machine or when the disk is slower than
that. A resume hashes each candidate once (select_resume) and then loads with verify=False.

`select_resume(root, "auto")` walks the checkpoints newest first and returns the first intact one, calling
`on_skip(path, why)` for each damaged one it passes over; `select_resume(root, PATH)` raises CheckpointError naming
the damage instead of falling back.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

from lowmem.checkpoint import store

_MAX_HEADER_BYTES = 100 << 20   # safetensors' own limit on the JSON header


def _safetensors_header_problem(path: Path) -> str | None:
    """None when `path` starts with a well-formed safetensors header (u64 length, JSON object, in-bounds offsets)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{path} is shorter than a safetensors header"
            (length,) = struct.unpack("<Q", head)
            if length > min(_MAX_HEADER_BYTES, size - 8):
                return f"{path} has a corrupt safetensors header (header length {length} > file size {size})"
            header = json.loads(fh.read(length))
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror or exc})"
    except ValueError as exc:
        return f"{path} has a corrupt safetensors header (not JSON: {exc})"
    if not isinstance(header, dict):
        return f"{path} has a corrupt safetensors header (not a JSON object)"
    data_bytes = size - 8 - length
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_bytes):
            return f"{path} has a corrupt safetensors header (tensor {name[:80]!r} points outside the file)"
    return None


def damage(path: str | os.PathLike, *, hashes: bool = True) -> str | None:
    """None when the checkpoint directory is intact (module docstring), else what is wrong, in one sentence.

    hashes=False skips the sha256 comparison (sizes and headers only: cheap)."""
    path = Path(path)
    meta, why = store._read_complete_meta(path)
    if meta is None:
        return why
    if meta.get("schema_version") != store.SCHEMA_VERSION:
        return (f"{path / store._META} has schema_version {meta.get('schema_version')!r}, this lowmem reads "
                f"{store.SCHEMA_VERSION}")
    files = meta["files"]
    for name in files:
        if name.endswith(".safetensors"):
            problem = _safetensors_header_problem(path / name)
            if problem:
                return problem
    if not hashes:
        return None
    for name, info in files.items():
        recorded = info.get("sha256") if isinstance(info, dict) else None
        if not isinstance(recorded, str):
            return f"{path / store._META} records no sha256 for {name}"
        try:
            actual = store._sha256(path / name)
        except OSError as exc:
            return f"{path / name} cannot be read ({exc.strerror or exc})"
        if actual != recorded:
            return f"{path / name} does not match its sha256 in meta.json (the file was changed or is corrupt)"
    return None


def _step_dirs_newest_first(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = store._STEP_DIR.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found, reverse=True)]


def select_resume(root: str | os.PathLike, resume: str | os.PathLike | None, *,
                  on_skip: Callable[[Path, str], None] | None = None) -> Path | None:
    """The intact checkpoint a run resumes from, verified (hashes included).

    "auto": the newest intact `root/step-*`, damaged newer ones reported through on_skip(path, why) and passed
    over; None when there is none. "none", "" or None: None. Anything else names one checkpoint directory (a path,
    or a name under root such as "step-00000100"); a missing or damaged one raises store.CheckpointError naming
    the damage (no fallback: the user asked for that one).
    """
    root = Path(root)
    if resume is None or (isinstance(resume, str) and resume.strip().lower() in ("", "none")):
        return None
    if isinstance(resume, str) and resume.strip().lower() == "auto":
        for path in _step_dirs_newest_first(root):
            why = damage(path)
            if why is None:
                return path
            if on_skip is not None:
                on_skip(path, why)
        return None
    path = Path(resume)
    if not path.exists() and not path.is_absolute() and (root / path).exists():
        path = root / path
    if not path.is_dir():
        raise store.CheckpointError(
            f"resume={str(resume)!r}: {path} does not exist or is not a directory. Pass a checkpoint directory "
            f"(root/step-XXXXXXXX), resume=auto for the newest intact one under {root}, or resume=none.")
    why = damage(path)
    if why is not None:
        raise store.CheckpointError(
            f"resume={str(resume)!r}: checkpoint {path} is damaged: {why}. Pass another checkpoint directory, "
            "resume=auto (the newest intact one), or resume=none.")
    return path
