"""benchmarks.quality: seed bands and claims against hand-computed values, the run ledger, and a study that is
interrupted and continues (the harness's training is replaced by a recorder; benchmarks.compare's tests cover the
training itself)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from benchmarks.compare.api import Workload
from benchmarks.compare.runner import MethodResult
from benchmarks.quality import __main__ as quality_main
from benchmarks.quality.bands import Band, ablation_costs, band_of, no_worse, reading, within_percent
from benchmarks.quality.ledger import load_run, run_path, save_run


def result(name: str, losses: list[float], *, status: str = "ok", exact: float | None = None) -> MethodResult:
    r = MethodResult(name, "baseline", "full", "", status=status, tokens_per_step=100)
    r.eval_points = [(0, {"eval_loss": 10.0})]
    for i, loss in enumerate(losses, 1):
        values = {"eval_loss": loss}
        if exact is not None:
            values["exact_match"] = exact
        r.eval_points.append((10 * i, values))
    r.step_seconds = [0.5] * (10 * len(losses))
    r.train_losses = [1.0] * (10 * len(losses))
    return r


def test_band_statistics_over_seeds():
    band = band_of("lowmem", {0: result("lowmem", [3.0, 2.5, 2.6]), 1: result("lowmem", [3.1, 2.7, 2.8]),
                              2: result("lowmem", [9.0], status="diverged (train loss nan at step 3)")})
    assert band.seeds == [0, 1]                       # the diverged run is left out
    assert band.final == [2.6, 2.8] and band.best == [2.5, 2.7]
    assert band.mean() == pytest.approx(2.7) and band.low() == 2.6 and band.high() == 2.8
    assert band.tokens_per_second == [200.0, 200.0]   # 100 tokens per 0.5 s step
    assert band.contains(2.75) and not band.contains(2.85)


def test_ablation_lines_compare_with_lowmem_band_and_name_a_one_seed_reference():
    lowmem = Band("lowmem", [0, 1, 2], [3.00, 3.02, 3.04], [], [], [], [])     # mean 3.02, band 3.00-3.04
    inside, outside = Band("a", [0], [3.03], [], [], [], []), Band("b", [0], [3.1708], [], [], [], [])
    assert ablation_costs(lowmem, [inside, outside, Band.empty("c")]) == [
        "a: 3.0300 (+0.33% vs lowmem, inside lowmem's seed band)",
        "b: 3.1708 (+4.99% vs lowmem, outside lowmem's seed band)"]
    # one lowmem seed is a point, not a noise band: the line says so instead of "outside"
    assert ablation_costs(Band("lowmem", [0], [3.00], [], [], [], []), [outside]) == [
        "b: 3.1708 (+5.69% vs lowmem, lowmem has one seed: no band)"]


def test_claims_are_one_sided_and_use_the_seed_band():
    adamw = Band("adamw-fp32", [0, 1, 2], [3.00, 3.02, 3.04], [], [], [], [])   # mean 3.02, band 3.00-3.04
    inside_1pct = Band("lowmem", [0], [3.02 * 1.009], [], [], [], [])
    beyond = Band("lowmem", [0], [3.02 * 1.03], [], [], [], [])
    lower = Band("lowmem", [0], [2.90], [], [], [], [])
    in_band = Band("lowmem", [0, 1], [3.01, 3.07], [], [], [], [])             # mean 3.04: +0.66%, inside the band
    assert within_percent(inside_1pct, adamw, 1.0, "c").verdict == "reproduced"
    assert within_percent(lower, adamw, 1.0, "c").verdict == "reproduced"     # lower loss is not a failure
    not_ok = within_percent(beyond, adamw, 1.0, "c")
    assert not_ok.verdict == "not reproduced" and "2.00 points beyond 1%" in not_ok.evidence
    assert within_percent(in_band, adamw, 0.1, "c").verdict == "reproduced"   # 0.66% > 0.1%, but inside the band
    assert no_worse(lower, adamw, "c").verdict == "reproduced"
    assert no_worse(in_band, adamw, "c").verdict == "within noise"
    assert no_worse(beyond, adamw, "c").verdict == "not reproduced"
    assert within_percent(Band.empty("lowmem"), adamw, 1.0, "c").verdict == "not measured"
    verdicts = [c.verdict for c in reading({"lowmem": lower, "adamw-fp32": adamw})]
    assert verdicts == ["reproduced", "not measured", "not measured"]
    # a claim resting on one seed says so; one with a band on both sides does not
    assert "one seed of lowmem: a single observation" in within_percent(lower, adamw, 1.0, "c").evidence
    assert "one seed" not in no_worse(in_band, adamw, "c").evidence


def test_ledger_round_trip_and_refusals(tmp_path):
    key = {"workload": "pretrain", "steps": 20, "method": "lowmem", "seed": 1}
    path = run_path(tmp_path, "pretrain", "lowmem", 1)
    original = result("lowmem", [3.0, 2.5], exact=0.25)
    save_run(path, original, settings_key=key)
    back = load_run(path, settings_key=key)
    assert back is not None and back.eval_points == original.eval_points and back.step_seconds == original.step_seconds
    assert back.metric("exact_match") == 0.25
    assert load_run(path, settings_key={**key, "steps": 40}) is None          # ran with other settings: run again
    path.write_text(path.read_text()[:25])                                    # torn file
    assert load_run(path, settings_key=key) is None
    assert not list(path.parent.glob(".*.tmp"))                                # no temporary left behind


class _Recorder:
    """Stands in for benchmarks.compare.runner.run_method: records calls, can be told to fail on the k-th one."""

    def __init__(self, interrupt_at: int | None = None):
        self.calls: list[tuple[str, int]] = []
        self.lr_factors: list[float] = []
        self.interrupt_at = interrupt_at

    def __call__(self, spec, workload, base, *, eval_at, initial_eval, log, on_step, lr_factor=1.0):
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        self.calls.append((spec.name, base.seed))
        self.lr_factors.append(lr_factor)
        for step in range(1, base.steps + 1):
            on_step(step)
        loss = {"adamw-fp32": 3.0, "adamw-bf16": 3.05, "lowmem": 3.01}.get(spec.name, 3.2) + 0.01 * base.seed
        r = result(spec.name, [loss + 0.5, loss])
        r.lr = workload.lr_for(spec.family) * lr_factor   # as benchmarks.compare.runner.settings_for
        return r


def _fake_workload(name: str, *, seed: int, quick: bool, device) -> Workload:
    """As the study's workload looks to the runner: the planned micro-batches per step and family learning rates."""
    from benchmarks.compare.workloads import LR
    model = nn.Linear(2, 2)
    accum = quality_main.plan.size_of(name, quick).accum
    return Workload(name=name, description="fake", make_model=lambda: model,
                    train_batches=lambda step: [{"input_ids": torch.zeros(1, 2, dtype=torch.long)}] * accum,
                    evaluate=lambda m: {"eval_loss": 10.0}, tokens_per_step=100, lr_for=lambda family: LR[name][family])


def test_an_interrupted_study_continues_where_it_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(quality_main.plan, "build_workload", _fake_workload)
    args = ["--quick", "--workload", "pretrain", "--seeds", "2", "--methods", "lowmem-no-sr,adafactor", "--out",
            str(tmp_path)]
    first = _Recorder(interrupt_at=2)
    monkeypatch.setattr(quality_main, "run_method", first)
    with pytest.raises(KeyboardInterrupt):
        quality_main.main(args)
    assert first.calls == [("adamw-fp32", 0), ("lowmem", 0)]
    partial = (tmp_path / "quality-pretrain-cpu.md").read_text()
    assert "Incomplete study" in partial and "adamw-bf16 seed 0" in partial

    # --report-only: the report from the finished runs, nothing run (another process may be continuing the study)
    reporter = _Recorder()
    monkeypatch.setattr(quality_main, "run_method", reporter)
    (tmp_path / "quality-pretrain-cpu.md").unlink()
    assert quality_main.main(args + ["--report-only"]) == 0 and reporter.calls == []
    rewritten = (tmp_path / "quality-pretrain-cpu.md").read_text()
    assert "| adamw-fp32 | 1 |" in rewritten and "| lowmem | 1 |" in rewritten
    assert "Incomplete study" in rewritten and "lowmem-no-sr seed 0" in rewritten and "lowmem seed 1" in rewritten
    assert "--report-only" not in rewritten                                  # the command shown continues the study

    second = _Recorder()
    monkeypatch.setattr(quality_main, "run_method", second)
    assert quality_main.main(args) == 0
    # seed 0 of every method first, then the other seeds of the seeded methods; finished runs are not repeated
    assert second.calls == [("adamw-bf16", 0), ("lowmem-no-sr", 0), ("adafactor", 0), ("adamw-fp32", 1),
                            ("lowmem", 1), ("adamw-bf16", 1)]
    report = (tmp_path / "quality-pretrain-cpu.md").read_text()
    assert "Incomplete study" not in report
    assert "| lowmem | 2 | 3.0150 [3.0100, 3.0200]" in report
    assert "**reproduced**: lowmem's final eval loss is within 1% of fp32 AdamW" in report
    assert "lowmem-no-sr: 3.2000" in report
    # another method against lowmem's band (mean 3.015): (3.2 - 3.015) / 3.015 = +6.14%
    assert "The other methods against lowmem" in report and "adafactor: 3.2000 (+6.14% vs lowmem" in report
    assert (tmp_path / "quality-pretrain-cpu-loss.png").stat().st_size > 0
    stored = json.loads((tmp_path / "quality-pretrain-cpu.json").read_text())
    assert sorted(stored) == ["adafactor", "adamw-bf16", "adamw-fp32", "lowmem", "lowmem-no-sr"]

    third = _Recorder()
    monkeypatch.setattr(quality_main, "run_method", third)
    assert quality_main.main(args) == 0 and third.calls == []                  # nothing left to run
    assert quality_main.main(args[:-2] + ["--steps", "3", "--out", str(tmp_path)]) == 0
    assert len(third.calls) == 8                                                # other settings: every run again


def test_seeded_methods_and_learning_rate_factor(tmp_path, monkeypatch):
    """--seeded chooses the methods run with several seeds; --lr-factor scales every method's learning rate, is part
    of the runs' settings (runs at another factor are run again, not mixed in) and shows in the report's lr column."""
    monkeypatch.setattr(quality_main.plan, "build_workload", _fake_workload)
    base = ["--quick", "--workload", "pretrain", "--seeds", "2", "--seeded", "adamw-fp32", "--methods", "adamw-fp32",
            "--out", str(tmp_path)]
    first = _Recorder()
    monkeypatch.setattr(quality_main, "run_method", first)
    assert quality_main.main(base + ["--lr-factor", "3"]) == 0
    assert first.calls == [("adamw-fp32", 0), ("adamw-fp32", 1)] and first.lr_factors == [3.0, 3.0]
    report = (tmp_path / "quality-pretrain-cpu.md").read_text()
    assert "| adamw-fp32 | 2 |" in report and "| 0.003 |" in report        # the fake workload's family lr is 1e-3
    assert "times 3 (--lr-factor)" in report
    second = _Recorder()
    monkeypatch.setattr(quality_main, "run_method", second)
    assert quality_main.main(base) == 0 and second.lr_factors == [1.0, 1.0]   # factor 1: other settings, run again
    assert "| 0.001 |" in (tmp_path / "quality-pretrain-cpu.md").read_text()
    with pytest.raises(SystemExit):
        quality_main.main(base + ["--lr-factor", "0"])
    with pytest.raises(SystemExit, match="unknown method"):
        quality_main.main(base[:5] + ["--seeded", "adamw-fp33", "--out", str(tmp_path)])


def test_stored_runs_are_keyed_by_the_resolved_lowmem_config(tmp_path, monkeypatch):
    """A stored lowmem run made under another LowMemConfig (a default changed since) is run again, not mixed in; a
    workload whose learning rate differs from the plan's is refused before anything runs under a wrong key."""
    monkeypatch.setattr(quality_main.plan, "build_workload", _fake_workload)
    args = ["--quick", "--workload", "pretrain", "--seeds", "1", "--seeded", "lowmem", "--methods", "adafactor",
            "--out", str(tmp_path)]
    first = _Recorder()
    monkeypatch.setattr(quality_main, "run_method", first)
    assert quality_main.main(args) == 0 and ("lowmem", 0) in first.calls
    path = run_path(tmp_path, "pretrain", "lowmem", 0)
    payload = json.loads(path.read_text())
    assert payload["settings"]["config"]["rank"] == 8 and payload["settings"]["config"]["power_iters"] == 2
    assert json.loads(run_path(tmp_path, "pretrain", "adafactor", 0).read_text())["settings"]["config"] is None
    payload["settings"]["config"]["power_iters"] = 1                         # as if made under another default
    path.write_text(json.dumps(payload))
    second = _Recorder()
    monkeypatch.setattr(quality_main, "run_method", second)
    assert quality_main.main(args) == 0 and second.calls == [("lowmem", 0)]

    def wrong_lr(name, **kw):
        workload = _fake_workload(name, **kw)
        return dataclasses.replace(workload, lr_for=lambda family: 0.5)
    monkeypatch.setattr(quality_main.plan, "build_workload", wrong_lr)
    path.unlink()
    with pytest.raises(RuntimeError, match="lr: 0.01 vs 0.5"):
        quality_main.main(args)
