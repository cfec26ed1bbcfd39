"""LowMemConfig: every knob of a lowmem run in one frozen, validated dataclass (DESIGN §2-§3).

Each field carries `metadata={"help": ..., "check": ...}`: the help sentence (units, allowed values) feeds
`help_text()` and the CLI's `--help-config`; the check validates and normalizes one value (lists -> tuples,
ints -> floats) and raises `ConfigError` naming the field, the bad value and what is allowed. Relations between
fields (thresholds ordered, intervals ordered) are checked after all fields.

Per-module overrides `{"*.q_proj": {"rank": 64}}` are stored as a tuple of (pattern, ((field, value), ...)) so the
config stays hashable; `for_module(name)` applies every matching override in insertion order. Run-wide fields
(learning-rate schedule, accumulation, clipping mode, seed, module selection) cannot be overridden per module,
because the runtime reads them once from the top-level config and a per-module value would be silently ignored.

Length: one dataclass of ~50 fields, each with its help sentence and check, plus the small validators they share;
splitting the fields across modules would scatter the one place a user reads to learn every knob.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import reprlib
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from fnmatch import fnmatchcase
from typing import Any, Callable

__all__ = ["ConfigError", "LowMemConfig", "RUN_WIDE_FIELDS", "brief", "closest_key", "matches", "unknown_key_error"]

OverrideItems = tuple  # ((pattern, ((field, value), ...)), ...) — see the module docstring

# Fields the runtime reads once from the top-level config; overriding them per module would have no effect.
RUN_WIDE_FIELDS = ("lr", "lr_schedule", "warmup_steps", "total_steps", "min_lr_ratio", "grad_accum_steps",
                   "clip_mode", "seed", "target_modules", "exclude_modules", "freeze")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message says which, and what is allowed."""


_BRIEF = reprlib.Repr()
_BRIEF.maxstring = _BRIEF.maxother = 60
_BRIEF.maxlist = _BRIEF.maxtuple = _BRIEF.maxdict = _BRIEF.maxset = 6
_BRIEF.maxlevel = 3
BRIEF_CHARS = 160   # the most characters of a value an error message echoes


def brief(value: Any) -> str:
    """repr(value) for an error message, bounded: long strings, big containers (a YAML alias expansion), deep
    nesting and huge ints are cut with an ellipsis and their size, and the cost is bounded too (reprlib looks at a
    few items per level, never the whole value)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"<an int of {value.bit_length() * 0.30103:.0f} digits>"   # repr() may refuse > 4300 digits
    try:
        text = _BRIEF.repr(value)
    except (ValueError, RecursionError):
        text = f"<{type(value).__name__}>"
    size = ""
    if isinstance(value, (str, bytes)) and len(value) > _BRIEF.maxstring:
        size = f" ({len(value)} chars)"
    elif isinstance(value, (list, tuple, dict, set, frozenset)) and len(value) > _BRIEF.maxlist:
        size = f" ({len(value)} items)"
    if len(text) > BRIEF_CHARS:
        text = text[:BRIEF_CHARS - 1] + "\N{HORIZONTAL ELLIPSIS}"
        size = size or " (cut)"
    return text + size


def closest_key(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate nearest to `name` by difflib similarity (case-insensitive as a fallback), or None."""
    candidates = [c for c in candidates if isinstance(c, str)]
    name = str(name)
    found = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    if found:
        return found[0]
    lowered = {c.lower(): c for c in candidates}
    found = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[found[0]] if found else None


def unknown_key_error(name: Any, candidates: Iterable[str], *, what: str = "key") -> ConfigError:
    """ConfigError "unknown key 'rnak'; did you mean 'rank'?" (or listing the valid names when none is close)."""
    candidates = list(candidates)
    best = closest_key(str(name), candidates)
    if best is not None:
        return ConfigError(f"unknown {what} {brief(name)}; did you mean {best!r}?")
    return ConfigError(f"unknown {what} {brief(name)}; valid {what}s: {', '.join(candidates)}")


def matches(name: str, patterns: Iterable[str] | str) -> bool:
    """True when the dotted name matches any fnmatch pattern (case-sensitive); a lone str is one pattern."""
    if isinstance(patterns, str):
        patterns = (patterns,)
    return any(fnmatchcase(name, pattern) for pattern in patterns)


# ---- per-field checks: (field name, value) -> normalized value, or ConfigError ------------------------------------

def _fail(name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{name} must be {allowed}, got {brief(value)}")


def _with_allowed(check: Callable[[str, Any], Any], allowed: str) -> Callable[[str, Any], Any]:
    check.allowed = allowed  # what _optional and error messages quote
    return check


INT_CAP = 2**31 - 1   # the largest count a field accepts unless it says otherwise: step counters, sizes and
#                      their products must stay far inside int64 (a 10**21 accumulation overflowed in backward)


def _int(lo: int, hi: int = INT_CAP) -> Callable[[str, Any], int]:
    allowed = f"an int in [{lo}, {hi}]"

    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
            raise _fail(name, value, allowed)
        return int(value)
    return _with_allowed(check, allowed)


def _float(lo: float, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False):
    if hi == math.inf:
        allowed = f"a finite number {'>' if lo_open else '>='} {lo:g}"
    else:
        allowed = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def check(name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _fail(name, value, allowed)
        if value < lo or (lo_open and value == lo) or value > hi or (hi_open and value == hi):
            raise _fail(name, value, allowed)
        return float(value)
    return _with_allowed(check, allowed)


def _optional(inner: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    allowed = f"None or {inner.allowed}"

    def check(name: str, value: Any) -> Any:
        if value is None:
            return None
        try:
            return inner(name, value)
        except ConfigError:
            raise _fail(name, value, allowed) from None
    return _with_allowed(check, allowed)


def _choice(*allowed_values: Any) -> Callable[[str, Any], Any]:
    allowed = "one of " + ", ".join(repr(v) for v in allowed_values)

    def check(name: str, value: Any) -> Any:
        # type equality keeps True out of (1, ...) and 8.0 out of (8, 16, 32)
        if not any(type(value) is type(v) and value == v for v in allowed_values):
            raise _fail(name, value, allowed)
        return value
    return check


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(name, value, "True or False")
    return value


def _patterns(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    allowed = "a tuple of non-empty fnmatch pattern strings"
    if not isinstance(value, (tuple, list)) or not all(isinstance(p, str) and p for p in value):
        raise _fail(name, value, allowed)
    return tuple(value)


def _betas(name: str, value: Any) -> tuple[float, float]:
    allowed = "two numbers (beta1, beta2), each in [0, 1)"
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise _fail(name, value, allowed)
    one = _float(0.0, 1.0, hi_open=True)
    try:
        return one(name, value[0]), one(name, value[1])
    except ConfigError:
        raise _fail(name, value, allowed) from None


def _even_int(lo: int) -> Callable[[str, Any], int]:
    base = _int(lo)

    def check(name: str, value: Any) -> int:
        value = base(name, value)
        if value % 2:
            raise _fail(name, value, f"an even int >= {lo} (two 4-bit values share a byte)")
        return value
    return check


def _f(default: Any, help: str, check: Callable[[str, Any], Any]):
    return field(default=default, metadata={"help": help, "check": check})


@dataclass(frozen=True)
class LowMemConfig:
    """All settings of a lowmem run; see each field's help (or `LowMemConfig.help_text()`)."""

    # projection and update scale
    rank: int = _f(256, "Rank r of the gradient subspace per low-rank weight; r >= min(m, n) means no projection "
                        "(plain Adam on the full gradient); int >= 1. At 135M scale (hidden 576) the fine-tune study "
                        "measured rank 32 at 0.0746 over three seeds, inside fp32 AdamW's seed band (0.0729-0.0858), "
                        "and rank 64 at 0.0731 (one seed) (benchmarks/results/quality). The norm of a projected Adam "
                        "step grows about with sqrt(rank): lower lr when raising rank (2000-step pre-train, 19M "
                        "LLaMA: rank 128 at lr 0.01 ended 9.8% above rank 64, at lr 0.005 0.3% above it).", _int(1))
    scale: float = _f(0.25, "GaLore alpha: factor on the back-projected low-rank update (1.0 with full rank equals "
                            "AdamW); number > 0.", _float(0.0, lo_open=True))
    vocab_scale: float = _f(1.0, "GaLore alpha of the vocabulary tables (input embedding, lm_head) when they are "
                                 "low-rank weights: 1.0 keeps the step size of the float AdamW they replace; "
                                 "per-module overrides of scale still win; number > 0.", _float(0.0, lo_open=True))
    # Adam and schedule
    lr: float = _f(1e-5, "Peak learning rate (per step, before the schedule); number >= 0.", _float(0.0))
    betas: tuple[float, float] = _f((0.9, 0.999), "Adam (beta1, beta2) moment decay rates; each in [0, 1).", _betas)
    eps: float = _f(1e-8, "Adam epsilon added to the root of the second moment; number > 0.",
                    _float(0.0, lo_open=True))
    weight_decay: float = _f(0.0, "Decoupled (AdamW) weight decay per unit learning rate, 2-D weights only; "
                                  "number >= 0.", _float(0.0))
    lr_schedule: str = _f("cosine", "Learning-rate shape after warm-up: 'cosine', 'constant' or 'linear' (decay to "
                                    "min_lr_ratio * lr at total_steps).", _choice("cosine", "constant", "linear"))
    warmup_steps: int = _f(0, "Optimizer steps of linear warm-up from 0 to lr; int >= 0.", _int(0))
    total_steps: int | None = _f(None, "Optimizer steps the cosine/linear decay spans; None keeps lr constant after "
                                       "warm-up; int >= 1 or None.", _optional(_int(1)))
    min_lr_ratio: float = _f(0.1, "Final learning rate of the cosine/linear decay as a fraction of lr; in [0, 1].",
                             _float(0.0, 1.0))
    # accumulation and clipping
    grad_accum_steps: int = _f(1, "Micro-batches per optimizer step; int >= 1.", _int(1))
    grad_clip: float | None = _f(1.0, "Gradient-norm clipping bound (L2 norm); None disables clipping; "
                                      "number > 0 or None.", _optional(_float(0.0, lo_open=True)))
    clip_mode: str = _f("per_tensor", "How grad_clip applies: 'per_tensor' (each tensor's own norm, fused), "
                                      "'two_pass' (exact global norm, about +35% time) or 'none'. The norm is that "
                                      "of what the updates consume: the projected gradient R of a low-rank weight, "
                                      "the gradient of a float one (the same on the fused and the plain path).",
                        _choice("per_tensor", "two_pass", "none"))
    # finding the subspace
    projection: str = _f("randomized", "Projector algorithm: 'randomized' (subspace iteration) or 'svd' "
                                       "(exact torch.linalg.svd).", _choice("randomized", "svd"))
    oversampling: int = _f(8, "Extra random columns p in randomized subspace iteration; int >= 0.", _int(0))
    power_iters: int = _f(2, "Power iterations q in randomized subspace iteration; int >= 0. 1 cuts refresh work "
                             "~30% and ended a 300-step fine-tune 2.2% worse (benchmarks/results/"
                             "refresh-power-iters-cpu.md): worth it only when refreshing every few steps.", _int(0))
    rsvd_tol: float | None = _f(1e-3, "Stop power iterations early once successive subspaces have similarity "
                                      "> 1 - rsvd_tol; None always runs all; in (0, 1) or None.",
                                _optional(_float(0.0, 1.0, lo_open=True, hi_open=True)))
    refresh_sketch: str = _f("rayleigh_ritz", "Refresh under gradient accumulation: 'rayleigh_ritz' (sketch summed "
                                              "over micro-batches) or 'first_micro_batch' (first micro-batch only).",
                             _choice("rayleigh_ritz", "first_micro_batch"))
    cross_head: bool = _f(True, "Share one projector across attention heads of q/k (GaLore+); True or False.", _bool)
    cross_head_modules: tuple[str, ...] = _f(("*q_proj", "*k_proj"), "fnmatch patterns of module names that use "
                                             "cross-head projection when cross_head is True.", _patterns)
    projector_bits: int = _f(4, "Storage bits of projectors: 4 (packed INT4), 8, 16 (bf16) or 32 (fp32).",
                             _choice(4, 8, 16, 32))
    projector_group_size: int = _f(256, "Elements per quantization group of 4/8-bit projectors; even int >= 2.",
                                   _even_int(2))
    # when to refresh
    refresh: str = _f("lazy", "Refresh policy: 'lazy' (interval adapts to subspace similarity, Q-GaLore), 'fixed' "
                              "(every refresh_interval_steps, GaLore) or 'geometric' (GaLore-dynamics). In the "
                              "fine-tune study 'fixed' reached the same loss (0.0749, inside lazy's seed band) with 7% "
                              "more projector refreshes (benchmarks/results/quality).",
                      _choice("lazy", "fixed", "geometric"))
    refresh_interval_steps: int = _f(200, "Base refresh interval T0 in optimizer steps; int >= 1. In the fine-tune "
                                          "study twice the interval ended 8.8% worse (0.0811 vs 0.0746) and half of it "
                                          "5.5% worse (0.0787; benchmarks/results/quality).", _int(1))
    max_refresh_interval_steps: int = _f(2500, "Longest refresh interval in optimizer steps (lazy and geometric); "
                                               "int >= refresh_interval_steps.", _int(1))
    lazy_threshold: float = _f(0.4, "Lazy policy: double the interval when the last lazy_window similarities "
                                    "||P_old^T P_new||_F^2 / r are all >= this; in [0, 1].", _float(0.0, 1.0))
    lazy_low_threshold: float = _f(0.2, "Lazy policy: halve the interval (down to T0) when a similarity is below "
                                        "this; in [0, lazy_threshold].", _float(0.0, 1.0))
    lazy_window: int = _f(3, "Lazy policy: number k of consecutive similarities that must pass lazy_threshold; "
                             "int >= 1.", _int(1))
    geometric_start_step: int = _f(200, "Geometric policy: optimizer step from which the interval grows; int >= 0.",
                                   _int(0))
    geometric_factor: float = _f(1.5, "Geometric policy: interval multiplier after each refresh; number >= 1.",
                                 _float(1.0))
    stagger: bool = _f(True, "Spread first refreshes: layer l first refreshes at step l*T0/L (after step 0); "
                             "True or False.", _bool)
    moment_transfer: str = _f("reset", "Low-rank moments at a refresh: 'reset' (to zero; bias correction "
                                       "restarts: the next steps are a fresh Adam; the default, chosen by the quality "
                                       "study: benchmarks/results/quality), 'keep' (as they are, GaLore; the new "
                                       "projector's column signs are aligned with the old one's) or 'rotate' (into "
                                       "the new basis; directions new to the subspace restart their Adam bias "
                                       "correction, kept ones continue).",
                              _choice("keep", "rotate", "reset"))
    # low-rank moments
    optim_bits: int = _f(8, "Storage bits of low-rank Adam moments: 8 (blockwise dynamic), 16 (bf16) or 32 (fp32).",
                         _choice(8, 16, 32))
    moment_block_size: int = _f(256, "Elements per absmax block of 8-bit moments; int >= 1.", _int(1))
    # sparse residuals (GaLore+)
    residual_ratio: float = _f(0.01, "Fraction of a weight's entries with a sparse residual correction; 0 "
                                     "disables; in [0, 1). The fine-tune study ended at 0.0754 without residuals "
                                     "(one seed) against 0.0746 [0.0740, 0.0753] with 0.01 "
                                     "(benchmarks/results/quality).", _float(0.0, 1.0, hi_open=True))
    residual_warmup_steps: int = _f(100, "Optimizer steps before the residual index set is chosen; int >= 0.",
                                    _int(0))
    residual_modules: tuple[str, ...] = _f(("*q_proj", "*k_proj"), "fnmatch patterns of module names that get "
                                           "sparse residuals.", _patterns)
    residual_dtype: str = _f("fp32", "Storage dtype of residual moments: 'fp32' or 'bf16'.", _choice("fp32", "bf16"))
    residual_mode: str = _f("exact", "How the residual corrects the update at its entries L: 'exact' keeps full-rank "
                            "Adam moments at L so the update there equals scale x full-rank Adam (default); 'paper' "
                            "is GaLore+ Algorithm 2 (moment residuals over the back-projected V', radicand clamped; "
                            "unstable when the radicand clamps, kept for ablations).", _choice("exact", "paper"))
    # error feedback (GaLore-EF)
    error_feedback: str = _f("off", "Error feedback of the projection residual G - P P^T G: 'off', 'bf16' or 'int8' "
                                    "(an (m, n) buffer per weight).", _choice("off", "bf16", "int8"))
    error_feedback_weight: float = _f(0.1, "Weight lambda of the error fed into the next gradient; in [0, 1].",
                                      _float(0.0, 1.0))
    # weights
    int8_weights: bool = _f(True, "Store low-rank linear weights as blockwise INT8 (else keep the float weight); "
                                  "True or False.", _bool)
    weight_block_size: int = _f(256, "Elements per absmax block of INT8 weights along the input dim; int >= 1.",
                                _int(1))
    stochastic_rounding: bool = _f(True, "Round weight updates stochastically (unbiased) instead of to nearest: "
                                         "INT8 weights, and bf16 float weights (norms, embeddings, lm_head, float "
                                         "linears); True or False.", _bool)
    int8_matmul: bool = _f(False, "Run INT8 linears' forward and input gradient as INT8 x INT8 matmuls "
                                  "(torch._int_mm, per-token activation quantisation; approximate, the weight "
                                  "update path is unchanged; lowmem.model.int8_matmul); no effect without "
                                  "int8_weights; True or False.", _bool)
    compile: bool = _f(True, "Run the INT8 hot kernels (SR weight update, dequantisation, noise) compiled with "
                             "torch.compile (C++ on CPU, Triton on CUDA; bit-identical to eager; compiled once per "
                             "process, cached on disk in TORCHINDUCTOR_CACHE_DIR). Falls back to eager with one "
                             "warning where no compiler works; the environment variable LOWMEM_COMPILE=0 forces "
                             "eager. True or False.", _bool)
    target_modules: tuple[str, ...] = _f(("*",), "fnmatch patterns of nn.Linear / nn.Embedding module names that "
                                         "get the low-rank treatment.", _patterns)
    exclude_modules: tuple[str, ...] = _f(("*lm_head",), "fnmatch patterns of module names excluded from "
                                          "target_modules (trained by full-rank AdamW instead). An untied input "
                                          "embedding is a low-rank INT8 weight unless excluded ('*embed*'); "
                                          "removing '*lm_head' makes an untied head one too (saves memory, learns "
                                          "slower: benchmarks/results/memory-levers-loss-cpu.md); a weight shared "
                                          "by two modules (tied embeddings) never is.", _patterns)
    # everything else
    float_optim_bits: int = _f(8, "Moment bits of the full-rank AdamW for embeddings, lm_head, norms and biases: "
                                  "8 or 32.", _choice(8, 32))
    float_optim_min_numel: int = _f(4096, "Float parameters with fewer elements always keep fp32 moments; "
                                          "int >= 0.", _int(0))
    freeze: tuple[str, ...] = _f((), "fnmatch patterns of parameter names that are not trained.", _patterns)
    seed: int = _f(0, "Run seed for projector sampling and stochastic rounding; int in [0, 2**63 - 1].",
                   _int(0, 2**63 - 1))
    overrides: OverrideItems = field(default=(), metadata={
        "help": "Per-module overrides {fnmatch pattern: {field: value}} applied by for_module() in insertion order "
                "(later wins); run-wide fields and 'overrides' itself are not allowed inside.",
        "check": None})

    def __post_init__(self):
        for f in fields(self):
            if f.name != "overrides":
                object.__setattr__(self, f.name, f.metadata["check"](f.name, getattr(self, f.name)))
        object.__setattr__(self, "overrides", _normalize_overrides(self.overrides))
        _check_relations(self)

    # ---- per-module view ----------------------------------------------------------------------------------------

    def for_module(self, name: str) -> LowMemConfig:
        """This config with every override whose pattern matches `name` applied in insertion order; overrides
        emptied. Raises ConfigError (naming the module) if the combination breaks a relation between fields."""
        if not self.overrides:
            return self
        changes: dict[str, Any] = {}
        for pattern, items in self.overrides:
            if fnmatchcase(name, pattern):
                changes.update(items)
        try:
            return dataclasses.replace(self, overrides=(), **changes)
        except ConfigError as err:
            raise ConfigError(f"config for module {name!r} after overrides: {err}") from None

    def replace(self, **changes: Any) -> LowMemConfig:
        """A validated copy with `changes` applied; unknown names raise ConfigError with the nearest field."""
        names = [f.name for f in fields(self)]
        for key in changes:
            if key not in names:
                raise unknown_key_error(key, names)
        return dataclasses.replace(self, **changes)

    # ---- (de)serialization --------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """{field: value} with overrides as {pattern: {field: value}} (plain dicts; sequences stay tuples)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["overrides"] = {pattern: dict(items) for pattern, items in self.overrides}
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LowMemConfig:
        """Build from a mapping (e.g. parsed YAML/JSON): lists become tuples, numeric strings such as '1e-5'
        (which YAML 1.1 reads as str) become floats for float fields; unknown keys raise ConfigError."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"a LowMemConfig must be built from a mapping of field names to values, "
                              f"got {type(d).__name__}")
        types = {f.name: f.type for f in fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if key not in types:
                raise unknown_key_error(key, types)
            if key == "overrides" and isinstance(value, Mapping):
                value = {pattern: ({k: _coerce_loaded(types.get(k, ""), v) for k, v in body.items()}
                                   if isinstance(body, Mapping) else body) for pattern, body in value.items()}
            elif key != "overrides":
                value = _coerce_loaded(types[key], value)
            kwargs[key] = value
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> LowMemConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"config JSON does not parse: {err}") from None
        return cls.from_dict(data)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> LowMemConfig:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"config YAML does not parse: {err}") from None
        return cls.from_dict({} if data is None else data)

    @classmethod
    def help_text(cls) -> str:
        """Every field with its type, default and help, for `--help-config`."""
        lines = ["LowMemConfig fields (name: type = default):"]
        for f in fields(cls):
            lines.append(f"  {f.name}: {f.type} = {f.default!r}")
            lines.append(textwrap.fill(f.metadata["help"], width=100, initial_indent=" " * 6,
                                       subsequent_indent=" " * 6))
        return "\n".join(lines)


_FIELDS = {f.name: f for f in fields(LowMemConfig)}


def _coerce_loaded(type_name: str, value: Any) -> Any:
    """Loader leniency: lists -> tuples, numeric strings -> floats where the field holds floats."""
    if isinstance(value, list):
        return tuple(_coerce_loaded(type_name, v) for v in value)
    if isinstance(value, str) and "float" in str(type_name):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _normalize_overrides(value: Any) -> OverrideItems:
    """Mapping or tuple of (pattern, body) pairs -> ((pattern, ((field, checked value), ...)), ...)."""
    allowed = "a dict {fnmatch pattern: {field: value}}"
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, (tuple, list)) and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in value):
        pairs = list(value)
    else:
        raise _fail("overrides", value, allowed)
    out = []
    for pattern, body in pairs:
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"overrides keys must be non-empty fnmatch pattern strings, got "
                              f"{brief(pattern)}")
        where = f"overrides[{brief(pattern)}]"
        if isinstance(body, Mapping):
            items = list(body.items())
        elif isinstance(body, (tuple, list)) and all(isinstance(i, (tuple, list)) and len(i) == 2 for i in body):
            items = list(body)
        else:
            raise _fail(where, body, "a dict {field: value}")
        checked = []
        for key, item in items:
            if key == "overrides":
                raise ConfigError(f"{where}: an override may not contain 'overrides'")
            if key not in _FIELDS:
                raise ConfigError(f"{where}: {unknown_key_error(key, _FIELDS)}")
            if key in RUN_WIDE_FIELDS:
                raise ConfigError(f"{where}: {brief(key)} is a run-wide setting and cannot be overridden per module "
                                  f"(run-wide: {', '.join(RUN_WIDE_FIELDS)})")
            checked.append((key, _FIELDS[key].metadata["check"](f"{where}.{key}", item)))
        out.append((pattern, tuple(checked)))
    return tuple(out)


def _check_relations(cfg: LowMemConfig) -> None:
    if cfg.lazy_low_threshold > cfg.lazy_threshold:
        raise ConfigError(f"lazy_low_threshold must be <= lazy_threshold = {cfg.lazy_threshold}, "
                          f"got {cfg.lazy_low_threshold!r}")
    if cfg.max_refresh_interval_steps < cfg.refresh_interval_steps:
        raise ConfigError(f"max_refresh_interval_steps must be >= refresh_interval_steps = "
                          f"{cfg.refresh_interval_steps}, got {cfg.max_refresh_interval_steps!r}")
    if cfg.total_steps is not None and cfg.warmup_steps > cfg.total_steps:
        raise ConfigError(f"warmup_steps must be <= total_steps = {cfg.total_steps}, got {cfg.warmup_steps!r}")
