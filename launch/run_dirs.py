"""The directories a run creates, and removing them again when the run fails before it wrote anything: a typo in
the model name must not leave an empty outputs/... directory behind."""
from __future__ import annotations

from pathlib import Path

__all__ = ["missing_dirs", "remove_unused_dirs"]


def missing_dirs(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first (what this run would create)."""
    missing, current = [], path.absolute()
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    return missing


def remove_unused_dirs(created: list[Path]) -> None:
    """After a run that failed before writing anything: remove the directories it created (deepest first) that hold
    nothing but its own hidden files (the write probe, a lock), so a typo leaves no empty outputs/... behind."""
    for folder in created:
        try:
            entries = list(folder.iterdir()) if folder.is_dir() else None
            if entries is None or any(not e.name.startswith(".") or not e.is_file() for e in entries):
                return
            for entry in entries:
                entry.unlink()
            folder.rmdir()
        except OSError:
            return
