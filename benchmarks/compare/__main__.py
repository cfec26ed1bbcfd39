"""`python -m benchmarks.compare`: every method on the same model, data, token budget and seed; one report per
workload (benchmarks/results/compare-<workload>-<device>.md with figures and JSON).

    python -m benchmarks.compare                          # default methods, both workloads (~15 min on 2 CPU cores)
    python -m benchmarks.compare --quick                  # tiny smoke run
    python -m benchmarks.compare --workload pretrain --methods all --steps 400
    python -m benchmarks.compare --methods lowmem,galore-torch,paper    # names and groups (baseline, paper, ...)
    python -m benchmarks.compare --device cuda --methods all
    python -m benchmarks.compare --list                   # methods and whether they can run here
    python -m benchmarks.compare --workload pretrain --methods all --lr-sweep   # 3 learning rates per method
    python -m benchmarks.compare --workload finetune --methods all --lr-sweep --resume   # continues if interrupted
"""
from __future__ import annotations

import argparse
import difflib
import shlex
import sys
import time
from pathlib import Path

import torch

from benchmarks.compare.api import MethodSettings, MethodSpec
from benchmarks.compare.ledger import RunStore
from benchmarks.compare.methods import adapter_methods, all_methods, unavailable_reason
from benchmarks.compare.report import write_report
from benchmarks.compare.runner import BASELINE_FP32, PENDING, eval_steps, run_comparison
from benchmarks.machine import device_tag, machine_line

WORKLOADS = ("pretrain", "finetune")
GROUPS = ("baseline", "paper", "ablation", "adapter")

# The CPU defaults, sized so both workloads finish in ~15 min on 2 otherwise idle cores (measured: ~0.3-0.6 s per
# pretrain step, ~2.5-7 s per finetune step): pretrain runs every method a claim of the report needs plus references;
# finetune (a 135M model) the methods its lowmem claims need plus LoRA. Everything else is reachable with
# --methods all (or by name / group); on CUDA the default is all.
DEFAULT_METHODS = {
    "pretrain": ("adamw-fp32", "adamw-bf16", "adafactor", "galore-torch", "apollo-mini", "galore", "q_galore",
                 "galore_plus", "galore_dynamics_ef", "lowmem", "lowmem-svd", "lora"),
    "finetune": ("adamw-fp32", "adamw-bf16", "galore-torch", "lowmem", "lora"),
}
# Evaluations per method after training starts (the step-0 evaluation is shared by all methods).
DEFAULT_EVAL_POINTS = {"pretrain": 3, "finetune": 1}

# Run shape: optimizer steps, rank, projector refresh interval, warm-up steps (micro-batches per step come from the
# workload). --quick takes benchmarks.compare.workloads.RECOMMENDED[(name, True)], sized for the tiny quick shapes.
DEFAULT_SETTINGS = {
    ("pretrain", "cpu"): dict(steps=60, rank=64, refresh_interval_steps=10, warmup_steps=6),
    ("finetune", "cpu"): dict(steps=10, rank=32, refresh_interval_steps=5, warmup_steps=1),
    ("pretrain", "cuda"): dict(steps=600, rank=64, refresh_interval_steps=100, warmup_steps=30),
    ("finetune", "cuda"): dict(steps=200, rank=32, refresh_interval_steps=50, warmup_steps=10),
}
QUICK_SETTINGS = dict(steps=3, rank=4, refresh_interval_steps=2, warmup_steps=1)
# --lr-sweep without values: the family's learning rate first, then a third of it and three times it (half a decade
# either side: wide enough to find the side of the optimum, few enough to sweep every method)
DEFAULT_LR_FACTORS = (1.0, 1 / 3, 3.0)


def parse_factors(text: str) -> tuple[float, ...]:
    """'1,0.333,3' -> (1.0, 0.333, 3.0); each factor finite and > 0, no repeats."""
    try:
        factors = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--lr-sweep: {err}; give comma-separated factors such as 1,0.333,3") \
            from None
    if not factors or any(not (f > 0 and f < float("inf")) for f in factors) or len(set(factors)) != len(factors):
        raise argparse.ArgumentTypeError(f"--lr-sweep: factors must be distinct finite numbers > 0, got {text!r}")
    return factors


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=(*WORKLOADS, "all"), default="all")
    p.add_argument("--methods", default="default",
                   help="comma list of method names, groups (baseline, paper, ablation, adapter), 'default' or "
                        "'all' (default: a per-workload set on CPU, see --list; all on CUDA)")
    p.add_argument("--steps", type=int, help="optimizer steps per method (default: per workload and device)")
    p.add_argument("--rank", type=int, help="rank of every low-rank method (default: per workload and device)")
    p.add_argument("--refresh-interval", type=int, dest="refresh_interval_steps",
                   help="projector refresh / adapter restart interval in steps (default: per workload)")
    p.add_argument("--warmup-steps", type=int, dest="warmup_steps", help="learning-rate warm-up steps")
    p.add_argument("--eval-points", type=int, help="evaluations per method, evenly spaced, the last after the last "
                                                   "step (default: 3 pretrain, 1 finetune)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default; 1 gives steadier "
                                               "timings on a machine shared with other jobs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    p.add_argument("--out", default="benchmarks/results", help="report directory (default benchmarks/results)")
    p.add_argument("--quick", action="store_true", help="tiny smoke settings (a few steps, tiny workloads)")
    p.add_argument("--no-memory", action="store_true", help="skip the extra memory-measuring step after each CPU run")
    p.add_argument("--list", action="store_true", help="list the methods and whether they can run here, then exit")
    p.add_argument("--lr-sweep", nargs="?", const=DEFAULT_LR_FACTORS, type=parse_factors, default=None,
                   metavar="FACTORS",
                   help="run each method at these multiples of its family's learning rate (default 1,0.333,3) and "
                        "report the run with the lowest final eval loss; the report lists every value tried")
    p.add_argument("--resume", action="store_true",
                   help="keep every finished run under OUT/runs/compare-<workload>-<device>/ and reuse the stored "
                        "runs made with the same settings: an interrupted comparison (or sweep) continues where it "
                        "stopped, and the report says which rows were timed by an earlier process")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: write the report from the runs stored by --resume (the others are listed as "
                        "pending), e.g. while another process continues the comparison")
    args = p.parse_args(argv)
    for name in ("steps", "rank", "refresh_interval_steps", "eval_points", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_steps', '').replace('_', '-')} must be >= 1, got {value}")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        p.error(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    return args


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    return torch.device(choice)


def select_methods(text: str, specs: list[MethodSpec], device: torch.device,
                   workload: str = "pretrain") -> list[MethodSpec]:
    """Parse --methods into specs in registry order; adamw-fp32 (the reference of every ratio) is always included."""
    by_name = {s.name: s for s in specs}
    chosen: set[str] = set()
    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        if token == "all" or (token == "default" and device.type == "cuda"):
            chosen.update(by_name)
        elif token == "default":
            chosen.update(n for n in DEFAULT_METHODS[workload] if n in by_name)
        elif token in GROUPS:
            chosen.update(s.name for s in specs if s.group == token)
        elif token in by_name:
            chosen.add(token)
        else:
            close = difflib.get_close_matches(token, [*by_name, *GROUPS], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SystemExit(f"--methods: unknown method or group {token!r}{hint} (--list shows them all)")
    chosen.add(BASELINE_FP32)
    return [s for s in specs if s.name in chosen]


def run_settings(name: str, workload, device: torch.device, args: argparse.Namespace,
                 recommended: dict) -> MethodSettings:
    """Steps / rank / interval / warm-up: the command line, else DEFAULT_SETTINGS (--quick: the workload module's
    RECOMMENDED quick shape, else QUICK_SETTINGS). Micro-batches per step: as many as `workload.train_batches(0)`."""
    if args.quick:
        shape = recommended.get((name, True), QUICK_SETTINGS)
    else:
        shape = DEFAULT_SETTINGS[(name, device.type)]
    shape = {key: shape[key] for key in ("steps", "rank", "refresh_interval_steps", "warmup_steps")}
    for key in shape:
        if getattr(args, key, None) is not None:
            shape[key] = getattr(args, key)
    shape["warmup_steps"] = min(shape["warmup_steps"], shape["steps"])
    return MethodSettings(lr=0.0, seed=args.seed, device=device, dtype=torch.float32,
                          grad_accum_steps=len(workload.train_batches(0)), **shape)


def settings_lines(workload, settings: MethodSettings, specs: list[MethodSpec], params: int,
                   lr_factors: tuple[float, ...] | None = None) -> list[str]:
    tokens = workload.tokens_per_step * settings.steps
    families = sorted({s.family for s in specs})
    lrs = []
    for family in families:
        try:
            lrs.append(f"{family} {workload.lr_for(family):.2g}")
        except Exception as err:   # reported per method as well; the settings line only lists what exists
            lrs.append(f"{family} ({type(err).__name__})")
    sweep = ("" if not lr_factors else
             f"; each method swept over {', '.join(f'{f:.3g}' for f in lr_factors)} x its family's learning rate, the "
             "run with the lowest final eval loss reported (see Learning-rate sweep)")
    return [
        f"workload `{workload.name}`: {workload.description}",
        f"model parameters: {params:,}",
        f"{settings.steps} optimizer steps x {workload.tokens_per_step:,} tokens = {tokens:,} tokens per method; "
        f"{settings.grad_accum_steps} micro-batch(es) per step; seed {settings.seed}",
        f"rank {settings.rank}; projector refresh (and adapter restart) interval {settings.refresh_interval_steps} "
        "steps; lowmem presets scale their other step counts (GaLore-dynamics start and cap, residual warm-up, lazy "
        "cap) by interval / 200 to keep the papers' proportions",
        f"learning rate per method family: {', '.join(lrs)}; linear warm-up {settings.warmup_steps} steps then cosine "
        f"decay to 0.1 lr (lowmem.schedule) for every method; no weight decay{sweep}",
        "gradient clipping: global norm 1.0 for torch-optimizer methods, per-tensor 1.0 for lowmem presets (fused "
        "updates never see the global norm before writing)",
        f"device {settings.device}, model dtype {str(settings.dtype).replace('torch.', '')} (adamw-bf16: bf16)",
    ]


def store_key(workload, settings: MethodSettings, eval_points: int, *, quick: bool, measure_memory: bool) -> dict:
    """What a stored run must have been made with to be reused: the workload (its description names the model,
    data and family learning rates), the run shape, the evaluation steps, the device and the memory step."""
    return {"workload": workload.name, "description": workload.description, "quick": quick,
            "steps": settings.steps, "rank": settings.rank, "refresh_interval_steps": settings.refresh_interval_steps,
            "warmup_steps": settings.warmup_steps, "grad_accum_steps": settings.grad_accum_steps,
            "seed": settings.seed, "device": settings.device.type, "dtype": str(settings.dtype),
            "eval_at": eval_steps(settings.steps, eval_points), "measure_memory": measure_memory}


def provenance(store: RunStore | None) -> str:
    """The caveat's sentence on where the timings come from."""
    if store is None or not store.reused:
        return "Timings come from one run on a possibly shared machine."
    times = sorted(r.finished_at for r in store.reused if r.finished_at)
    span = f", finished {times[0]} to {times[-1]}" if times else ""
    return (f"{len(store.reused)} of the runs were reused from earlier processes (--resume{span}; the stored runs "
            f"are in {store.directory}): their timings, and ratios between rows timed by different processes, also "
            "carry the difference in machine load between those processes.")


def pending_note(results) -> str:
    """The caveat's sentence on rows whose runs are not stored yet (--report-only), or ''."""
    pending = [r.name for r in results
               if r.status == PENDING or any(status == PENDING for _, _, status in r.lr_sweep)]
    if not pending:
        return ""
    return (f" Incomplete: {len(pending)} method(s) still have runs pending ({', '.join(pending)}); the command "
            "above continues the comparison.")


def list_methods(specs: list[MethodSpec], device: torch.device) -> None:
    print(f"{'method':24} {'group':9} {'family':10} {'here':40} description")
    for s in specs:
        where = unavailable_reason(s, device) or "available"
        default = [w for w in WORKLOADS if s.name in DEFAULT_METHODS[w]]
        default = f" [default: {', '.join(default)}]" if default else ""
        print(f"{s.name:24} {s.group:9} {s.family:10} {where:40} {s.description}{default}")
    why = adapter_methods()[1]
    if why:
        print(f"(no adapter methods: {why})")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(machine_line(device), flush=True)
    specs = all_methods()
    if args.list:
        list_methods(specs, device)
        return 0
    names = WORKLOADS if args.workload == "all" else (args.workload,)
    chosen = {name: select_methods(args.methods, specs, device, name) for name in names}
    try:
        from benchmarks.compare import workloads
    except ImportError as err:
        raise SystemExit(f"benchmarks.compare.workloads does not import ({err}); it provides the workloads") from err
    given = list(sys.argv[1:] if argv is None else argv)
    if args.report_only:   # the command the report shows is the one that continues the comparison
        given = [a for a in given if a != "--report-only"] + ([] if args.resume else ["--resume"])
    command = f"python -m benchmarks.compare {shlex.join(given)}".strip()
    for name in names:
        start = time.perf_counter()
        workload = workloads.get_workload(name, quick=args.quick, device=device, seed=args.seed)
        settings = run_settings(name, workload, device, args, getattr(workloads, "RECOMMENDED", {}))
        params = sum(p.numel() for p in workload.make_model().parameters())
        print(f"== {name}: {len(chosen[name])} methods, {settings.steps} steps, rank {settings.rank}", flush=True)
        eval_points = min(args.eval_points or DEFAULT_EVAL_POINTS[name], settings.steps)
        store = None
        if args.resume or args.report_only:
            store = RunStore(Path(args.out) / "runs" / f"compare-{name}-{device_tag(device)}",
                             store_key(workload, settings, eval_points, quick=args.quick,
                                       measure_memory=not args.no_memory))
        results = run_comparison(chosen[name], workload, settings, eval_points=eval_points,
                                 measure_memory=not args.no_memory, log=lambda line: print(line, flush=True),
                                 lr_factors=args.lr_sweep, store=store, report_only=args.report_only)
        caveat = (f"a small model ({params / 1e6:.1f} M parameters) trained {settings.steps} steps on "
                  f"{'a GPU' if device.type == 'cuda' else 'CPU'}; the papers' claims are about 7B-scale models over "
                  "thousands of steps, where projector cost, refresh savings and loss gaps differ. "
                  + provenance(store) + pending_note(results))
        path = write_report(results, out_dir=Path(args.out), workload_name=name, device_tag=device_tag(device),
                            machine=machine_line(device), command=command,
                            settings_lines=settings_lines(workload, settings, chosen[name], params, args.lr_sweep),
                            caveat=caveat,
                            wall_seconds=None if args.report_only else time.perf_counter() - start)
        print(f"report: {path} ({(time.perf_counter() - start) / 60:.1f} min)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
