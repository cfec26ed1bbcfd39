"""Finished method runs on disk, so that a long comparison or study that is interrupted continues where it stopped.

One JSON file per run, written atomically, holding the MethodResult and the settings it ran with; a stored run is
reused only when those settings are the ones asked for. `RunStore` is the comparison's view (one directory per
workload and device, one file per method and learning-rate factor); the quality study names its files itself
(`benchmarks.quality.ledger.run_path`). A run that was cut off starts again from its first step (runs are minutes
long; checkpointing every compared method's optimizer mid-run is not worth its complexity here).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from benchmarks.compare.runner import MethodResult

_FIELDS = {f for f in MethodResult.__dataclass_fields__}


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


class RunStore:
    """The comparison's finished runs: `<directory>/<method>-lr<factor>.json`, each checked against `settings_key`
    (the workload, its description with the family learning rates, the run shape, evaluation steps, device) plus
    the method, its learning-rate factor and its resolved configuration (`methods.resolved_config`: a lowmem preset's
    LowMemConfig, so a changed default is not mixed with runs made under the old one).

    Only runs that trained and ended on their own are kept ("ok" or "diverged ..."): a method that could not run
    here costs nothing to ask again, and one that raised may have met a passing problem. `reused` / `saved` count
    this process's reads and writes, for the report's provenance line."""

    def __init__(self, directory: Path | str, settings_key: dict):
        self.directory = Path(directory)
        self.settings_key = settings_key
        self.reused: list[MethodResult] = []
        self.saved = 0

    def path(self, method: str, lr_factor: float) -> Path:
        return self.directory / f"{method}-lr{lr_factor:.6g}.json"

    def _key(self, method: str, lr_factor: float, config: dict | None) -> dict:
        key = {**self.settings_key, "method": method, "lr_factor": float(lr_factor), "config": config}
        return json.loads(json.dumps(key))   # as it reads back from JSON (tuples become lists)

    def load(self, method: str, lr_factor: float, config: dict | None = None) -> MethodResult | None:
        result = load_run(self.path(method, lr_factor), settings_key=self._key(method, lr_factor, config))
        if result is not None:
            self.reused.append(result)
        return result

    def save(self, method: str, lr_factor: float, result: MethodResult, config: dict | None = None) -> bool:
        """Keep `result` if it is worth reusing (see the class docstring); True when written."""
        if not result.step_seconds or result.status.startswith("failed"):
            return False
        save_run(self.path(method, lr_factor), result, settings_key=self._key(method, lr_factor, config))
        self.saved += 1
        return True
