"""The layout's import rules (ARCHITECTURE.md): `quant <- lowmem <- hooks <- launch`, and inside lowmem, `optim/`
imports neither `model/` nor `checkpoint/`. Read from the source with `ast`, so a function-local import counts too.

The one allowed upward edge is the lazy facade: `lowmem/__init__.py` resolves `prepare` from `hooks` inside a
function, and `lowmem.integrations` (a facade over the runtime for other trainers) may do the same inside functions.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAYERS = ["quant", "lowmem", "hooks", "launch"]        # each may import only itself and those to its left


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, imported at module level) for every absolute import in `path`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, id(node) in top_level))
    return found


def _sources(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("package", LAYERS)
def test_imports_point_one_way(package):
    allowed = set(LAYERS[: LAYERS.index(package) + 1])
    forbidden = set(LAYERS) - allowed
    bad = []
    for path in _sources(package):
        rel = path.relative_to(REPO).as_posix()
        lazy_facade = rel == "lowmem/__init__.py" or rel.startswith("lowmem/integrations/")
        for module, top_level in _imports(path):
            root = module.split(".")[0]
            if root in forbidden and not (lazy_facade and not top_level):
                bad.append(f"{rel} imports {module}")
    assert not bad, "imports against the layer order quant <- lowmem <- hooks <- launch:\n" + "\n".join(bad)


def test_optim_imports_neither_model_nor_checkpoint():
    bad = [f"{path.relative_to(REPO).as_posix()} imports {module}"
           for path in _sources("lowmem/optim") for module, _ in _imports(path)
           if module.startswith(("lowmem.model", "lowmem.checkpoint"))]
    assert not bad, "\n".join(bad)


def test_tests_mirror_the_lowmem_rooms():
    rooms = sorted(p.name for p in (REPO / "lowmem").iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert {"optim", "model", "checkpoint", "memory"} <= set(rooms)
    for room in rooms:
        assert (REPO / "tests/unit/lowmem" / room).is_dir(), f"tests/unit/lowmem/{room}/ is missing"
