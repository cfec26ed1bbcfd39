"""Seed statistics of a study and the claims read from them.

A method's runs over seeds give a band: mean, min and max of the final (and best) eval loss. A claim "A within 1% of
B" is reproduced when mean_A - mean_B <= 1% of mean_B, or when A's mean lies inside B's seed band [min, max];
"A no worse than B" is reproduced when mean_A <= mean_B, within noise when mean_A exceeds mean_B but lies inside B's
band (or B's mean inside A's), and not reproduced otherwise. With one seed a band is a single point.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import mean

from benchmarks.compare.runner import MethodResult


@dataclass
class Band:
    """One method over its seeds. Losses are per-token cross-entropy on the shared held-out set."""
    method: str
    seeds: list[int]
    final: list[float]              # final eval loss per seed
    best: list[float]               # best eval loss over the run's evaluation points, per seed
    exact_match: list[float]        # finetune only (empty otherwise)
    tokens_per_second: list[float]
    peak_bytes: list[int]
    lrs: list[float] = field(default_factory=list)   # learning rate per seed (the same unless a study changed it)

    @classmethod
    def empty(cls, method: str) -> "Band":
        return cls(method, [], [], [], [], [], [], [])

    @property
    def n(self) -> int:
        return len(self.final)

    @property
    def has_spread(self) -> bool:
        """Two or more seeds: min-max is a noise band (one seed's "band" is a single point)."""
        return self.n >= 2

    @staticmethod
    def _stat(values: list[float], fn) -> float | None:
        return fn(values) if values else None

    def mean(self, key: str = "final") -> float | None:
        return self._stat(getattr(self, key), mean)

    def low(self, key: str = "final") -> float | None:
        return self._stat(getattr(self, key), min)

    def high(self, key: str = "final") -> float | None:
        return self._stat(getattr(self, key), max)

    def contains(self, value: float, key: str = "final") -> bool:
        return self.n > 0 and self.low(key) <= value <= self.high(key)


def band_of(method: str, runs: dict[int, MethodResult]) -> Band:
    """The band of `method` from its finished runs {seed: result}; failed or diverged runs are left out."""
    band = Band.empty(method)
    for seed, result in sorted(runs.items()):
        losses = [float(values["eval_loss"]) for step, values in result.eval_points
                  if step > 0 and "eval_loss" in values and math.isfinite(float(values["eval_loss"]))]
        if not result.ok or not losses:
            continue
        band.seeds.append(seed)
        band.final.append(losses[-1])
        band.best.append(min(losses))
        match = result.metric("exact_match")
        if match is not None:
            band.exact_match.append(match)
        if result.tokens_per_second:
            band.tokens_per_second.append(result.tokens_per_second)
        if result.peak_bytes:
            band.peak_bytes.append(int(result.peak_bytes))
        if result.lr is not None:
            band.lrs.append(float(result.lr))
    return band


@dataclass
class Claim:
    text: str
    verdict: str        # "reproduced" | "not reproduced" | "within noise" | "not measured"
    evidence: str


def _single_seed_note(a: Band, b: Band) -> str:
    """What a claim from fewer than two seeds on either side is worth: one observation, no noise band."""
    few = [band.method for band in (a, b) if not band.has_spread]
    return f"; one seed of {' and '.join(few)}: a single observation, no noise band" if few else ""


def within_percent(a: Band, b: Band, percent: float, text: str) -> Claim:
    """One-sided: A's mean loss at most `percent` % above B's mean, or inside B's seed band. Lower is better, so A
    below B reproduces the claim too (the evidence says by how much)."""
    if not a.n or not b.n:
        return Claim(text, "not measured", f"{a.method}: {a.n} run(s), {b.method}: {b.n} run(s)")
    ma, mb = a.mean(), b.mean()
    gap = (ma - mb) / mb * 100
    evidence = (f"{a.method} {ma:.4f} (n={a.n}) vs {b.method} {mb:.4f} (n={b.n}, band {b.low():.4f}-{b.high():.4f}): "
                f"{gap:+.2f}%{_single_seed_note(a, b)}")
    if gap <= percent or b.contains(ma):
        return Claim(text, "reproduced", evidence)
    return Claim(text, "not reproduced", evidence + f" ({gap - percent:.2f} points beyond {percent:g}%)")


def no_worse(a: Band, b: Band, text: str) -> Claim:
    if not a.n or not b.n:
        return Claim(text, "not measured", f"{a.method}: {a.n} run(s), {b.method}: {b.n} run(s)")
    ma, mb = a.mean(), b.mean()
    evidence = (f"{a.method} {ma:.4f} (n={a.n}) vs {b.method} {mb:.4f} (n={b.n}): {(ma - mb) / mb * 100:+.2f}%"
                f"{_single_seed_note(a, b)}")
    if ma <= mb:
        return Claim(text, "reproduced", evidence)
    if b.contains(ma) or a.contains(mb):
        return Claim(text, "within noise", evidence)
    return Claim(text, "not reproduced", evidence)


def ablation_costs(lowmem: Band, ablations: list[Band]) -> list[str]:
    """One line per band (an ablation: which component costs what; or another method): how its final loss compares
    with lowmem's band."""
    lines = []
    for band in ablations:
        if not band.n or not lowmem.n:
            continue
        delta = (band.mean() - lowmem.mean()) / lowmem.mean() * 100
        if not lowmem.has_spread:   # inside/outside a single point would say nothing about noise
            where = "lowmem has one seed: no band"
        else:
            where = "inside lowmem's seed band" if lowmem.contains(band.mean()) else "outside lowmem's seed band"
        lines.append(f"{band.method}: {band.mean():.4f} ({delta:+.2f}% vs lowmem, {where})")
    return lines


def reading(bands: dict[str, Band]) -> list[Claim]:
    """The study's claims, each computed from the bands present."""
    def get(name: str) -> Band:
        return bands.get(name, Band.empty(name))

    return [
        within_percent(get("lowmem"), get("adamw-fp32"), 1.0,
                       "lowmem's final eval loss is within 1% of fp32 AdamW (or inside its seed band)"),
        no_worse(get("lowmem"), get("galore-torch"), "lowmem is no worse than galore-torch at equal rank"),
        no_worse(get("lowmem"), get("adamw-bf16"), "lowmem is no worse than bf16 AdamW"),
    ]
