"""The run's log and final report: a JSONL line per step, then report.md with loss and memory curves (PNG)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402


class StepLog:
    """Appends one JSON object per line to output_dir/train_log.jsonl (flushed per line: survives a kill)."""

    def __init__(self, path: Path, *, append: bool):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "a" if append else "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, default=float) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_log(path: Path) -> list[dict]:
    """The records of train_log.jsonl. A line that is not a JSON object (one torn by a kill mid-write, which only
    the last line can be) is passed over: the log is ours, and a report must not fail on it."""
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f.read().split("\n"):   # "\n" only: a JSON string may hold U+2028, which splitlines() splits
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def _plot(records: list[dict], out: Path) -> tuple[Path, Path]:
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train" and r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("kind") == "eval"]
    mem = [(r["step"], r["peak_memory_bytes"] / 2**30) for r in records if r.get("kind") == "train"]
    loss_png, mem_png = out / "loss.png", out / "memory.png"
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(loss_png, dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3))
    if mem:
        ax.plot(*zip(*mem))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("peak memory (GiB)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(mem_png, dpi=100)
    plt.close(fig)
    return loss_png, mem_png


def write_report(out_dir: Path, *, config_yaml: str, records: list[dict], summary: dict) -> Path:
    """report.md (+ loss.png, memory.png) in out_dir; returns the markdown path."""
    loss_png, mem_png = _plot(records, out_dir)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    lines = ["# lowmem fine-tuning run", ""]
    for key, value in summary.items():
        lines.append(f"- **{key}**: {value}")
    lines += ["", "## Curves", "", f"![loss]({loss_png.name})", "", f"![memory]({mem_png.name})", ""]
    if evals:
        lines += ["## Evaluation", "", "| step | eval loss | perplexity |", "| --- | --- | --- |"]
        for r in evals:
            lines.append(f"| {r['step']} | {r['eval_loss']:.4f} | {math.exp(min(r['eval_loss'], 50)):.2f} |")
        lines.append("")
    if train:
        lines += ["## Last steps", "", "| step | loss | lr | grad norm | tokens/s |", "| --- | --- | --- | --- | --- |"]
        for r in train[-5:]:
            lines.append(f"| {r['step']} | {r['loss']:.4f} | {r['lr']:.3g} | {r['grad_norm']:.3g} | "
                         f"{r['tokens_per_s']:.0f} |")
        lines.append("")
    lines += ["## Configuration", "", "```yaml", config_yaml.rstrip(), "```", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
