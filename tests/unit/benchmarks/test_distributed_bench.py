"""Smoke test of `python -m benchmarks.distributed --quick` (2 CPU processes over gloo, ~35 s on 2 cores).

Checks that the report is written with every section, that every number in its tables is positive, and that the
bytes figures equal formulas recomputed here from the model shape alone:
- the dense all-reduce of every trained tensor in fp32 (ring: 2(W-1)/W of the payload per rank);
- ZeRO 0 steady-step traffic: an all-reduce of each low-rank weight's projected gradient R (the seven linears
  of each layer and the untied input embedding, an INT8 low-rank (vocab, h) table), of the q/k residual
  entries (ceil(1% of m·n) each) and of every float parameter's gradient, plus the step's statistics (two all-reduces
  of two float64 values each) and the one-float64 agreement that the loss is finite;
- update sharing: (a) N fp32 of the low-rank moment shape, (b) int8 codes m·n plus fp32 scales m·ceil(n/256).
No timing thresholds: times are only required to be positive.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# The quick benchmark takes a few minutes on an idle 2-core machine; the limit is a hang guard for a busy one.
QUICK_RUN_TIMEOUT_S = 2400
pytestmark = [pytest.mark.multi_gpu, pytest.mark.slow, pytest.mark.timeout(QUICK_RUN_TIMEOUT_S + 600)]

REPO = Path(__file__).resolve().parents[3]
NUMBER = re.compile(r"^-?\d+(\.\d+)?(e[-+]?\d+)?$")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_bench")
    report, data = out / "report.md", out / "numbers.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.distributed", "--quick", "--report", str(report),
                           "--json", str(data)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=QUICK_RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return report.read_text(), json.loads(data.read_text())


def tables(markdown: str) -> list[list[list[str]]]:
    """Every markdown table as rows of cells (header and separator rows dropped)."""
    found, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            current.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif current:
            found.append([row for row in current[2:]])
            current = []
    return found


def numbers_in(cell: str) -> list[float]:
    return [float(part) for part in cell.strip("()x").replace("(", "").replace(")", "").split(", ")
            if NUMBER.match(part.strip())]


def trained_shapes(s: dict) -> tuple[list[tuple[str, tuple[int, int]]], list[int]]:
    """(low-rank weights as (role, (out, in))), float parameter numels of the LLaMA model in the settings.

    The untied input embedding is a low-rank INT8 weight under the default exclude list ('*lm_head'): its
    (vocab, h) gradient travels as R, like a linear's; lm_head stays a float parameter."""
    h, inter, kv = s["hidden"], s["intermediate"], s["kv_heads"] * (s["hidden"] // s["heads"])
    linears = [("embed", (s["vocab"], h))]                        # embed_tokens (lowmem.model.int8_embedding)
    floats = [s["vocab"] * h, h]                                  # lm_head, final norm
    for _ in range(s["layers"]):
        linears += [("q", (h, h)), ("k", (kv, h)), ("v", (kv, h)), ("o", (h, h)),
                    ("gate", (inter, h)), ("up", (inter, h)), ("down", (h, inter))]
        floats += [h, h]                                          # the two RMSNorms
    return linears, floats


def test_report_has_every_part(quick_run):
    report, _ = quick_run
    for heading in ("## 1. One process vs two", "## 2. ZeRO 1/2 update sharing", "## 3. Per-rank planner view"):
        assert heading in report
    assert "Command: `python -m benchmarks.distributed --quick" in report
    assert "machine: CPU" in report and "torch" in report
    assert "memory-budget-llama2-7b-per-rank.md" in report
    assert "lowmem uses (a)" in report
    for label in ("1 process", "ZeRO 0", "ZeRO 1", "ZeRO 2", "ZeRO 3", "ZeRO 2, overlap=False"):
        assert f"| {label}" in report or f"proc, {label} |" in report


def test_every_number_in_the_tables_is_positive(quick_run):
    report, _ = quick_run
    found = tables(report)
    assert len(found) == 3                      # time, bytes/memory, update sharing
    count = 0
    for table in found:
        for row in table:
            for cell in row[1:]:
                for value in numbers_in(cell):
                    assert value > 0, f"non-positive number {value} in row {row}"
                    count += 1
    assert count > 100
    assert all(row[-1] == "yes" for row in found[2])   # (a) and (b) leave identical INT8 bytes


def test_dense_and_zero0_bytes_match_the_formulas(quick_run):
    report, data = quick_run
    s, world = data["settings"], 2
    linears, floats = trained_shapes(s)
    numel = sum(m * n for _, (m, n) in linears) + sum(floats)
    dense = 2 * (world - 1) / world * 4 * numel
    assert data["dense_wire_bytes"] == pytest.approx(dense, rel=1e-12)

    r = s["rank"]
    def r_numel(role, m, n):       # q/k: cross-head right projection (m, r); others the smaller side
        return m * r if role in ("q", "k") or m >= n else r * n
    residual = sum(math.ceil(0.01 * m * n - 1e-9) for role, (m, n) in linears if role in ("q", "k"))
    # + the step's statistics (2 x 2 fp64); no separate loss agreement (a non-finite loss poisons every rank's
    # backward instead: lowmem.distributed)
    payload = 4 * (sum(r_numel(role, m, n) for role, (m, n) in linears) + residual + sum(floats)) + 2 * 2 * 8
    zero0 = data["runs"]["ZeRO 0"]
    assert zero0["steady_wire_bytes"] == pytest.approx(2 * (world - 1) / world * payload, rel=1e-12)
    assert zero0["steady_dense_ratio"] == pytest.approx(zero0["steady_wire_bytes"] / dense, rel=1e-12)
    # ZeRO 1/2 moves the same bytes on steady steps: reduce R (half) + broadcast N (half) = one all-reduce, plus
    # each low-rank weight's fp32 skip flag at the end of its owner's broadcast (lowmem.distributed: no host read)
    flags = (world - 1) / world * 4 * len(linears)
    for label in ("ZeRO 1", "ZeRO 2", "ZeRO 2, overlap=False"):
        assert data["runs"][label]["steady_wire_bytes"] == pytest.approx(zero0["steady_wire_bytes"] + flags,
                                                                         rel=1e-12)

    byte_rows = {row[0]: row for row in tables(report)[1]}
    printed_dense = float(byte_rows["2 proc, ZeRO 0"][3])
    assert printed_dense == pytest.approx(dense / 2**20, abs=6e-4)
    for label, row in data["runs"].items():
        printed = byte_rows[f"2 proc, {label}"]
        assert float(printed[4]) == pytest.approx(row["steady_wire_bytes"] / dense, abs=6e-4)
        assert float(printed[5]) == pytest.approx(row["cycle_wire_bytes"] / dense, abs=6e-4)
        assert row["cycle_wire_bytes"] >= row["steady_wire_bytes"]    # refreshes only add traffic


def test_memory_fractions(quick_run):
    _, data = quick_run
    single, runs = data["single"], data["runs"]
    assert runs["ZeRO 0"]["state_bytes"] == [single["state_bytes"][0]] * 2
    for label in ("ZeRO 1", "ZeRO 2", "ZeRO 3"):
        assert max(runs[label]["state_bytes"]) < single["state_bytes"][0]
    # ZeRO 3 partitions whole weights: the ranks' INT8 bytes add up to the one-process figure.
    assert sum(runs["ZeRO 3"]["int8_weight_bytes"]) == single["int8_weight_bytes"][0]
    assert runs["ZeRO 3"]["int8_fraction"] == pytest.approx(max(runs["ZeRO 3"]["int8_weight_bytes"])
                                                            / single["int8_weight_bytes"][0])


def test_update_sharing_bytes_match_the_formulas(quick_run):
    report, data = quick_run
    printed = tables(report)[2]
    assert len(printed) == len(data["sharing"]) == len(data["settings"]["shapes"])
    for entry, row in zip(data["sharing"], printed):
        m, n, r = entry["shape"]
        direction = 4 * r * max(m, n)                     # N: (m, r) right (m >= n) or (r, n) left, fp32
        codes = m * n + 4 * m * math.ceil(n / 256)        # int8 codes + fp32 block scales
        assert entry["direction_payload_bytes"] == direction
        assert entry["codes_payload_bytes"] == codes
        assert float(row[4]) == pytest.approx(codes / direction, abs=6e-4)
        assert float(row[5]) == pytest.approx(m / (4 * r), abs=6e-4)
        assert float(row[8]) == pytest.approx(entry["single_codes_s"] / entry["single_direction_s"], abs=6e-3)
