"""fit: auto (launch.preflight.fit_automatically, called by launch.finetune): the planner's choice is applied to the TrainConfig (global batch kept) and said."""
import dataclasses

import pytest
import torch
from transformers import LlamaConfig

import lowmem.memory.fit as fit
from launch.config import CONFIG_DIR, ConfigError, OptimSection
from launch.config_loader import load_train_config
from launch.preflight import fit_automatically
from lowmem.memory import GIB

LLAMA2_13B = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                  num_key_value_heads=40, vocab_size=32000)


def test_fit_auto_applies_checkpointing_offload_and_rank_and_keeps_the_rest(monkeypatch):
    monkeypatch.setattr(fit, "_device_bytes", lambda device: 16 * GIB)
    cfg = load_train_config(CONFIG_DIR / "llama2-13b-sft-16gb.yaml",
                            ["dtype=bf16", "gradient_checkpointing=false", "activation_offload=false", "optim.rank=256"])
    fitted, line = fit_automatically(cfg, LlamaConfig(**LLAMA2_13B), torch.device("cuda"))
    assert fitted.gradient_checkpointing is True and fitted.activation_offload is True
    # rank 256 does not fit even offloaded; the rank chosen is the largest that does (halving from 256)
    chosen = fitted.lowmem_config().rank
    assert chosen < 256
    doubled = dataclasses.replace(fitted, optim=OptimSection({**fitted.optim.to_dict(), "rank": 2 * chosen}))
    assert fit.preflight(doubled, LlamaConfig(**LLAMA2_13B), torch.device("cuda")).fits is False
    assert fitted.lowmem_config().exclude_modules == cfg.lowmem_config().exclude_modules   # other optim keys kept
    assert fitted.micro_batch_size * fitted.grad_accum_steps == cfg.micro_batch_size * cfg.grad_accum_steps
    assert "gradient_checkpointing=True" in line and "activation_offload=True" in line and f"optim.rank={chosen}" in line
    verdict = fit.preflight(fitted, LlamaConfig(**LLAMA2_13B), torch.device("cuda"))
    assert verdict.fits is True


def test_fit_auto_never_offloads_when_the_device_is_the_host(monkeypatch):
    """On a CPU device the host is the device: offload is neither chosen nor credited in the prediction."""
    monkeypatch.setattr(fit, "_device_bytes", lambda device: 16 * GIB)
    cfg = load_train_config(CONFIG_DIR / "llama2-13b-sft-16gb.yaml",
                            ["dtype=bf16", "gradient_checkpointing=true", "activation_offload=true"])
    on_cpu = fit.preflight(cfg, LlamaConfig(**LLAMA2_13B), torch.device("cpu"))
    kept = fit.preflight(dataclasses.replace(cfg, activation_offload=False), LlamaConfig(**LLAMA2_13B),
                         torch.device("cpu"))
    assert on_cpu.predicted_peak_bytes == kept.predicted_peak_bytes
    fitted, _ = fit_automatically(dataclasses.replace(cfg, activation_offload=False, gradient_checkpointing=False),
                                  LlamaConfig(**LLAMA2_13B), torch.device("cpu"))
    assert fitted.activation_offload is False


def test_offload_without_checkpointing_is_refused():
    with pytest.raises(ConfigError, match="gradient_checkpointing: true"):
        load_train_config(CONFIG_DIR / "llama2-13b-sft-16gb.yaml",
                          ["gradient_checkpointing=false", "activation_offload=true"])


def test_fit_auto_says_when_nothing_fits(monkeypatch):
    monkeypatch.setattr(fit, "_device_bytes", lambda device: 8 * GIB)
    cfg = load_train_config(CONFIG_DIR / "llama2-13b-sft-16gb.yaml", ["dtype=bf16"])
    fitted, line = fit_automatically(cfg, LlamaConfig(**LLAMA2_13B), torch.device("cuda"))
    assert fitted == cfg and "no setting" in line
