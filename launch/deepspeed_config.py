"""DeepSpeed JSON -> lowmem's distributed plan: ZeRO stage, per-process micro-batch, accumulation, clipping, dtype.

    plan = load_deepspeed_config("launch/configs/ds_zero2.json", train_cfg, world_size=4)
    for line in plan.notices: print(line)
    train_cfg = apply_plan(train_cfg, plan)

lowmem is the optimizer and owns the distributed runtime (lowmem.distributed); DeepSpeed brings the launcher and the
collectives. So the JSON is read for the few decisions it makes, and every other key is sorted into one of four kinds:
  applied   train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps, gradient_clipping,
            bf16.enabled, zero_optimization.stage;
  refused   keys whose meaning lowmem cannot honour (DeepSpeed's optimizer/scheduler, fp16 loss scaling, offload,
            quantised ZeRO++ communication, pipeline/tensor/sequence parallelism, ...): ConfigError saying why and
            what to write instead;
  noticed   performance knobs of DeepSpeed's own ZeRO implementation (bucket sizes, overlap, prefetch, ...) and
            enabled monitors: accepted, one line each in `plan.notices` (printed by the launcher), never silent;
  harmless  logging switches (steps_per_print, wall_clock_breakdown, disabled monitors, ...): accepted quietly.
Any other key, at the top level or inside zero_optimization / bf16 / fp16 / data_types, is a ConfigError naming
the key path and the nearest valid key ("zero_optimization.stgae: unknown key; did you mean zero_optimization.stage?").

"auto" (as in Hugging Face's integration) takes the value from the YAML TrainConfig; an absent key behaves like
"auto" (so DeepSpeed's own defaults, fp32 and no clipping, do not silently override the YAML). Batch identity:
train_batch_size = micro * accum * world_size. Given two of the three (an "auto" micro/accum counts as given), the
third is derived and must divide exactly; given all three they must agree; with only train_batch_size the YAML's
grad_accum_steps is kept and the micro-batch derived. Without a JSON (torchrun alone) the plan is ZeRO stage 0 with
the TrainConfig's values.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch.config import CONFIG_DIR, ConfigError, TrainConfig
from lowmem.config import closest_key
from lowmem.deepspeed_keys import REFUSED_TOP as _REFUSED_TOP
from lowmem.deepspeed_keys import REFUSED_ZERO as _REFUSED_ZERO
from lowmem.deepspeed_keys import truthy as _truthy

__all__ = ["NO_JSON", "DistributedPlan", "apply_plan", "load_deepspeed_config"]

NO_JSON = "defaults (no deepspeed JSON)"
AUTO = "auto"
_ABSENT = object()


@dataclass(frozen=True)
class DistributedPlan:
    """What the DeepSpeed JSON (or its absence) decides for one run; values are per process."""

    zero_stage: int                # 0..3 (lowmem's semantics: DESIGN §4, lowmem.memory.cost_model per-rank view)
    micro_batch_size: int          # sequences per forward/backward on one process
    grad_accum_steps: int          # micro-batches per optimizer step
    grad_clip: float | None        # L2 clipping bound; None = no clipping
    dtype: str | None              # "bf16" | "fp32" | None (leave TrainConfig.dtype as is)
    source: str                    # path of the JSON or NO_JSON
    notices: tuple[str, ...]       # one line per accepted-but-not-applied key


# ---- key tables --------------------------------------------------------------------------------------------------

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
_PERF_WHY = "a performance knob of DeepSpeed's own ZeRO; not applied (lowmem sizes its own low-rank communication)"
_ZERO_PERF = ("reduce_bucket_size", "allgather_bucket_size", "overlap_comm", "contiguous_gradients", "reduce_scatter",
              "allgather_partitions", "round_robin_gradients", "stage3_prefetch_bucket_size",
              "stage3_param_persistence_threshold", "stage3_max_live_parameters", "stage3_max_reuse_distance",
              "stage3_gather_16bit_weights_on_model_save", "stage3_gather_fp16_weights_on_model_save",
              "sub_group_size", "memory_efficient_linear", "elastic_checkpoint", "load_from_fp32_weights",
              "ignore_unused_parameters", "legacy_stage1", "use_multi_rank_bucket_allreduce",
              "stage3_module_granularity_threshold", "use_all_reduce_for_fetch_params", "log_trace_cache_warnings")
_LOGGING = ("steps_per_print", "wall_clock_breakdown", "dump_state", "memory_breakdown")
_MONITORS = ("tensorboard", "wandb", "csv_monitor", "comet", "comms_logger")
_FP16_KEYS = ("enabled", "auto_cast", "loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis",
              "consecutive_hysteresis", "min_loss_scale", "fp16_master_weights_and_grads")
_BF16_KEYS = ("enabled", "immediate_grad_update", "check_grad_overflow")


_TOP_KEYS = (*_BATCH_KEYS, "gradient_clipping", "bf16", "bfloat16", "fp16", "zero_optimization", "data_types",
             "zero_allow_untested_optimizer", "flops_profiler", *_LOGGING, *_MONITORS, *_REFUSED_TOP)
_ZERO_KEYS = ("stage", *_ZERO_PERF, *_REFUSED_ZERO)


# ---- reading -----------------------------------------------------------------------------------------------------

class _Reader:
    """Walks one parsed JSON object; collects the applied values and the notices, raises on the rest."""

    def __init__(self, path: str):
        self.path = path
        self.notices: list[str] = []
        self.values: dict[str, Any] = {}

    def error(self, key: str, why: str) -> ConfigError:
        return ConfigError(f"{self.path}: {key}: {why}")

    def unknown(self, prefix: str, key: str, known: tuple[str, ...]) -> ConfigError:
        best = closest_key(key, known)
        hint = f"did you mean {prefix}{best}?" if best else "valid keys: " + ", ".join(prefix + k for k in known)
        return self.error(prefix + key, f"unknown key; {hint}")

    def section(self, key: str, value: Any) -> dict:
        if not isinstance(value, dict):
            raise self.error(key, f"must be a JSON object {{...}}, got {value!r}")
        return value

    def refuse_if(self, table: dict, prefix: str, key: str, value: Any) -> None:
        refuses, why = table[key]
        if refuses(value):
            raise self.error(prefix + key, f"{json.dumps(value)} is not supported: {why}")

    def read(self, data: dict) -> None:
        for key, value in data.items():
            if key in _BATCH_KEYS or key == "gradient_clipping":
                self.values[key] = value
            elif key in ("bf16", "bfloat16"):
                self.bf16(key, self.section(key, value))
            elif key == "fp16":
                self.fp16(self.section(key, value))
            elif key == "zero_optimization":
                self.zero(self.section(key, value))
            elif key == "data_types":
                for sub, dtype in self.section(key, value).items():
                    if sub != "grad_accum_dtype":
                        raise self.unknown("data_types.", sub, ("grad_accum_dtype",))
                    if dtype not in ("fp32", None):
                        raise self.error("data_types.grad_accum_dtype", f"{json.dumps(dtype)} is not supported: "
                                         "lowmem accumulates low-rank gradients in fp32; use \"fp32\"")
            elif key in _REFUSED_TOP:
                self.refuse_if(_REFUSED_TOP, "", key, value)
            elif key in _MONITORS or key == "flops_profiler":
                if _truthy(self.section(key, value).get("enabled", False)):
                    what = ("lowmem writes its own train_log.jsonl in output_dir" if key != "flops_profiler"
                            else "lowmem reports step time and tokens/s in train_log.jsonl")
                    self.notices.append(f"{key}: enabled but not used; {what}")
            elif key == "zero_allow_untested_optimizer":
                self.notices.append(f"{key}: not applied; lowmem is the optimizer")
            elif key not in _LOGGING:
                raise self.unknown("", key, _TOP_KEYS)

    def bf16(self, key: str, body: dict) -> None:
        for sub, value in body.items():
            if sub not in _BF16_KEYS:
                raise self.unknown(f"{key}.", sub, _BF16_KEYS)
            if sub != "enabled":
                self.notices.append(f"{key}.{sub}: not applied; lowmem has no bf16 optimizer wrapper to tune")
            elif value != AUTO and not isinstance(value, bool):
                raise self.error(f"{key}.enabled", f"must be true, false or \"auto\", got {json.dumps(value)}")
            else:
                self.values["bf16"] = value

    def fp16(self, body: dict) -> None:
        for sub, value in body.items():
            if sub not in _FP16_KEYS:
                raise self.unknown("fp16.", sub, _FP16_KEYS)
        # "auto" follows a --fp16 flag in Hugging Face; TrainConfig has no fp16 dtype, so it means off here
        if body.get("enabled", False) not in (False, AUTO, None):
            raise self.error("fp16.enabled", "fp16 is not supported: lowmem has no loss scaling; use "
                                             "\"bf16\": {\"enabled\": true} (or \"auto\") and fp16 disabled")

    def zero(self, body: dict) -> None:
        for key, value in body.items():
            if key == "stage":
                if isinstance(value, bool) or value not in (0, 1, 2, 3):
                    raise self.error("zero_optimization.stage", f"must be 0, 1, 2 or 3, got {json.dumps(value)}")
                self.values["stage"] = int(value)
            elif key in _ZERO_PERF:
                self.notices.append(f"zero_optimization.{key}: {_PERF_WHY}")
            elif key in _REFUSED_ZERO:
                self.refuse_if(_REFUSED_ZERO, "zero_optimization.", key, value)
            else:
                raise self.unknown("zero_optimization.", key, _ZERO_KEYS)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _read_json(path: str) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        shipped = {p.name: p for p in sorted(CONFIG_DIR.glob("ds_*.json"))}
        best = closest_key(Path(path).name, shipped)
        hint = f"; did you mean {str(shipped[best])!r}?" if best else ""
        raise ConfigError(f"deepspeed config not found: {path!r} (working directory {os.getcwd()}){hint}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read deepspeed config {path!r}: {err}") from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}:{err.lineno}: invalid JSON at line {err.lineno}, column {err.colno}: "
                          f"{err.msg}") from None
    except ValueError as err:   # a duplicate key
        raise ConfigError(f"{path}: invalid deepspeed config: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level of a deepspeed config must be a JSON object, got "
                          f"{type(data).__name__}")
    return data


# ---- resolving ---------------------------------------------------------------------------------------------------

def _batch_value(reader: _Reader, key: str) -> Any:
    """An int >= 1, AUTO or _ABSENT."""
    value = reader.values.get(key, _ABSENT)
    if value is _ABSENT or value == AUTO:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise reader.error(key, f"must be an int >= 1 or \"auto\", got {json.dumps(value)}")
    return value


def _resolve_batch(reader: _Reader, cfg: TrainConfig, world: int) -> tuple[int, int]:
    total, micro, accum = (_batch_value(reader, k) for k in _BATCH_KEYS)
    micro_given, accum_given = micro is not _ABSENT, accum is not _ABSENT
    micro = cfg.micro_batch_size if micro in (_ABSENT, AUTO) else micro
    accum = cfg.grad_accum_steps if accum in (_ABSENT, AUTO) else accum
    if total in (_ABSENT, AUTO):
        return micro, accum
    if micro_given and accum_given:
        if total != micro * accum * world:
            raise reader.error("train_batch_size", f"{total} != train_micro_batch_size_per_gpu {micro} x "
                               f"gradient_accumulation_steps {accum} x world_size {world} = {micro * accum * world}; "
                               "fix one of them or set train_batch_size to \"auto\"")
        return micro, accum
    # derive the missing one (micro when both are missing: the YAML's accumulation is kept)
    known_key, known, missing_key = (("train_micro_batch_size_per_gpu", micro, "gradient_accumulation_steps")
                                     if micro_given else ("gradient_accumulation_steps", accum,
                                                          "train_micro_batch_size_per_gpu"))
    if total % (known * world):
        raise reader.error("train_batch_size", f"{total} is not divisible by {known_key} {known} x world_size "
                           f"{world} = {known * world}, so {missing_key} cannot be derived; change one of the "
                           "three numbers")
    derived = total // (known * world)
    return (micro, derived) if micro_given else (derived, accum)


def _resolve_clip(reader: _Reader, cfg: TrainConfig) -> float | None:
    value = reader.values.get("gradient_clipping", AUTO)
    if value == AUTO:
        return cfg.lowmem_config().grad_clip
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise reader.error("gradient_clipping", f"must be a number > 0 (0 turns clipping off) or \"auto\", got "
                           f"{json.dumps(value)}")
    clip = float(value) if value > 0 else None
    yaml_clip = cfg.optim.changes().get("grad_clip", clip)
    if yaml_clip != clip:
        reader.notices.append(f"gradient_clipping: {value} from the deepspeed JSON replaces optim.grad_clip="
                              f"{yaml_clip} from the YAML")
    return clip


def _resolve_dtype(reader: _Reader, cfg: TrainConfig) -> str | None:
    enabled = reader.values.get("bf16", AUTO)
    if enabled == AUTO:
        return None
    dtype = "bf16" if enabled else "fp32"
    if cfg.dtype not in ("auto", dtype):
        reader.notices.append(f"bf16.enabled: {json.dumps(enabled)} from the deepspeed JSON replaces dtype="
                              f"{cfg.dtype} from the YAML")
    return dtype


def load_deepspeed_config(path: str | os.PathLike | None, train_cfg: TrainConfig, world_size: int) -> DistributedPlan:
    """The plan for `train_cfg` run on `world_size` processes under the DeepSpeed JSON at `path` (None: no JSON,
    ZeRO stage 0 with the TrainConfig's values). Raises ConfigError naming the file and the key path."""
    if not isinstance(train_cfg, TrainConfig):
        raise TypeError(f"train_cfg must be a launch.config.TrainConfig, got {type(train_cfg).__name__}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if path is None:
        return DistributedPlan(0, train_cfg.micro_batch_size, train_cfg.grad_accum_steps,
                               train_cfg.lowmem_config().grad_clip, None, NO_JSON, ())
    path = os.fspath(path)
    reader = _Reader(path)
    reader.read(_read_json(path))
    micro, accum = _resolve_batch(reader, train_cfg, world_size)
    return DistributedPlan(reader.values.get("stage", 0), micro, accum, _resolve_clip(reader, train_cfg),
                           _resolve_dtype(reader, train_cfg), path, tuple(reader.notices))


def apply_plan(train_cfg: TrainConfig, plan: DistributedPlan) -> TrainConfig:
    """`train_cfg` with micro_batch_size, grad_accum_steps, dtype (unless plan.dtype is None) and optim.grad_clip
    replaced by the plan's values; built through TrainConfig's own validation (ConfigError on a bad combination)."""
    if not isinstance(plan, DistributedPlan):
        raise TypeError(f"plan must be a DistributedPlan, got {type(plan).__name__}")
    optim = train_cfg.optim
    if train_cfg.lowmem_config().grad_clip != plan.grad_clip:
        optim = optim.replace(grad_clip=plan.grad_clip)
    return dataclasses.replace(train_cfg, micro_batch_size=plan.micro_batch_size,
                               grad_accum_steps=plan.grad_accum_steps, dtype=plan.dtype or train_cfg.dtype,
                               optim=optim)
