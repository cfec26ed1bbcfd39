"""LiveTensorBytes charges tensors read from files (lowmem.memory.tensor_sources): safetensors, torch.load,
torch.frombuffer, thread-pool workers and transformers' from_pretrained. Expected bytes come from shapes and dtypes."""
import concurrent.futures
import gc

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load, load_file, save, save_file

from lowmem.memory.live_bytes import LiveTensorBytes, module_bytes


@pytest.fixture
def tensor_file(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.randn(300, 200), "b": torch.randn(200).to(torch.bfloat16)}, str(path))
    return path


def test_safe_open_get_tensor_and_slice_are_charged_and_refunded(tensor_file):
    meter = LiveTensorBytes()
    with meter:
        with safe_open(str(tensor_file), "pt") as f:
            w = f.get_tensor("w")
            assert meter.live_bytes == 300 * 200 * 4
            b = f.get_tensor("b")
            assert meter.live_bytes == 300 * 200 * 4 + 200 * 2
        del w
        gc.collect()
        assert meter.live_bytes == 200 * 2
        del b
        assert meter.live_bytes == 0
    assert meter.peak_bytes == 300 * 200 * 4 + 200 * 2


def test_load_file_and_load_of_bytes_are_charged(tensor_file):
    expected = 300 * 200 * 4 + 200 * 2
    meter = LiveTensorBytes()
    with meter:
        loaded = load_file(str(tensor_file))
        assert meter.live_bytes == expected
        del loaded
        assert meter.live_bytes == 0
    data = save({"x": torch.zeros(64, 32)})        # bytes made outside the meter
    meter = LiveTensorBytes()
    with meter:
        from_bytes = load(data)                     # torch.frombuffer over the bytes: no aten op of its own
        assert meter.live_bytes == 64 * 32 * 4
    assert from_bytes["x"].shape == (64, 32)


def test_frombuffer_is_charged_only_while_a_meter_is_active():
    original = torch.frombuffer
    buf = bytearray(4096)
    meter = LiveTensorBytes()
    with meter:
        assert torch.frombuffer is not original
        t = torch.frombuffer(buf, dtype=torch.float32)
        assert meter.live_bytes == 4096
        del t
        assert meter.live_bytes == 0
    assert torch.frombuffer is original
    assert concurrent.futures.ThreadPoolExecutor.submit.__name__ == "submit"


@pytest.mark.parametrize("mmap", [False, True])
def test_torch_load_is_charged(tmp_path, mmap):
    path = tmp_path / "t.pt"
    torch.save({"a": torch.randn(128, 64), "b": torch.zeros(10, dtype=torch.int64)}, path)
    meter = LiveTensorBytes()
    with meter:
        loaded = torch.load(path, mmap=mmap)
        assert meter.live_bytes == 128 * 64 * 4 + 10 * 8
        del loaded
        gc.collect()
        assert meter.live_bytes == 0


def test_thread_pool_work_is_charged_to_every_active_meter():
    outer, inner = LiveTensorBytes(), LiveTensorBytes()
    with outer, inner, concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(torch.ones, 100, 10) for _ in range(3)]
        made = [f.result() for f in futures]
        assert inner.live_bytes == outer.live_bytes == 3 * 100 * 10 * 4
        del made, futures
        gc.collect()
        assert inner.live_bytes == outer.live_bytes == 0
    # work submitted after the meters are gone is not charged to them
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        kept = pool.submit(torch.ones, 1000).result()
    assert outer.live_bytes == 0 and kept.numel() == 1000


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_from_pretrained_of_sharded_safetensors_is_charged(tmp_path, dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=500)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    meter = LiveTensorBytes()
    with meter:
        model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert module_bytes(model) == params * dtype.itemsize + buffers
    # every parameter and buffer (RoPE inverse frequencies) was made under the meter and is still alive
    assert meter.live_bytes == module_bytes(model)
    assert meter.peak_bytes >= module_bytes(model)
