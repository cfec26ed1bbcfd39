"""DeepSpeed JSON keys whose meaning lowmem cannot honour, with why and what to write instead.

Shared by `launch.deepspeed_config` (the CLI's reader of the whole JSON) and `lowmem.integrations.transformers`
(a Trainer given `deepspeed=`), so both refuse the same keys with the same words. `refused_keys(ds_config)` lists
every refused key of a parsed JSON object as "key.path: value is not supported: why".
"""
from __future__ import annotations

import json
from typing import Any, Callable

__all__ = ["AUTO", "REFUSED_TOP", "REFUSED_ZERO", "refused_keys", "truthy"]

AUTO = "auto"


def truthy(value: Any) -> bool:
    return value not in (False, None, 0)


def _enabled(value: Any) -> bool:
    return truthy(value.get("enabled", True)) if isinstance(value, dict) else truthy(value)


def _above(limit: int) -> Callable[[Any], bool]:
    return lambda value: not (isinstance(value, (int, float)) and not isinstance(value, bool) and value <= limit)


def _offloads(value: Any) -> bool:
    return value is not None and not (isinstance(value, dict) and value.get("device", "none") in ("none", None))


_OWN_QUANT = "lowmem does its own quantisation (INT8 weights, 8-bit moments, INT4 projectors); remove the key"
_NO_OFFLOAD = ("offloading is not supported: lowmem keeps its (small) state on the device; use a higher "
               "zero_optimization.stage or more ranks instead")
# key -> (refuses(value), why and what to do instead)
REFUSED_TOP: dict[str, tuple[Callable[[Any], bool], str]] = {
    "optimizer": (lambda v: True, "lowmem is the optimizer: remove this section and set optim.* (preset, rank, "
                                  "betas, weight_decay, ...) in the YAML"),
    "scheduler": (lambda v: True, "lowmem owns the learning-rate schedule: remove this section and set lr, "
                                  "lr_schedule and warmup_steps in the YAML"),
    "zero_force_ds_cpu_optimizer": (truthy, "DeepSpeed's CPU optimizer is never used (lowmem updates on the "
                                             "device); remove the key"),
    "amp": (_enabled, "apex AMP is not supported: use \"bf16\": {\"enabled\": true}"),
    "gradient_predivide_factor": (lambda v: v != 1, "lowmem averages the reduced low-rank gradients itself; use 1 "
                                                    "or remove the key"),
    "prescale_gradients": (truthy, "lowmem averages the reduced low-rank gradients itself; use false or remove "
                                    "the key"),
    "sparse_gradients": (truthy, "sparse embedding gradients are not supported; use false or remove the key"),
    "pipeline": (lambda v: True, "pipeline parallelism is not supported (lowmem is data-parallel with ZeRO "
                                 "stages); remove the section"),
    "tensor_parallel": (lambda v: True, "tensor parallelism is not supported (lowmem is data-parallel with ZeRO "
                                        "stages); remove the section"),
    "sequence_parallel_size": (_above(1), "sequence parallelism is not supported; use 1 or remove the key"),
    "communication_data_type": (lambda v: v not in ("fp32", AUTO, None),
                                "lowmem reduces low-rank gradients in fp32; use \"fp32\" or remove the key"),
}
REFUSED_ZERO: dict[str, tuple[Callable[[Any], bool], str]] = {
    "offload_optimizer": (_offloads, _NO_OFFLOAD),
    "offload_param": (_offloads, _NO_OFFLOAD),
    "cpu_offload": (truthy, _NO_OFFLOAD),
    "cpu_offload_param": (truthy, _NO_OFFLOAD),
    "zero_quantized_weights": (truthy, _OWN_QUANT),
    "zero_quantized_gradients": (truthy, _OWN_QUANT),
    "zero_quantized_nontrainable_weights": (truthy, _OWN_QUANT),
    "zero_hpz_partition_size": (_above(1), _OWN_QUANT),
    "mics_shard_size": (_above(0), "MiCS sub-group sharding is not supported: lowmem partitions state across all "
                                   "ranks; remove the key"),
}


def refused_keys(ds_config: dict) -> list[str]:
    """One message per refused key of a parsed DeepSpeed JSON object (top level and zero_optimization)."""
    found = []
    for prefix, body, table in (("", ds_config, REFUSED_TOP),
                                ("zero_optimization.", ds_config.get("zero_optimization") or {}, REFUSED_ZERO)):
        if not isinstance(body, dict):
            continue
        for key, value in body.items():
            if key in table and table[key][0](value):
                found.append(f"{prefix}{key}: {json.dumps(value)} is not supported: {table[key][1]}")
    return found
