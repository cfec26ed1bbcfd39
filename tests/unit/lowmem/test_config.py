"""LowMemConfig validation, overrides, (de)serialization, and the named presets."""
import dataclasses
import json

import pytest

from lowmem.config import RUN_WIDE_FIELDS, ConfigError, LowMemConfig, closest_key, matches
from lowmem.presets import PRESET_DESCRIPTIONS, PRESETS, preset

# The defaults as the design brief fixes them (written out here, not read from the implementation).
BRIEF_DEFAULTS = {
    "rank": 256, "scale": 0.25, "vocab_scale": 1.0, "lr": 1e-5, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
    "lr_schedule": "cosine", "warmup_steps": 0, "total_steps": None, "min_lr_ratio": 0.1,
    "grad_accum_steps": 1, "grad_clip": 1.0, "clip_mode": "per_tensor",
    "projection": "randomized", "oversampling": 8, "power_iters": 2, "rsvd_tol": 1e-3,
    "refresh_sketch": "rayleigh_ritz", "cross_head": True, "cross_head_modules": ("*q_proj", "*k_proj"),
    "projector_bits": 4, "projector_group_size": 256,
    "refresh": "lazy", "refresh_interval_steps": 200, "max_refresh_interval_steps": 2500, "lazy_threshold": 0.4,
    "lazy_low_threshold": 0.2, "lazy_window": 3, "geometric_start_step": 200, "geometric_factor": 1.5,
    "stagger": True, "moment_transfer": "reset", "optim_bits": 8, "moment_block_size": 256,
    "residual_ratio": 0.01, "residual_warmup_steps": 100, "residual_modules": ("*q_proj", "*k_proj"),
    "residual_dtype": "fp32", "residual_mode": "exact", "error_feedback": "off", "error_feedback_weight": 0.1,
    "int8_weights": True, "weight_block_size": 256, "stochastic_rounding": True, "compile": True,
    "int8_matmul": False, "target_modules": ("*",), "exclude_modules": ("*lm_head",),
    "float_optim_bits": 8, "float_optim_min_numel": 4096, "freeze": (), "seed": 0,
}


def test_defaults_are_valid_and_match_the_brief():
    cfg = LowMemConfig()
    for name, expected in BRIEF_DEFAULTS.items():
        assert getattr(cfg, name) == expected, name
    assert cfg.to_dict()["overrides"] == {}
    assert {f.name for f in dataclasses.fields(cfg)} == set(BRIEF_DEFAULTS) | {"overrides"}


def test_every_field_has_help_and_help_text_lists_it():
    text = LowMemConfig.help_text()
    for f in dataclasses.fields(LowMemConfig):
        help_ = f.metadata.get("help", "")
        assert help_.strip() and help_.endswith("."), f.name
        assert f"  {f.name}: " in text


def test_frozen_and_hashable():
    cfg = LowMemConfig(overrides={"*.q_proj": {"rank": 64, "betas": [0.8, 0.9]}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rank = 3
    assert hash(cfg) == hash(LowMemConfig(overrides={"*.q_proj": {"rank": 64, "betas": (0.8, 0.9)}}))


INVALID = [
    ("vocab_scale", 0),
    ("rank", 0), ("rank", 2.5), ("rank", True), ("scale", 0.0), ("scale", float("nan")),
    ("lr", -1e-5), ("lr", "1e-5"), ("betas", (0.9,)), ("betas", (0.9, 1.0)), ("betas", (-0.1, 0.9)),
    ("eps", 0.0), ("weight_decay", -0.1), ("lr_schedule", "cosin"), ("warmup_steps", -1),
    ("total_steps", 0), ("min_lr_ratio", 1.5), ("grad_accum_steps", 0), ("grad_clip", -1.0),
    ("grad_clip", float("inf")), ("clip_mode", "global"), ("projection", "qr"), ("oversampling", -1),
    ("power_iters", -2), ("rsvd_tol", 0.0), ("rsvd_tol", 1.0), ("refresh_sketch", "exact"),
    ("cross_head", 1), ("cross_head_modules", (3,)), ("cross_head_modules", ("",)), ("projector_bits", 2),
    ("projector_bits", 8.0), ("projector_group_size", 0), ("projector_group_size", 63), ("refresh", "eager"),
    ("refresh_interval_steps", 0), ("max_refresh_interval_steps", 0), ("lazy_threshold", 1.1),
    ("lazy_low_threshold", -0.1), ("lazy_window", 0), ("geometric_start_step", -1), ("geometric_factor", 0.9),
    ("stagger", "yes"), ("moment_transfer", "rotate_all"), ("optim_bits", 4), ("moment_block_size", 0),
    ("residual_ratio", 1.0), ("residual_ratio", -0.01), ("residual_warmup_steps", -1),
    ("residual_modules", 5), ("residual_dtype", "fp16"), ("residual_mode", "approx"), ("error_feedback", "fp32"),
    ("error_feedback_weight", 2.0), ("int8_weights", None), ("weight_block_size", 0),
    ("stochastic_rounding", 0), ("int8_matmul", 1), ("target_modules", None), ("exclude_modules", [1]),
    ("float_optim_bits", 16),
    ("float_optim_min_numel", -1), ("freeze", {"a": 1}), ("seed", -1), ("seed", 2**63), ("overrides", 5),
    ("compile", "yes"),
]


@pytest.mark.parametrize("name,value", INVALID, ids=[f"{n}={v!r}" for n, v in INVALID])
def test_invalid_value_names_field_and_value(name, value):
    with pytest.raises(ConfigError) as info:
        LowMemConfig(**{name: value})
    message = str(info.value)
    assert name in message
    assert repr(value) in message or str(value) in message
    assert isinstance(info.value, ValueError)


def test_every_field_has_an_invalid_case():
    assert {n for n, _ in INVALID} == set(BRIEF_DEFAULTS) | {"overrides"}


@pytest.mark.parametrize("changes,field", [
    ({"lazy_threshold": 0.3, "lazy_low_threshold": 0.35}, "lazy_low_threshold"),
    ({"refresh_interval_steps": 300, "max_refresh_interval_steps": 250}, "max_refresh_interval_steps"),
    ({"warmup_steps": 20, "total_steps": 10}, "warmup_steps"),
])
def test_relations_between_fields(changes, field):
    with pytest.raises(ConfigError, match=field):
        LowMemConfig(**changes)


def test_normalization():
    cfg = LowMemConfig(lr=1, betas=[0.8, 0.9], freeze="*.bias", target_modules=["*mlp*"])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.betas == (0.8, 0.9) and cfg.freeze == ("*.bias",) and cfg.target_modules == ("*mlp*",)
    # optional fields accept None
    assert LowMemConfig(grad_clip=None, rsvd_tol=None, total_steps=1000).grad_clip is None


def test_closest_key():
    names = ["rank", "lr", "lazy_threshold", "lazy_low_threshold"]
    assert closest_key("rnak", names) == "rank"
    assert closest_key("RANK", names) == "rank"
    assert closest_key("lazy_treshold", names) == "lazy_threshold"
    assert closest_key("zzzzzzzz", names) is None


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError, match=r"unknown key 'rnak'; did you mean 'rank'\?"):
        LowMemConfig.from_dict({"rnak": 64})
    with pytest.raises(ConfigError, match="did you mean 'projector_bits'"):
        LowMemConfig().replace(projecter_bits=8)
    with pytest.raises(ConfigError, match="valid keys"):
        LowMemConfig.from_dict({"qqqqqqqqqqqq": 1})
    with pytest.raises(ConfigError, match="mapping"):
        LowMemConfig.from_dict([("rank", 3)])


def test_override_keys_validated_like_top_level():
    with pytest.raises(ConfigError) as info:
        LowMemConfig(overrides={"*.q_proj": {"rnak": 64}})
    assert "'*.q_proj'" in str(info.value) and "did you mean 'rank'" in str(info.value)
    with pytest.raises(ConfigError, match=r"overrides\['\*.q_proj'\]\.rank"):
        LowMemConfig(overrides={"*.q_proj": {"rank": 0}})
    with pytest.raises(ConfigError, match="may not contain 'overrides'"):
        LowMemConfig(overrides={"*.q_proj": {"overrides": {}}})
    for name in RUN_WIDE_FIELDS:
        with pytest.raises(ConfigError, match="run-wide"):
            LowMemConfig(overrides={"*": {name: getattr(LowMemConfig(), name)}})
    with pytest.raises(ConfigError, match="pattern"):
        LowMemConfig(overrides={"": {"rank": 4}})
    with pytest.raises(ConfigError, match=r"overrides\['x'\]"):
        LowMemConfig(overrides={"x": 4})
    # from_dict goes through the same check
    with pytest.raises(ConfigError, match="did you mean 'projector_bits'"):
        LowMemConfig.from_dict({"overrides": {"*k_proj": {"projector_bit": 8}}})


def test_matches():
    assert matches("model.layers.0.self_attn.q_proj", ("*q_proj", "*k_proj"))
    assert not matches("model.layers.0.self_attn.v_proj", ("*q_proj", "*k_proj"))
    assert matches("lm_head", "*lm_head")  # a lone string is one pattern, not a set of characters
    assert not matches("model.embed_tokens", ())
    assert not matches("model.Q_PROJ", "*q_proj")  # case-sensitive on every platform


def test_for_module_applies_matching_overrides_in_order():
    cfg = LowMemConfig(rank=256, overrides={
        "*self_attn.*": {"rank": 64, "projector_bits": 8},
        "*.q_proj": {"rank": 32, "betas": [0.8, 0.95]},
        "*.layers.1.*": {"optim_bits": 32},
    })
    q0 = cfg.for_module("model.layers.0.self_attn.q_proj")
    assert (q0.rank, q0.projector_bits, q0.betas, q0.optim_bits) == (32, 8, (0.8, 0.95), 8)  # later wins
    k0 = cfg.for_module("model.layers.0.self_attn.k_proj")
    assert (k0.rank, k0.projector_bits, k0.betas) == (64, 8, (0.9, 0.999))
    k1 = cfg.for_module("model.layers.1.self_attn.k_proj")
    assert (k1.rank, k1.optim_bits) == (64, 32)
    mlp = cfg.for_module("model.layers.0.mlp.up_proj")
    assert mlp == cfg.replace(overrides={})
    for sub in (q0, k0, k1, mlp):
        assert sub.overrides == () and sub.to_dict()["overrides"] == {}
    # reversed insertion order flips which value wins
    flipped = LowMemConfig(overrides={"*.q_proj": {"rank": 32}, "*self_attn.*": {"rank": 64}})
    assert flipped.for_module("a.self_attn.q_proj").rank == 64
    assert LowMemConfig().for_module("anything") == LowMemConfig()


def test_for_module_checks_relations_of_the_combination():
    # each override alone is valid against the defaults; together they order the thresholds wrongly
    cfg = LowMemConfig(overrides={"*attn*": {"lazy_low_threshold": 0.35}, "*k_proj": {"lazy_threshold": 0.3}})
    assert cfg.for_module("x.attn.q_proj").lazy_low_threshold == 0.35
    assert cfg.for_module("x.mlp.k_proj").lazy_threshold == 0.3
    with pytest.raises(ConfigError, match=r"'x\.attn\.k_proj'.*lazy_low_threshold"):
        cfg.for_module("x.attn.k_proj")


def _rich_config():
    return LowMemConfig(rank=128, lr=3.5e-4, betas=(0.85, 0.995), total_steps=1000, warmup_steps=10,
                        grad_clip=None, rsvd_tol=None, freeze=("*.bias",), seed=12345,
                        overrides={"*.q_proj": {"rank": 64, "betas": (0.8, 0.9)}, "*mlp*": {"scale": 0.1 + 0.2}})


@pytest.mark.parametrize("cfg", [LowMemConfig(), _rich_config()] + [preset(n) for n in PRESETS],
                         ids=["default", "rich"] + list(PRESETS))
def test_round_trips_are_exact(cfg):
    assert LowMemConfig.from_dict(cfg.to_dict()) == cfg
    assert LowMemConfig.from_json(cfg.to_json()) == cfg
    assert LowMemConfig.from_yaml(cfg.to_yaml()) == cfg
    plain = json.loads(cfg.to_json())
    assert isinstance(plain["overrides"], dict)
    assert all(isinstance(body, dict) for body in cfg.to_dict()["overrides"].values())


def test_loaders_are_lenient_where_yaml_is_odd():
    # YAML 1.1 reads 1e-5 (no dot) as a string; float fields take it
    cfg = LowMemConfig.from_yaml("lr: 1e-5\nbetas: [0.9, '0.95']\nfreeze: ['*.bias']\n"
                                 "overrides:\n  '*q_proj': {eps: 1e-6, rank: 8}\n")
    assert cfg.lr == 1e-5 and cfg.betas == (0.9, 0.95) and cfg.freeze == ("*.bias",)
    assert cfg.for_module("a.q_proj").eps == 1e-6
    assert LowMemConfig.from_yaml("") == LowMemConfig()
    with pytest.raises(ConfigError, match="rank"):
        LowMemConfig.from_yaml("rank: '64'\n")  # int fields stay strict
    with pytest.raises(ConfigError, match="JSON"):
        LowMemConfig.from_json("{rank: 3")


# --- presets ----------------------------------------------------------------------------------------------------

# What each preset must change relative to the defaults (from the brief / the papers).
PRESET_EXPECT = {
    "galore": {"projection": "svd", "refresh": "fixed", "refresh_interval_steps": 200, "projector_bits": 32,
               "cross_head": False, "residual_ratio": 0.0, "int8_weights": False, "optim_bits": 32,
               "error_feedback": "off", "moment_transfer": "keep", "stochastic_rounding": True},
    "q_galore": {"int8_weights": True, "stochastic_rounding": True, "projector_bits": 4, "refresh": "lazy",
                 "lazy_threshold": 0.4, "projection": "svd", "cross_head": False, "residual_ratio": 0.0,
                 "optim_bits": 8},
    "galore_plus": {"cross_head": True, "projection": "randomized", "residual_ratio": 0.01,
                    "residual_modules": ("*q_proj", "*k_proj"), "int8_weights": False, "projector_bits": 32,
                    "refresh": "fixed", "optim_bits": 32, "moment_transfer": "keep"},
    "galore_ef": {"projection": "svd", "refresh": "fixed", "int8_weights": False, "error_feedback": "bf16",
                  "error_feedback_weight": 0.1, "moment_transfer": "keep"},
    "galore_dynamics": {"projection": "svd", "refresh": "geometric", "geometric_start_step": 200,
                        "geometric_factor": 1.5, "max_refresh_interval_steps": 2500, "error_feedback": "off"},
    "galore_dynamics_ef": {"projection": "svd", "refresh": "geometric", "geometric_factor": 1.5,
                           "error_feedback": "bf16"},
    "lowmem": {},
    "adamw_twin": {"int8_weights": False, "optim_bits": 32, "float_optim_bits": 32, "projector_bits": 32,
                   "residual_ratio": 0.0, "error_feedback": "off", "scale": 1.0, "grad_clip": None},
}
MUST_DIFFER = {
    "galore": ["projection", "refresh", "projector_bits", "cross_head", "residual_ratio", "int8_weights",
               "optim_bits"],
    "q_galore": ["projection", "cross_head", "residual_ratio"],
    "galore_plus": ["int8_weights", "projector_bits", "refresh", "optim_bits"],
    "galore_ef": ["error_feedback"], "galore_dynamics": ["refresh"], "galore_dynamics_ef": ["refresh",
                                                                                            "error_feedback"],
    "lowmem": [], "adamw_twin": ["rank", "int8_weights", "optim_bits", "float_optim_bits", "projector_bits",
                                 "residual_ratio", "scale"],
}


def test_every_preset_is_checked():
    assert set(PRESETS) == set(PRESET_EXPECT) == set(MUST_DIFFER) == set(PRESET_DESCRIPTIONS)


@pytest.mark.parametrize("name", list(PRESET_EXPECT))
def test_preset_builds_with_documented_settings(name):
    cfg = preset(name)
    defaults = LowMemConfig()
    for field_name, value in PRESET_EXPECT[name].items():
        assert getattr(cfg, field_name) == value, field_name
    for field_name in MUST_DIFFER[name]:
        assert getattr(cfg, field_name) != getattr(defaults, field_name), field_name
    description = PRESET_DESCRIPTIONS[name]
    assert description and "\n" not in description


def test_lowmem_preset_is_the_defaults_and_twin_is_full_rank():
    assert preset("lowmem") == LowMemConfig()
    twin = preset("adamw_twin")
    assert twin.rank >= 1 << 20  # >= min(m, n) of any real weight: no projection
    assert twin.clip_mode == "none" or twin.grad_clip is None
    assert twin.lr_schedule == "constant"


def test_presets_are_related_as_documented():
    galore = preset("galore").to_dict()
    for name, extra in [("galore_ef", {"error_feedback", "error_feedback_weight"}),
                        ("galore_dynamics", {"refresh", "geometric_start_step", "geometric_factor",
                                             "max_refresh_interval_steps"})]:
        other = preset(name).to_dict()
        assert {k for k in galore if galore[k] != other[k]} <= extra, name
    dyn, dyn_ef = preset("galore_dynamics").to_dict(), preset("galore_dynamics_ef").to_dict()
    assert {k for k in dyn if dyn[k] != dyn_ef[k]} <= {"error_feedback", "error_feedback_weight"}


def test_preset_overrides_and_errors():
    cfg = preset("q_galore", lr=1e-4, rank=128)
    assert (cfg.lr, cfg.rank, cfg.projector_bits) == (1e-4, 128, 4)
    with pytest.raises(ConfigError, match="unknown preset 'galor'; did you mean 'galore'"):
        preset("galor")
    with pytest.raises(ConfigError, match="did you mean 'q_galore'"):
        preset("qgalore")
    with pytest.raises(ConfigError, match="did you mean 'rank'"):
        preset("galore", rnak=3)
    with pytest.raises(ConfigError, match="rank"):
        preset("galore", rank=0)
    # the preset table is not mutated by a call
    assert "lr" not in PRESETS["q_galore"]
