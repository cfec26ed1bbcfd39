"""`python -m benchmarks.gpu_suite --device cpu --quick` runs end to end, so the GPU suite cannot rot on CPU-only CI."""
import subprocess
import sys
import weakref

import pytest
import torch

from benchmarks import gpu_suite


def test_gpu_suite_quick_cpu_end_to_end(tmp_path):
    # Exactly the CI form (the pytest stage reports itself not run on a CPU device); the tiny model, few steps.
    assert gpu_suite.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "gpu-cpu.md").read_text(encoding="utf-8")
    assert "not GPU figures" in report and "not run: no CUDA device" in report
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| ")}
    for method in ("lowmem", "adamw_bf16"):
        cells = [c.strip() for c in rows[method].split("|")[1:-1]]
        step_s, tokens_per_s, peak_mib, estimate_mib = float(cells[1]), float(cells[2]), float(cells[5]), \
            float(cells[6])
        assert step_s > 0 and tokens_per_s > 0 and peak_mib > 0 and estimate_mib > 0
    for method in ("bnb_adamw8bit", "torchao_adamw8bit"):
        assert method in rows   # measured, or reported "not installed" / the error that stopped it
    kernels = [line for line in report.splitlines() if line.startswith(("| sr_update_int8_", "| dequantize_int8"))]
    assert len(kernels) == 2 and all(float(line.split("|")[2]) > 0 and float(line.split("|")[4]) > 0
                                     for line in kernels)
    loading = report.split("## 4. Loading")[1]
    assert "streamed / today: time" in loading and "\nstreamed " in loading and "\ntoday " in loading


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the refusal cannot happen")
def test_gpu_suite_refuses_cuda_without_a_device(capsys):
    assert gpu_suite.main(["--device", "cuda", "--quick", "--out", "/nonexistent"]) == 2
    assert "--device cpu --quick" in capsys.readouterr().err


def test_gpu_suite_budget_skips_what_it_cannot_start(tmp_path):
    # A spent budget starts no measurement: every one is reported as skipped, and the report is complete.
    assert gpu_suite.main(["--device", "cpu", "--quick", "--out", str(tmp_path), "--budget-s", "1e-9"]) == 0
    report = (tmp_path / "gpu-cpu.md").read_text(encoding="utf-8")
    assert "Incomplete" not in report
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| ")}
    for name in (*gpu_suite.METHODS, "skipped: the 0 s budget was spent"):
        assert name in rows
    for method in gpu_suite.METHODS:
        assert "skipped: the 0 s budget was spent" in rows[method]
    assert "skipped: the 0 s budget was spent" in report.split("## 4. Loading")[1]


def test_gpu_suite_report_survives_a_killed_run(tmp_path, monkeypatch):
    # The device's time limit kills the command: what was measured before must already be on disk.
    real = gpu_suite.measure_method
    calls = []

    def measure_then_die(method, work, device, steps):
        calls.append(method)
        if len(calls) == 2:
            raise KeyboardInterrupt   # what a kill mid-measurement looks like from inside
        return real(method, work, device, steps)

    monkeypatch.setattr(gpu_suite, "measure_method", measure_then_die)
    with pytest.raises(KeyboardInterrupt):
        gpu_suite.main(["--device", "cpu", "--quick", "--out", str(tmp_path), "--methods", "adamw_bf16,lowmem"])
    report = (tmp_path / "gpu-cpu.md").read_text(encoding="utf-8")
    assert "**Incomplete: still to run when this was written:" in report
    assert "tiny LLaMA (hidden 64, 2 layers) lowmem" in report.split("**Incomplete")[1].splitlines()[0]
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| ")}
    assert float(rows["adamw_bf16"].split("|")[2]) > 0          # the finished method's step time is kept
    assert "lowmem" not in rows
    assert float(rows["sr_update_int8_ (SR write)"].split("|")[2]) > 0


@pytest.mark.parametrize("flag", ["--budget-s", "--tests-timeout"])
def test_gpu_suite_rejects_a_non_positive_time(flag, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_suite.main(["--device", "cpu", "--quick", flag, "0"])
    assert exc.value.code == 2 and flag in capsys.readouterr().err


def test_gpu_suite_reports_a_broken_library_and_goes_on(tmp_path, monkeypatch):
    """A torchao that is installed but fails on import (built for another CUDA) is reported as broken and skipped;
    a missing bitsandbytes as not installed; the other methods are measured and the suite finishes."""
    package = tmp_path / "fake_site" / "torchao"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('raise RuntimeError("torchao was built for CUDA 11.8")\n')
    monkeypatch.syspath_prepend(str(tmp_path / "fake_site"))
    for name in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)   # what an absent package looks like to import
    out = tmp_path / "out"
    assert gpu_suite.main(["--device", "cpu", "--quick", "--out", str(out), "--methods",
                           "adamw_bf16,torchao_adamw8bit,bnb_adamw8bit"]) == 0
    rows = {line.split("|")[1].strip(): line for line in (out / "gpu-cpu.md").read_text().splitlines()
            if line.startswith("| ")}
    assert "broken, skipped: RuntimeError: torchao was built for CUDA 11.8" in rows["torchao_adamw8bit"]
    assert "not installed (bitsandbytes)" in rows["bnb_adamw8bit"]
    assert float(rows["adamw_bf16"].split("|")[2]) > 0


def test_measure_method_frees_the_model(monkeypatch):
    """lowmem's runtime and the model hold each other (hooks, sinks): the method's model must be gone when
    measure_method returns, or later methods' peaks would include it."""
    made = []
    real = gpu_suite.LlamaForCausalLM

    def tracked(config):
        model = real(config)
        made.append(weakref.ref(model))
        return model

    monkeypatch.setattr(gpu_suite, "LlamaForCausalLM", tracked)
    work = gpu_suite.workloads(quick=True)[0]
    result = gpu_suite.measure_method("lowmem", work, torch.device("cpu"), steps=1)
    assert result["status"] == "ok" and len(made) == 1
    assert made[0]() is None


def test_estimate_is_compared_like_with_like():
    """On CUDA the estimate beside the allocator's peak leaves out the CUDA context and allocator slack (the
    allocator counts tensors only); on CPU there is nothing to leave out."""
    from lowmem.memory import estimate
    from lowmem.memory.cost_model import CUDA_CONTEXT_BYTES
    from lowmem.presets import preset
    work = gpu_suite.workloads(quick=True)[0]
    cfg = preset("lowmem", lr=1e-4, stagger=True)
    kw = dict(seq_len=work.seq_len, micro_batch_size=work.batch, gradient_checkpointing=False, lowmem_config=cfg,
              dtype=torch.bfloat16)
    full = estimate(work.config, method="lowmem", device_type="cuda", **kw)
    compared = gpu_suite._estimate("lowmem", work, cfg, torch.bfloat16, torch.device("cuda"))
    assert compared == full.peak_bytes - full.components["cuda_context"] - full.components["allocator_slack"]
    assert full.components["cuda_context"] == CUDA_CONTEXT_BYTES and full.peak_bytes - compared > CUDA_CONTEXT_BYTES
    cpu = estimate(work.config, method="lowmem", device_type="cpu", **kw)
    assert gpu_suite._estimate("lowmem", work, cfg, torch.bfloat16, torch.device("cpu")) == cpu.peak_bytes


def test_gpu_tests_timeout_keeps_the_output(tmp_path, monkeypatch):
    """pytest -m gpu killed at its timeout: the lines it wrote are in the log file and quoted in the summary."""
    def run_until_timeout(cmd, *, stdout, timeout, **kwargs):
        stdout.write("tests/unit/quant/test_compiled_numerics.py ....\nFAILED tests/x.py::test_y - AssertionError\n")
        stdout.flush()
        raise subprocess.TimeoutExpired(cmd, timeout)

    monkeypatch.setattr(gpu_suite.subprocess, "run", run_until_timeout)
    log = tmp_path / "gpu-tests-cuda.log"
    result = gpu_suite.run_gpu_tests(["tests"], 42.0, log)
    assert result["rc"] is None and result["summary"].startswith("timed out after 42 s")
    assert "FAILED tests/x.py::test_y" in result["summary"]
    assert "test_compiled_numerics.py ...." in log.read_text()
