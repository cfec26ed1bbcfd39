"""Activation offload (lowmem.model.offload): gradients bit-identical to plain checkpointing and to no
checkpointing, the layer inputs leave the device between forward and backward, clear errors."""
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from hooks.runtime import prepare
from lowmem.memory.live_bytes import LiveTensorBytes, host_memory
from lowmem.model.offload import enable_offloaded_checkpointing, offloaded_checkpoint
from lowmem.presets import preset

LAYERS, HIDDEN, BATCH, SEQ = 4, 64, 2, 48


def tiny_model(mode: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=HIDDEN, intermediate_size=160, num_hidden_layers=LAYERS,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                         max_position_embeddings=64)).float()
    model.train()
    if mode == "checkpoint":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif mode == "offload":
        assert enable_offloaded_checkpointing(model) >= LAYERS
    return model


def ids():
    return torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("mode", ["none", "checkpoint", "offload"])
def test_gradients_are_bit_identical_across_modes(mode):
    reference = tiny_model("none")
    reference(input_ids=ids(), labels=ids()).loss.backward()
    model = tiny_model(mode)
    model(input_ids=ids(), labels=ids()).loss.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_lowmem_training_steps_are_bit_identical_with_offload():
    """Through the runtime (updates inside backward, INT8 weights with stochastic rounding): three steps give the
    same weights and losses with the inputs offloaded as with them kept."""
    results = []
    for mode in ("checkpoint", "offload"):
        model = tiny_model(mode)
        runtime = prepare(model, preset("lowmem", rank=8, refresh_interval_steps=2))
        losses = []
        for _ in range(3):
            with runtime.micro_batch():
                loss = model(input_ids=ids(), labels=ids()).loss
                runtime.backward(loss)
            runtime.step()
            losses.append(loss.item())
        results.append((losses, [t.clone() for t in model.state_dict().values()]))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_layer_inputs_leave_the_device_between_forward_and_backward():
    """After the forward, the device holds the kept inputs' bytes less with offload, and the host holds exactly
    LAYERS inputs (BATCH x SEQ x HIDDEN fp32 each); the backward hands all of them back."""
    live_after_forward = {}
    for mode in ("checkpoint", "offload"):
        model = tiny_model(mode)
        meter = LiveTensorBytes()
        with meter:
            loss = model(input_ids=ids(), labels=ids()).loss
            live_after_forward[mode] = meter.live_bytes
            host_after_forward = meter.host_live_bytes
            loss.backward()
        if mode == "offload":
            one_input = BATCH * SEQ * HIDDEN * 4
            assert host_after_forward == LAYERS * one_input
            assert meter.host_live_bytes == 0
    assert live_after_forward["checkpoint"] - live_after_forward["offload"] == LAYERS * BATCH * SEQ * HIDDEN * 4


def test_host_memory_split_of_the_meter():
    meter = LiveTensorBytes()
    with meter:
        on_device = torch.ones(1000)
        with host_memory():
            on_host = torch.ones(500)
        assert (meter.live_bytes, meter.host_live_bytes) == (4000, 2000)
        del on_host
        assert (meter.live_bytes, meter.host_live_bytes, meter.host_peak_bytes) == (4000, 0, 2000)
    assert meter.snapshot()["host_peak_bytes"] == 2000
    del on_device


def test_errors_are_clear():
    with pytest.raises(ValueError, match="use_reentrant=False"):
        offloaded_checkpoint(torch.sin, torch.ones(2, requires_grad=True), use_reentrant=True)
    with pytest.raises(TypeError, match="gradient_checkpointing_enable"):
        enable_offloaded_checkpointing(nn.Linear(2, 2))
