"""Where a run's metrics go (`log_to`): JSONL always, TensorBoard and Weights & Biases (offline) on request.

    log = RunLogger(output_dir, ("jsonl", "tensorboard"), append=False, config=cfg.to_dict())
    log.write({"kind": "train", "step": 1, "loss": 2.3, "lr": 1e-4, ...})   # one record -> every sink
    log.close()

Records are the dicts the training loop writes to train_log.jsonl (launch.finetune):
  kind "train"    step, loss, lr, grad_norm, skipped, seconds, tokens_per_s, peak_memory_bytes, refreshed (layer
                  count), comm_bytes (several processes): the progress bar's numbers and the memory;
  kind "eval"     step, eval_loss, perplexity;
  kind "refresh"  step, layers: the layers whose projector was refreshed in that step.
JSONL gets every record as it is. TensorBoard (`torch.utils.tensorboard.SummaryWriter`, event files under
output_dir/tensorboard) and W&B get every numeric field as a scalar "<kind>/<field>" at that step (memory also as
"train/peak_memory_gib"), and a refresh event as the text "refresh/layers" (TensorBoard) or a count (W&B).
W&B runs in offline mode (files under output_dir/wandb; `wandb sync` uploads them later); asked for but not
installed, it is skipped with one printed line, and the run goes on (so does TensorBoard when the tensorboard package
is missing). A resumed run appends: TensorBoard's reader orders events by step, W&B starts a new offline run.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

from launch.report import StepLog

__all__ = ["RunLogger", "TENSORBOARD_DIR", "WANDB_DIR"]

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
_NOT_SCALARS = ("kind", "step")


def _scalars(record: dict) -> dict[str, float]:
    """"<kind>/<field>" -> value for every finite-or-not number of the record (bools as 0/1)."""
    kind = record.get("kind", "train")
    out = {}
    for key, value in record.items():
        if key in _NOT_SCALARS or not isinstance(value, (int, float)):
            continue
        out[f"{kind}/{key}"] = float(value)
    if "peak_memory_bytes" in record:
        out[f"{kind}/peak_memory_gib"] = record["peak_memory_bytes"] / 2**30
    return out


class _TensorBoard:
    def __init__(self, directory: Path):
        from torch.utils.tensorboard import SummaryWriter   # needs the tensorboard package (its protobufs)
        self.writer = SummaryWriter(log_dir=str(directory))

    def write(self, record: dict) -> None:
        step = int(record.get("step", 0))
        if record.get("kind") == "refresh":
            self.writer.add_text("refresh/layers", ", ".join(record.get("layers", [])), global_step=step)
            self.writer.add_scalar("refresh/layers_refreshed", len(record.get("layers", [])), global_step=step)
        else:
            for tag, value in _scalars(record).items():
                if math.isfinite(value):   # TensorBoard plots NaN as a gap at best; skipped steps keep their record
                    self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, directory: Path, config: dict):
        import wandb
        directory.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb = wandb
        self.run = wandb.init(mode="offline", dir=str(directory), config=config, project="lowmem")

    def write(self, record: dict) -> None:
        step = int(record.get("step", 0))
        if record.get("kind") == "refresh":
            self.run.log({"refresh/layers_refreshed": len(record.get("layers", []))}, step=step)
        else:
            self.run.log(_scalars(record), step=step)

    def close(self) -> None:
        self.run.finish()


class RunLogger:
    """Fan-out of one run's records: output_dir/train_log.jsonl always, plus the optional sinks of `log_to`."""

    def __init__(self, output_dir: str | os.PathLike, log_to: tuple[str, ...] = ("jsonl",), *, append: bool,
                 config: dict | None = None, say: Callable[[str], None] = print):
        out = Path(output_dir)
        self.jsonl = StepLog(out / "train_log.jsonl", append=append)
        self.path = self.jsonl.path
        self.sinks: list = []
        for name in log_to:
            if name == "jsonl":
                continue
            try:
                if name == "tensorboard":
                    self.sinks.append(_TensorBoard(out / TENSORBOARD_DIR))
                elif name == "wandb":
                    self.sinks.append(_Wandb(out / WANDB_DIR, config or {}))
                else:
                    raise ValueError(f"unknown log sink {name!r}; valid: jsonl, tensorboard, wandb")
            except ImportError as err:
                package = "tensorboard" if name == "tensorboard" else "wandb"
                say(f"log_to: {name} asked for but the {package} package is not installed ({err}); logging to "
                    f"train_log.jsonl without it. Install it with `pip install {package}` to get {name} logs.")

    def write(self, record: dict) -> None:
        self.jsonl.write(record)
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        self.jsonl.close()
        for sink in self.sinks:
            sink.close()
