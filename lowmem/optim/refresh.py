"""When to refresh a layer's projector (DESIGN §3.3): fixed, lazy and geometric policies, staggered across layers.

A policy is configuration only; everything that changes lives in a per-layer state dict of tensors (safetensors-
friendly, merged into the layer's optimizer state). Keys, all int64 0-d unless noted:

    next_refresh_step      first global step (0-based) at which `due` is true; 0 before the initial refresh
    interval_steps         current gap between refreshes
    stagger_offset_steps   floor(layer_index * T0 / num_layers) with stagger, else 0
    refresh_count          refreshes recorded so far
    similarity_history     fp32 (window,): the last subspace similarities, oldest first, nan where empty
    last_similarity        fp32 0-d: the most recent known similarity (nan until one is recorded)

Schedule: every layer refreshes at step 0. After that first refresh layer ℓ's next refresh is at
stagger_offset_steps when that is > 0, else one interval later; afterwards one interval after each refresh.

The state is meant to stay on the CPU: the policy reads it with `.item()`, which would sync a CUDA stream.

Why the lazy policy keeps intervals on multiples of T0: every refresh time of layer ℓ is then congruent to its offset
modulo T0, so layers with different offsets never refresh in the same step and at most ceil(L / T0) layers share a
step, however their intervals have drifted apart. For the same reason its cap is max_interval_steps rounded down to a
multiple of T0 (2500 -> 2400 at T0 = 200). The geometric policy keeps the paper's rounding; since every layer walks
the same interval sequence from its own offset it stays staggered too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["init_refresh_state", "RefreshPolicy", "FixedPolicy", "LazyPolicy", "GeometricPolicy", "make_policy",
           "refresh_summary", "POLICY_KINDS"]

POLICY_KINDS = ("fixed", "lazy", "geometric")
REFRESH_STATE_KEYS = ("next_refresh_step", "interval_steps", "stagger_offset_steps", "refresh_count",
                      "similarity_history", "last_similarity")
# Similarities come out of fp32 (and INT4-decoded projectors): allow this much outside [0, 1] before calling it a bug.
_SIMILARITY_SLACK = 1e-3


def _check_int(name: str, value, lowest: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lowest:
        raise ValueError(f"{name} must be >= {lowest}, got {value}")
    return value


def _int0(value: int) -> Tensor:
    return torch.tensor(value, dtype=torch.int64)


def init_refresh_state(layer_index: int, num_layers: int, *, base_interval_steps: int, stagger: bool = True,
                       window: int = 3) -> dict[str, Tensor]:
    """Fresh refresh bookkeeping for layer `layer_index` of `num_layers` (CPU tensors, see the module docstring)."""
    _check_int("num_layers", num_layers, 1)
    _check_int("layer_index", layer_index, 0)
    if layer_index >= num_layers:
        raise ValueError(f"layer_index must be < num_layers = {num_layers}, got {layer_index}")
    _check_int("base_interval_steps", base_interval_steps, 1)
    _check_int("window", window, 1)
    offset_steps = (layer_index * base_interval_steps) // num_layers if stagger else 0
    return {
        "next_refresh_step": _int0(0),
        "interval_steps": _int0(base_interval_steps),
        "stagger_offset_steps": _int0(offset_steps),
        "refresh_count": _int0(0),
        "similarity_history": torch.full((window,), float("nan"), dtype=torch.float32),
        "last_similarity": torch.tensor(float("nan"), dtype=torch.float32),
    }


def _check_state(state: dict[str, Tensor]) -> None:
    missing = [k for k in REFRESH_STATE_KEYS if k not in state]
    if missing:
        raise KeyError(f"refresh state is missing {missing}; build it with init_refresh_state")


@dataclass(frozen=True)
class RefreshPolicy:
    """Base policy: a refresh every `interval_steps`, the interval adapted by `_next_interval` (identity here).

    Subclasses override `_next_interval(state, step, similarity) -> int` only; `due` and `record` are shared.
    """

    base_interval_steps: int = 200
    max_interval_steps: int = 2500

    def __post_init__(self) -> None:
        _check_int("base_interval_steps", self.base_interval_steps, 1)
        _check_int("max_interval_steps", self.max_interval_steps, self.base_interval_steps)

    def due(self, state: dict[str, Tensor], step: int) -> bool:
        """True when layer `state` should refresh at global step `step` (0-based); late calls still fire."""
        _check_state(state)
        return step >= int(state["next_refresh_step"].item())

    def record(self, state: dict[str, Tensor], step: int, similarity: float | None) -> None:
        """Book a refresh done at `step`; similarity = ||P_oldᵀ P_new||²_F / r, or None (first refresh / unknown).

        Updates refresh_count, the similarity history, interval_steps and next_refresh_step in place.
        """
        _check_state(state)
        _check_int("step", step, 0)
        if similarity is not None:
            similarity = float(similarity)
            if not (-_SIMILARITY_SLACK <= similarity <= 1.0 + _SIMILARITY_SLACK):  # also rejects nan
                raise ValueError(f"similarity must lie in [0, 1], got {similarity}")
            similarity = min(1.0, max(0.0, similarity))
            history = state["similarity_history"]
            history.copy_(torch.roll(history, -1))
            history[-1] = similarity
            state["last_similarity"].fill_(similarity)
        first = int(state["refresh_count"].item()) == 0
        interval_steps = self._next_interval(state, step, similarity)
        state["interval_steps"].fill_(interval_steps)
        offset_steps = int(state["stagger_offset_steps"].item())
        gap_steps = offset_steps if first and offset_steps > 0 else interval_steps
        state["next_refresh_step"].fill_(step + gap_steps)
        state["refresh_count"].add_(1)

    def _next_interval(self, state: dict[str, Tensor], step: int, similarity: float | None) -> int:
        return int(state["interval_steps"].item())


@dataclass(frozen=True)
class FixedPolicy(RefreshPolicy):
    """GaLore: every base_interval_steps (after the staggered first gap)."""


@dataclass(frozen=True)
class LazyPolicy(RefreshPolicy):
    """Q-GaLore's lazy refresh with the rotation-invariant similarity.

    `window` agreeing similarities (>= threshold) double the interval up to the cap and clear the history; one
    similarity below low_threshold halves it (not below base) and clears the history.
    """

    threshold: float = 0.4
    low_threshold: float = 0.2
    window: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("window", self.window, 1)
        if not (0.0 <= self.low_threshold <= self.threshold <= 1.0):
            raise ValueError(f"need 0 <= low_threshold <= threshold <= 1, got low_threshold={self.low_threshold}, "
                             f"threshold={self.threshold}")

    @property
    def cap_interval_steps(self) -> int:
        """max_interval_steps rounded down to a multiple of base (keeps the stagger, see the module docstring)."""
        base = self.base_interval_steps
        return max(base, (self.max_interval_steps // base) * base)

    def _next_interval(self, state: dict[str, Tensor], step: int, similarity: float | None) -> int:
        history = state["similarity_history"]
        if history.numel() != self.window:
            raise ValueError(f"similarity_history holds {history.numel()} values but the lazy policy's window is "
                             f"{self.window}; build the state with the same window")
        interval_steps = int(state["interval_steps"].item())
        if similarity is None:
            return interval_steps
        base = self.base_interval_steps
        if similarity < self.low_threshold:
            history.fill_(float("nan"))
            return max(base, (interval_steps // 2 // base) * base)
        if bool((history >= self.threshold).all()):       # nan (not yet filled) compares False
            history.fill_(float("nan"))
            return min(self.cap_interval_steps, 2 * interval_steps)
        return interval_steps


@dataclass(frozen=True)
class GeometricPolicy(RefreshPolicy):
    """GaLore-dynamics: from geometric_start_step on, interval <- round(interval * factor) after each refresh."""

    geometric_start_step: int = 200
    geometric_factor: float = 1.5

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("geometric_start_step", self.geometric_start_step, 0)
        if not (math.isfinite(self.geometric_factor) and self.geometric_factor >= 1.0):
            raise ValueError(f"geometric_factor must be a finite number >= 1, got {self.geometric_factor}")

    def _next_interval(self, state: dict[str, Tensor], step: int, similarity: float | None) -> int:
        interval_steps = int(state["interval_steps"].item())
        if step < self.geometric_start_step:
            return interval_steps
        return min(self.max_interval_steps, int(round(interval_steps * self.geometric_factor)))


def make_policy(kind: str, *, base_interval_steps: int = 200, max_interval_steps: int = 2500,
                threshold: float = 0.4, low_threshold: float = 0.2, window: int = 3,
                geometric_start_step: int = 200, geometric_factor: float = 1.5) -> RefreshPolicy:
    """The policy named `kind` ("fixed", "lazy" or "geometric"); options a kind does not use are ignored."""
    if kind == "fixed":
        return FixedPolicy(base_interval_steps, max_interval_steps)
    if kind == "lazy":
        return LazyPolicy(base_interval_steps, max_interval_steps, threshold=threshold, low_threshold=low_threshold,
                          window=window)
    if kind == "geometric":
        return GeometricPolicy(base_interval_steps, max_interval_steps, geometric_start_step=geometric_start_step,
                               geometric_factor=geometric_factor)
    raise ValueError(f"unknown refresh policy {kind!r}; expected one of {', '.join(POLICY_KINDS)}")


def refresh_summary(states: list[dict[str, Tensor]]) -> dict:
    """Per-layer intervals, counts and similarities of `states` (one refresh state per layer), for logs.

    Returns {"interval_steps": [int], "refresh_count": [int], "next_refresh_step": [int],
    "last_similarity": [float | None], "total_refreshes": int, "min_interval_steps", "max_interval_steps",
    "mean_interval_steps"} (the last three None for an empty list).
    """
    for state in states:
        _check_state(state)
    intervals = [int(s["interval_steps"].item()) for s in states]
    last = [float(s["last_similarity"].item()) for s in states]
    return {
        "interval_steps": intervals,
        "refresh_count": [int(s["refresh_count"].item()) for s in states],
        "next_refresh_step": [int(s["next_refresh_step"].item()) for s in states],
        "last_similarity": [None if math.isnan(x) else x for x in last],
        "total_refreshes": sum(int(s["refresh_count"].item()) for s in states),
        "min_interval_steps": min(intervals) if intervals else None,
        "max_interval_steps": max(intervals) if intervals else None,
        "mean_interval_steps": sum(intervals) / len(intervals) if intervals else None,
    }
