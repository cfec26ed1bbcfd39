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
    """Eval loss against optimizer steps: the mean over seeds as a line, the min-max over seeds shaded. Left: the
    whole run; right: its second half, the y-axis from the lowest final loss to 12% above the median method's final
    (where the ablations differ by a percent or two). Ablations (lowmem-*) dashed; 20 colours before one repeats."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(14, 4.8))
    colours = plt.get_cmap("tab20").colors
    finals, last_step = [], 0
    for index, (method, by_seed) in enumerate(runs.items()):
        curves = [{step: v["eval_loss"] for step, v in r.eval_points if "eval_loss" in v}
                  for r in by_seed.values() if r.ok]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        values = [[c[s] for c in curves] for s in steps]
        means = [sum(v) / len(v) for v in values]
        style = dict(color=colours[index % len(colours)], linewidth=1.4,
                     linestyle="--" if method.startswith("lowmem-") else "-")
        for axis in (ax, zoom):
            axis.plot(steps, means, label=f"{method} (n={len(curves)})", **style)
            if len(curves) > 1:
                axis.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=style["color"],
                                  alpha=0.2, linewidth=0)
        if steps:
            finals.append((means[-1], min(values[-1])))
            last_step = max(last_step, steps[-1])
    if finals and last_step:
        final_means = sorted(mean for mean, _ in finals)
        median_final = final_means[len(final_means) // 2]
        zoom.set_xlim(last_step / 2, last_step * 1.01)
        zoom.set_ylim(min(low for _, low in finals) * 0.98, median_final * 1.12)
    zoom.set_title("second half, near the best")
    for axis in (ax, zoom):
        axis.set_xlabel("optimizer steps")
        axis.grid(alpha=0.3)
    ax.set_ylabel("held-out eval loss (nats/token)")
    ax.set_title(title)
    zoom.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the curves fill the panel
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
