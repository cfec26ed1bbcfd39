"""benchmarks.compare: the runner on a tiny in-test workload, the report and its generated verdicts, the CLI's method
selection, and the AdamW / Adafactor trainers against hand-written torch.optim loops."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.compare import methods as M
from benchmarks.compare.__main__ import select_methods
from benchmarks.compare.api import MethodSettings, MethodSpec, Workload
from benchmarks.compare.report import NOT_REPRODUCED, REPRODUCED, reading, write_report
from benchmarks.compare.runner import MethodResult, eval_steps, run_comparison

VOCAB, SEQ, BATCH = 96, 12, 2


def tiny_workload(accum: int = 1) -> Workload:
    """Random 2-layer LLaMA (hidden 64, 4 heads, 2 KV heads) on random tokens."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    torch.manual_seed(0)
    initial = LlamaForCausalLM(config).state_dict()

    def make_model():
        model = LlamaForCausalLM(config)
        model.load_state_dict(initial)
        return model

    def train_batches(step):
        gen = torch.Generator().manual_seed(100 + step)
        ids = [torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen) for _ in range(accum)]
        return [{"input_ids": x, "labels": x.clone()} for x in ids]

    eval_ids = torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(7))

    def evaluate(model):
        loss = float(model(input_ids=eval_ids, labels=eval_ids).loss)
        return {"eval_loss": loss, "perplexity": math.exp(loss)}

    lrs = {"full": 1e-3, "adafactor": 1e-2, "galore": 1e-2, "lowmem": 1e-2, "adapter": 1e-3}
    return Workload("tiny", "random tokens", make_model, train_batches, evaluate, BATCH * SEQ * accum,
                    lambda family: lrs[family])


def settings(steps: int = 3, warmup: int = 1, accum: int = 1) -> MethodSettings:
    return MethodSettings(steps=steps, grad_accum_steps=accum, rank=8, refresh_interval_steps=2, lr=0.0,
                          warmup_steps=warmup, seed=0, device=torch.device("cpu"), dtype=torch.float32)


def spec(name: str) -> MethodSpec:
    return next(s for s in M.all_methods() if s.name == name)


def _broken_build(model, settings):
    raise RuntimeError("deliberately broken\nsecond line")


MISSING = MethodSpec("needs-missing", "full", _broken_build, requires=("no_such_module_for_compare_test",))
BROKEN = MethodSpec("broken", "full", _broken_build)


@pytest.fixture(scope="module")
def results():
    import lowmem.optim.lowrank
    original = lowmem.optim.lowrank.compute_projector
    specs = [spec("adamw-fp32"), MISSING, BROKEN, spec("lowmem"), spec("lowmem-no-residual")]
    out = run_comparison(specs, tiny_workload(), settings(), eval_points=2, log=lambda line: None)
    assert lowmem.optim.lowrank.compute_projector is original   # the timing wrapper is removed on close
    return {r.name: r for r in out}


def test_runner_rows(results):
    for name in ("adamw-fp32", "lowmem", "lowmem-no-residual"):
        r = results[name]
        assert r.ok, r.status
        assert len(r.train_losses) == 3 and all(math.isfinite(x) for x in r.train_losses)
        assert [s for s, _ in r.eval_points] == [0, *eval_steps(3, 2)]
        assert math.isfinite(r.metric("eval_loss"))
        assert r.peak_bytes > 0 and r.tokens_per_second > 0
    assert results["adamw-fp32"].ratio_fp32 == 1.0
    assert results["adamw-fp32"].refresh_seconds is None
    low = results["lowmem"]
    assert low.refresh_seconds > 0 and low.svd_equivalents > 0 and low.refresh_count > 0
    assert low.ratio_fp32 == low.mean_step_seconds / results["adamw-fp32"].mean_step_seconds
    # AdamW holds weights, gradients and two moments, all fp32: at least 4x the weights; activations of this tiny
    # batch add little, and nothing from outside the run (workload data, the template weights) is counted.
    param_bytes = 4 * sum(p.numel() for p in tiny_workload().make_model().parameters())
    assert 4 * param_bytes <= results["adamw-fp32"].peak_bytes <= 6 * param_bytes
    # Every method starts from the same weights: the shared step-0 evaluation.
    assert low.eval_points[0] == results["adamw-fp32"].eval_points[0]


def test_unavailable_and_failing_methods_do_not_stop_the_run(results):
    assert results["needs-missing"].status == "not installed (pip install no_such_module_for_compare_test)"
    assert results["needs-missing"].step_seconds == []
    assert results["broken"].status == "failed: RuntimeError: deliberately broken"
    assert results["lowmem-no-residual"].ok   # ran after both


def test_report_files(results, tmp_path):
    path = write_report(list(results.values()), out_dir=tmp_path, workload_name="tiny", device_tag="cpu",
                        machine="CPU test machine", command="python -m benchmarks.compare --quick",
                        settings_lines=["steps 3"], caveat="tiny model", wall_seconds=1.0)
    text = path.read_text()
    assert path.name == "compare-tiny-cpu.md"
    for needle in ("CPU test machine", "`python -m benchmarks.compare --quick`", "| `lowmem` |", "## Reading",
                   "Caveat: tiny model", "compare-tiny-cpu-loss.png", "not installed (pip install"):
        assert needle in text
    for png in ("compare-tiny-cpu-loss.png", "compare-tiny-cpu-bars.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "compare-tiny-cpu.json").stat().st_size > 0


def _row(name, step_s=1.0, loss=3.0, refresh_s=None, refreshes=None, steps=4):
    return MethodResult(name, "paper", "galore", "", tokens_per_step=10, step_seconds=[step_s] * steps,
                        train_losses=[loss] * steps,
                        eval_points=[(0, {"eval_loss": 5.0}), (steps, {"eval_loss": loss})],
                        refresh_seconds=refresh_s, refresh_count=refreshes)


def _claim(rows, start):
    return next(c for c in reading(rows) if c.claim.startswith(start))


@pytest.mark.parametrize("good", [True, False])
def test_reading_follows_the_numbers(good):
    galore_s, plus_s = 2.0, (0.4 if good else 1.0)                 # 5x vs 2x (claim: >= 3x)
    q_count, g_count = (3 if good else 6), 10                       # 70% vs 40% saved (claim: > 60%)
    dyn_loss, galore_loss = (2.9 if good else 3.1), 3.0
    low_s, low_refresh = 0.5, (0.5 * 4 * (0.02 if good else 0.2))    # 2% vs 20% of train time (claim: <= 5%)
    ref_s = 0.5 * (4.0 if good else 2.0)                             # 4x vs 2x faster than galore-torch (>= 3x)
    bf16_s = 0.5 * (1.0 if good else 0.5)                            # speed 1.0 vs 0.5 of bf16 (>= 0.9)
    bf16_loss, low_loss = 3.0, (3.02 if good else 3.06)              # +0.67% vs +2% (<= 1%)
    ref_loss = 3.05 if good else 3.0                                 # lowmem 3.02 <= 3.05; 3.06 > 3.0
    rows = [_row("galore", galore_s, galore_loss, refreshes=g_count), _row("galore_plus", plus_s),
            _row("q_galore", refreshes=q_count), _row("galore_dynamics_ef", loss=dyn_loss),
            _row("lowmem", low_s, low_loss, refresh_s=low_refresh), _row("galore-torch", ref_s, ref_loss),
            _row("adamw-bf16", bf16_s, bf16_loss)]
    claims = reading(rows)
    assert len(claims) == 8
    expected = REPRODUCED if good else NOT_REPRODUCED
    for c in claims:
        assert c.verdict == expected, (c.claim, c.detail)
    assert f"{galore_s / plus_s:.2f}x" in _claim(rows, "GaLore+").detail
    assert f"{100 * (1 - q_count / g_count):.1f}% saved" in _claim(rows, "Q-GaLore").detail


def test_reading_not_measured():
    rows = [_row("galore"), MethodResult("galore_plus", "paper", "galore", "", status="failed: RuntimeError: x")]
    verdicts = {c.claim: c.verdict for c in reading(rows)}
    plus = next(v for k, v in verdicts.items() if k.startswith("GaLore+"))
    assert plus == "not measured (galore_plus: failed: RuntimeError: x)"
    assert next(v for k, v in verdicts.items() if k.startswith("Q-GaLore")) == \
        "not measured (q_galore not in this run)"


def _reference_lr(step, lr, steps, warmup):
    """Linear warm-up, then cosine decay from lr to 0.1 lr over the remaining steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@pytest.mark.parametrize("name,make_opt", [
    ("adamw-fp32", lambda params, lr: torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                                         weight_decay=0.0)),
    ("adafactor", lambda params, lr: torch.optim.Adafactor(params, lr=lr, weight_decay=0.0)),
])
def test_optimizer_trainers_match_torch_loop(name, make_opt):
    workload, run = tiny_workload(accum=2), settings(steps=3, warmup=1, accum=2)
    run = MethodSettings(**{**run.__dict__, "lr": workload.lr_for(spec(name).family)})
    trainer = spec(name).build(workload.make_model(), run)
    reference = workload.make_model()
    optimizer = make_opt(reference.parameters(), run.lr)
    for step in range(3):
        batches = workload.train_batches(step)
        trainer.train_step(batches)
        for group in optimizer.param_groups:
            group["lr"] = _reference_lr(step, run.lr, run.steps, run.warmup_steps)
        for batch in batches:
            (reference(**batch).loss / len(batches)).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    trainer.close()
    got = dict(trainer.model.named_parameters())
    for key, want in reference.named_parameters():
        torch.testing.assert_close(got[key], want, rtol=0, atol=1e-6)
    assert not torch.equal(got["model.layers.0.mlp.up_proj.weight"], workload.make_model().state_dict()[
        "model.layers.0.mlp.up_proj.weight"])


def test_lowmem_config_keeps_paper_proportions():
    run = settings()
    run = MethodSettings(**{**run.__dict__, "refresh_interval_steps": 20, "steps": 100, "lr": 0.01})
    dyn = M.lowmem_config("galore_dynamics_ef", run)
    assert (dyn.refresh, dyn.refresh_interval_steps, dyn.geometric_start_step) == ("geometric", 20, 20)
    assert dyn.max_refresh_interval_steps == 250 and dyn.error_feedback_weight == 0.2
    q = M.lowmem_config("q_galore", run)
    assert (q.refresh, q.lazy_threshold, q.rank, q.lr, q.total_steps) == ("lazy", 0.4, 8, 0.01, 100)
    ablation = M.lowmem_config("lowmem", run, projector_bits=32)
    assert ablation.projector_bits == 32 and ablation.residual_warmup_steps == 10
    # rank ablations scale the run's rank (8 here), everything else as the lowmem row
    for name, rank in (("lowmem-rank-half", 4), ("lowmem-rank-double", 16)):
        overrides = M.ABLATIONS[name][0]
        config = M.lowmem_config("lowmem", run, **overrides)
        assert config.rank == rank
        assert config == M.lowmem_config("lowmem", run, rank=rank)
    assert M.ABLATIONS["lowmem-rank-half"][0] == {"rank_scale": 0.5}   # the table itself is not rewritten
    # interval ablations change the refresh interval (20 here) and nothing else: the residual warm-up and the lazy
    # cap stay scaled to the run's interval (the cap is raised only where it would fall below the new interval)
    lowmem = M.lowmem_config("lowmem", run)
    for name, interval in (("lowmem-interval-half", 10), ("lowmem-interval-double", 40)):
        config = M.lowmem_config("lowmem", run, **M.ABLATIONS[name][0])
        assert config.refresh_interval_steps == interval
        assert config == type(lowmem).from_dict(
            {**lowmem.to_dict(), "refresh_interval_steps": interval})
    # the power-iteration ablation changes the range finder's iteration count and nothing else
    config = M.lowmem_config("lowmem", run, **M.ABLATIONS["lowmem-power-iters-1"][0])
    assert lowmem.power_iters == 2 and config.power_iters == 1
    assert config == type(lowmem).from_dict({**lowmem.to_dict(), "power_iters": 1})
    tiny = MethodSettings(**{**run.__dict__, "refresh_interval_steps": 1})
    assert M.lowmem_config("lowmem", tiny, interval_scale=0.5).refresh_interval_steps == 1   # at least one step


def test_select_methods():
    specs = M.all_methods()
    cpu = torch.device("cpu")
    chosen = [s.name for s in select_methods("lowmem,paper", specs, cpu)]
    assert chosen[0] == "adamw-fp32"                      # the ratio reference is always run
    assert {"lowmem", "galore", "q_galore", "galore_plus"} <= set(chosen)
    assert len(select_methods("all", specs, cpu)) == len(specs)
    with pytest.raises(SystemExit, match="did you mean 'lowmem'"):
        select_methods("lowmme", specs, cpu)


def test_unavailable_reason():
    assert M.unavailable_reason(spec("adamw-8bit-bnb"), torch.device("cpu")) == "needs a GPU"
    assert M.unavailable_reason(MISSING, torch.device("cpu")).startswith("not installed (pip install ")
    assert M.unavailable_reason(spec("adamw-fp32"), torch.device("cpu")) is None


def test_lr_sweep_reports_the_best_of_each_methods_runs(tmp_path):
    """Three learning rates of AdamW on the tiny workload: the row is the run with the lowest final eval loss, the
    sweep records every value with its own loss, and the report lists them."""
    factors = (1.0, 1e-3, 3.0)
    out = run_comparison([spec("adamw-fp32"), MISSING], tiny_workload(), settings(), eval_points=1,
                         log=lambda line: None, lr_factors=factors, measure_memory=False)
    row, missing = out
    assert missing.lr_sweep == [] and missing.status.startswith("not installed")   # nothing swept, still reported
    assert [lr for lr, _, _ in row.lr_sweep] == pytest.approx([1e-3 * f for f in factors])
    losses = {lr: loss for lr, loss, status in row.lr_sweep}
    assert all(status == "ok" and math.isfinite(loss) for _, loss, status in row.lr_sweep)
    assert len(set(losses.values())) == 3                    # three different runs, not one reported thrice
    assert row.metric("eval_loss") == min(losses.values())
    assert row.lr == min(losses, key=losses.get)
    # each value's loss is that learning rate's own run: rerunning the chosen one alone gives the same loss
    (alone,) = run_comparison([spec("adamw-fp32")], tiny_workload(), settings(), eval_points=1,
                              log=lambda line: None, lr_factors=(row.lr / 1e-3,), measure_memory=False)
    assert alone.metric("eval_loss") == pytest.approx(row.metric("eval_loss"), rel=1e-6)
    text = write_report(out, out_dir=tmp_path, workload_name="tiny", device_tag="cpu", machine="m", command="c",
                        settings_lines=[], caveat="-").read_text()
    assert "## Learning-rate sweep" in text and "| `needs-missing` | baseline | not installed" in text
    for lr, loss in losses.items():
        assert f"{lr:.3g}: {loss:.4f}" in text


def test_sweep_choice_skips_failed_and_diverged_runs():
    from benchmarks.compare.report import sweep_table
    from benchmarks.compare.runner import choose_from_sweep
    good = _row("m", loss=3.0)
    worse = _row("m", loss=2.5)
    worse.status = "diverged (train loss nan at step 2)"     # its last eval is lower, but the run did not finish
    failed = MethodResult("m", "paper", "galore", "", status="failed: RuntimeError: x")
    best = _row("m", loss=2.9)
    assert choose_from_sweep([good, worse, failed, best]) is best
    assert choose_from_sweep([failed, worse]) is failed       # nothing finished: the first run, with its status
    best.lr, best.lr_sweep = 0.3, [(0.1, 3.0, "ok"), (0.3, 2.9, "ok"), (0.03, 2.5, "diverged")]
    table = sweep_table([best, _row("no-sweep")])
    assert "`no-sweep`" not in table
    assert "0.03: diverged; 0.1: 3.0000; 0.3: 2.9000 | 0.3 (edge of the range) |" in table


def test_lr_sweep_option():
    from benchmarks.compare.__main__ import DEFAULT_LR_FACTORS, parse_args
    assert parse_args([]).lr_sweep is None
    assert parse_args(["--lr-sweep"]).lr_sweep == DEFAULT_LR_FACTORS
    assert parse_args(["--lr-sweep", "1,0.5"]).lr_sweep == (1.0, 0.5)
    for bad in ("1,1", "0,1", "x", "-1"):
        with pytest.raises(SystemExit):
            parse_args(["--lr-sweep", bad])


def test_methods_that_cannot_run_under_the_meter_skip_the_memory_step(monkeypatch):
    """A method marked no_cpu_memory trains as usual, never runs under the live-bytes meter (torchao's compiled step
    refuses a TorchDispatchMode, and the refusal would poison its later runs), and says why it has no peak."""
    import dataclasses

    from benchmarks.compare import runner
    metered = []
    monkeypatch.setattr(runner, "measure_step_peak_bytes", lambda *args: metered.append(args) or 1)
    unmeasured = dataclasses.replace(spec("adamw-fp32"), name="no-meter", no_cpu_memory="cannot run under it")
    out = {r.name: r for r in run_comparison([spec("adamw-fp32"), unmeasured], tiny_workload(), settings(),
                                             eval_points=1, log=lambda line: None)}
    assert out["no-meter"].ok and len(out["no-meter"].train_losses) == 3
    assert out["no-meter"].peak_bytes is None
    assert out["no-meter"].memory_note == "not measured: cannot run under it"
    assert len(metered) == 1 and out["adamw-fp32"].peak_bytes == 1   # the other method was measured
    assert all(s.no_cpu_memory for s in M.all_methods() if s.name.startswith("torchao"))


def test_an_interrupted_sweep_continues_from_the_stored_runs(tmp_path, monkeypatch):
    """With a RunStore, a sweep cut off after its second run reruns only the third, and reports the same rows and
    sweep as one uninterrupted process; a store made with other settings is not reused; a failed run is not kept."""
    from benchmarks.compare import runner
    from benchmarks.compare.ledger import RunStore
    factors = (1.0, 1e-3, 3.0)
    key = {"workload": "tiny", "steps": 3}
    kwargs = dict(eval_points=1, log=lambda line: None, lr_factors=factors, measure_memory=False)
    (whole,) = run_comparison([spec("adamw-fp32")], tiny_workload(), settings(), **kwargs)

    real_run_method, calls = runner.run_method, []

    def counting(spec_, *args, lr_factor, **kw):
        if len(calls) == 2 and interrupt:
            raise KeyboardInterrupt
        calls.append((spec_.name, lr_factor))
        return real_run_method(spec_, *args, lr_factor=lr_factor, **kw)

    monkeypatch.setattr(runner, "run_method", counting)
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        run_comparison([spec("adamw-fp32")], tiny_workload(), settings(), store=RunStore(tmp_path, key), **kwargs)
    assert calls == [("adamw-fp32", 1.0), ("adamw-fp32", 1e-3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adamw-fp32-lr0.001.json", "adamw-fp32-lr1.json"]

    # --report-only: nothing runs; the two stored values and the missing one, marked pending
    from benchmarks.compare.__main__ import pending_note
    (partial,) = run_comparison([spec("adamw-fp32")], tiny_workload(), settings(), store=RunStore(tmp_path, key),
                                report_only=True, **kwargs)
    assert calls == [("adamw-fp32", 1.0), ("adamw-fp32", 1e-3)]
    assert [status for _, _, status in partial.lr_sweep] == ["ok", "ok", runner.PENDING]
    assert partial.lr_sweep[2][0] == pytest.approx(3e-3) and partial.ok
    assert "1 method(s) still have runs pending (adamw-fp32)" in pending_note([partial])

    interrupt, calls[:] = False, []
    store = RunStore(tmp_path, key)
    (resumed,) = run_comparison([spec("adamw-fp32")], tiny_workload(), settings(), store=store, **kwargs)
    assert calls == [("adamw-fp32", 3.0)] and len(store.reused) == 2 and store.saved == 1
    assert resumed.lr == whole.lr and resumed.metric("eval_loss") == pytest.approx(whole.metric("eval_loss"),
                                                                                   rel=1e-6)
    assert [lr for lr, _, _ in resumed.lr_sweep] == pytest.approx([lr for lr, _, _ in whole.lr_sweep])
    for (_, mine, _), (_, theirs, _) in zip(resumed.lr_sweep, whole.lr_sweep):
        assert mine == pytest.approx(theirs, rel=1e-6)
    assert all(r.finished_at for r in store.reused)
    assert pending_note([resumed]) == ""

    calls[:] = []                                              # other settings: nothing reused, everything rerun
    run_comparison([spec("adamw-fp32")], tiny_workload(), settings(), store=RunStore(tmp_path, {**key, "steps": 4}),
                   **kwargs)
    assert len(calls) == 3

    broken_store = RunStore(tmp_path / "broken", key)
    (failed,) = run_comparison([BROKEN], tiny_workload(), settings(), store=broken_store, **kwargs)
    assert failed.status.startswith("failed") and broken_store.saved == 0 and not (tmp_path / "broken").exists()


def test_report_caveat_names_reused_runs(tmp_path):
    from benchmarks.compare.__main__ import provenance
    from benchmarks.compare.ledger import RunStore
    assert provenance(None) == "Timings come from one run on a possibly shared machine."
    store = RunStore(tmp_path, {})
    assert "one run" in provenance(store)
    early, late = _row("a"), _row("b")
    early.finished_at, late.finished_at = "2026-11-29T10:00:00+00:00", "2026-11-29T12:00:00+00:00"
    store.reused += [late, early]
    text = provenance(store)
    assert text.startswith("2 of the runs were reused") and "2026-11-29T10:00:00+00:00 to 2026-11-29T12:00:00" in text


def test_stored_runs_carry_the_lowmem_config(tmp_path):
    """A lowmem run stored under one resolved LowMemConfig is not reused under another (a changed default)."""
    from benchmarks.compare.ledger import RunStore
    from benchmarks.compare.methods import resolved_config
    lowmem = resolved_config(spec("lowmem"), settings())
    assert lowmem["rank"] == 8 and lowmem["total_steps"] == 3
    assert resolved_config(spec("lowmem-rank-half"), settings())["rank"] == 4
    assert resolved_config(spec("adamw-fp32"), settings()) is None
    store = RunStore(tmp_path, {"workload": "tiny"})
    assert store.save("lowmem", 1.0, _row("lowmem"), lowmem)
    assert store.load("lowmem", 1.0, lowmem) is not None
    assert store.load("lowmem", 1.0, {**lowmem, "power_iters": lowmem["power_iters"] + 1}) is None
    assert store.load("lowmem", 3.0, lowmem) is None
