"""The fit check's view of the device (lowmem.memory.fit._device_bytes) and NCCL's buffers in the per-rank
estimate, with the CUDA memory queries faked (no GPU here)."""
import torch
from transformers import LlamaConfig

import lowmem.memory.fit as fit
from launch.config import CONFIG_DIR
from launch.config_loader import load_train_config
from launch.preflight import device_memory_bytes
from lowmem.memory import GIB, estimate
from lowmem.memory.cost_model import CUDA_CONTEXT_BYTES, nccl_buffer_bytes
from lowmem.presets import preset

LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000)


def fake_cuda(monkeypatch, *, free, total, reserved=0):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved)


def test_device_bytes_is_free_memory_plus_this_process_share(monkeypatch):
    fake_cuda(monkeypatch, free=10 * GIB, total=24 * GIB, reserved=1 * GIB)   # another process holds 13 GiB
    cuda = torch.device("cuda", 0)
    assert fit._device_bytes(cuda) == 11 * GIB + CUDA_CONTEXT_BYTES
    assert device_memory_bytes(cuda) == 11 * GIB + CUDA_CONTEXT_BYTES
    fake_cuda(monkeypatch, free=24 * GIB - CUDA_CONTEXT_BYTES // 2, total=24 * GIB)
    assert fit._device_bytes(cuda) == 24 * GIB                                  # never above the total


def test_preflight_refuses_a_run_that_fits_the_total_but_not_the_free_memory(monkeypatch):
    cfg = load_train_config(CONFIG_DIR / "llama2-7b-sft-12gb.yaml", ["dtype=bf16"])
    model = LlamaConfig(**LLAMA_1B)
    fake_cuda(monkeypatch, free=24 * GIB, total=24 * GIB)
    roomy = fit.preflight(cfg, model, torch.device("cuda"))
    assert roomy.fits is True
    needed = roomy.predicted_peak_bytes
    # the same card with another process holding all but half of the predicted peak
    fake_cuda(monkeypatch, free=needed // 2, total=24 * GIB)
    crowded = fit.preflight(cfg, model, torch.device("cuda"))
    assert crowded.fits is False and crowded.predicted_peak_bytes == needed
    assert crowded.device_bytes == needed // 2 + CUDA_CONTEXT_BYTES and "available" in crowded.detail


def test_nccl_buffers_are_charged_per_rank_on_cuda_only():
    model = LlamaConfig(**LLAMA_1B)
    cfg = preset("lowmem")

    def comm(device_type, world):
        b = estimate(model, method="lowmem", lowmem_config=cfg, seq_len=512, micro_batch_size=1,
                     gradient_checkpointing=True, device_type=device_type, zero_stage=1, world_size=world,
                     dtype=torch.bfloat16)
        return b.components.get("comm_buffers", 0), b.notes

    cpu, _ = comm("cpu", 2)
    cuda, notes = comm("cuda", 2)
    assert cuda - cpu == nccl_buffer_bytes() and any("NCCL" in n for n in notes)
    single, notes = comm("cuda", 1)
    assert single == 0 and not any("NCCL" in n for n in notes)
    # NCCL's defaults: 8 channels x 4 connections x (4 MiB + 4.69 MiB + 0.5 MiB); its environment is honoured
    assert nccl_buffer_bytes({}) == 8 * 4 * ((4 << 20) + 4_915_200 + 524_288)
    assert nccl_buffer_bytes({"NCCL_BUFFSIZE": str(1 << 20), "NCCL_MAX_NCHANNELS": "2"}) == \
        2 * 4 * ((1 << 20) + 4_915_200 + 524_288)
