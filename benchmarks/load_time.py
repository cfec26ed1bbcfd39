"""Load + prepare: wall time and peak memory of today's path vs the streaming loader, on the same checkpoint.

    python -m benchmarks.load_time                                  # 374M LLaMA (hidden 1024, 24 layers), CPU
    python -m benchmarks.load_time --device cuda                    # + CUDA peak allocated vs lowmem's prediction
    python -m benchmarks.load_time --out benchmarks/results         # writes load-time-<device>.md there
    python -m benchmarks.load_time --malloc-mmap-threshold 65536    # RssAnon without glibc's heap retention

A random LLaMA (bf16) is saved as sharded safetensors (`save_pretrained(max_shard_size=...)`) in a temporary
directory; then each path runs in its own fresh Python process, alternately, `--repeats` times:
  today     `AutoModelForCausalLM.from_pretrained(dir, dtype=bf16)`, `.to(device)`, `hooks.runtime.prepare`
  streamed  `lowmem.load_pretrained(dir, config, device=..., dtype=bf16)` (lowmem.model.loader)
Each process first prepares a tiny model (imports and the compiled kernels' first compilations, the same for both
paths), then reports the wall time of load + prepare, its peak anonymous memory (RssAnon sampled
from /proc/self/status every 5 ms: the heap, not the memory-mapped checkpoint's page cache; also above its value
when loading starts) and its peak resident set (`resource.getrusage` ru_maxrss: the mapped files' pages included); on
CUDA also `torch.cuda.max_memory_allocated()` during load + prepare, beside `lowmem.memory.estimate_load`'s
prediction without the CUDA context and allocator slack (the allocator's own view). Times are the best of the
repeats; the ratio streamed / today is what to compare across machines.

RssAnon also holds freed memory that glibc keeps in its heap: after large buffers are freed its mmap threshold
grows (up to 32 MiB), later buffers come from the heap and it cannot shrink under live ones. The streaming loader
frees many chunk-sized buffers, so its RssAnon can exceed its live tensors by hundreds of MiB where a fixed
threshold (--malloc-mmap-threshold) shows the live bytes. On a CPU device today's path keeps its float parameters
as views of the memory-mapped files (page cache, not RssAnon) while the loader copies them; on a GPU both paths
copy, and today's holds the whole float model on the device first.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GIB = 2**30
SHARD = "200MB"


def model_config(hidden: int, layers: int, vocab: int):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64, num_hidden_layers=layers,
                       num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                       vocab_size=vocab)


def build(directory: Path, hidden: int, layers: int, vocab: int) -> int:
    """Save a random bf16 LLaMA of these dimensions as sharded safetensors; returns its parameter count."""
    import torch
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(model_config(hidden, layers, vocab))
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(directory, max_shard_size=SHARD)
    return sum(p.numel() for p in model.parameters())


def _rss_anon_bytes() -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class _AnonPeak:
    """Samples RssAnon every 5 ms on a thread; `peak` is the largest value seen."""

    def __init__(self) -> None:
        self.start = self.peak = _rss_anon_bytes()   # the window's first value: the peak is never below it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_anon_bytes())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_anon_bytes())
        return self.peak


def _warm_up(device, cfg) -> None:
    """Imports and the compiled kernels' first compilations (the same for both paths, and not loading): a tiny
    LLaMA, several weight shapes, prepared on the device and dropped."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hooks.load import load_pretrained  # noqa: F401  (imports the loader)
    from hooks.runtime import prepare
    tiny = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                        num_attention_heads=2, vocab_size=300)).to(device=device, dtype=torch.bfloat16)
    prepare(tiny, cfg).detach()


def run_path(path: str, directory: Path, device: str, rank: int) -> dict:
    """Load + prepare along `path` ("today" or "streamed") in this process; returns its measurements."""
    import resource

    import torch
    from transformers import AutoModelForCausalLM

    from hooks.runtime import prepare
    from lowmem import load_pretrained
    from lowmem.presets import preset
    dev = torch.device(device)
    cfg = preset("lowmem", rank=rank)
    _warm_up(dev, cfg)
    if dev.type == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(dev)
    sampler = _AnonPeak()
    anon_before = sampler.start
    started = time.perf_counter()
    if path == "today":
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).to(dev)
        runtime = prepare(model, cfg)
    else:
        model, runtime = load_pretrained(directory, cfg, device=dev, dtype=torch.bfloat16)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - started
    out = {"path": path, "seconds": seconds, "rss_anon_peak_bytes": sampler.stop(),
           "rss_anon_before_bytes": anon_before,
           "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "trained": len(runtime.states)}
    if dev.type == "cuda":
        out["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(dev))
    return out


def _child(path: str, directory: Path, device: str, rank: int, mmap_threshold: int | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    cmd = [sys.executable, "-m", "benchmarks.load_time", "--child", path, "--dir", str(directory), "--device",
           device, "--rank", str(rank)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        raise RuntimeError(f"{path} run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(directory: Path, device: str, rank: int, repeats: int,
            mmap_threshold: int | None = None) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {"today": [], "streamed": []}
    for _ in range(repeats):
        for path in runs:      # alternated, so drift on a shared machine hits both
            runs[path].append(_child(path, directory, device, rank, mmap_threshold))
    return runs


def summarise(runs: dict[str, list[dict]], *, params: int, config, device: str, rank: int, machine: str,
              command: str) -> list[str]:
    """The report's lines: per path the best time, the peaks; the ratios; on CUDA the prediction."""
    import torch

    from lowmem.memory import estimate_load
    from lowmem.presets import preset
    best = {path: min(rs, key=lambda r: r["seconds"]) for path, rs in runs.items()}
    peak = {path: max(r["rss_anon_peak_bytes"] for r in rs) for path, rs in runs.items()}
    lines = [machine, f"model: random LLaMA, {params / 1e6:.0f}M parameters (hidden {config.hidden_size}, "
             f"{config.num_hidden_layers} layers, vocab {config.vocab_size}), bf16, sharded safetensors "
             f"(max_shard_size {SHARD}); lowmem preset, rank {rank}; device {device}; best of {len(runs['today'])}",
             f"{'path':<10} {'load+prepare s':>15} {'peak RssAnon GiB':>17} {'above start GiB':>16} "
             f"{'peak RSS GiB':>13}"]
    for path, r in best.items():
        above = max(x["rss_anon_peak_bytes"] - x["rss_anon_before_bytes"] for x in runs[path])
        lines.append(f"{path:<10} {r['seconds']:>15.2f} {peak[path] / GIB:>17.3f} {above / GIB:>16.3f} "
                     f"{max(x['max_rss_bytes'] for x in runs[path]) / GIB:>13.3f}")
    lines.append(f"streamed / today: time {best['streamed']['seconds'] / best['today']['seconds']:.2f}x, "
                 f"peak RssAnon {peak['streamed'] / peak['today']:.2f}x")
    if device.startswith("cuda"):
        load = estimate_load(config, preset("lowmem", rank=rank), dtype=torch.bfloat16, device_type="cuda")
        allocated = sum(v for k, v in load.components.items() if k not in ("cuda_context", "allocator_slack"))
        measured = {path: max(r["cuda_max_allocated_bytes"] for r in rs) for path, rs in runs.items()}
        lines.append(f"CUDA max_memory_allocated during load + prepare: today {measured['today'] / GIB:.3f} GiB, "
                     f"streamed {measured['streamed'] / GIB:.3f} GiB; estimate_load {allocated / GIB:.3f} GiB "
                     f"allocated ({load.peak_bytes / GIB:.3f} GiB with CUDA context and slack), error "
                     f"{100 * (allocated - measured['streamed']) / measured['streamed']:+.1f}%")
    lines.append(f"command: {command}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None, help="directory for load-time-<device>.md (default: print only)")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="glibc MALLOC_MMAP_THRESHOLD_ for both paths (fixed: freed large buffers go back to the "
                             "system instead of staying in the heap, so RssAnon follows the live tensors); the "
                             "report is then load-time-<device>-mmap<BYTES>.md")
    parser.add_argument("--child", choices=("today", "streamed"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_path(args.child, Path(args.dir), args.device, args.rank)))
        return 0
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    import torch

    from benchmarks.machine import device_tag, machine_line
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device on this machine")
    machine = machine_line(args.device)
    print(machine, flush=True)
    config = model_config(args.hidden, args.layers, args.vocab)
    with tempfile.TemporaryDirectory(prefix="lowmem-load-time-") as tmp:
        params = build(Path(tmp), args.hidden, args.layers, args.vocab)
        runs = measure(Path(tmp), args.device, args.rank, args.repeats, args.malloc_mmap_threshold)
    command = ("python -m benchmarks.load_time " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    lines = summarise(runs, params=params, config=config, device=args.device, rank=args.rank, machine=machine,
                      command=command)
    print("\n".join(lines[1:]))
    if args.out:
        suffix = f"-mmap{args.malloc_mmap_threshold}" if args.malloc_mmap_threshold is not None else ""
        path = Path(args.out) / f"load-time-{device_tag(args.device)}{suffix}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# Load + prepare: today's path vs the streaming loader\n\n" + __doc__.split("\n\n", 2)[2]
                        + "\n```\n" + "\n".join(lines) + "\n```\n", encoding="utf-8")
        print(f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
