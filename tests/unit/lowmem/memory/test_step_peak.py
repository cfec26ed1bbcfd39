"""Peak memory per optimizer step (lowmem.memory.step_peak): reset at the step's first micro-batch, read in step();
on CUDA the allocator's peak (faked here: the calls and their order are what is tested), on the CPU the resident
set's high-water mark, which a transient allocation before the step no longer inflates."""
import torch

import lowmem.memory.step_peak as step_peak
from hooks.runtime import prepare
from tests.unit.hooks.test_no_sync import config
from tests.unit.hooks.test_runtime import tiny_llama, token_batches


class FakeCudaAllocator:
    def __init__(self):
        self.calls = []
        self.peak = 0

    def reset_peak_memory_stats(self, device=None):
        self.calls.append(("reset", str(device)))
        self.peak = 100

    def max_memory_allocated(self, device=None):
        self.calls.append(("read", str(device)))
        return self.peak


def test_cuda_peak_is_reset_and_read_through_the_allocator(monkeypatch):
    fake = FakeCudaAllocator()
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", fake.reset_peak_memory_stats)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", fake.max_memory_allocated)
    device = torch.device("cuda", 0)
    fake.peak = 10 ** 12          # model loading, earlier steps
    assert step_peak.reset_step_peak(device) is True and step_peak.step_peak_resets(device)
    fake.peak += 5
    assert step_peak.step_peak_bytes(device) == 105
    assert fake.calls == [("reset", "cuda:0"), ("read", "cuda:0")]


def test_runtime_resets_once_per_step_at_its_first_micro_batch(monkeypatch):
    import hooks.runtime as runtime_module
    events = []
    monkeypatch.setattr(runtime_module, "reset_step_peak", lambda device: events.append(("reset", device.type)))
    monkeypatch.setattr(runtime_module, "step_peak_bytes", lambda device: events.append(("read", device.type)) or 7)
    model = tiny_llama()
    runtime = prepare(model, config("per_tensor", 2))
    for step, batch in enumerate(token_batches(4)[::2]):
        for ids in batch.chunk(2):
            with runtime.micro_batch():
                runtime.backward(model(input_ids=ids, labels=ids).loss)
            events.append(("micro", step))
        assert runtime.step()["peak_memory_bytes"] == 7
    assert events == [("reset", "cpu"), ("micro", 0), ("micro", 0), ("read", "cpu"),
                      ("reset", "cpu"), ("micro", 1), ("micro", 1), ("read", "cpu")]


def test_cpu_step_peak_excludes_a_transient_allocation_before_the_step():
    model = tiny_llama()
    runtime = prepare(model, config("per_tensor", 1))
    ids = token_batches(1)[0]
    big = torch.ones(96 * 2 ** 20)            # 384 MiB, touched: resident, then returned to the OS (mmap)
    big += 1
    del big
    lifetime_peak = step_peak.step_peak_bytes(torch.device("cpu"))
    with runtime.micro_batch():
        runtime.backward(model(input_ids=ids, labels=ids).loss)
    peak = runtime.step()["peak_memory_bytes"]
    assert peak > 0
    if step_peak.step_peak_resets(torch.device("cpu")):
        # the step of this tiny model holds far less than the 384 MiB buffer that preceded it
        assert peak < lifetime_peak - 256 * 2 ** 20, (peak, lifetime_peak)
    else:   # no reset possible here (not Linux): the documented fallback is the process-lifetime peak
        assert peak >= lifetime_peak
