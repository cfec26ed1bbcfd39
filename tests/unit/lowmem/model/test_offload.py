"""Activation offload (lowmem.model.offload): gradients bit-identical to plain checkpointing and to no
checkpointing, the layer inputs leave the device between forward and backward, host buffers reused, the copy
schedule (side stream, prefetch, waits) recorded by a fake stream provider, clear errors. CUDA: `gpu` marker."""
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from hooks.runtime import prepare
from lowmem.memory.live_bytes import LiveTensorBytes, host_memory
from lowmem.model.offload import ActivationOffloader, enable_offloaded_checkpointing, offloaded_checkpoint
from lowmem.presets import preset

LAYERS, HIDDEN, BATCH, SEQ = 4, 64, 2, 48


def tiny_model(mode: str, offloader: ActivationOffloader | None = None) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=HIDDEN, intermediate_size=160, num_hidden_layers=LAYERS,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                         max_position_embeddings=64)).float()
    model.train()
    if mode == "checkpoint":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif mode == "offload":
        assert enable_offloaded_checkpointing(model, offloader) >= LAYERS
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
    """After the forward the device holds LAYERS - 1 inputs fewer with offload (the last layer's input stays: its
    recompute comes first and uses it as is), and the host holds exactly LAYERS inputs (BATCH x SEQ x HIDDEN fp32
    each). The host buffers are kept for reuse: a second micro-batch allocates none."""
    live_after_forward = {}
    one_input = BATCH * SEQ * HIDDEN * 4
    for mode in ("checkpoint", "offload"):
        offloader = ActivationOffloader()
        model = tiny_model(mode, offloader)
        meter = LiveTensorBytes()
        with meter:
            loss = model(input_ids=ids(), labels=ids()).loss
            live_after_forward[mode] = meter.live_bytes
            host_after_forward = meter.host_live_bytes
            loss.backward()
            del loss
            if mode == "offload":
                model(input_ids=ids(), labels=ids()).loss.backward()
        if mode == "offload":
            assert host_after_forward == LAYERS * one_input
            assert meter.host_peak_bytes == meter.host_live_bytes == LAYERS * one_input
            assert offloader.host_buffers_allocated == LAYERS
            assert offloader.release_host_buffers() == LAYERS
    assert live_after_forward["checkpoint"] - live_after_forward["offload"] == (LAYERS - 1) * one_input


class FakeTransfers:
    """Transfers that copy at once (like HostCopies) and log, in one list with the layer events of `watch`, each
    copy and each wait of the compute stream: ("to_host", i), ("to_device", i), ("wait", "to_host" | "to_device",
    i), where i counts the copies to the host in order (the layer, in one forward)."""

    def __init__(self, log: list):
        self.log = log
        self._host_index: dict[int, int] = {}

    def to_host(self, src, dst):
        index = self._host_index[id(dst)] = len(self._host_index)
        dst.copy_(src)
        self.log.append(("to_host", index))
        return ("to_host", index)

    def to_device(self, src, device):
        index = self._host_index[id(src)]
        self.log.append(("to_device", index))
        return src.to(device, copy=True), ("to_device", index)

    def wait(self, event):
        self.log.append(("wait", *event))


def watch(model, log: list) -> None:
    """Log ("forward", i) when decoder layer i starts its forward (not its recompute) and ("backward_done", i) when
    the gradient of its input is complete."""
    from lowmem.model.int8_linear import inside_backward

    def pre_hook(index):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            if not inside_backward():
                log.append(("forward", index))
                x.register_hook(lambda grad: log.append(("backward_done", index)))
        return hook
    for index, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(pre_hook(index), with_kwargs=True)


def test_copy_schedule_side_stream_order_and_waits():
    """The schedule of the module docstring, recorded by a fake stream provider over one forward and backward of
    LAYERS checkpointed layers: layer i's input leaves as layer i starts (so before layer i + 1); the compute stream
    waits for that copy only when layer i + 1 starts (releasing the input) or, for the last layer, when its kept
    input is used; in the backward, layer i - 1's input is brought back before layer i's backward finishes, and the
    compute stream waits for it only when layer i - 1's recompute asks for it. Gradients as plain checkpointing."""
    log = []
    model = tiny_model("offload", ActivationOffloader(FakeTransfers(log)))
    watch(model, log)
    model(input_ids=ids(), labels=ids()).loss.backward()
    at = {event: position for position, event in enumerate(log)}
    last = LAYERS - 1
    for i in range(LAYERS):
        assert at[("forward", i)] < at[("to_host", i)]        # as layer i starts, before its compute
        if i < last:
            assert at[("to_host", i)] < at[("forward", i + 1)] < at[("wait", "to_host", i)] < at[("to_host", i + 1)]
        if i > 0:
            assert at[("backward_done", i)] > at[("to_device", i - 1)]
            assert at[("backward_done", i)] < at[("wait", "to_device", i - 1)] < at[("backward_done", i - 1)]
    assert at[("to_host", last)] < at[("wait", "to_host", last)] < at[("backward_done", last)]
    waits = [event for event in log if event[0] == "wait"]
    assert waits == [("wait", "to_host", i) for i in range(LAYERS)] + [("wait", "to_device", i)
                                                                        for i in reversed(range(LAYERS - 1))]
    assert sum(event[0] == "to_device" for event in log) == LAYERS - 1    # the last layer's input never left
    assert len(log) == len(at)                                             # every event once
    reference = tiny_model("checkpoint")
    reference(input_ids=ids(), labels=ids()).loss.backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), reference.parameters()))


def test_a_retained_graph_unpacks_again_from_the_host_copy():
    log = []
    model = tiny_model("offload", ActivationOffloader(FakeTransfers(log)))
    loss = model(input_ids=ids(), labels=ids()).loss
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss.backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), first))
    assert sum(event[0] == "to_device" for event in log) == (LAYERS - 1) + LAYERS


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_side_stream_offload_is_bit_identical_and_uses_pinned_reused_buffers():
    results = {}
    for mode in ("checkpoint", "offload"):
        offloader = ActivationOffloader()
        model = tiny_model(mode, offloader).cuda()
        for _ in range(2):
            model.zero_grad()
            model(input_ids=ids().cuda(), labels=ids().cuda()).loss.backward()
        results[mode] = [p.grad.cpu() for p in model.parameters()]
        if mode == "offload":
            assert offloader.host_buffers_allocated == LAYERS
            assert all(buffer.is_pinned() for pool in offloader._pools.values() for buffer in pool)
            transfers = offloader.transfers_for(next(model.parameters()).device)
            assert transfers.side != torch.cuda.current_stream()
    assert all(torch.equal(a, b) for a, b in zip(results["checkpoint"], results["offload"]))


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
