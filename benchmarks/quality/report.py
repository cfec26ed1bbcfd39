"""The study's report: `quality-<workload>-<device>.md` with a loss-curve figure (seed bands shaded) and the JSON."""
from __future__ import annotations

import json
from pathlib import Path

from benchmarks.compare.runner import MethodResult
from benchmarks.quality.bands import Band, ablation_costs, reading


def _fmt(band: Band, key: str, spec: str = ".4f") -> str:
    if not getattr(band, key):
        return "-"
    if band.n == 1:
        return format(band.mean(key), spec)
    return f"{band.mean(key):{spec}} [{band.low(key):{spec}}, {band.high(key):{spec}}]"


def table(bands: list[Band]) -> str:
    rows = ["| method | seeds | final eval loss (mean [min, max]) | best eval loss | exact match | tokens/s | "
            "peak MiB | lr |", "|---|---|---|---|---|---|---|---|"]
    for band in bands:
        tps = f"{sum(band.tokens_per_second) / len(band.tokens_per_second):.0f}" if band.tokens_per_second else "-"
        peak = f"{max(band.peak_bytes) / 2**20:.0f}" if band.peak_bytes else "-"
        match = _fmt(band, "exact_match", ".3f")
        lr = ", ".join(f"{value:g}" for value in sorted(set(band.lrs))) or "-"
        rows.append(f"| {band.method} | {band.n} | {_fmt(band, 'final')} | {_fmt(band, 'best')} | {match} | {tps} | "
                    f"{peak} | {lr} |")
    return "\n".join(rows)


def plot(runs: dict[str, dict[int, MethodResult]], path: Path, title: str) -> None:
    """Eval loss against optimizer steps: the mean over seeds as a line, the min-max over seeds shaded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for method, by_seed in runs.items():
        curves = [{step: v["eval_loss"] for step, v in r.eval_points if "eval_loss" in v}
                  for r in by_seed.values() if r.ok]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        values = [[c[s] for c in curves] for s in steps]
        means = [sum(v) / len(v) for v in values]
        line, = ax.plot(steps, means, label=f"{method} (n={len(curves)})", linewidth=1.4)
        if len(curves) > 1:
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=line.get_color(),
                            alpha=0.2, linewidth=0)
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("held-out eval loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(runs: dict[str, dict[int, MethodResult]], bands: dict[str, Band], *, out_dir: Path,
                 workload: str, device_tag: str, header_lines: list[str], pending: list[str]) -> Path:
    """Write the markdown, figure and JSON; return the markdown's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"quality-{workload}-{device_tag}"
    plot(runs, out_dir / f"{stem}-loss.png", f"{workload}: eval loss, mean over seeds, min-max shaded")
    ordered = [bands[m] for m in runs if m in bands]
    lines = [f"# Quality at length: {workload} ({device_tag})", ""] + [f"- {line}" for line in header_lines]
    if pending:
        lines += ["", f"**Incomplete study:** {len(pending)} run(s) not finished yet: {', '.join(pending)}. "
                  "Run the same command again to continue."]
    failed = [f"{m} seed {s}: {r.status}" for m, by in runs.items() for s, r in by.items() if not r.ok]
    if failed:
        lines += ["", "Runs that did not finish training: " + "; ".join(failed)]
    lines += ["", "## Results", "", table(ordered), "", f"![eval loss]({stem}-loss.png)", "", "## Reading", ""]
    for claim in reading(bands):
        lines.append(f"- **{claim.verdict}**: {claim.text} — {claim.evidence}")
    lowmem = bands.get("lowmem", Band.empty("lowmem"))
    costs = ablation_costs(lowmem, [b for m, b in bands.items() if m.startswith("lowmem-")])
    if costs:
        lines += ["", "What each lowmem component costs or gains (ablation minus lowmem, one seed each):", ""]
        lines += [f"- {line}" for line in costs]
    others = ablation_costs(lowmem, [b for m, b in bands.items()
                                     if not m.startswith("lowmem") and m not in ("adamw-fp32", "adamw-bf16")])
    if others:
        lines += ["", "The other methods against lowmem (each at its family's learning rate, the lr column; a method "
                  "below lowmem here may owe part of it to that learning rate):", ""]
        lines += [f"- {line}" for line in others]
    path = out_dir / f"{stem}.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out_dir / f"{stem}.json").write_text(json.dumps(
        {m: {str(s): r.to_dict() for s, r in by.items()} for m, by in runs.items()}, indent=1), encoding="utf-8")
    return path
