"""The comparison report: markdown table, two figures (matplotlib Agg) and a "Reading" section whose verdicts are
computed from the measured numbers, plus the raw results as JSON.

Files (out_dir): compare-<workload>-<device>.md, -loss.png (train-loss curves and eval points of every method on one
plot), -bars.png (step-time ratio to fp32 AdamW and peak memory), .json (every MethodResult).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from benchmarks.compare.runner import BASELINE_BF16, BASELINE_FP32, MethodResult

# Thresholds of the claims checked in "Reading" (papers and DESIGN §8).
GALORE_PLUS_MIN_SPEEDUP = 3.0        # "approximately 4x" fine-tuning speed, read as at least 3x end to end
Q_GALORE_MIN_SVD_SAVING = 0.60       # "over 60% reduction in SVD calls" at similarity threshold 0.4
LOWMEM_MAX_REFRESH_SHARE = 0.05      # projector refresh <= 5% of training time
LOWMEM_MIN_SPEEDUP_VS_GALORE = 3.0   # >= 3x faster end to end than the GaLore reference implementation
LOWMEM_MAX_LOSS_OVER_BF16 = 0.01     # final eval loss within 1% of bf16 AdamW
LOWMEM_MIN_SPEED_VS_BF16 = 0.9       # step time >= 0.9x of bf16 AdamW's speed

REPRODUCED, NOT_REPRODUCED = "reproduced", "not reproduced"


@dataclass(frozen=True)
class Claim:
    claim: str
    verdict: str      # "reproduced" | "not reproduced" | "not measured (why)"
    detail: str       # the numbers behind the verdict


def _find(results: list[MethodResult], name: str) -> tuple[MethodResult | None, str | None]:
    """(result, None) when `name` ran to the end, else (None, why not)."""
    for r in results:
        if r.name == name:
            return (r, None) if r.ok else (None, f"{name}: {r.status}")
    return None, f"{name} not in this run"


def _need(results, *names) -> tuple[list[MethodResult], str | None]:
    found, missing = [], []
    for name in names:
        r, why = _find(results, name)
        found.append(r)
        if why:
            missing.append(why)
    return found, ("; ".join(missing) if missing else None)


def _eval_loss(r: MethodResult) -> float | None:
    loss = r.metric("eval_loss")
    return loss if loss is not None and math.isfinite(loss) else None


def _final_losses(results, first: str, second: str) -> tuple[tuple[float, float] | None, str | None]:
    """Final eval losses of two methods, or the reason a claim about them cannot be checked."""
    (a, b), why = _need(results, first, second)
    losses = None if why else (_eval_loss(a), _eval_loss(b))
    if not why and None in losses:
        why = "no finite final eval loss"
    return losses, why


def _verdict(ok: bool) -> str:
    return REPRODUCED if ok else NOT_REPRODUCED


def _missing(claim: str, why: str) -> Claim:
    return Claim(claim, f"not measured ({why})", "")


def reading(results: list[MethodResult]) -> list[Claim]:
    """Each paper / DESIGN claim judged from `results` (one workload, one run)."""
    claims = []

    name = "GaLore+ is about 4x faster than GaLore (galore_plus vs galore, end to end)"
    (plus, galore), why = _need(results, "galore_plus", "galore")
    if why:
        claims.append(_missing(name, why))
    else:
        speedup = galore.mean_step_seconds / plus.mean_step_seconds
        refresh = ""
        if galore.refresh_seconds and plus.refresh_seconds:
            refresh = (f"; projector refresh {galore.refresh_seconds:.2f} s vs {plus.refresh_seconds:.2f} s "
                       f"({galore.refresh_seconds / plus.refresh_seconds:.1f}x)")
        claims.append(Claim(name, _verdict(speedup >= GALORE_PLUS_MIN_SPEEDUP),
                            f"mean step {galore.mean_step_seconds:.3f} s (galore) vs {plus.mean_step_seconds:.3f} s "
                            f"(galore_plus): {speedup:.2f}x{refresh}; needs >= {GALORE_PLUS_MIN_SPEEDUP:g}x"))

    name = "Q-GaLore saves > 60% of SVDs with the 0.4 threshold (refreshes of q_galore vs galore)"
    (q, galore), why = _need(results, "q_galore", "galore")
    if not why and (q.refresh_count is None or not galore.refresh_count):
        why = "no refresh count"
    if why:
        claims.append(_missing(name, why))
    else:
        saving = 1.0 - q.refresh_count / galore.refresh_count
        claims.append(Claim(name, _verdict(saving > Q_GALORE_MIN_SVD_SAVING),
                            f"{q.refresh_count} projector computations vs {galore.refresh_count}: "
                            f"{100 * saving:.1f}% saved; needs > {100 * Q_GALORE_MIN_SVD_SAVING:.0f}%"))

    name = "GaLore-dynamics-EF reaches a lower eval loss than GaLore"
    losses, why = _final_losses(results, "galore_dynamics_ef", "galore")
    if why:
        claims.append(_missing(name, why))
    else:
        claims.append(Claim(name, _verdict(losses[0] < losses[1]),
                            f"final eval loss {losses[0]:.4f} (galore_dynamics_ef) vs {losses[1]:.4f} (galore)"))

    name = "lowmem: projector refresh <= 5% of training time"
    (low,), why = _need(results, "lowmem")
    if not why and low.refresh_share is None:
        why = "no refresh time"
    if why:
        claims.append(_missing(name, why))
    else:
        claims.append(Claim(name, _verdict(low.refresh_share <= LOWMEM_MAX_REFRESH_SHARE),
                            f"{low.refresh_seconds:.2f} s of {low.train_seconds:.2f} s = "
                            f"{100 * low.refresh_share:.1f}%"))

    name = "lowmem: >= 3x faster end to end than galore-torch at equal rank"
    (low, ref), why = _need(results, "lowmem", "galore-torch")
    if why:
        claims.append(_missing(name, why))
    else:
        speedup = ref.mean_step_seconds / low.mean_step_seconds
        claims.append(Claim(name, _verdict(speedup >= LOWMEM_MIN_SPEEDUP_VS_GALORE),
                            f"mean step {ref.mean_step_seconds:.3f} s (galore-torch) vs {low.mean_step_seconds:.3f} s "
                            f"(lowmem): {speedup:.2f}x"))

    name = "lowmem: step time >= 0.9x of bf16 AdamW's speed (the project's goal)"
    (low, bf16), why = _need(results, "lowmem", BASELINE_BF16)
    if why:
        claims.append(_missing(name, why))
    else:
        speed = bf16.mean_step_seconds / low.mean_step_seconds
        claims.append(Claim(name, _verdict(speed >= LOWMEM_MIN_SPEED_VS_BF16),
                            f"mean step {low.mean_step_seconds:.3f} s (lowmem) vs {bf16.mean_step_seconds:.3f} s "
                            f"(adamw-bf16): lowmem runs at {speed:.2f}x bf16 AdamW's speed"))

    name = "lowmem: final eval loss within 1% of bf16 AdamW"
    losses, why = _final_losses(results, "lowmem", BASELINE_BF16)
    if why:
        claims.append(_missing(name, why))
    else:
        excess = losses[0] / losses[1] - 1.0
        claims.append(Claim(name, _verdict(excess <= LOWMEM_MAX_LOSS_OVER_BF16),
                            f"{losses[0]:.4f} (lowmem) vs {losses[1]:.4f} (adamw-bf16): {100 * excess:+.2f}%; "
                            f"needs <= {100 * LOWMEM_MAX_LOSS_OVER_BF16:+.2f}%"))

    name = "lowmem: final eval loss no worse than galore-torch"
    losses, why = _final_losses(results, "lowmem", "galore-torch")
    if why:
        claims.append(_missing(name, why))
    else:
        claims.append(Claim(name, _verdict(losses[0] <= losses[1]),
                            f"{losses[0]:.4f} (lowmem) vs {losses[1]:.4f} (galore-torch)"))
    return claims


# ---- formatting ----------------------------------------------------------------------------------------------------

def _fmt(value, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:{spec}}{suffix}"


def results_table(results: list[MethodResult]) -> str:
    head = ("| method | group | status | lr | final eval loss | ppl | exact-match | tokens/s | step time / fp32 AdamW "
            "| step time / bf16 AdamW | refresh share | SVD-equiv. | refreshes | peak memory (MiB) |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        em = r.metric("exact_match")
        rows.append("| " + " | ".join([
            f"`{r.name}`", r.group, r.status.replace("|", "/"), _fmt(r.lr, ".2g"),
            _fmt(r.metric("eval_loss"), ".4f"), _fmt(r.metric("perplexity"), ".2f"),
            _fmt(None if em is None else 100 * em, ".1f", "%"), _fmt(r.tokens_per_second, ".0f"),
            _fmt(r.ratio_fp32, ".2f", "x"), _fmt(r.ratio_bf16, ".2f", "x"),
            _fmt(None if r.refresh_share is None else 100 * r.refresh_share, ".1f", "%"),
            _fmt(r.svd_equivalents, ".1f"), _fmt(r.refresh_count, "d"),
            _fmt(None if r.peak_bytes is None else r.peak_bytes / 2**20, ".1f")]) + " |")
    return "\n".join(rows)


def _smooth(values: list[float], span: int) -> list[float]:
    """Exponential moving average with alpha = 2 / (span + 1), for readable train-loss curves."""
    alpha, out, avg = 2.0 / (span + 1), [], None
    for v in values:
        avg = v if avg is None or not math.isfinite(avg) else alpha * v + (1 - alpha) * avg
        out.append(avg)
    return out


def plot_losses(results: list[MethodResult], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in results if r.train_losses]
    fig, ax = plt.subplots(figsize=(11, 6))
    colors = plt.get_cmap("tab20").colors
    span = max(1, max((len(r.train_losses) for r in shown), default=1) // 20)
    for i, r in enumerate(shown):
        color, style = colors[i % len(colors)], ("-", "--", ":", "-.")[(i // len(colors)) % 4]
        steps = range(len(r.train_losses))   # the loss of step k is measured after k updates
        ax.plot(steps, _smooth(r.train_losses, span), color=color, linestyle=style, linewidth=1.2, label=r.name)
        points = [(s, e["eval_loss"]) for s, e in r.eval_points if "eval_loss" in e]
        if points:
            ax.plot(*zip(*points), color=color, linestyle="none", marker="o", markersize=4)
    ax.set_xlabel("optimizer updates done")
    ax.set_ylabel(f"train loss (EMA, span {span}); dots: eval loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if shown:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bars(results: list[MethodResult], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in results if r.ratio_fp32 is not None]
    sized = [r for r in results if r.peak_bytes is not None]
    height = 1.5 + 0.28 * max(len(timed), len(sized), 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, height))
    left.barh([r.name for r in timed], [r.ratio_fp32 for r in timed], color="tab:blue")
    left.axvline(1.0, color="black", linewidth=0.8)
    left.set_xlabel("mean step time / fp32 AdamW (same run)")
    right.barh([r.name for r in sized], [r.peak_bytes / 2**20 for r in sized], color="tab:orange")
    right.set_xlabel("peak memory (MiB)")
    for ax in (left, right):
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_table(results: list[MethodResult]) -> str | None:
    """Every learning rate each method tried (MethodResult.lr_sweep) with its final eval loss; None without a sweep."""
    swept = [r for r in results if r.lr_sweep]
    if not swept:
        return None
    lines = ["| method | learning rates tried: final eval loss | chosen |", "|---|---|---|"]
    for r in swept:
        tried = []
        for lr, loss, status in sorted(r.lr_sweep, key=lambda t: (t[0] is None, t[0] or 0.0)):
            what = f"{loss:.4f}" if loss is not None and status == "ok" else status.replace("|", "/")
            tried.append(f"{_fmt(lr, '.3g')}: {what}")
        finished = [lr for lr, loss, status in r.lr_sweep if loss is not None and status == "ok"]
        edge = r.ok and len(finished) > 1 and r.lr in (min(finished), max(finished))
        chosen = (_fmt(r.lr, ".3g") + (" (edge of the range)" if edge else "")) if r.ok else "—"
        lines.append(f"| `{r.name}` | {'; '.join(tried)} | {chosen} |")
    return "\n".join(lines)


def write_report(results: list[MethodResult], *, out_dir: Path | str, workload_name: str, device_tag: str,
                 machine: str, command: str, settings_lines: list[str], caveat: str,
                 wall_seconds: float | None = None) -> Path:
    """Write the markdown report, both figures and the JSON; returns the markdown path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"compare-{workload_name}-{device_tag}"
    loss_png, bars_png = out_dir / f"{stem}-loss.png", out_dir / f"{stem}-bars.png"
    title = f"{workload_name} on {device_tag}"
    plot_losses(results, loss_png, f"Loss curves: {title}")
    plot_bars(results, bars_png, f"Step time and peak memory: {title}")

    lines = [f"# Method comparison: {title}", "", f"Machine: {machine}", "", f"Command: `{command}`"]
    if wall_seconds is not None:
        lines.append(f"\nWall time of this workload's comparison: {wall_seconds / 60:.1f} min")
    lines += ["", "## Settings", "", *[f"- {line}" for line in settings_lines], "", "## Results", "",
              f"Step-time ratios divide mean step times (all steps, refreshes included) by those of "
              f"`{BASELINE_FP32}` / `{BASELINE_BF16}` in this run. Refresh share: projector computation seconds / "
              "train seconds. SVD-equiv.: projector work in units of one full torch.linalg.svd of the same shape "
              "(galore-torch: one per refresh). Refreshes: projector computations (one per weight per refresh).",
              "", results_table(results), "", f"![loss curves]({loss_png.name})", "",
              f"![step time and peak memory]({bars_png.name})", "", "## Reading", "",
              "Generated from the numbers above.", ""]
    for c in reading(results):
        lines.append(f"- {c.claim}: **{c.verdict}**" + (f" — {c.detail}" if c.detail else ""))
    sweep = sweep_table(results)
    if sweep is not None:
        lines += ["", "## Learning-rate sweep", "",
                  "Each method ran once per learning rate below (its family's rate times the sweep's factors); the "
                  "results table shows the run with the lowest final eval loss. The choice is made on the held-out "
                  "set the table reports, so every figure is the best of that method's own tries: fair between "
                  "methods, optimistic for each. A chosen value at the edge of the range means the optimum may lie "
                  "beyond it.", "", sweep]
    lines += ["", f"Caveat: {caveat}", "", "## Methods", ""]
    lines += [f"- `{r.name}` ({r.group}, lr family {r.family}): {r.description}"
              + (f" Memory: {r.memory_note}." if r.memory_note else "") for r in results]
    md_path = out_dir / f"{stem}.md"
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out_dir / f"{stem}.json").write_text(json.dumps(
        {"command": command, "machine": machine, "settings": settings_lines,
         "results": [r.to_dict() for r in results]}, indent=1, default=str), encoding="utf-8")
    return md_path
