"""What verifying a checkpoint's sha256 costs: the hashing rate measured here, projected onto a 7B checkpoint.

    python -m benchmarks.checkpoint_hash                        # 256 MiB sample, LLaMA-2-7B projection
    python -m benchmarks.checkpoint_hash --mib 1024 --model llama2-13b

Resume and export verify every file of a checkpoint (lowmem.checkpoint.verify.damage): one streamed sha256 pass
over all its bytes, in store._HASH_CHUNK_BYTES chunks. Measured side by side in one run:
  memory   hashlib.sha256 over a buffer already in RAM: the CPU bound (one core);
  file     store._sha256 over a freshly written file, the path verification takes; the file is in the page cache,
           so this is the CPU bound plus the read syscalls, not the disk: a cold read is bound by the disk as well
           (a checkpoint read from an NVMe at ~2 GB/s or a network disk at ~200 MB/s), whichever is slower.
The 7B figure is a projection: checkpoint bytes / measured file rate. The checkpoint's bytes come from the planner
(lowmem.memory.estimate, method "lowmem", the preset's steady-state optimizer state): INT8 weights and block scales,
bf16 float parameters, low-rank and float moments, projectors, residuals (checkpoint_bytes()).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

# Persistent components of a lowmem run (what a checkpoint holds); activations and transients are not saved.
CHECKPOINT_COMPONENTS = ("weights_int8", "weight_scales", "float_params", "optimizer_moments", "projectors",
                         "residuals", "error_feedback")


def checkpoint_bytes(model_config, lowmem_config=None, dtype=None) -> int:
    """Bytes of a single-process lowmem checkpoint of `model_config` (sum of the planner's persistent components;
    the few KiB of safetensors headers and meta.json are left out)."""
    import torch

    from lowmem.memory import estimate
    breakdown = estimate(model_config, method="lowmem", seq_len=1, micro_batch_size=1, gradient_checkpointing=False,
                         lowmem_config=lowmem_config, dtype=dtype or torch.bfloat16)
    return sum(breakdown.components[name] for name in CHECKPOINT_COMPONENTS)


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of fn()."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure_rates(sample_bytes: int, repeats: int = 3) -> dict[str, float]:
    """Best-of-`repeats` bytes/s of sha256 over RAM and over a file through store._sha256 (warm page cache), per
    wall-clock second and per CPU second of this process (the latter does not depend on how busy the machine is)."""
    from lowmem.checkpoint.store import _sha256
    data = os.urandom(sample_bytes)
    rates = dict.fromkeys(("memory", "file", "memory_cpu", "file_cpu"), 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sample.bin"
        path.write_bytes(data)
        for _ in range(repeats):
            for name, fn in (("memory", lambda: hashlib.sha256(data).hexdigest()), ("file", lambda: _sha256(path))):
                wall, cpu = _timed(fn)
                rates[name] = max(rates[name], sample_bytes / wall)
                rates[f"{name}_cpu"] = max(rates[f"{name}_cpu"], sample_bytes / max(cpu, 1e-9))
    return rates


def main(argv: list[str] | None = None) -> int:
    from transformers import LlamaConfig

    from benchmarks.machine import machine_line
    from benchmarks.memory_budget import BUILTIN
    from lowmem.presets import preset

    parser = argparse.ArgumentParser(prog="python -m benchmarks.checkpoint_hash", description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="sample size hashed per repeat (MiB; default 256)")
    parser.add_argument("--model", default="llama2-7b", choices=sorted(BUILTIN), help="model for the projection")
    parser.add_argument("--rank", type=int, default=256, help="optim.rank of the projected checkpoint")
    args = parser.parse_args(argv)
    if args.mib < 1:
        parser.error("--mib must be >= 1")

    print(machine_line("cpu"))
    rates = measure_rates(args.mib << 20)
    total = checkpoint_bytes(LlamaConfig(**BUILTIN[args.model]), preset("lowmem", rank=args.rank))
    print(f"sha256 over {args.mib} MiB, best of 3, per wall-clock second: {rates['memory'] / 1e9:.2f} GB/s from "
          f"RAM, {rates['file'] / 1e9:.2f} GB/s through the checkpoint reader (page cache); ratio file/RAM "
          f"{rates['file'] / rates['memory']:.2f}")
    print(f"per CPU second of this process (one core, independent of load): {rates['memory_cpu'] / 1e9:.2f} GB/s "
          f"from RAM, {rates['file_cpu'] / 1e9:.2f} GB/s through the reader")
    print(f"{args.model} lowmem checkpoint (rank {args.rank}, bf16 float params): {total / 1e9:.2f} GB")
    print(f"projected verification time per resume or export: {total / rates['file']:.1f} s at the wall-clock "
          f"rate measured now, {total / rates['file_cpu']:.1f} s on one idle core; with a cold page cache at "
          f"least total / disk read rate (e.g. {total / 2e9:.1f} s at 2 GB/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
