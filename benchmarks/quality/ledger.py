"""Where the quality study keeps its finished runs: one JSON file per (workload, method, seed) under
`<out>/runs/<workload>/`, written and read by `benchmarks.compare.ledger` (atomic writes, settings-checked reads).

A study that is interrupted (Ctrl-C, a killed machine) continues where it stopped: finished runs are read back and
not run again; the run that was cut off starts again from its first step (runs are minutes long; checkpointing every
compared method's optimizer mid-run is not worth its complexity here).
"""
from __future__ import annotations

from pathlib import Path

from benchmarks.compare.ledger import load_run, save_run

__all__ = ["load_run", "run_path", "save_run"]


def run_path(out_dir: Path, workload: str, method: str, seed: int) -> Path:
    return Path(out_dir) / "runs" / workload / f"{method}-seed{seed}.json"
