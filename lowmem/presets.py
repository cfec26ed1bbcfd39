"""Named presets: the published methods lowmem reproduces, written as configs rather than code paths.

Each entry of PRESETS is a plain {field: value} dict laid over the LowMemConfig defaults by `preset()`; a method is
nothing more than a choice of settings. Paper reproductions turn `stagger` off because the papers refresh every
layer on the same step (`step % T0 == 0`); staggering is lowmem's own addition.

Full rank: a weight with rank >= min(m, n) skips projection entirely (the low-rank moments are the full moments),
so `adamw_twin` uses rank = 2**30 to mean "full rank" on any model; with scale 1, fp32 everything, no clipping and
a constant schedule its update equals torch.optim.AdamW (DESIGN §3.4). Every preset keeps the LM head float
(exclude_modules '*lm_head': full-rank AdamW), as the papers do; `lowmem` too by default (an untied head becomes a
low-rank INT8 linear when '*lm_head' is removed from exclude_modules).

Usage:
    cfg = preset("q_galore", lr=1e-4, rank=128)        # overrides are validated like any config key
"""
from __future__ import annotations

from typing import Any

from lowmem.config import ConfigError, LowMemConfig, unknown_key_error

__all__ = ["FULL_RANK", "PRESETS", "PRESET_DESCRIPTIONS", "preset"]

FULL_RANK = 1 << 30  # larger than any weight dimension: rank >= min(m, n) means no projection

_GALORE: dict[str, Any] = {
    "projection": "svd",
    "refresh": "fixed",
    "refresh_interval_steps": 200,
    "stagger": False,
    "projector_bits": 32,
    "cross_head": False,
    "residual_ratio": 0.0,
    "int8_weights": False,
    "optim_bits": 32,
    "float_optim_bits": 32,
    "error_feedback": "off",
    "moment_transfer": "keep",
    "exclude_modules": ("*lm_head", "*embed*"),   # the papers train the head with AdamW
}

# GaLore-dynamics: from step 200 the interval grows by 1.5x after each refresh, capped at 2500 steps.
_DYNAMICS = {"refresh": "geometric", "geometric_start_step": 200, "geometric_factor": 1.5,
             "max_refresh_interval_steps": 2500}

PRESETS: dict[str, dict[str, Any]] = {
    "galore": dict(_GALORE),
    "q_galore": {
        "int8_weights": True,
        "stochastic_rounding": True,
        "projector_bits": 4,
        "refresh": "lazy",
        "lazy_threshold": 0.4,
        "refresh_interval_steps": 200,
        "stagger": False,
        "projection": "svd",
        "cross_head": False,
        "residual_ratio": 0.0,
        "optim_bits": 8,
        "float_optim_bits": 8,
        "error_feedback": "off",
        "moment_transfer": "keep",
        "exclude_modules": ("*lm_head", "*embed*"),
    },
    "galore_plus": {
        "cross_head": True,
        "cross_head_modules": ("*q_proj", "*k_proj"),
        "projection": "randomized",
        "residual_ratio": 0.01,
        "residual_modules": ("*q_proj", "*k_proj"),
        "int8_weights": False,
        "projector_bits": 32,
        "refresh": "fixed",
        "refresh_interval_steps": 200,
        "stagger": False,
        "optim_bits": 32,
        "float_optim_bits": 32,
        "error_feedback": "off",
        "moment_transfer": "keep",     # GaLore+ keeps GaLore's moments across a refresh
        "exclude_modules": ("*lm_head", "*embed*"),
    },
    "galore_ef": {**_GALORE, "error_feedback": "bf16", "error_feedback_weight": 0.1},
    "galore_dynamics": {**_GALORE, **_DYNAMICS},
    # The paper's best GaLore-dynamics-error-feedback run used weight 0.2 (0.1 was best without dynamics).
    "galore_dynamics_ef": {**_GALORE, **_DYNAMICS, "error_feedback": "bf16", "error_feedback_weight": 0.2},
    "lowmem": {},
    "adamw_twin": {
        "rank": FULL_RANK,
        "scale": 1.0,
        "int8_weights": False,
        "stochastic_rounding": False,
        "optim_bits": 32,
        "float_optim_bits": 32,
        "projector_bits": 32,
        "residual_ratio": 0.0,
        "error_feedback": "off",
        "cross_head": False,
        "grad_clip": None,
        "clip_mode": "none",
        "lr_schedule": "constant",
        "warmup_steps": 0,
        "exclude_modules": ("*lm_head", "*embed*"),
    },
}

PRESET_DESCRIPTIONS: dict[str, str] = {
    "galore": "GaLore (Zhao et al. 2024, 'GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection'): "
              "exact SVD every 200 steps, fp32 projectors and moments, float weights (bf16 ones updated with "
              "stochastic rounding).",
    "q_galore": "Q-GaLore (2024, 'Q-GaLore: Quantized GaLore with INT4 Projection and Layer-Adaptive "
                "Low-Rank Gradients'): INT8 weights with stochastic rounding, INT4 projectors, lazy refresh, "
                "8-bit moments.",
    "galore_plus": "GaLore+ (2024, 'GaLore+: Boosting Low-Rank Adaptation for LLMs with Cross-Head "
                   "Projection'): cross-head randomized projectors for q/k and 1% sparse residuals; float weights "
                   "(bf16 ones updated with stochastic rounding).",
    "galore_ef": "GaLore-error-feedback ('Approximations may be all you need: Towards Pre-training LLMs with "
                 "Low-Rank Decomposition and Optimizers'): GaLore plus bf16 error feedback, weight 0.1.",
    "galore_dynamics": "GaLore-dynamics ('Approximations may be all you need'): GaLore with the refresh interval "
                       "growing 1.5x per refresh from step 200, capped at 2500.",
    "galore_dynamics_ef": "GaLore-dynamics-error-feedback ('Approximations may be all you need'): GaLore-dynamics "
                          "plus bf16 error feedback, weight 0.2 (the paper's best).",
    "lowmem": "lowmem defaults (this project, DESIGN.md): INT8+SR weights, INT4 randomized cross-head projectors, "
              "lazy refresh, q/k residuals, 8-bit moments reset at a refresh.",
    "adamw_twin": "torch.optim.AdamW (Loshchilov & Hutter 2019, 'Decoupled Weight Decay Regularization') through "
                  "lowmem: full rank, scale 1, fp32 everything, no clipping; for equality tests on small models.",
}


def preset(name: str, **overrides: Any) -> LowMemConfig:
    """The LowMemConfig of preset `name` with `overrides` applied on top (validated; unknown keys or names raise
    ConfigError naming the nearest valid one)."""
    if name not in PRESETS:
        raise unknown_key_error(name, PRESETS, what="preset")
    try:
        return LowMemConfig.from_dict({**PRESETS[name], **overrides})
    except ConfigError as err:
        raise ConfigError(f"preset {name!r}: {err}") from None
