"""The two interfaces `python -m benchmarks.compare` is built from: a Workload (model + data + evaluation) and a
Trainer (one training method applied to a fresh copy of the workload's model).

Every method runs on the same workload instance: the same initial weights (`make_model()` is deterministic), the same
micro-batches in the same order (`train_batches(step)`), the same token budget and the same evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

Batch = dict[str, torch.Tensor]   # {"input_ids": int64 (B, T), "labels": int64 (B, T), -100 = no loss}


@dataclass
class MethodSettings:
    """What every method of one comparison shares (the per-method learning rate comes from the method's family)."""
    steps: int                     # optimizer steps
    grad_accum_steps: int          # micro-batches per step
    rank: int                      # low-rank methods: projector / adapter rank
    refresh_interval_steps: int    # GaLore-family projector refresh interval (and ReLoRA-family restart interval)
    lr: float                      # base learning rate chosen by the workload for this method family
    warmup_steps: int
    seed: int
    device: torch.device
    dtype: torch.dtype             # compute / weight dtype of the model (fp32 on CPU by default)
    extra: dict = field(default_factory=dict)


class Trainer(Protocol):
    """One method bound to one model. `train_step` runs grad_accum_steps micro-batches and one optimizer update."""

    name: str

    def train_step(self, micro_batches: list[Batch]) -> float:
        """Forward/backward every micro-batch, update; return the mean training loss of the step."""

    def eval_model(self) -> nn.Module:
        """The model to evaluate (forward only, e.g. with adapters merged or INT8 weights dequantized on the fly)."""

    def refresh_seconds(self) -> float | None:
        """Wall seconds spent computing projectors so far (None: the method has no projector)."""

    def svd_equivalents(self) -> float | None:
        """Projector work so far in units of one full SVD of the same shapes (None: no projector)."""

    def close(self) -> None:
        """Detach hooks / free state."""


@dataclass
class Workload:
    name: str                                    # "pretrain" | "finetune" (used in report file names)
    description: str                             # model, data source (package), token budget: printed in the report
    make_model: Callable[[], nn.Module]          # fresh model with the same initial weights on every call
    train_batches: Callable[[int], list[Batch]]  # step -> that step's micro-batches (deterministic)
    evaluate: Callable[[nn.Module], dict]        # -> {"eval_loss": float, "perplexity": float, ["exact_match": float]}
    tokens_per_step: int
    lr_for: Callable[[str], float]               # method family ("full", "galore", "lowmem", "adapter", ...) -> lr


@dataclass(frozen=True)
class MethodSpec:
    """A comparable method: how to build its Trainer and what it needs to run."""
    name: str                                    # unique, e.g. "adamw-fp32", "galore-torch", "lowmem", "lora"
    family: str                                  # learning-rate family passed to Workload.lr_for
    build: Callable[[nn.Module, MethodSettings], Trainer]
    requires: tuple[str, ...] = ()               # importable modules needed (e.g. ("galore_torch",)); missing -> not run
    cuda_only: bool = False                      # True: reported as "needs a GPU" on CPU
    group: str = "baseline"                      # "baseline" | "paper" | "ablation" | "adapter" (report sections)
    description: str = ""                        # one line for the report
    # why the CPU memory step (run under the live-bytes meter, a TorchDispatchMode) cannot measure this method, or
    # None: such methods report no CPU peak instead of failing (or, worse, poisoning later runs of the process)
    no_cpu_memory: str | None = None
