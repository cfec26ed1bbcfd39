"""Data parallelism on 2 processes vs 1 (step time, bytes moved, per-rank memory) and the ZeRO 1/2 update-sharing
decision, measured in one run.

    python -m benchmarks.distributed                  # CPU default, ~3-5 min on 2 cores -> results/distributed-cpu.md
    python -m benchmarks.distributed --quick          # small model and shapes, < 45 s; prints the report only
    python -m benchmarks.distributed --full           # adds the 7B MLP shapes (4096, 11008) to the sharing table
    python -m benchmarks.distributed --device cuda    # NCCL, one process per GPU (2-process parts need >= 2 GPUs)

The parent process trains the 1-process baseline itself (the global batch, 1 torch thread), then relaunches this module
through `torch.distributed.run` with 2 ranks (`--worker DIR`, 1 thread each). The ranks train the same model on their
half of every global batch at ZeRO 0, 1, 2, 3 and ZeRO 2 without overlap, then time the two ways of sharing one low-rank
update at ZeRO 1/2: (a) "direction" (the owner broadcasts the update direction N, every rank back-projects and writes
its INT8 copy with the shared stochastic-rounding noise: what lowmem does) and (b) "codes" (the owner writes, then
broadcasts the INT8 codes and scales). Each rank writes DIR/rank{R}.json; the parent renders the markdown report.

Steps: step 0 computes every projector, step 1 chooses the sparse-residual indices (residual_warmup_steps=1, so the
steady state carries the q/k residual traffic too); both are warm-up. The timed steps are one refresh interval, in which
the staggered lazy policy refreshes every low-rank weight exactly once: their mean is the refresh-amortised figure,
and the steps where no weight refreshed give the steady figure (median time, mean bytes).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from benchmarks.machine import device_tag, machine_line

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PLANNER_REPORT = "benchmarks/results/memory-budget-llama2-7b-per-rank.md"
WORLD_SIZE = 2
RUNS = (("ZeRO 0", 0, True), ("ZeRO 1", 1, True), ("ZeRO 2", 2, True), ("ZeRO 3", 3, True),
        ("ZeRO 2, overlap=False", 2, False))
SHARING_LR = 1e-3      # any small step: the cost of a write does not depend on it
SHARING_SEED = 11

DEFAULT = dict(hidden=256, intermediate=688, layers=4, heads=8, kv_heads=4, vocab=2048, seq_len=128,
               batch_per_rank=4, rank=32, refresh_interval_steps=50, warmup_steps=2, timed_steps=50,
               residual_warmup_steps=1, lr=1e-3, sharing_reps=5,
               shapes=[(1024, 1024, 64), (2048, 2048, 128), (4096, 4096, 128)])
# Quick: 1 layer (7 low-rank weights) and an interval of 10, so 3 of the 10 timed steps refresh nothing.
QUICK = dict(DEFAULT, hidden=128, intermediate=344, layers=1, heads=4, kv_heads=2, vocab=512, seq_len=64,
             batch_per_rank=2, rank=16, refresh_interval_steps=10, timed_steps=10, sharing_reps=2,
             shapes=[(256, 256, 16), (512, 512, 32)])
FULL_SHAPES = [(4096, 11008, 128), (11008, 4096, 128)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- training: one process or one rank ------------------------------------------------------------------------------
def build_model(s: dict, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                         num_key_value_heads=s["kv_heads"], max_position_embeddings=s["seq_len"])
    return LlamaForCausalLM(config).to(device).train()


def lowmem_config(s: dict):
    from lowmem.presets import preset
    return preset("lowmem", rank=s["rank"], refresh_interval_steps=s["refresh_interval_steps"],
                  residual_warmup_steps=s["residual_warmup_steps"], lr=s["lr"], lr_schedule="constant",
                  warmup_steps=0, seed=0)


def global_batch(s: dict, step: int) -> torch.Tensor:
    """int64 (WORLD_SIZE * batch_per_rank, seq_len) tokens of one step, identical in every process."""
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, s["vocab"], (WORLD_SIZE * s["batch_per_rank"], s["seq_len"]), generator=gen)


def train_run(s: dict, device: torch.device, comm=None, zero_stage: int = 0, overlap: bool = True) -> dict:
    """Train warmup_steps + timed_steps steps; per-step seconds, wire bytes, refresh flag, loss; then bytes held."""
    from hooks.runtime import prepare
    from lowmem.distributed import DataParallel
    from lowmem.model.int8_linear import Int8Linear
    model = build_model(s, device)
    dp = None if comm is None else DataParallel(comm, zero_stage, overlap=overlap)
    runtime = prepare(model, lowmem_config(s), data_parallel=dp)
    world, rank = (1, 0) if comm is None else (comm.world_size, comm.rank)
    rows = WORLD_SIZE * s["batch_per_rank"] // world
    out = {"step_s": [], "wire_bytes": [], "refreshed": [], "loss": []}
    for step in range(s["warmup_steps"] + s["timed_steps"]):
        ids = global_batch(s, step)[rank * rows:(rank + 1) * rows].to(device)
        if comm is not None:
            comm.barrier()   # every rank starts the step together: a step's time is the slowest rank's
        sync(device)
        wire_before = 0.0 if comm is None else comm.wire_bytes
        start = time.perf_counter()
        with runtime.micro_batch():
            runtime.backward(model(input_ids=ids, labels=ids).loss)
        stats = runtime.step()
        sync(device)
        out["step_s"].append(time.perf_counter() - start)
        out["wire_bytes"].append(0.0 if comm is None else comm.wire_bytes - wire_before)
        out["refreshed"].append(len(stats["refreshed"]) > 0)
        out["loss"].append(stats["loss"])
    out["state_bytes"] = sum(t.numel() * t.element_size() for st in runtime.states.values() for t in st.values())
    out["int8_weight_bytes"] = sum(m.weight_q.numel() * m.weight_q.element_size()
                                   + m.weight_scales.numel() * m.weight_scales.element_size()
                                   for m in model.modules() if isinstance(m, Int8Linear))
    out["trained_numels"] = [math.prod(item.spec.shape) if item.spec is not None else item.tensor.numel()
                             for item in runtime.trainables]
    out["float_numel"] = sum(item.tensor.numel() for item in runtime.trainables if item.kind == "float")
    runtime.detach()   # a collective at ZeRO 3 (gathers every weight): every rank calls it
    return out


# -- ZeRO 1/2 update sharing: (a) direction vs (b) codes --------------------------------------------------------------
def share_update(comm, shape: tuple[int, int], r: int, reps: int, device: torch.device) -> dict:
    """Time and bytes of sharing one layer's update, owner rank 0 ('single'), and of two layers owned by ranks 0 and 1
    ('pair': the balanced ownership of a whole model, where (b) splits the writes between the ranks)."""
    from lowmem.optim.lowrank import LowRankSpec, lowrank_moment_shape, projection_side_for
    from lowmem.presets import preset
    from lowmem.optim.projector import backproject_rows
    from lowmem.optim.weights import Int8Weight
    from quant.int8 import BLOCK_SIZE, quantize_int8
    m, n = shape
    spec = LowRankSpec(name="bench", shape=shape, param_index=0)
    cfg = preset("lowmem", rank=r)
    direction_shape = lowrank_moment_shape(spec, cfg)
    side = projection_side_for(spec, cfg)
    gen = torch.Generator().manual_seed(m * 31 + n * 7 + r)
    proj = torch.linalg.qr(torch.randn(n if side == "right" else m, r, generator=gen)).Q.to(device)
    q0, s0 = quantize_int8((torch.randn(m, n, generator=gen) * 0.02).to(device), block_size=BLOCK_SIZE)
    directions = [torch.randn(direction_shape, generator=gen).to(device) for _ in range(reps + 1)]
    rank = comm.rank

    def write(codes, direction, step: int, stream: int) -> None:
        Int8Weight(codes[0], codes[1], block_size=BLOCK_SIZE, seed=SHARING_SEED, stream=stream).apply_(
            lambda lo, hi, w_rows: backproject_rows(direction, proj, side, lo, hi).mul_(-SHARING_LR), step=step)

    def via_direction(weights, step: int) -> None:
        received = []
        for k in range(len(weights)):     # weight k is owned by rank k
            buffer = directions[step].clone() if rank == k else torch.empty(direction_shape, device=device)
            comm.broadcast_(buffer, src=k)
            received.append(buffer)
        for k, codes in enumerate(weights):
            write(codes, received[k], step, stream=k)

    def via_codes(weights, step: int) -> None:
        for k, codes in enumerate(weights):
            if rank == k:
                write(codes, directions[step], step, stream=k)
        for k, codes in enumerate(weights):
            comm.broadcast_(codes[0], src=k)
            comm.broadcast_(codes[1], src=k)

    result = {"shape": [m, n, r], "side": side, "direction_shape": list(direction_shape)}
    for layers, label in ((1, "single"), (comm.world_size, "pair")):
        finals = {}
        for mode, fn in (("direction", via_direction), ("codes", via_codes)):
            weights = [(q0.clone(), s0.clone()) for _ in range(layers)]
            fn(weights, 0)   # warm-up, not timed
            times, payload = [], 0
            for step in range(1, reps + 1):
                comm.barrier()
                sync(device)
                payload_before = comm.bytes_total
                start = time.perf_counter()
                fn(weights, step)
                sync(device)
                times.append((time.perf_counter() - start) / layers)
                payload = (comm.bytes_total - payload_before) / layers
            result[f"{label}_{mode}_s"] = times
            result[f"{label}_{mode}_payload_bytes"] = payload
            finals[mode] = weights
        # Same directions, same counter-based noise: both ways must leave every rank with the owner's exact bytes.
        result[f"{label}_identical"] = all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                           for a, b in zip(finals["direction"], finals["codes"]))
    return result


def worker_main(work_dir: Path) -> None:
    """One rank, launched by torch.distributed.run: every 2-process run, then the sharing table."""
    from lowmem.distributed import init_distributed, shutdown
    s = json.loads((work_dir / "settings.json").read_text())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if s["device"] == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(1)
    comm = init_distributed(device=device, timeout_s=900)
    clean = False
    try:
        out = {"rank": comm.rank, "runs": {}, "sharing": []}
        for label, stage, overlap in RUNS:
            out["runs"][label] = train_run(s, device, comm, zero_stage=stage, overlap=overlap)
        for m, n, r in s["shapes"]:
            out["sharing"].append(share_update(comm, (m, n), r, s["sharing_reps"], device))
        (work_dir / f"rank{comm.rank}.json").write_text(json.dumps(out))
        clean = True
    finally:
        shutdown(comm, clean=clean)


def launch_ranks(s: dict, work_dir: Path) -> list[dict]:
    (work_dir / "settings.json").write_text(json.dumps(s))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                   str(Path.home() / ".cache" / "lowmem" / "torch_extensions")))
    if s["device"] == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD_SIZE), "--master_port",
           str(port), "-m", "benchmarks.distributed", "--worker", str(work_dir)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"the 2-process run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return [json.loads((work_dir / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]


# -- summaries -------------------------------------------------------------------------------------------------------
def summarise_run(per_rank: list[dict], s: dict, single: dict | None = None) -> dict:
    """Timed steps only: slowest rank's time per step, any rank's refresh, bytes (identical on every rank)."""
    first = s["warmup_steps"]
    step_s = [max(r["step_s"][i] for r in per_rank) for i in range(first, len(per_rank[0]["step_s"]))]
    refreshed = [any(r["refreshed"][i] for r in per_rank) for i in range(first, len(per_rank[0]["refreshed"]))]
    wire = [max(r["wire_bytes"][i] for r in per_rank) for i in range(first, len(per_rank[0]["wire_bytes"]))]
    steady = [i for i, flag in enumerate(refreshed) if not flag]
    if not steady:
        raise ValueError(f"every one of the {len(step_s)} timed steps refreshed a projector: time more steps "
                         "(--timed-steps) to get steady (refresh-free) figures")
    losses = per_rank[0]["loss"]
    out = {"steady_s": statistics.median(step_s[i] for i in steady), "cycle_s": statistics.fmean(step_s),
           "steady_steps": len(steady), "refresh_steps": len(step_s) - len(steady),
           "steady_wire_bytes": statistics.fmean(wire[i] for i in steady), "cycle_wire_bytes": statistics.fmean(wire),
           "state_bytes": [r["state_bytes"] for r in per_rank],
           "int8_weight_bytes": [r["int8_weight_bytes"] for r in per_rank]}
    if single is not None:
        out["max_rel_loss_diff"] = max(abs(a - b) / abs(b) for a, b in zip(losses, single["loss"]))
    return out


def _mib(value: float) -> str:
    return f"{value / 2**20:.3f}"


def render(s: dict, meta: dict, single: dict, ranks: list[dict] | None) -> tuple[str, dict]:
    """The markdown report and the summarised numbers behind it (written by --json)."""
    from lowmem.distributed import dense_allreduce_wire_bytes
    base = summarise_run([single], s)
    dense = dense_allreduce_wire_bytes(single["trained_numels"], WORLD_SIZE)
    data = {"settings": s, "dense_wire_bytes": dense, "single": base, "runs": {}, "sharing": []}
    tokens = WORLD_SIZE * s["batch_per_rank"] * s["seq_len"]
    lines = [f"# Data parallelism, 1 vs {WORLD_SIZE} processes ({meta['tag']}): step time, bytes moved, per-rank "
             "memory, update sharing", "",
             f"Command: `{meta['command']}`. Run on {meta['date']} in {meta['wall_s']:.0f} s; load average "
             f"{meta['load'][0]:.2f} at start, {meta['load'][1]:.2f} at end.", "",
             f"machine: {meta['machine']} (in every process)", "",
             f"settings: LLaMA-style (transformers.LlamaConfig) hidden {s['hidden']}, intermediate "
             f"{s['intermediate']}, layers {s['layers']}, heads {s['heads']} / kv heads {s['kv_heads']}, vocab "
             f"{s['vocab']}, seq {s['seq_len']}; global batch {WORLD_SIZE} x {s['batch_per_rank']} sequences "
             f"({tokens} tokens) per step; lowmem preset \"lowmem\" with rank {s['rank']}, refresh_interval_steps "
             f"{s['refresh_interval_steps']} (lazy, staggered), residual_warmup_steps {s['residual_warmup_steps']}, "
             f"lr {s['lr']} constant; {s['warmup_steps']} warm-up steps excluded (step 0 computes every projector, "
             f"step 1 chooses the residual indices), then {s['timed_steps']} timed steps = one refresh interval "
             f"(each low-rank weight refreshes once in it). 'steady' = the {base['steady_steps']} timed steps where "
             "no weight refreshed (median time, mean bytes); 'cycle' = the mean over all timed steps (refreshes "
             "amortised).", "",
             "## 1. One process vs two, same global batch", ""]
    if ranks is None:
        lines += [f"1 process: steady step {base['steady_s']:.3f} s. 2-process rows: {meta['why_not']}.", ""]
    else:
        for label, _, _ in RUNS:
            row = summarise_run([r["runs"][label] for r in ranks], s, single)
            row["time_ratio"] = row["steady_s"] / base["steady_s"]
            row["steady_dense_ratio"] = row["steady_wire_bytes"] / dense
            row["cycle_dense_ratio"] = row["cycle_wire_bytes"] / dense
            row["state_fraction"] = max(row["state_bytes"]) / base["state_bytes"][0]
            row["int8_fraction"] = max(row["int8_weight_bytes"]) / base["int8_weight_bytes"][0]
            data["runs"][label] = row
        lines += _run_tables(base, data["runs"], dense, tokens)
        lines += [_runs_reading(data["runs"], single, meta), ""]
    lines += _render_sharing(s, ranks, data, meta)
    lines += ["## 3. Per-rank planner view", "",
              f"7B-scale per-rank memory by ZeRO stage and world size (predicted): {PLANNER_REPORT} "
              "(`python -m benchmarks.memory_budget --model llama2-7b --world-size N --zero-stage K`).", ""]
    return "\n".join(lines), data


def _run_tables(base: dict, runs: dict, dense: float, tokens: int) -> list[str]:
    times = ["| run | steady step s | vs 1 process | cycle mean s | tokens/s (steady) | tokens/s vs 1 process "
             "| max rel. loss diff vs 1 process |", "| --- | --- | --- | --- | --- | --- | --- |",
             f"| 1 process | {base['steady_s']:.3f} | 1.00 | {base['cycle_s']:.3f} | {tokens / base['steady_s']:.0f} "
             "| 1.00 | - |"]
    sizes = ["| run | wire MiB/rank/step steady | cycle | dense all-reduce MiB | ratio steady | ratio cycle "
             "| state MiB/rank (r0, r1) | vs 1 process (max rank) | INT8 weight MiB/rank (r0, r1) "
             "| vs 1 process (max rank) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
             f"| 1 process | - | - | - | - | - | {_mib(base['state_bytes'][0])} | 1.00 | "
             f"{_mib(base['int8_weight_bytes'][0])} | 1.00 |"]
    for label, row in runs.items():
        name = f"{WORLD_SIZE} proc, {label}"
        times.append(f"| {name} | {row['steady_s']:.3f} | {row['time_ratio']:.2f} | {row['cycle_s']:.3f} | "
                     f"{tokens / row['steady_s']:.0f} | {1 / row['time_ratio']:.2f} | {row['max_rel_loss_diff']:.1e} |")
        sizes.append(f"| {name} | {_mib(row['steady_wire_bytes'])} | {_mib(row['cycle_wire_bytes'])} | "
                     f"{_mib(dense)} | {row['steady_dense_ratio']:.3f} | {row['cycle_dense_ratio']:.3f} | "
                     f"{', '.join(_mib(b) for b in row['state_bytes'])} | {row['state_fraction']:.2f} | "
                     f"{', '.join(_mib(b) for b in row['int8_weight_bytes'])} | {row['int8_fraction']:.2f} |")
    return times + [""] + sizes + [""]


def _runs_reading(runs: dict, single: dict, meta: dict) -> str:
    z0, z1, z2, z3 = (runs[f"ZeRO {k}"] for k in range(4))
    where = (f"on 2 idle cores; this machine's {os.cpu_count()} cores are shared with other work (load average "
             "above), so the ratios include that contention" if meta["tag"] == "cpu" else "with one GPU per process")
    float_share = single["float_numel"] / sum(single["trained_numels"])
    return (f"Reading: the ideal step ratio is 0.50 {where}. Steady step ratio to 1 process: ZeRO 0 "
            f"{z0['time_ratio']:.2f}, ZeRO 1 {z1['time_ratio']:.2f}, ZeRO 2 {z2['time_ratio']:.2f}, ZeRO 3 "
            f"{z3['time_ratio']:.2f}. ZeRO 1 and 2 are one code path in lowmem, so the gap between their steps "
            f"({z1['steady_s']:.3f} s vs {z2['steady_s']:.3f} s) is the run-to-run noise here. Asynchronous "
            "reduction of R (ZeRO 2): the step without overlap takes "
            f"{runs['ZeRO 2, overlap=False']['steady_s'] / z2['steady_s']:.2f}x the step with it. Bytes: a rank sends "
            f"{z0['steady_dense_ratio']:.3f}x (ZeRO 0) and {z1['steady_dense_ratio']:.3f}x (ZeRO 1/2) of a dense "
            f"fp32 gradient all-reduce on steady steps ({z1['cycle_dense_ratio']:.3f}x with refreshes amortised). "
            "lm_head and norms are float parameters whose gradients travel dense (the untied input embedding is an "
            "INT8 low-rank weight: its R travels, like a linear's): they alone are "
            f"{float_share:.3f}x of the dense figure at this size. ZeRO 3 sends {z3['steady_dense_ratio']:.3f}x: every "
            "INT8 weight is gathered from its owner in forward and again in backward (and no direction is "
            f"broadcast). Per-rank optimizer state falls to {z1['state_fraction']:.2f} of 1 process at ZeRO 1/2 "
            "(owners balanced by bytes; projectors and refresh counters stay replicated), and INT8 weights to "
            f"{z3['int8_fraction']:.2f} at ZeRO 3.")


def _render_sharing(s: dict, ranks: list[dict] | None, data: dict, meta: dict) -> list[str]:
    lines = ["## 2. ZeRO 1/2 update sharing: broadcast the direction or the INT8 codes", ""]
    if ranks is None:
        return lines + [f"{meta['why_not']}.", ""]
    lines += ["(a) direction: the owner broadcasts N (fp32, the low-rank moment shape), every rank back-projects and "
              "writes its INT8 copy with stochastic rounding; (b) codes: the owner back-projects and writes, then "
              "broadcasts the INT8 codes (m x n) and fp32 scales (m x ceil(n/256)). 'single' = one layer owned by "
              f"rank 0; 'pair' = {WORLD_SIZE} layers, one owned by each rank (balanced owners, as across a model), "
              f"per layer. Median of {s['sharing_reps']} repetitions, slowest rank.", "",
              "| (m, n, r) | N shape | (a) payload MiB | (b) payload MiB | bytes (b)/(a) | min(m,n)/(4r) | "
              "(a) single ms | (b) single ms | time (b)/(a) single | (a) pair ms | (b) pair ms | time (b)/(a) pair "
              "| same bytes |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, row in enumerate(ranks[0]["sharing"]):
        m, n, r = row["shape"]
        t = {key: statistics.median(max(rk["sharing"][i][key][j] for rk in ranks)
                                    for j in range(s["sharing_reps"]))
             for key in ("single_direction_s", "single_codes_s", "pair_direction_s", "pair_codes_s")}
        a, b = row["single_direction_payload_bytes"], row["single_codes_payload_bytes"]
        entry = {"shape": [m, n, r], "direction_shape": row["direction_shape"], "direction_payload_bytes": a,
                 "codes_payload_bytes": b, "bytes_ratio": b / a, "claimed_ratio": min(m, n) / (4 * r),
                 "time_ratio_single": t["single_codes_s"] / t["single_direction_s"],
                 "time_ratio_pair": t["pair_codes_s"] / t["pair_direction_s"],
                 "identical": all(rk["sharing"][i]["single_identical"] and rk["sharing"][i]["pair_identical"]
                                  for rk in ranks), **t}
        data["sharing"].append(entry)
        lines.append(f"| ({m}, {n}, {r}) | {tuple(row['direction_shape'])} | {_mib(a)} | {_mib(b)} | "
                     f"{entry['bytes_ratio']:.3f} | {entry['claimed_ratio']:.3f} | {1e3 * t['single_direction_s']:.1f} "
                     f"| {1e3 * t['single_codes_s']:.1f} | {entry['time_ratio_single']:.2f} | "
                     f"{1e3 * t['pair_direction_s']:.1f} | {1e3 * t['pair_codes_s']:.1f} | "
                     f"{entry['time_ratio_pair']:.2f} | {'yes' if entry['identical'] else 'NO'} |")
    rows = data["sharing"]
    single = [e["time_ratio_single"] for e in rows]
    pair = [e["time_ratio_pair"] for e in rows]
    lines += ["", "Reading: lowmem uses (a), \"direction\". Bytes: (b)/(a) = (m·n + 4·m·ceil(n/256)) / "
              "(4·r·max(m, n)) (codes and scales over N's r·max(m, n) fp32), which is min(m, n)/(4r)·(1 + 4/256) "
              "when 256 divides n (the formula in lowmem/distributed.py's docstring). Measured: "
              f"{', '.join(format(e['bytes_ratio'], '.2f') + 'x' for e in rows)} here. Time: (b)/(a) is "
              f"{min(single):.2f}-{max(single):.2f} for one layer and {min(pair):.2f}-{max(pair):.2f} per layer with "
              "balanced owners. " + _time_verdict(single, pair, max(e["bytes_ratio"] for e in rows), meta["tag"])
              + " Both ways leave every rank with the same INT8 bytes ('same bytes' column: (a) and (b) produce "
              "identical codes and scales).", ""]
    return lines


def _time_verdict(single: list[float], pair: list[float], bytes_ratio: float, tag: str) -> str:
    where = "on this machine" if tag == "cpu" else f"on {tag}"
    if min(pair) >= 1.0 and min(single) >= 1.0:
        return f"The time agrees with the bytes {where}: broadcasting the codes is slower."
    if max(pair) < 1.0:
        contention = (" (with one layer, (a) also runs both ranks' writes at once on cores shared with other work, "
                      "while (b) runs one)") if tag == "cpu" else ""
        return (f"The time does NOT follow the bytes {where}: (a) makes every rank back-project and stochastically "
                "round every layer, (b) lets each owner write only its own layers, and broadcasting the extra bytes "
                f"here is cheaper than the duplicated writes{contention}. Where bandwidth is scarcer than compute "
                f"(GPUs with fast write kernels, a real interconnect) the {bytes_ratio:.1f}x byte volume should "
                "dominate instead; that is expected, not measured here. lowmem uses (a), chosen for its fewer "
                "bytes moved.")
    return (f"The time only partly follows the bytes {where}: moving the extra bytes costs little here, and with "
            "balanced owners (b) saves the duplicated writes of (a).")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="small model and shapes (< 45 s on 2 CPU cores)")
    parser.add_argument("--full", action="store_true", help="add the (4096, 11008) MLP shapes to the sharing table")
    parser.add_argument("--timed-steps", type=int, default=None, help="timed steps (default: one refresh interval)")
    parser.add_argument("--report", type=Path, default=None,
                        help="markdown report path (default results/distributed-<device>.md; --quick writes none)")
    parser.add_argument("--json", type=Path, default=None, help="also write the summarised numbers as JSON")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker_main(args.worker)
        return 0
    s = dict(QUICK if args.quick else DEFAULT, device=args.device)
    if args.full:
        s["shapes"] = s["shapes"] + FULL_SHAPES
    if args.timed_steps is not None:
        if args.timed_steps < 1:
            parser.error(f"--timed-steps must be >= 1, got {args.timed_steps}")
        s["timed_steps"] = args.timed_steps
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    torch.set_num_threads(1)   # the 1-process baseline and every rank run one torch thread
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    meta = {"command": " ".join(["python -m benchmarks.distributed", *argv]), "date": date.today().isoformat(),
            "machine": machine_line(device), "tag": device_tag(device), "why_not": None}
    print(f"machine: {meta['machine']}", flush=True)
    single = train_run(s, device)
    print(f"1 process done ({time.perf_counter() - started:.0f} s)", flush=True)
    ranks = None
    if device.type == "cuda" and torch.cuda.device_count() < WORLD_SIZE:
        meta["why_not"] = f"needs >= {WORLD_SIZE} GPUs ({torch.cuda.device_count()} visible)"
    else:
        with tempfile.TemporaryDirectory(prefix="lowmem-dist-bench-") as work:
            ranks = launch_ranks(s, Path(work))
        print(f"{WORLD_SIZE} processes done ({time.perf_counter() - started:.0f} s)", flush=True)
    meta.update(wall_s=time.perf_counter() - started, load=(load_start, os.getloadavg()[0]))
    report, data = render(s, meta, single, ranks)
    print()
    print(report)
    path = args.report if args.report is not None or args.quick else RESULTS / f"distributed-{meta['tag']}.md"
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report)
        print(f"wrote {path}")
    if args.json is not None:
        args.json.write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
