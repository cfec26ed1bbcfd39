"""Loading a TrainConfig: one YAML file, then dotted `key=value` overrides; printing it back and the key help.

`load_train_config` reads one YAML file with a safe loader (duplicate keys refused), then applies `key=value`
overrides (`max_steps=5`, `data.path=x.jsonl`, `optim.rank=128`, `optim.overrides.*q_proj.rank=64`; the value text
is read as YAML, so `optim.betas=[0.9,0.95]` is a list). Each value is coerced to its field's type ("5" -> 5,
"1e-5" -> 1e-5 (YAML 1.1 reads that as a string), "false" -> False, "none" -> None for optional fields) and checked
on the spot, so an error names the key, the value, what is allowed and where the value came from (file and line, or
the override). A section written in the YAML replaces the default section; dotted overrides change single keys of
whatever section is loaded. Nothing here touches the model or the data files. The schema is `launch.config`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import yaml

from launch.config import (CONFIG_DIR, DEFAULT_OPTIM, RUN_WIDE, _BOOL_WORDS, _DATA_FIELDS, _LOWMEM_FIELDS, _NONE_WORDS,
                           _OPTIM_KEYS, _SECTIONS, _TRAIN_FIELDS, DataConfig, OptimSection, TrainConfig, _unknown)
from lowmem.config import ConfigError, brief, closest_key
from lowmem.presets import PRESETS

__all__ = ["config_help", "config_to_yaml", "load_train_config"]


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
                                  f"got {brief(value)}")
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
                                  f"got {brief(value)}")
            value = {pattern: ({k: _coerce(v, _LOWMEM_FIELDS[k].type) if k in _LOWMEM_FIELDS else v
                                for k, v in body.items()} if isinstance(body, Mapping) else body)
                     for pattern, body in value.items()}
            OptimSection({rest: value})
            section[rest] = value
            return
        section[rest] = f.metadata["check"](f"optim.{rest}", _coerce(value, f.type, raw_text))

    def build(self, notes: list[str] | None = None) -> TrainConfig:
        values = dict(self.values)
        max_steps = values.get("max_steps", TrainConfig.max_steps)
        warmup = values.get("warmup_steps", TrainConfig.warmup_steps)
        if warmup > max_steps:
            # A short trial of a long recipe (max_steps=1 on a 1000-step config) is the first thing people run:
            # warm up over the whole run instead of refusing it.
            values["warmup_steps"] = max_steps
            if notes is not None:
                notes.append(f"warmup_steps={warmup} is longer than the run (max_steps={max_steps}): the warm-up "
                             f"is cut to {max_steps} step(s), the whole run (set warmup_steps to choose)")
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


MAX_YAML_NODES = 100_000   # nodes of a document after alias expansion; a config holds a few hundred
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _StrictSafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys (plain safe_load keeps the last one silently); merge keys
    (`<<: *base`) work as in YAML 1.1, and the document's own keys override the merged ones."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue   # flattened by SafeConstructor.construct_mapping below
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {brief(key)} (first at line {seen[key]})", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


class YamlSizeError(ConfigError):
    """A YAML document that expands (through aliases) beyond MAX_YAML_NODES, or refers to itself."""


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [child for pair in node.value for child in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def expanded_node_count(root: yaml.Node, limit: int = MAX_YAML_NODES) -> int:
    """Nodes of the composed document `root` once every alias is expanded, capped at limit + 1; cost linear in the
    text. The composer hands back the anchored node itself for an alias (a DAG), so a node's expanded size is
    1 + its children's, memoised per node: a 9-level "billion laughs" is counted in a few dozen additions instead
    of being built. Raises YamlSizeError for an alias inside its own anchor (a document that refers to itself)."""
    memo: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:   # iterative post-order: deep documents need no recursion here
        node, finished = stack.pop()
        key = id(node)
        if finished:
            open_nodes.discard(key)
            memo[key] = min(limit + 1, 1 + sum(memo[id(child)] for child in _children(node)))
            continue
        if key in memo:
            continue
        if key in open_nodes:
            raise YamlSizeError(f"line {node.start_mark.line + 1}: an alias refers to the node that contains it "
                                "(a recursive document); write the value out instead")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in memo)
    return memo[id(root)]


def safe_load_bounded(text: str, what: str) -> Any:
    """yaml.safe_load with duplicate keys refused, merge keys supported and the document's size after alias
    expansion checked on the composed node graph BEFORE anything is built (an alias bomb is refused in
    milliseconds, whatever it would expand to). Raises yaml.YAMLError, or ConfigError naming `what`."""
    loader = _StrictSafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise ConfigError(f"{what}: the YAML is nested too deeply to read (more than a few hundred levels); "
                              "a config nests at most a few levels") from None
        if node is None:
            return None
        try:
            count = expanded_node_count(node)
        except YamlSizeError as err:
            raise YamlSizeError(f"{what}: {err}") from None
        if count > MAX_YAML_NODES:
            raise YamlSizeError(f"{what}: the YAML expands to more than {MAX_YAML_NODES:,} values through its aliases "
                                f"(*name); a config holds a few hundred. Refused before expanding it; write the "
                                "values out or use fewer nested aliases")
        try:
            return loader.construct_document(node)
        except (ValueError, RecursionError) as err:   # e.g. an int of more than 4300 digits
            if isinstance(err, yaml.YAMLError):
                raise
            problem = ("an integer has more than 4300 digits" if "integer string conversion" in str(err)
                       else brief(str(err)))
            raise ConfigError(f"{what}: a value cannot be read ({problem}); expected config values (numbers, "
                              "strings, lists, mappings) of ordinary size") from None
    finally:
        loader.dispose()


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
        return text, safe_load_bounded(text, str(path))
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
        value = safe_load_bounded(text, f"override {brief(item)}")
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
            raise ConfigError(f"{where(str(key))}: YAML keys are plain names (nest sections instead), "
                              f"got {brief(key)}")
        if key in _SECTIONS and isinstance(value, Mapping):
            loader.set(key, None, lambda key=key: where(key), replace_section=True)
            for sub_key, sub_value in value.items():
                loader.set(f"{key}.{sub_key}", sub_value, lambda key=key, sub=str(sub_key): where(key, sub))
        else:
            loader.set(key, value, lambda key=key: where(key), replace_section=True)


def load_train_config(path: str | os.PathLike | None, overrides: Sequence[str] = (), *,
                      notes: list[str] | None = None) -> TrainConfig:
    """TrainConfig from a YAML file (None: the defaults, i.e. the demo) with dotted `key=value` overrides applied
    in order. Raises ConfigError naming the file and line, or the override, for every kind of bad input. A warm-up
    longer than max_steps is cut to max_steps; `notes`, when given, receives one line saying so."""
    if isinstance(overrides, str):
        overrides = (overrides,)
    loader = _Loader()
    if path is not None:
        path = Path(path)
        _load_yaml_file(loader, path)
    for item in overrides:
        key, value, raw_text = _parse_override(item)
        loader.set(key, value, lambda item=item: f"override {brief(item)}", raw_text)
    origin = f"{path}" if path is not None else "defaults"
    try:
        return loader.build(notes)
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
