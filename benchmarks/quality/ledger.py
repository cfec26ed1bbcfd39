"""Finished runs on disk: one JSON file per (workload, method, seed), written atomically.

A study that is interrupted (Ctrl-C, a killed machine) continues where it stopped: finished runs are read back and
not run again; the run that was cut off starts again from its first step (runs are minutes long; checkpointing every
compared method's optimizer mid-run is not worth its complexity here).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from benchmarks.compare.runner import MethodResult

_FIELDS = {f for f in MethodResult.__dataclass_fields__}


def run_path(out_dir: Path, workload: str, method: str, seed: int) -> Path:
    return Path(out_dir) / "runs" / workload / f"{method}-seed{seed}.json"


def save_run(path: Path, result: MethodResult, *, settings_key: dict) -> None:
    """Write `result` (and the settings it ran with, so a changed study is not mixed with an old one) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"settings": settings_key, "result": result.to_dict()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_run(path: Path, *, settings_key: dict) -> MethodResult | None:
    """The stored result, or None when there is none, it is unreadable, or it ran with other settings."""
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(payload, dict) or payload.get("settings") != settings_key:
        return None
    data = {k: v for k, v in payload.get("result", {}).items() if k in _FIELDS}
    try:
        result = MethodResult(**data)
    except TypeError:
        return None
    result.eval_points = [(int(step), dict(values)) for step, values in result.eval_points]
    return result
