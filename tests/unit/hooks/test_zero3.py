"""hooks.zero3 on one process: rank 0 of a pretend pair, the other rank's weights arriving through a fake broadcast.
Gathers per micro-batch with and without gradient checkpointing, no prefetch thrown away once the trace is known,
and the same weights bit for bit as the unpartitioned model. The 2-process gloo run of the same claims:
tests/integration/distributed/test_data_parallel.py::test_zero3_under_checkpointing_*."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hooks.zero3 import WeightPartition
from lowmem.model.int8_linear import Int8Linear
from lowmem.model.surgery import convert_linears_to_int8
from lowmem.presets import preset

LAYERS, MICRO_BATCHES = 2, 4


class _Work:
    def wait(self) -> None:
        pass


class FakeComm:
    """Rank 0 of 2. A broadcast from rank 1 fills the buffer with `sending` (codes, then scales: what rank 1 sends
    for the gather under way)."""

    rank, world_size = 0, 2

    def __init__(self):
        self.sending: list[torch.Tensor] = []
        self.broadcasts = 0

    def broadcast_(self, tensor, src, async_op=False):
        self.broadcasts += 1
        if src != self.rank:
            tensor.copy_(self.sending.pop(0))
        return _Work() if async_op else None


def tiny_model(checkpointing: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                         max_position_embeddings=64, tie_word_embeddings=False))
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def partitioned(model, remote: dict) -> WeightPartition:
    """Every other Int8Linear owned by rank 1; `remote` holds rank 1's codes of each (the test keeps them current),
    delivered by the fake broadcast."""
    linears = [m for m in model.modules() if isinstance(m, Int8Linear)]
    owners = {m: i % 2 for i, m in enumerate(linears)}
    remote.update({m: (m.weight_q, m.weight_scales) for m in linears if owners[m] == 1})
    comm = FakeComm()
    part = WeightPartition(comm, owners)
    start = part._start

    def start_with_delivery(module):
        comm.sending = list(remote.get(module, ()))
        return start(module)
    part._start = start_with_delivery
    return part


def int8_model(checkpointing: bool) -> LlamaForCausalLM:
    """The decoder linears as Int8Linear (no runtime: the weights stay what both pretend ranks hold), the float
    parameters collecting ordinary gradients."""
    model = tiny_model(checkpointing)
    convert_linears_to_int8(model, preset("lowmem", rank=8))
    return model


def train(checkpointing: bool, partition: bool, micro_batches: int = MICRO_BATCHES):
    """Per micro-batch: gathers, losses and every float parameter's gradient (each decoder layer's input gradient
    feeds the norms and the embedding); and the partition."""
    model = int8_model(checkpointing)
    part = partitioned(model, {}) if partition else None
    gathers, losses, grads = [], [], []
    for k in range(micro_batches):
        ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(k))
        before = part.gathers if part else 0
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if part:
            part.flush()
        gathers.append(part.gathers - before if part else 0)
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    return gathers, part, losses, grads


@pytest.mark.parametrize("checkpointing", [False, True])
def test_each_weight_is_gathered_twice_per_micro_batch_and_no_prefetch_is_thrown_away(checkpointing):
    """The INT8 embedding once (its backward needs no weight), each decoder linear for its forward and its backward
    (under checkpointing: forward and recompute, whose codes the backward takes). The first micro-batch gathers on
    demand, the later ones follow its trace: every request but the first prefetched. Without checkpointing the last
    layer's down_proj is asked for twice in a row (its forward, then the first backward): from the second
    micro-batch on the trace says so and its codes stay."""
    gathers, part, _, _ = train(checkpointing, partition=True)
    linears = 7 * LAYERS
    requests = 1 + 2 * linears
    reused = 0 if checkpointing else 1
    assert gathers == [requests] + [requests - reused] * (MICRO_BATCHES - 1)
    assert part.prefetch_discards == 0
    assert part.prefetch_hits == (MICRO_BATCHES - 1) * (requests - 1 - reused)
    assert len(part.trace) == requests


@pytest.mark.parametrize("checkpointing", [False, True])
def test_partitioned_training_is_bit_identical_to_the_whole_model(checkpointing):
    _, _, losses, grads = train(checkpointing, partition=True)
    _, _, ref_losses, ref_grads = train(False, partition=False)
    assert losses == ref_losses
    assert all(len(a) == len(b) > 2 * LAYERS for a, b in zip(grads, ref_grads))
    assert all(torch.equal(a, b) for step, ref in zip(grads, ref_grads) for a, b in zip(step, ref))


def test_an_evaluation_forward_leaves_the_trace_without_a_wrong_collective():
    """A no-grad forward between training micro-batches follows the forward part of the trace, then stops; the
    training micro-batch after it is prefetched again from its second request on."""
    model = int8_model(True)
    part = partitioned(model, {})
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        model(input_ids=ids)
    part.flush()
    assert part.prefetch_discards == 1      # the last layer's recompute, predicted after its forward, dropped
    hits = part.prefetch_hits
    model(input_ids=ids, labels=ids).loss.backward()
    part.flush()
    assert part.prefetch_discards == 1
    forward_requests = 1 + 7 * LAYERS      # the embedding and the decoder linears
    assert part.prefetch_hits - hits == forward_requests - 1   # the evaluation's trace, then on demand
