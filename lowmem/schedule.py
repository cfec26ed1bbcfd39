"""Learning-rate schedule: linear warm-up, then cosine / linear decay to `min_lr_ratio · lr`, or constant.

One schedule for the whole model (no per-parameter scheduler copies); the runtime asks it once per step.
"""
from __future__ import annotations

import math

from lowmem.config import LowMemConfig


def lr_at(step: int, cfg: LowMemConfig) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant" or cfg.total_steps is None:
        return cfg.lr
    decay_steps = max(1, cfg.total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    if cfg.lr_schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # linear
        factor = 1.0 - progress
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * factor)
