"""`python -m benchmarks.memory_budget` as a user runs it: a new run directory (printed), never the committed
benchmarks/results/ unless --out says so; a compact terminal table; GiB everywhere; the card's "fits" kept apart
from the project's size goal; the 12 GB card and lowmem's breakdown before / after the memory levers."""
from __future__ import annotations

import re
from pathlib import Path

from transformers import LlamaConfig

from benchmarks import memory_budget
from benchmarks.memory_budget import BUILTIN, lever_columns, lever_table
from lowmem.memory import GIB, GPUS

RESULTS = Path(memory_budget.__file__).parent / "results"


def _snapshot(folder: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} if folder.is_dir() else {}


def test_writes_a_new_run_directory_and_prints_its_path(tmp_path, monkeypatch, capsys):
    before = _snapshot(RESULTS)
    monkeypatch.chdir(tmp_path)
    assert memory_budget.main(["--model", "llama2-7b", "--gpu", "4060ti-16gb", "--seq-len", "256"]) == 0
    out = capsys.readouterr().out
    (run,) = (tmp_path / "outputs" / "benchmarks").iterdir()
    report = run / "memory-budget-llama2-7b-4060ti-16gb.md"
    assert report.is_file() and list(run.glob("*.png"))
    assert str(report.relative_to(tmp_path)) in out
    assert _snapshot(RESULTS) == before                     # the committed reports are untouched

    # Compact terminal table: one short row per method; the wide per-component table is in the file only.
    rows = [line for line in out.splitlines() if line.startswith("  ")]
    assert len(rows) == 1 + len(memory_budget.METHODS) and max(map(len, rows)) <= 60
    assert "optimizer_moments" in report.read_text() and "optimizer_moments" not in out
    for text in (out, report.read_text()):
        assert not re.search(r"\d GB\b", text) and "DESIGN" not in text
    assert "misses" not in report.read_text()
    lowmem_fits = next(r for r in rows if r.split()[0] == "lowmem").split()[-1]
    goal = re.search(r"Size goal \(independent of the card\): .* is (within|above) the project's goal",
                     report.read_text())
    assert lowmem_fits in ("yes", "no") and goal


def test_out_names_the_directory(tmp_path, capsys):
    assert memory_budget.main(["--model", "llama2-7b", "--seq-len", "256", "--out", str(tmp_path / "here")]) == 0
    assert (tmp_path / "here" / "memory-budget-llama2-7b-4060ti-16gb.md").is_file()
    assert str(tmp_path / "here") in capsys.readouterr().out


def test_llama3_8b_on_the_12gb_card_today_vs_new():
    assert GPUS["3060-12gb"] == 12 * GIB
    model = LlamaConfig(**BUILTIN["llama3-8b"])
    (_, today, _), (_, new, _), (_, int8_head, _), (_, offloaded, _), (_, fitted, chosen) = lever_columns(
        model, 256, 1, 256, GPUS["3060-12gb"])
    for b in (today, new, int8_head, offloaded, fitted):
        assert sum(b.components.values()) == b.peak_bytes
    assert today.peak_bytes > 0.95 * 12 * GIB >= fitted.peak_bytes
    assert int8_head.peak_bytes < new.peak_bytes < today.peak_bytes
    # the levers remove the float tables and their full-rank moments; the INT8 tables add V x h bytes each
    assert int8_head.components["float_params"] < new.components["float_params"] < today.components["float_params"]
    assert new.components["optimizer_moments"] < today.components["optimizer_moments"]
    assert offloaded.components["activations"] < int8_head.components["activations"]
    assert "gradient_checkpointing=True" in chosen
    text = "\n".join(lever_table(model, 256, 1, 256, GPUS["3060-12gb"]))
    assert "today" in text and "fit: auto" in text and "| peak |" in text


def test_the_load_phase_is_shown_beside_the_step():
    """Llama-3-8B on 12 GB: with the float head the load peaks once the optimizer state exists (its zero 8-bit
    AdamW state is written directly: no fp32 copy of (V, h)); with the INT8 head (the shipped 8B config) it peaks
    while lm_head streams in. Both fit; the host holds one tensor (the (V, h) table in bf16)."""
    from benchmarks.memory_budget import load_table
    lines, terminal = load_table(LlamaConfig(**BUILTIN["llama3-8b"]), 256, GPUS["3060-12gb"])
    text = "\n".join(lines)
    assert "## Load phase" in text and "| state_init |" not in text and "| host peak | 0.98 | 0.98 |" in text
    peak = next(line for line in text.splitlines() if line.startswith("| peak |"))
    assert "(optimizer state)" in peak and "(lm_head streamed)" in peak
    assert text.splitlines()[-1] == "| fits (95%) | yes | yes |"
    assert terminal.startswith("load phase (defaults): peak ") and "(fits)" in terminal
