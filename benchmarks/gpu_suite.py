"""The GPU check in one command: tests, step time, kernel bandwidth and memory, written to one report.

    python -m benchmarks.gpu_suite                         # on one CUDA GPU, ~1B LLaMA; aims at < 8 minutes
    python -m benchmarks.gpu_suite --device cpu --quick    # the same code end to end on CPU, tiny model (CI)
    python -m benchmarks.gpu_suite --out "$OUT" --budget-s 420   # a time-limited borrowed GPU: see below

Lent GPU time is short and a killed command returns only the files it already wrote, so the report is rewritten
after every stage (marked incomplete, listing what has not run yet), the stages run cheapest-first after the tests
(kernels, then the ~1B model, then the SmolLM2 shape), and `--budget-s` (default 480 s, the 8 minutes above)
stops starting new measurements once spent: the ones not started are reported as skipped, not silently dropped.

Sections of the report (`benchmarks/results/gpu-<device>.md`, or under --out):
1. `pytest -m gpu` (the suite's GPU tests; with --quick only tests/unit/hooks/test_no_sync.py, whose gpu variant
   checks that backward never synchronises): the summary line and the wall time. Not run on a CPU device (every
   test marked gpu would skip there), so the CPU smoke test stays well under a minute.
2. Step time and tokens/s, measured side by side in this run on the same model and tokens: lowmem (fused INT8
   runtime, preset "lowmem") vs bf16 AdamW (torch) vs bitsandbytes 8-bit AdamW vs torchao AdamW8bit. Each
   optional method reports "not installed" (or the error that stopped it) instead of failing the suite. Models:
   a ~1.1B LLaMA built from its config (TinyLlama's shape: hidden 2048, 22 layers, GQA 32/4) and a
   SmolLM2-135M-shaped model (random weights, from its published config: the shape is what matters for speed).
   --quick: one tiny LLaMA only.
3. The fused kernels' bandwidth: `quant.sr_update_int8_` (the SR write) and `quant.dequantize_int8` against
   `clone()` of the same fp32 matrix, as a fraction of that copy bandwidth (bytes each must move: SR write 6 per
   element (int8 codes in and out, fp32 delta in, scales), dequantise 5 (codes in, fp32 out), clone 8).
4. Peak memory of the same runs (CUDA allocator peak, `max_memory_allocated`; on CPU the live-tensor counter)
   against `lowmem.memory.estimate` for the same model, method, batch and sequence length, like with like: the
   estimate's CUDA context and allocator slack (which the allocator's peak does not count) are left out. Between
   methods everything the last one built is released (lowmem's runtime detached, optimizer state cleared,
   gc.collect, empty_cache) and the peak statistics reset, so a later method's peak is its own; the bytes still
   allocated when a method starts are reported beside it.

5. Loading (benchmarks.load_time, last): from_pretrained + prepare against lowmem.load_pretrained on a ~1.1B
   LLaMA saved as sharded bf16 safetensors, each in its own process: wall time, host RssAnon and CUDA's
   max_memory_allocated during load + prepare against lowmem.memory.estimate_load.

Optional methods (bitsandbytes, torchao): a missing library is reported "not installed", one that imports or
builds with an error (compiled for another CUDA, an incompatible torch) "broken, skipped: <error>"; the suite goes
on. The pytest stage streams its output into `gpu-tests-<device>.log` beside the report, so a timeout keeps it.

Figures are only ever written for the device they were measured on: a CPU run writes gpu-cpu.md (a smoke test of
this script, not GPU figures), and nothing here invents a number for a device that is absent.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.machine import device_tag, machine_line

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
METHODS = ("lowmem", "adamw_bf16", "bnb_adamw8bit", "torchao_adamw8bit")
NOT_ALLOCATED = ("cuda_context", "allocator_slack")   # estimate components the allocator's peak does not count


@dataclass(frozen=True)
class Workload:
    name: str
    config: LlamaConfig
    batch: int
    seq_len: int


def llama_1b() -> LlamaConfig:
    return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                       tie_word_embeddings=False)


def smollm2_135m() -> LlamaConfig:
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                       tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)


def tiny_llama() -> LlamaConfig:
    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False)


def workloads(quick: bool) -> list[Workload]:
    if quick:
        return [Workload("tiny LLaMA (hidden 64, 2 layers)", tiny_llama(), batch=2, seq_len=32)]
    return [Workload("LLaMA ~1.1B (hidden 2048, 22 layers)", llama_1b(), batch=4, seq_len=1024),
            Workload("SmolLM2-135M shape", smollm2_135m(), batch=8, seq_len=1024)]


# -- 1. the GPU tests --------------------------------------------------------------------------------------------
def run_gpu_tests(paths: list[str], timeout_s: float, log_path: Path) -> dict:
    """pytest -m gpu on `paths`, its output streamed into `log_path` as it runs: a timeout (or a kill of the whole
    suite at the device's time limit) keeps every line written so far, and the report quotes the last ones."""
    # A lent GPU machine may lack an optional test dependency: one module failing to import must not stop the
    # GPU tests of every other module.
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-m", "gpu", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", *paths]
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log_file:
        try:
            done = subprocess.run(cmd, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, text=True,
                                  timeout=timeout_s)
            rc, timed_out = done.returncode, False
        except subprocess.TimeoutExpired:
            rc, timed_out = None, True
    lines = [line for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    if timed_out:
        summary = f"timed out after {timeout_s:.0f} s; last lines: " + " / ".join(lines[-3:])[-300:]
    else:
        summary = lines[-1].strip("= ") if lines else f"no output (exit code {rc})"
    return {"command": "python " + " ".join(cmd[1:]), "summary": summary, "rc": rc, "log": log_path.name,
            "seconds": time.perf_counter() - start}


# -- 2. step time ------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dtype(method: str, device: torch.device) -> torch.dtype:
    # On a GPU every method trains a bf16 model (the comparison the issue asks for); on CPU fp32, where bf16
    # matmuls are slow and the CPU run is only a smoke test.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# the optional library behind a method: absent -> "not installed"; present but failing (built for another CUDA, an
# incompatible torch) -> "broken: <error>"; either way the suite goes on with the other methods
OPTIONAL_PACKAGES = {"bnb_adamw8bit": "bitsandbytes", "torchao_adamw8bit": "torchao"}


def _optimizer_step(method: str, model, device: torch.device):
    """(step(ids), lowmem config or None, state_tensors(), close()) for one method. close() drops what ties the
    model to the optimizer (lowmem's runtime hooks: the model <-> runtime cycle; an optimizer's state), so the model
    is freed once the caller drops it. Raises whatever importing or building the method's library raises."""
    if method == "lowmem":
        from hooks.runtime import prepare
        from lowmem.presets import preset
        cfg = preset("lowmem", lr=1e-4, stagger=True)
        runtime = prepare(model, cfg)

        def step(ids):
            with runtime.micro_batch():
                runtime.backward(model(input_ids=ids, labels=ids).loss)
            runtime.step()

        def close():
            runtime.detach()
            runtime.states.clear()
        return step, cfg, lambda: [t for s in runtime.states.values() for t in s.values()], close
    if method == "adamw_bf16":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    elif method == "bnb_adamw8bit":
        import bitsandbytes as bnb
        opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-4)
    elif method == "torchao_adamw8bit":
        from torchao.optim import AdamW8bit
        opt = AdamW8bit(model.parameters(), lr=1e-4)
    else:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")

    def step(ids):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, None, lambda: [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)], \
        opt.state.clear


def _unavailable(method: str, err: BaseException) -> str:
    """The status line of a method whose library could not be set up: not installed, or installed but broken."""
    package = OPTIONAL_PACKAGES.get(method)
    if package is not None and importlib.util.find_spec(package) is None:
        return f"not installed ({package})"
    text = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
    return f"broken, skipped: {type(err).__name__}: {text}"


def _release(device: torch.device) -> None:
    """Free what the last method left (its model, runtime and state were dropped by the caller) and start the next
    method's peak from here: gc collects reference cycles the del left, empty_cache returns cached blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure_method(method: str, work: Workload, device: torch.device, steps: int) -> dict:
    """Median steady step time, tokens/s, the first step (compile, state creation, refreshes) and peak bytes.
    Everything the method built is released before returning (the next method's peak starts clean)."""
    _release(device)
    left_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    torch.manual_seed(0)
    dtype = _dtype(method, device)
    model = LlamaForCausalLM(work.config).to(device=device, dtype=dtype)
    try:
        step, cfg, state_tensors, close = _optimizer_step(method, model, device)
    except Exception as err:  # noqa: BLE001 - a missing or broken optional library must not stop the suite
        del model
        _release(device)
        return {"method": method, "status": _unavailable(method, err)}
    try:
        result = _timed_steps(method, work, device, steps, model, step, state_tensors)
    finally:
        close()
        del model, step, state_tensors
        _release(device)
    if result["status"] == "ok":
        result["dtype"] = dtype
        result["left_bytes"] = left_bytes
        result["estimate_bytes"] = _estimate(method, work, cfg, dtype, device)
    return result


def _timed_steps(method: str, work: Workload, device: torch.device, steps: int, model, step, state_tensors) -> dict:
    from lowmem.memory.live_bytes import LiveTensorBytes, baseline_bytes, module_bytes

    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, work.config.vocab_size, (work.batch, work.seq_len), generator=gen).to(device)
               for _ in range(steps + 2)]
    try:
        _sync(device)
        start = time.perf_counter()
        step(batches[0])
        _sync(device)
        first_s = time.perf_counter() - start
        step(batches[1])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        counter = LiveTensorBytes() if device.type == "cpu" else None
        resident = module_bytes(model) if device.type == "cpu" else 0
        for i, ids in enumerate(batches[2:]):
            _sync(device)
            start = time.perf_counter()
            if counter is not None and i == 0:
                with counter:
                    step(ids)
            else:
                step(ids)
            _sync(device)
            times.append(time.perf_counter() - start)
    except Exception as err:  # noqa: BLE001 - one method failing must not lose the others' figures
        return {"method": method, "status": f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"}
    if device.type == "cuda":
        peak = int(torch.cuda.max_memory_allocated(device))
    else:
        # model + optimizer state that lived before the counted step + what that step held at its peak
        peak = resident + baseline_bytes(state_tensors()) + counter.peak_bytes
    step_s = statistics.median(times)
    return {"method": method, "status": "ok", "step_s": step_s, "first_step_s": first_s,
            "tokens_per_s": work.batch * work.seq_len / step_s, "peak_bytes": peak}


def _estimate(method: str, work: Workload, cfg, dtype: torch.dtype, device: torch.device) -> int | None:
    from lowmem.memory import estimate
    planned = {"lowmem": "lowmem", "adamw_bf16": "adamw_bf16", "bnb_adamw8bit": "adamw_8bit"}.get(method)
    if planned is None:
        return None
    breakdown = estimate(work.config, method=planned, seq_len=work.seq_len, micro_batch_size=work.batch,
                         gradient_checkpointing=False, lowmem_config=cfg, dtype=dtype, device_type=device.type)
    # like with like: torch.cuda.max_memory_allocated counts tensors only, not the CUDA context (and cuBLAS
    # workspace) nor the caching allocator's slack, which the estimate adds on CUDA for a fit decision
    return breakdown.peak_bytes - sum(breakdown.components.get(k, 0) for k in NOT_ALLOCATED)


# -- 3. kernel bandwidth -----------------------------------------------------------------------------------------
def kernel_bandwidth(device: torch.device, rows: int, cols: int, repeats: int) -> list[dict]:
    from quant import dequantize_int8, quantize_int8, sr_update_int8_

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, generator=gen).to(device)
    delta = (torch.randn(rows, cols, generator=gen) * 1e-3).to(device)
    q, scales = quantize_int8(w)

    def timed(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    clone_s = timed(lambda: w.clone())
    kernels = [("clone (fp32 copy)", clone_s, 8),
               ("sr_update_int8_ (SR write)", timed(lambda: sr_update_int8_(q, scales, delta, seed=0, stream=0, step=1,
                                                                        check_values=False)), 6),
               ("dequantize_int8", timed(lambda: dequantize_int8(q, scales, check_values=False)), 5)]
    numel = rows * cols
    copy_bw = 8 * numel / clone_s
    return [{"kernel": name, "seconds": s, "gb_per_s": bytes_per * numel / s / 1e9,
             "fraction_of_copy": bytes_per * numel / s / copy_bw} for name, s, bytes_per in kernels]


# -- the report --------------------------------------------------------------------------------------------------
def load_stage(device: torch.device, quick: bool, rank: int = 256) -> list[str]:
    """benchmarks.load_time on this device: from_pretrained + prepare vs the streaming loader, one run each, on a
    ~1.1B LLaMA (hidden 2048, 22 layers; --quick: hidden 256, 2 layers), with CUDA's max_memory_allocated against
    lowmem.memory.estimate_load. Returns the report's lines."""
    import tempfile

    from benchmarks import load_time

    hidden, layers, vocab = (256, 2, 1000) if quick else (2048, 22, 32000)
    config = load_time.model_config(hidden, layers, vocab)
    with tempfile.TemporaryDirectory(prefix="lowmem-gpu-suite-load-") as tmp:
        params = load_time.build(Path(tmp), hidden, layers, vocab)
        runs = load_time.measure(Path(tmp), str(device), rank, repeats=1)
    return load_time.summarise(runs, params=params, config=config, device=str(device), rank=rank,
                               machine=machine_line(device),
                               command=f"python -m benchmarks.load_time --device {device} --hidden {hidden} "
                                       f"--layers {layers} --vocab {vocab} --rank {rank} --repeats 1")[1:]


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def render(device: torch.device, args, tests: dict | str | None, runs: list[tuple[Workload, list[dict]]],
           kernels: list[dict] | str | None, wall_s: float, pending: Sequence[str] = (),
           load: list[str] | str | None = None) -> str:
    """The report as Markdown. tests/kernels None: not run yet (listed in `pending`, the stages still to come,
    which makes the report say it is incomplete); a string: why the stage did not run."""
    lines = [f"# GPU suite: {device_tag(device)}", "",
             f"Machine: {machine_line(device)}", "",
             f"Command: `python -m benchmarks.gpu_suite {' '.join(args.argv)}` (wall time {wall_s:.0f} s)."]
    if device.type != "cuda":
        lines += ["", "**CPU run: a smoke test of this script, not GPU figures.**"]
    if pending:
        lines += ["", f"**Incomplete: still to run when this was written: {', '.join(pending)}.**"]
    lines += ["", "## 1. GPU tests", ""]
    if tests is None:
        lines.append("pending")
    elif isinstance(tests, str):
        lines.append(tests)
    else:
        lines.append(f"`{tests['command']}`: {tests['summary']} ({tests['seconds']:.0f} s; full output in "
                     f"`{tests['log']}`)")
    lines += ["", "## 2. Step time, tokens/s and peak memory vs lowmem.memory.estimate", "",
              "Measured side by side in this run; steady steps (median of the timed steps) after one warm-up; the "
              "first step includes state creation, compilation and (lowmem) the projector refreshes. Peak: the "
              "allocator's peak over the timed steps (CPU: live tensor bytes). Estimate: lowmem.memory.estimate "
              "without its CUDA context and allocator slack, which the allocator's peak does not count. Allocated "
              "at start: what earlier methods left behind (0 when they were freed).", ""]
    for work, results in runs:
        lines += [f"### {work.name}: batch {work.batch} x seq {work.seq_len}", "",
                  "| method | steady step s | tokens/s | ratio to adamw_bf16 | first step s | peak MiB | estimate MiB "
                  "| measured / estimate | allocated at start MiB |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        base = next((r for r in results if r["method"] == "adamw_bf16" and r["status"] == "ok"), None)
        for r in results:
            if r["status"] != "ok":
                lines.append(f"| {r['method']} | {r['status']} | | | | | | | |")
                continue
            ratio = f"{r['step_s'] / base['step_s']:.2f}" if base else "n/a"
            est = r.get("estimate_bytes")
            vs = f"{r['peak_bytes'] / est:.2f}" if est else "n/a"
            lines.append(f"| {r['method']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {ratio} | "
                         f"{r['first_step_s']:.2f} | {_mib(r['peak_bytes'])} | {_mib(est)} | {vs} | "
                         f"{_mib(r.get('left_bytes'))} |")
        lines.append("")
    lines += ["## 3. Kernel bandwidth", "",
              f"{args.kernel_rows} x {args.kernel_cols} fp32-equivalent matrix; fraction = the kernel's bytes per "
              "second over clone()'s.", "",
              "| kernel | median s | GB/s | fraction of copy bandwidth |", "| --- | --- | --- | --- |"]
    if kernels is None or isinstance(kernels, str):
        lines.append(f"| {kernels or 'pending'} | | | |")
    for k in kernels if isinstance(kernels, list) else ():
        lines.append(f"| {k['kernel']} | {k['seconds']:.3g} | {k['gb_per_s']:.3g} | {k['fraction_of_copy']:.3g} |")
    lines += ["", "## 4. Loading: from_pretrained + prepare vs the streaming loader (benchmarks.load_time)", ""]
    if load is None or isinstance(load, str):
        lines.append(load or "pending")
    else:
        lines += ["```", *load, "```"]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps, small kernels (CI smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the report (default benchmarks/results)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per method (default 5; --quick 2)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu")
    parser.add_argument("--tests-timeout", type=float, default=240.0, help="seconds allowed for pytest -m gpu")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="no new measurement starts after this many seconds (default 480); the rest are "
                             "reported as skipped")
    args = parser.parse_args(argv)
    if args.budget_s <= 0 or args.tests_timeout <= 0:
        parser.error("--budget-s and --tests-timeout must be positive numbers of seconds")
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    args.steps = args.steps or (2 if args.quick else 5)
    args.kernel_rows, args.kernel_cols = (256, 512) if args.quick else (8192, 8192)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu --quick for the smoke test", file=sys.stderr)
        return 2
    start = time.perf_counter()
    print(f"machine: {machine_line(device)}", flush=True)
    methods = [m for m in args.methods.split(",") if m]
    plan = workloads(args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu-{device_tag(device)}.md"
    tests, kernels, load = None, None, None
    runs: list[tuple[Workload, list[dict]]] = [(work, []) for work in plan]

    def pending() -> list[str]:
        left = ([] if tests is not None else ["GPU tests"]) + ([] if kernels is not None else ["kernel bandwidth"])
        return left + [f"{work.name} {m}" for work, results in runs for m in methods[len(results):]] + \
            ([] if load is not None else ["loading"])

    def write() -> str:
        # after every stage: a command killed at the device's time limit still leaves what it measured
        report = render(device, args, tests, runs, kernels, time.perf_counter() - start, pending(), load)
        path.write_text(report, encoding="utf-8")
        return report

    def over_budget() -> bool:
        return time.perf_counter() - start > args.budget_s

    write()
    if args.skip_tests:
        tests = "not run (--skip-tests)"
    elif device.type != "cuda":
        tests = "not run: no CUDA device (every test marked gpu would skip)"
    else:
        test_paths = ["tests/unit/hooks/test_no_sync.py"] if args.quick else ["tests"]
        tests = run_gpu_tests(test_paths, min(args.tests_timeout, args.budget_s),
                              args.out / f"gpu-tests-{device_tag(device)}.log")
        print(f"pytest -m gpu: {tests['summary']}", flush=True)
    write()
    skipped = f"skipped: the {args.budget_s:.0f} s budget was spent"
    kernels = (skipped if over_budget() else
               kernel_bandwidth(device, args.kernel_rows, args.kernel_cols, repeats=3 if args.quick else 10))
    write()
    for work, results in runs:
        for method in methods:
            result = ({"method": method, "status": skipped} if over_budget()
                      else measure_method(method, work, device, args.steps))
            print(f"{work.name} {method}: {result['status']}" + (f", {result['step_s']:.3f} s/step"
                                                                 if result["status"] == "ok" else ""), flush=True)
            results.append(result)
            write()
    if over_budget():
        load = skipped
    else:
        try:
            load = load_stage(device, args.quick)
        except Exception as err:  # noqa: BLE001 - one failed stage is reported, the others are kept
            load = f"failed: {type(err).__name__}: {str(err)[-500:]}"
        print(f"loading: {load if isinstance(load, str) else load[-2]}", flush=True)
    print(write())
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
