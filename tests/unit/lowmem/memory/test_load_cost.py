"""lowmem.memory.load_cost (estimate_load) against the load measured with LiveTensorBytes, and the preflight judging
the larger of the load and step peaks. The streamed reads here follow the loader's contract with the real pieces
(safetensors safe_open, quant.int8.quantize_int8); expected sizes elsewhere come from shapes and dtypes."""
import json

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from hooks.runtime import prepare
from lowmem.memory import GIB, estimate, estimate_load, format_load_breakdown, preflight
from lowmem.memory.live_bytes import LiveTensorBytes, baseline_bytes
from lowmem.presets import preset
from quant.int8 import quantize_int8


def small_config(tied=False, vocab=4000):
    return LlamaConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=tied)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    LlamaForCausalLM(small_config()).to(torch.bfloat16).save_pretrained(path, max_shard_size="400KB")
    return path


def stream(directory, dtype, is_target, block_size, meter):
    """Read every tensor of a sharded safetensors directory in file order as the loader's contract says; keep codes
    and scales of targets and float params in `dtype`. Returns (kept tensors, the largest peak of one tensor's load
    above the bytes live before it, that tensor's key)."""
    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    kept, worst = {}, (0, None)
    for shard in dict.fromkeys(weight_map.values()):
        with safe_open(str(directory / shard), "pt") as f:
            for key in f.keys():
                meter.reset_peak()
                before = meter.live_bytes
                t = f.get_tensor(key).to("cpu", dtype)
                kept[key] = quantize_int8(t.float(), block_size=block_size) if is_target(key) else (t,)
                del t
                worst = max(worst, (meter.peak_bytes - before, key), key=lambda w: w[0])
    return kept, worst[0], worst[1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_streamed_load_matches_the_prediction_component_by_component(checkpoint, dtype):
    cfg = preset("lowmem", rank=16)     # INT8 low-rank layers and embedding, float head (exclude *lm_head)

    def is_target(key):
        return key.endswith("_proj.weight") or key == "model.embed_tokens.weight"
    meter = LiveTensorBytes()
    with meter:
        kept, one_tensor_peak, key = stream(checkpoint, dtype, is_target, cfg.weight_block_size, meter)
        weights = meter.live_bytes
    load = estimate_load(small_config(), cfg, dtype=dtype, device_type="cpu", file_dtype=torch.bfloat16)
    prepare_moment, stream_moment = load.moment_components["prepare"], load.moment_components["stream"]
    predicted_weights = sum(prepare_moment[k] for k in ("weights_int8", "weight_scales", "float_params"))
    assert weights == predicted_weights == baseline_bytes(t for ts in kept.values() for t in ts)
    # the (V, h) tables are the largest tensors (in fp32 the float head's read + fp32 copy ties with the INT8
    # embedding's); the worst tensor's load peak on top of the other weights (all of them in the prediction: the
    # file order is not in the config), which the measured peak exceeds only by the finiteness check's one-element sum
    assert key in ("model.embed_tokens.weight", "lm_head.weight") and load.largest_tensor in ("embed_tokens", "lm_head")
    assert abs(one_tensor_peak - load.tensor_peak_bytes) <= 16, (one_tensor_peak, load.tensor_peak_bytes)
    # bf16 file to an fp32 load on the CPU: the read tensor lives beside its fp32 copy, which is also the one
    # quantised (no second fp32 copy); bf16 to bf16: the read tensor is the copy
    numel = 4000 * 128
    expected = {"read_tensor": 2 * numel, "load_dtype_copy": 4 * numel, "fp32_copy": 0} if dtype == torch.float32 \
        else {"read_tensor": 0, "load_dtype_copy": 2 * numel, "fp32_copy": 4 * numel}
    assert {k: stream_moment[k] for k in expected} == expected


@pytest.mark.parametrize("error_feedback", ["off", "bf16", "int8"])
def test_prepare_moment_is_the_state_the_runtime_allocates(error_feedback):
    cfg = preset("lowmem", rank=16, error_feedback=error_feedback)
    torch.manual_seed(0)
    model = LlamaForCausalLM(small_config()).to(torch.bfloat16)
    runtime = prepare(model, cfg)
    state_bytes = baseline_bytes(t for s in runtime.states.values() for t in s.values())
    prepare_moment = estimate_load(small_config(), cfg, dtype=torch.bfloat16, device_type="cpu").moment_components[
        "prepare"]
    ef_zeros = 0 if error_feedback == "off" else 4 * 4000 * 128    # the INT8 embedding's fp32 zeros, transient
    predicted = prepare_moment["optimizer_moments"] + prepare_moment["error_feedback"] - ef_zeros
    # scalar counters (a few int64 / fp32 per trained tensor) are the only bytes not modelled
    assert predicted <= state_bytes <= predicted + 100 * len(runtime.states)


def test_host_holds_the_largest_tensor_on_a_gpu_and_everything_on_a_cpu():
    llama3_8b = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, vocab_size=128256)
    cfg = preset("lowmem", exclude_modules=())
    gpu = estimate_load(llama3_8b, cfg, dtype=torch.bfloat16, device_type="cuda")
    assert gpu.host_peak_bytes == 2 * 128256 * 4096           # the head (or embedding) in bf16
    assert gpu.components["cuda_context"] > 0 and gpu.components["read_tensor"] == 0
    cpu = estimate_load(llama3_8b, cfg, dtype=torch.bfloat16, device_type="cpu")
    assert cpu.host_peak_bytes == cpu.peak_bytes and cpu.components["cuda_context"] == 0
    fp32_file = estimate_load(llama3_8b, cfg, dtype=torch.bfloat16, device_type="cuda", file_dtype=torch.float32)
    assert fp32_file.host_peak_bytes == 2 * gpu.host_peak_bytes
    assert "load + prepare" in format_load_breakdown(gpu) and gpu.moment in gpu.notes[0]


def test_the_file_dtype_comes_from_the_config():
    config = small_config()
    config.dtype = torch.float32
    from_config = estimate_load(config, preset("lowmem"), device_type="cuda")
    assert from_config.host_peak_bytes == estimate_load(small_config(), preset("lowmem"), device_type="cuda",
                                                        file_dtype=torch.float32).host_peak_bytes
    assert from_config.host_peak_bytes == 2 * estimate_load(small_config(), preset("lowmem"),
                                                            device_type="cuda").host_peak_bytes


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="device_type"):
        estimate_load(small_config(), device_type="tpu")
    with pytest.raises(TypeError, match="file_dtype"):
        estimate_load(small_config(), file_dtype=torch.int8)


def test_preflight_judges_the_larger_of_load_and_step(monkeypatch):
    """A big INT8 head and a one-token step: the load is the peak, and a device between the two peaks refuses."""
    import lowmem.memory.fit as fit
    from launch.config import TrainConfig
    model_cfg = small_config(vocab=128000)
    cfg = TrainConfig(seq_len=8, micro_batch_size=1, dtype="bf16",
                      optim={"preset": "lowmem", "rank": 16, "exclude_modules": []})
    step = estimate(model_cfg, method="lowmem", lowmem_config=cfg.lowmem_config(), seq_len=8, micro_batch_size=1,
                    gradient_checkpointing=False, dtype=torch.bfloat16, device_type="cpu", fused_loss=cfg.fused_loss)
    load = estimate_load(model_cfg, cfg.lowmem_config(), dtype=torch.bfloat16, device_type="cpu")
    assert load.peak_bytes > step.peak_bytes
    monkeypatch.setattr(fit, "_device_bytes", lambda device: int((load.peak_bytes + step.peak_bytes) / 2 / 0.95))
    verdict = preflight(cfg, model_cfg, torch.device("cpu"))
    assert verdict.fits is False and verdict.predicted_peak_bytes == verdict.load_peak_bytes == load.peak_bytes
    assert verdict.step_peak_bytes == step.peak_bytes
    assert f"load {load.peak_bytes / GIB:.2f} GiB, step {step.peak_bytes / GIB:.2f} GiB: the load is the peak" \
        in verdict.detail
    monkeypatch.setattr(fit, "_device_bytes", lambda device: int(load.peak_bytes / 0.95) + 1)
    assert preflight(cfg, model_cfg, torch.device("cpu")).fits is True
