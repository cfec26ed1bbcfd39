"""benchmarks.checkpoint_hash: the projected checkpoint size matches a real checkpoint's tensors, and the
benchmark prints its machine, rates and projection."""
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.checkpoint_hash import checkpoint_bytes, main, measure_rates
from hooks.runtime import prepare
from lowmem.presets import preset


def test_checkpoint_bytes_matches_the_tensors_of_a_saved_checkpoint(tmp_path):
    """Independent check of the formula: save a real run's checkpoint after the residual warm-up and the first
    projector refresh, and add up its tensors. The planner leaves out only per-tensor bookkeeping counters (step,
    refresh counters, similarity history: a few scalars per trained tensor)."""
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float()
    lowmem_config = preset("lowmem", rank=32, refresh_interval_steps=2, residual_warmup_steps=1,
                           weight_block_size=64)
    runtime = prepare(model, lowmem_config)
    for _ in range(4):
        ids = torch.randint(0, 512, (2, 16))
        with runtime.micro_batch():
            runtime.backward(model(input_ids=ids, labels=ids).loss)
        runtime.step()
    path = runtime.save(tmp_path)
    tensor_bytes = 0
    for name in ("model.safetensors", "optim.safetensors"):
        with safe_open(path / name, "pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open handles are not dicts
                tensor = fh.get_tensor(key)
                tensor_bytes += tensor.numel() * tensor.element_size()
    predicted = checkpoint_bytes(config, lowmem_config, dtype=torch.float32)
    bookkeeping_bound = 256 * len(runtime.states)
    assert 0 <= tensor_bytes - predicted <= bookkeeping_bound, (tensor_bytes, predicted)


def test_rates_are_measured_and_the_projection_printed(capsys):
    rates = measure_rates(1 << 20, repeats=1)
    assert all(rate > 0 for rate in rates.values())
    assert main(["--mib", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("CPU ") and "GB/s" in out and "llama2-7b lowmem checkpoint" in out
    assert "projected verification time" in out
