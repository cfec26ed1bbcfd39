"""GGUF export against the bf16 Hugging Face export on the same prepared model: time, peak memory, file size.

    OMP_NUM_THREADS=1 python -m benchmarks.gguf_export                 # the shipped SmolLM2-135M, INT8 (block 256)
    python -m benchmarks.gguf_export --model PATH --repeats 3 --out benchmarks/results/gguf-export-cpu.md

The model is loaded and prepared as `launch.finetune` does (INT8 linears and embedding). Each export runs once
untimed (the first dequantisation compiles its kernel), then `repeats` times, interleaved, keeping the best wall and
CPU seconds. Memory is a separate pass under lowmem.memory.live_bytes.LiveTensorBytes (it slows the ops it counts):
the peak of tensor bytes allocated during the export and alive at once, i.e. beyond the model itself.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    import torch

    from benchmarks.machine import machine_line
    from hooks.runtime import prepare
    from launch.models import load_model
    from lowmem.checkpoint.gguf_export import _CHUNK_ELEMS
    from lowmem.memory.live_bytes import LiveTensorBytes, module_bytes
    from lowmem.presets import preset

    parser = argparse.ArgumentParser(prog="python -m benchmarks.gguf_export", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="model spec as for launch.finetune (default: shipped)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each export (best kept; default 2)")
    parser.add_argument("--out", default=None, help="also write the report (markdown) here")
    args = parser.parse_args(argv)

    lines = [machine_line("cpu")]
    print(lines[0], flush=True)
    loaded = load_model(args.model, dtype=torch.float32)
    model, tokenizer = loaded.model, loaded.tokenizer
    runtime = prepare(model, preset("lowmem", rank=64))
    model_bytes = module_bytes(model)
    largest = max(p.numel() for p in model.state_dict().values())
    exports = {
        "HF bf16 (baseline)": lambda out: runtime.export(out / "hf", tokenizer=tokenizer),
        "GGUF q8_0": lambda out: runtime.export(out / "q8_0.gguf", tokenizer=tokenizer, format="gguf"),
        "GGUF bf16": lambda out: runtime.export(out / "bf16.gguf", tokenizer=tokenizer, format="gguf",
                                                gguf_type="bf16"),
        "GGUF f16": lambda out: runtime.export(out / "f16.gguf", tokenizer=tokenizer, format="gguf",
                                               gguf_type="f16"),
    }
    best = {name: (float("inf"), float("inf")) for name in exports}
    peaks, sizes = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for name, export in exports.items():
            sizes[name] = _size(export(out))          # warm-up (kernel compilation), and the file size
        for _ in range(args.repeats):
            for name, export in exports.items():
                wall, cpu = _timed(lambda: export(out))
                best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
        for name, export in exports.items():
            with LiveTensorBytes() as meter:
                export(out)
            peaks[name] = meter.peak_bytes
    base_wall, base_cpu = best["HF bf16 (baseline)"]
    mib = 2**20
    lines += [f"model {loaded.source}: INT8 model (codes, scales, float parameters) {model_bytes / mib:.1f} MiB; "
              f"largest tensor {largest / 1e6:.2f} M elements ({4 * largest / mib:.1f} MiB as fp32); GGUF row chunk "
              f"{_CHUNK_ELEMS / 2**20:.0f} Mi elements ({4 * _CHUNK_ELEMS / mib:.0f} MiB as fp32)",
              f"best of {args.repeats} after one warm-up run each, {torch.get_num_threads()} torch threads",
              "", "| export | wall s | x HF | CPU s | x HF | peak beyond the model (MiB) | file size (MiB) |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in exports:
        wall, cpu = best[name]
        lines.append(f"| {name} | {wall:.2f} | {wall / base_wall:.2f} | {cpu:.2f} | {cpu / base_cpu:.2f} | "
                     f"{peaks[name] / mib:.1f} | {sizes[name] / mib:.1f} |")
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).write_text(
            "# GGUF export vs the Hugging Face export (CPU)\n\n"
            f"`OMP_NUM_THREADS=1 python -m benchmarks.gguf_export --repeats {args.repeats}` on this project's shared "
            "2-core machine (other processes were running: wall seconds are under load, CPU seconds are this "
            "process's own).\n\n" + report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
