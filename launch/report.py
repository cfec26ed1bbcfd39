"""What a run shows: a line per set-up phase with its duration (`Phases`), a JSONL line per step (`StepLog`), and
the final report.md with run time, peak memory and loss and memory curves (PNG)."""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402


GIB = 2**30


def memory_label(device_type: str) -> str:
    """What the per-step memory figure is: the process's peak resident set on CPU (Python, torch and library code
    included), the CUDA allocator's peak on GPU."""
    return "peak RSS" if device_type == "cpu" else "peak CUDA allocated"


def format_gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.3g} GiB"


def predicted_peaks(predicted_bytes: int | None, load_bytes: int | None = None,
                    step_bytes: int | None = None) -> str:
    """The preflight's prediction for the run report: 'predicted peak X of live tensors (memory preflight: load A,
    step B)'; '' when there is none."""
    if not predicted_bytes:
        return ""
    parts = f": load {format_gib(load_bytes)}, step {format_gib(step_bytes)}" if load_bytes and step_bytes else ""
    return f"predicted peak {format_gib(predicted_bytes)} of live tensors (memory preflight{parts})"


def format_seconds(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


class Phases:
    """Says what the run is doing between start and the first step (model conversion, tokenising, preparing the
    optimizer, the first evaluation): a line when a phase starts, one with its duration when it ends. `durations`
    keeps (name, seconds) for the report."""

    def __init__(self, say: Callable[..., None]):
        self.say = say
        self.durations: list[tuple[str, float]] = []

    @contextmanager
    def __call__(self, what: str, done: Callable[[], str] | None = None, *, short: str | None = None
                 ) -> Iterator[None]:
        """`what` is printed; `short` (default `what`) names the phase in the report; `done()` adds a detail."""
        self.say(f"[setup] {what} ...", flush=True)
        started = time.perf_counter()
        yield
        seconds = time.perf_counter() - started
        self.durations.append((short or what, seconds))
        extra = f" ({done()})" if done is not None else ""
        self.say(f"[setup] {what}: {format_seconds(seconds)}{extra}", flush=True)


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


def _plot(records: list[dict], out: Path, *, predicted_peak_bytes: int | None = None,
          memory_kind: str = "peak memory", predicted_load_bytes: int | None = None) -> tuple[Path, Path]:
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
    fig, ax = plt.subplots(figsize=(7, 3.5))
    if mem:
        ax.plot(*zip(*mem), label=f"{memory_kind} (measured per step)")
    if predicted_peak_bytes:
        ax.axhline(predicted_peak_bytes / GIB, color="tab:orange", linestyle="--",
                   label="predicted peak (live tensors, memory preflight)")
    if predicted_load_bytes:
        ax.axhline(predicted_load_bytes / GIB, color="tab:green", linestyle=":",
                   label="predicted load peak (streamed checkpoint + optimizer state)")
    ax.set_ylim(bottom=0)   # from zero: a 7% rise must not look like a doubling
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("GiB")
    ax.set_title(f"memory: {memory_kind} vs the preflight's prediction" if predicted_peak_bytes else memory_kind)
    if mem or predicted_peak_bytes:
        ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(mem_png, dpi=100)
    plt.close(fig)
    return loss_png, mem_png


def write_report(out_dir: Path, *, config_yaml: str, records: list[dict], summary: dict,
                 predicted_peak_bytes: int | None = None, memory_kind: str = "peak memory",
                 predicted_load_bytes: int | None = None) -> Path:
    """report.md (+ loss.png, memory.png) in out_dir; returns the markdown path. The memory plot shows the logged
    per-step figure (`memory_kind` says which: memory_label()) from 0 GiB, the predicted peak as a line and, when
    given, the predicted load peak (predicted_peaks() words both for the summary)."""
    loss_png, mem_png = _plot(records, out_dir, predicted_peak_bytes=predicted_peak_bytes, memory_kind=memory_kind,
                              predicted_load_bytes=predicted_load_bytes)
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
