"""launch.deepspeed_config: DeepSpeed JSON -> DistributedPlan (stage, batch identity, clipping, dtype), refused and
noticed keys, nearest-key errors, apply_plan."""
import dataclasses
import json
import re

import pytest

from launch.config import CONFIG_DIR, TrainConfig
from launch.deepspeed_config import NO_JSON, DistributedPlan, apply_plan, load_deepspeed_config
from lowmem.config import ConfigError

PERF_KNOBS = ["reduce_bucket_size", "allgather_bucket_size", "overlap_comm", "contiguous_gradients", "reduce_scatter",
              "allgather_partitions", "round_robin_gradients", "stage3_prefetch_bucket_size",
              "stage3_param_persistence_threshold", "stage3_max_live_parameters", "stage3_max_reuse_distance",
              "stage3_gather_16bit_weights_on_model_save", "sub_group_size", "memory_efficient_linear",
              "elastic_checkpoint", "load_from_fp32_weights"]


def cfg(**kw):
    base = dict(micro_batch_size=3, grad_accum_steps=2)
    base.update(kw)
    return TrainConfig(**base)


def plan_of(tmp_path, data, train_cfg=None, world=2):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return load_deepspeed_config(str(path), train_cfg or cfg(), world)


def refused(tmp_path, data, *patterns, world=2):
    with pytest.raises(ConfigError) as info:
        plan_of(tmp_path, data, world=world)
    text = str(info.value)
    assert str(tmp_path / "ds.json") in text, text
    for pattern in patterns:
        assert re.search(pattern, text), (pattern, text)
    return text


# ---- shipped files and the no-JSON plan --------------------------------------------------------------------------

@pytest.mark.parametrize("stage", [1, 2, 3])
def test_shipped_json_loads_with_auto_from_the_yaml(stage):
    path = CONFIG_DIR / f"ds_zero{stage}.json"
    train_cfg = cfg(optim={"preset": "lowmem", "rank": 64, "grad_clip": 0.5})
    plan = load_deepspeed_config(path, train_cfg, world_size=4)
    shipped = json.loads(path.read_text())
    assert plan == DistributedPlan(stage, 3, 2, float(shipped["gradient_clipping"]), None, str(path), plan.notices)
    assert len(plan.notices) == 1 and "optim.grad_clip=0.5" in plan.notices[0]   # the JSON's 1.0 wins


def test_no_json_is_stage_zero_with_the_train_config_values():
    train_cfg = cfg(dtype="fp32", optim={"preset": "lowmem", "grad_clip": None})
    plan = load_deepspeed_config(None, train_cfg, world_size=4)
    assert plan == DistributedPlan(0, 3, 2, None, None, NO_JSON, ())
    assert apply_plan(train_cfg, plan) == train_cfg


def test_world_size_one_with_a_json_is_the_same_semantics():
    plan = load_deepspeed_config(CONFIG_DIR / "ds_zero2.json", cfg(), world_size=1)
    assert (plan.zero_stage, plan.micro_batch_size, plan.grad_accum_steps) == (2, 3, 2)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="world_size"):
        load_deepspeed_config(None, cfg(), world_size=0)
    with pytest.raises(TypeError, match="TrainConfig"):
        load_deepspeed_config(None, {"micro_batch_size": 1}, world_size=1)
    with pytest.raises(TypeError, match="DistributedPlan"):
        apply_plan(cfg(), {"zero_stage": 1})


# ---- batch identity ----------------------------------------------------------------------------------------------

# (json batch keys, world, expected (micro, accum)); the YAML has micro 3, accum 2; total = micro * accum * world.
DERIVATIONS = [
    ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}, 2, (4, 4)),        # 32 / (4 * 2)
    ({"train_batch_size": 32, "gradient_accumulation_steps": 2}, 4, (4, 2)),           # 32 / (2 * 4)
    ({"train_batch_size": 48, "train_micro_batch_size_per_gpu": "auto"}, 4, (3, 4)),   # auto micro 3 counts as given
    ({"train_batch_size": 24, "gradient_accumulation_steps": "auto"}, 2, (6, 2)),      # auto accum 2
    ({"train_batch_size": 36}, 3, (6, 2)),                                             # YAML accum kept, micro derived
    ({"train_batch_size": 40, "train_micro_batch_size_per_gpu": 5, "gradient_accumulation_steps": 4}, 2, (5, 4)),
    ({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": 7}, 8, (7, 2)),
    ({"gradient_accumulation_steps": 5}, 1, (3, 5)),
]


@pytest.mark.parametrize("batch,world,expected", DERIVATIONS)
def test_batch_identity_derives_the_third_number(tmp_path, batch, world, expected):
    plan = plan_of(tmp_path, batch, world=world)
    assert (plan.micro_batch_size, plan.grad_accum_steps) == expected
    if isinstance(batch.get("train_batch_size"), int):
        assert plan.micro_batch_size * plan.grad_accum_steps * world == batch["train_batch_size"]


def test_all_three_must_agree(tmp_path):
    refused(tmp_path, {"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2},
            r"train_batch_size: 30 != .*micro_batch_size_per_gpu 4 x gradient_accumulation_steps 2 x world_size 2 "
            r"= 16")
    refused(tmp_path, {"train_batch_size": 10, "train_micro_batch_size_per_gpu": "auto",
                       "gradient_accumulation_steps": "auto"}, r"10 != .* 3 x .* 2 x world_size 2 = 12")


@pytest.mark.parametrize("batch,numbers", [
    ({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4},
     r"30 is not divisible by train_micro_batch_size_per_gpu 4 x world_size 2 = 8"),
    ({"train_batch_size": 10, "gradient_accumulation_steps": 3},
     r"10 is not divisible by gradient_accumulation_steps 3 x world_size 2 = 6"),
    ({"train_batch_size": 2, "gradient_accumulation_steps": 2}, r"2 is not divisible by .* = 4"),
])
def test_indivisible_derivation_names_the_three_numbers(tmp_path, batch, numbers):
    refused(tmp_path, batch, "train_batch_size: " + numbers)


@pytest.mark.parametrize("key", ["train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"])
@pytest.mark.parametrize("value", [0, -2, 2.5, "4", True, None])
def test_batch_numbers_must_be_ints_at_least_one(tmp_path, key, value):
    refused(tmp_path, {key: value}, re.escape(key) + r": must be an int >= 1 or \"auto\"")


# ---- clipping and dtype ------------------------------------------------------------------------------------------

def test_gradient_clipping_values(tmp_path):
    assert plan_of(tmp_path, {"gradient_clipping": "auto"}, cfg(optim={"grad_clip": 0.3})).grad_clip == 0.3
    assert plan_of(tmp_path, {}, cfg(optim={"grad_clip": None})).grad_clip is None      # absent = auto
    off = plan_of(tmp_path, {"gradient_clipping": 0})
    assert off.grad_clip is None and off.notices == ()                                   # the preset default: no notice
    assert plan_of(tmp_path, {"gradient_clipping": 2}).grad_clip == 2.0
    same = plan_of(tmp_path, {"gradient_clipping": 0.5}, cfg(optim={"grad_clip": 0.5}))
    assert same.notices == ()
    for bad in (-1, "1.0", True, float("inf")):
        refused(tmp_path, json.dumps({"gradient_clipping": bad}) if bad != float("inf") else
                '{"gradient_clipping": Infinity}', r"gradient_clipping: must be a number > 0 \(0 turns clipping off\)")


def test_json_clipping_wins_over_an_explicit_yaml_value_with_a_notice(tmp_path):
    train_cfg = cfg(optim={"preset": "lowmem", "grad_clip": 5.0})
    plan = plan_of(tmp_path, {"gradient_clipping": 0}, train_cfg)
    assert plan.grad_clip is None
    assert plan.notices == ("gradient_clipping: 0 from the deepspeed JSON replaces optim.grad_clip=5.0 from the YAML",)
    assert apply_plan(train_cfg, plan).lowmem_config().grad_clip is None


def test_bf16_enabled_decides_the_dtype(tmp_path):
    assert plan_of(tmp_path, {"bf16": {"enabled": True}}).dtype == "bf16"
    assert plan_of(tmp_path, {"bf16": {"enabled": False}}).dtype == "fp32"
    assert plan_of(tmp_path, {"bf16": {"enabled": "auto"}}).dtype is None
    assert plan_of(tmp_path, {"bfloat16": {"enabled": True}}).dtype == "bf16"
    assert plan_of(tmp_path, {}).dtype is None
    noticed = plan_of(tmp_path, {"bf16": {"enabled": True}}, cfg(dtype="fp32"))
    assert noticed.dtype == "bf16" and "replaces dtype=fp32" in noticed.notices[0]
    refused(tmp_path, {"bf16": {"enabled": "yes"}}, r"bf16.enabled: must be true, false or \"auto\"")
    refused(tmp_path, {"bf16": True}, r"bf16: must be a JSON object")


def test_fp16_disabled_or_auto_is_accepted_enabled_is_refused(tmp_path):
    hf = {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
          "hysteresis": 2, "min_loss_scale": 1}
    assert plan_of(tmp_path, {"fp16": hf, "bf16": {"enabled": "auto"}}).notices == ()
    refused(tmp_path, {"fp16": {"enabled": True}}, r"fp16.enabled: .*no loss scaling.*bf16")


# ---- refused, noticed, harmless and unknown keys -----------------------------------------------------------------

@pytest.mark.parametrize("data,path,why", [
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}, "optimizer", r"lowmem is the optimizer.*optim\."),
    ({"scheduler": {"type": "WarmupLR"}}, "scheduler", r"lr_schedule"),
    ({"zero_force_ds_cpu_optimizer": True}, "zero_force_ds_cpu_optimizer", r"never used"),
    ({"amp": {"enabled": True, "opt_level": "O1"}}, "amp", r"bf16"),
    ({"gradient_predivide_factor": 2.0}, "gradient_predivide_factor", r"use 1"),
    ({"prescale_gradients": True}, "prescale_gradients", r"use false"),
    ({"sparse_gradients": True}, "sparse_gradients", r"not supported"),
    ({"pipeline": {"stages": 2}}, "pipeline", r"pipeline parallelism"),
    ({"tensor_parallel": {"autotp_size": 2}}, "tensor_parallel", r"tensor parallelism"),
    ({"sequence_parallel_size": 2}, "sequence_parallel_size", r"use 1"),
    ({"data_types": {"grad_accum_dtype": "bf16"}}, "data_types.grad_accum_dtype", r"fp32"),
    ({"communication_data_type": "bf16"}, "communication_data_type", r"fp32"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, "zero_optimization.offload_optimizer",
     r"offloading is not supported.*stage"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}, "zero_optimization.offload_param",
     r"offloading"),
    ({"zero_optimization": {"zero_quantized_weights": True}}, "zero_optimization.zero_quantized_weights",
     r"own quantisation"),
    ({"zero_optimization": {"zero_quantized_gradients": True}}, "zero_optimization.zero_quantized_gradients",
     r"own quantisation"),
    ({"zero_optimization": {"zero_hpz_partition_size": 4}}, "zero_optimization.zero_hpz_partition_size",
     r"own quantisation"),
])
def test_keys_lowmem_cannot_honour_fail_saying_why(tmp_path, data, path, why):
    refused(tmp_path, data, r": " + re.escape(path) + r": .* is not supported: ", why)


def test_the_harmless_values_of_refusable_keys_are_accepted(tmp_path):
    data = {"gradient_predivide_factor": 1.0, "prescale_gradients": False, "sparse_gradients": False,
            "sequence_parallel_size": 1, "communication_data_type": "fp32",
            "data_types": {"grad_accum_dtype": "fp32"}, "amp": {"enabled": False}, "zero_force_ds_cpu_optimizer": False,
            "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "none"},
                                  "offload_param": {"device": "none"},
                                  "zero_quantized_weights": False, "zero_hpz_partition_size": 1}}
    plan = plan_of(tmp_path, data)
    assert plan.zero_stage == 3 and plan.notices == ()


def test_each_zero_performance_knob_gets_one_notice(tmp_path):
    plan = plan_of(tmp_path, {"zero_optimization": {"stage": 3, **{k: "auto" for k in PERF_KNOBS}}})
    assert len(plan.notices) == len(PERF_KNOBS)
    for key, line in zip(PERF_KNOBS, plan.notices):
        assert line.startswith(f"zero_optimization.{key}: ") and "lowmem sizes its own low-rank communication" in line


def test_logging_keys_are_harmless_and_enabled_monitors_get_a_notice(tmp_path):
    quiet = {"steps_per_print": 10, "wall_clock_breakdown": False, "dump_state": False,
             "flops_profiler": {"enabled": False}, "tensorboard": {"enabled": False, "output_path": "x"},
             "wandb": {"enabled": False}, "csv_monitor": {"enabled": False}}
    assert plan_of(tmp_path, quiet).notices == ()
    loud = plan_of(tmp_path, {"wandb": {"enabled": True, "project": "p"}, "csv_monitor": {"enabled": True}})
    assert len(loud.notices) == 2 and all("train_log.jsonl" in n for n in loud.notices)
    assert loud.notices[0].startswith("wandb:")


@pytest.mark.parametrize("data,message", [
    ({"zero_optimization": {"stgae": 2}},
     "zero_optimization.stgae: unknown key; did you mean zero_optimization.stage?"),
    ({"gradient_clippin": 1.0}, "gradient_clippin: unknown key; did you mean gradient_clipping?"),
    ({"train_micro_batch_size": 2},
     "train_micro_batch_size: unknown key; did you mean train_micro_batch_size_per_gpu?"),
    ({"bf16": {"enabeld": True}}, "bf16.enabeld: unknown key; did you mean bf16.enabled?"),
    ({"zero_optimization": {"overlap_com": True}}, "zero_optimization.overlap_com: unknown key; did you mean "
                                                   "zero_optimization.overlap_comm?"),
    ({"fp16": {"loss_scal": 0}}, "fp16.loss_scal: unknown key; did you mean fp16.loss_scale?"),
])
def test_unknown_keys_name_the_path_and_the_nearest_valid_key(tmp_path, data, message):
    refused(tmp_path, data, re.escape(message))


def test_unknown_key_with_nothing_close_lists_the_valid_keys(tmp_path):
    text = refused(tmp_path, {"zzzz": 1}, r"zzzz: unknown key; valid keys: ")
    assert "zero_optimization" in text and "gradient_clipping" in text


@pytest.mark.parametrize("stage", [4, -1, "2", True, None, 1.5])
def test_zero_stage_must_be_0_to_3(tmp_path, stage):
    refused(tmp_path, {"zero_optimization": {"stage": stage}}, r"zero_optimization.stage: must be 0, 1, 2 or 3")


def test_a_hugging_face_style_zero3_template_without_optimizer_loads(tmp_path):
    template = {"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto", "loss_scale": 0},
                "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                                      "sub_group_size": 1e9, "reduce_bucket_size": "auto",
                                      "stage3_prefetch_bucket_size": "auto",
                                      "stage3_param_persistence_threshold": "auto",
                                      "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9,
                                      "stage3_gather_16bit_weights_on_model_save": True},
                "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 2000,
                "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": False}
    plan = plan_of(tmp_path, template, world=8)
    assert (plan.zero_stage, plan.micro_batch_size, plan.grad_accum_steps, plan.grad_clip) == (3, 3, 2, 1.0)
    assert len(plan.notices) == len(template["zero_optimization"]) - 1   # every knob but the stage


# ---- files -------------------------------------------------------------------------------------------------------

def test_missing_file_names_the_path_and_the_nearest_shipped_one(tmp_path):
    with pytest.raises(ConfigError, match=r"deepspeed config not found: '.*ds_zero4\.json'.*ds_zero\d\.json"):
        load_deepspeed_config(str(tmp_path / "ds_zero4.json"), cfg(), 2)


def test_invalid_json_names_line_and_column(tmp_path):
    text = '{\n  "zero_optimization": {"stage": 2,}\n}'
    refused(tmp_path, text, r"ds\.json:2: invalid JSON at line 2, column 36")
    refused(tmp_path, '{"bf16": {}, "bf16": {}}', r"duplicate key 'bf16'")
    refused(tmp_path, "[1, 2]", r"top level .* JSON object, got list")


# ---- apply_plan --------------------------------------------------------------------------------------------------

def test_apply_plan_replaces_the_four_values_and_keeps_validation(tmp_path):
    train_cfg = cfg(dtype="auto", lr=3e-4)
    plan = DistributedPlan(2, 5, 7, 0.25, "bf16", "x.json", ())
    out = apply_plan(train_cfg, plan)
    assert (out.micro_batch_size, out.grad_accum_steps, out.dtype) == (5, 7, "bf16")
    assert out.lowmem_config().grad_clip == 0.25 and out.lowmem_config().grad_accum_steps == 7
    assert out.lr == train_cfg.lr and out.optim.preset == train_cfg.optim.preset
    assert apply_plan(train_cfg, dataclasses.replace(plan, dtype=None)).dtype == "auto"
    with pytest.raises(ConfigError, match="micro_batch_size"):
        apply_plan(train_cfg, dataclasses.replace(plan, micro_batch_size=0))
