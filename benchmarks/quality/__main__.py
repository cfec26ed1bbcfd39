"""`python -m benchmarks.quality`: lowmem vs AdamW (and GaLore, APOLLO, LoRA, ablations) at length, with seeds.

    python -m benchmarks.quality                                # both workloads, full length (hours on 2 CPU cores)
    python -m benchmarks.quality --workload pretrain --seeds 3  # one workload
    python -m benchmarks.quality --quick --out runs/quality-smoke   # a tiny end-to-end run (a minute)
    python -m benchmarks.quality --out benchmarks/results       # write the committed reports

Interrupted? Run the same command again: finished (method, seed) runs are read back from <out>/runs/.
`--report-only` rewrites the report from the finished runs without running anything.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.compare.methods import all_methods, resolved_config, unavailable_reason
from benchmarks.compare.runner import evaluate, eval_steps, run_method, settings_for
from benchmarks.machine import device_tag, machine_line
from benchmarks.quality import plan
from benchmarks.quality.bands import band_of
from benchmarks.quality.ledger import load_run, run_path, save_run
from benchmarks.quality.report import write_report


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=("pretrain", "finetune", "all"), default="all")
    ap.add_argument("--seeds", type=int, default=3, help="seeds for lowmem, fp32 AdamW and bf16 AdamW (default 3)")
    ap.add_argument("--methods", default=None,
                    help="comma-separated method names run with one seed (default: the study's set per workload)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 2000 pretrain, 300 finetune)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and a few steps: checks the harness end to end")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="runs/quality", help="report and run directory (default runs/quality)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--seeded", default=None,
                    help="comma-separated methods run with --seeds seeds (default: adamw-fp32,lowmem,adamw-bf16)")
    ap.add_argument("--lr-factor", type=float, default=1.0,
                    help="every method at this multiple of its family's learning rate (default 1); kept in the "
                         "runs' settings, so give such a study its own --out")
    ap.add_argument("--report-only", action="store_true",
                    help="write the report from the runs already finished under <out>/runs/ and run nothing (the "
                         "others are listed as pending): e.g. while another process continues the study")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error("--seeds must be >= 1")
    if args.steps is not None and args.steps < 1:
        ap.error("--steps must be >= 1")
    if not args.lr_factor > 0:
        ap.error("--lr-factor must be > 0")
    return args


def study_runs(workload: str, seeds: int, single: tuple[str, ...],
               seeded: tuple[str, ...] = plan.SEEDED_METHODS) -> list[tuple[str, int]]:
    """(method, seed) pairs in the order they run: seed 0 of everything first, so a partial study already compares
    every method; then the remaining seeds of the seeded methods."""
    first = [(m, 0) for m in seeded] + [(m, 0) for m in single if m not in seeded]
    return first + [(m, s) for s in range(1, seeds) for m in seeded]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    specs = {s.name: s for s in all_methods()}
    out = Path(args.out)
    print(machine_line(device), flush=True)
    # the command that continues the study (a --report-only run names the command it reports on)
    given = [a for a in (sys.argv[1:] if argv is None else list(argv)) if a != "--report-only"]
    command = f"python -m benchmarks.quality {shlex.join(given)}".strip()
    for name in (("pretrain", "finetune") if args.workload == "all" else (args.workload,)):
        shape = plan.SHAPES[(name, args.quick)]
        if args.steps is not None:
            shape = plan.StudyShape(**{**shape.__dict__, "steps": args.steps})
        single = tuple(args.methods.split(",")) if args.methods else plan.SINGLE_SEED_METHODS[name]
        seeded = tuple(args.seeded.split(",")) if args.seeded else plan.SEEDED_METHODS
        unknown = [m for m in single + seeded if m not in specs]
        if unknown:
            raise SystemExit(f"--methods/--seeded: unknown method(s) {unknown}; `python -m benchmarks.compare --list` "
                             "names them")
        runs = study_runs(name, args.seeds, single, seeded)
        key = {"workload": name, "quick": args.quick, "device": str(device), **shape.__dict__}
        if args.lr_factor != 1.0:   # absent at 1: runs stored before the option existed stay valid
            key["lr_factor"] = args.lr_factor
        done: dict[str, dict[int, object]] = {}
        todo = []
        def run_key(method: str, seed: int) -> dict:
            config = plan.planned_config(specs[method], name, shape, quick=args.quick, seed=seed, device=device,
                                         lr_factor=args.lr_factor)
            return {**key, "method": method, "seed": seed, "config": config}

        for method, seed in runs:
            stored = load_run(run_path(out, name, method, seed), settings_key=run_key(method, seed))
            if stored is not None:
                done.setdefault(method, {})[seed] = stored
            elif args.report_only:
                continue
            elif unavailable_reason(specs[method], device) is None:
                todo.append((method, seed))
            else:
                print(f"{method}: {unavailable_reason(specs[method], device)}; left out", flush=True)
        print(f"== {name}: {len(runs)} runs, {sum(len(v) for v in done.values())} already finished, {len(todo)} to "
              f"run, {shape.steps} steps each -> {out}", flush=True)
        eval_at = eval_steps(shape.steps, min(shape.eval_points, shape.steps))
        workloads: dict[int, object] = {}
        start = time.perf_counter()
        with tqdm(total=len(todo) * shape.steps, unit="step", desc=name, dynamic_ncols=True) as bar:
            for method, seed in todo:
                if seed not in workloads:
                    workloads[seed] = plan.build_workload(name, seed=seed, quick=args.quick, device=device)
                workload = workloads[seed]
                base = plan.settings(shape, workload, seed=seed, device=device)
                bar.set_postfix_str(f"{method} seed {seed}")
                planned = run_key(method, seed)["config"]
                actual = resolved_config(specs[method], settings_for(specs[method], workload, base, args.lr_factor))
                if planned != actual:   # the stored key would not describe the run: refuse rather than mislabel
                    raise RuntimeError(f"{method} seed {seed}: the configuration planned for the run's key differs "
                                       f"from the one it would run with ({_first_difference(planned, actual)})")
                initial = evaluate(workload, workload.make_model())
                result = run_method(specs[method], workload, base, eval_at=eval_at, initial_eval=initial,
                                    log=lambda line: tqdm.write(line), on_step=lambda _: bar.update(1),
                                    lr_factor=args.lr_factor)
                bar.update(max(0, shape.steps - len(result.step_seconds)))     # a run that stopped early
                save_run(run_path(out, name, method, seed), result, settings_key=run_key(method, seed))
                done.setdefault(method, {})[seed] = result
                tqdm.write(f"{method} seed {seed}: {result.status}; final eval loss {result.metric('eval_loss')}")
                _report(name, done, runs, out, device, shape, command, args.lr_factor)
        path = _report(name, done, runs, out, device, shape, command, args.lr_factor)
        print(f"report: {path} ({(time.perf_counter() - start) / 60:.1f} min this session)", flush=True)
    return 0


def _first_difference(planned: dict | None, actual: dict | None) -> str:
    if planned is None or actual is None:
        return f"{planned!r} vs {actual!r}"
    keys = sorted(k for k in {*planned, *actual} if planned.get(k) != actual.get(k))
    return ", ".join(f"{k}: {planned.get(k)!r} vs {actual.get(k)!r}" for k in keys[:3])


def _report(name, done, runs, out, device, shape, command, lr_factor: float) -> Path:
    order = list(dict.fromkeys(m for m, _ in runs))
    ordered = {m: done[m] for m in order if m in done}
    bands = {m: band_of(m, by_seed) for m, by_seed in ordered.items()}
    pending = [f"{m} seed {s}" for m, s in runs if s not in done.get(m, {})]
    header = [machine_line(device), f"command: `{command}`",
              f"{shape.steps} optimizer steps, rank {shape.rank}, refresh interval {shape.refresh_interval_steps}, "
              f"warm-up {shape.warmup_steps}; evaluation at {eval_steps(shape.steps, min(shape.eval_points, shape.steps))}",
              "seeds change the initial weights (pretrain) and the batch order; the held-out set is the same for every "
              "seed; learning rates per method family as in benchmarks.compare"
              + ("" if lr_factor == 1.0 else f", times {lr_factor:g} (--lr-factor)")]
    return write_report(ordered, bands, out_dir=out, workload=name, device_tag=device_tag(device),
                        header_lines=header, pending=pending)


if __name__ == "__main__":
    sys.exit(main())
