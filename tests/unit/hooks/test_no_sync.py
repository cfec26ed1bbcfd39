"""No host-device synchronisation inside backward (one process), for every clip mode and accumulation 1 and 2.

On the CPU every Tensor -> Python conversion is counted (sync_counter: on CUDA each one would wait for the stream);
the `gpu` variant runs the same steps under torch.cuda.set_sync_debug_mode("error"), which raises on any
synchronising CUDA call. Ordinary steps must show zero. A refresh step reads the device once per refreshed weight
(hooks/runtime.py docstring): the range finder's fallback decision; the commit's refresh bookkeeping waits for
step()'s read. Reads inductor makes while compiling a new graph (first use in a process with a cold FX-graph
cache) are no part of a step and are counted apart (sync_counter.SyncCounter.compile_calls).
"""
import pytest
import torch

from hooks.runtime import prepare
from lowmem.presets import preset
from tests.unit.hooks.sync_counter import SyncCounter, host_state_tensors
from tests.unit.hooks.test_runtime import tiny_llama, token_batches, weights

CLIP_MODES = ("per_tensor", "two_pass", "none")


def config(clip_mode, grad_accum_steps, **kw):
    # One refresh (step 0: no projector yet), none after; residual indices chosen at the first commit, so later
    # steps run the residual path (gather, exact residual step, sparse write) too.
    base = dict(rank=8, lr=3e-3, refresh_interval_steps=1000, stagger=False, residual_warmup_steps=1,
                residual_ratio=0.05, weight_block_size=32, moment_block_size=64, projector_group_size=64,
                clip_mode=clip_mode, grad_accum_steps=grad_accum_steps, grad_clip=0.05)
    base.update(kw)
    return preset("lowmem", **base)


def run_step(runtime, model, batches, counter=None):
    """One optimizer step; the backward calls (runtime.backward, i.e. the loss guard too) run under `counter`."""
    for ids in batches:
        with runtime.micro_batch():
            loss = model(input_ids=ids, labels=ids).loss
            if counter is None:
                runtime.backward(loss)
            else:
                with counter.counting():
                    runtime.backward(loss)
    return runtime.step()


@pytest.mark.parametrize("grad_accum_steps", [1, 2])
@pytest.mark.parametrize("clip_mode", CLIP_MODES)
def test_backward_never_synchronises(clip_mode, grad_accum_steps):
    model = tiny_llama()
    runtime = prepare(model, config(clip_mode, grad_accum_steps))
    batches = token_batches(3 * grad_accum_steps)
    steps = [batches[i:i + grad_accum_steps] for i in range(0, len(batches), grad_accum_steps)]

    refresh = SyncCounter(host_state_tensors(runtime))
    stats = run_step(runtime, model, steps[0], refresh)
    assert len(stats["refreshed"]) > 0
    # The counter sees the runtime's own reads: exactly the stated ones on the refresh step.
    assert len(refresh.calls) == len(stats["refreshed"]), refresh.calls

    for batch in steps[1:]:
        before = weights(model)
        counter = SyncCounter(host_state_tensors(runtime))
        stats = run_step(runtime, model, batch, counter)
        assert counter.calls == [], counter.calls
        assert not stats["skipped"] and stats["refreshed"] == [] and stats["grad_norm"] > 0
        assert stats["layers_written"] == len(runtime.trainables)
        after = weights(model)
        assert any(not torch.equal(before[k], after[k]) for k in before)   # the step really wrote


@pytest.mark.parametrize("grad_accum_steps", [1, 2])
def test_refresh_with_a_previous_projector_reads_once_per_weight(grad_accum_steps):
    """A refresh that has a previous projector runs more than one range finder for a cross-head weight (q/k: the
    new heads' subspace and the old heads' one, for the lazy policy's like-for-like similarity); their fallback
    decisions are read together, so such a step still reads the device once per refreshed weight."""
    model = tiny_llama()
    runtime = prepare(model, config("per_tensor", grad_accum_steps, refresh="fixed", refresh_interval_steps=1))
    batches = token_batches(2 * grad_accum_steps)
    run_step(runtime, model, batches[:grad_accum_steps])
    cross_head = [item for item in runtime.trainables if getattr(item.spec, "cross_head", None) is not None]
    assert cross_head and all("proj_heads" in runtime.states[item.index] for item in cross_head)
    counter = SyncCounter(host_state_tensors(runtime))
    stats = run_step(runtime, model, batches[grad_accum_steps:], counter)
    assert not stats["skipped"] and {item.name for item in cross_head} <= set(stats["refreshed"])
    assert len(counter.calls) == len(stats["refreshed"]), counter.calls


def poison_layer_input(model, layer_index):
    """NaN into the gradient that leaves decoder layer `layer_index` towards the layers below it... and itself:
    the hook sits on the layer's output, so that layer's own weight gradients are NaN too."""
    def forward_hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden.register_hook(lambda g: g * float("nan"))
    return model.model.layers[layer_index].register_forward_hook(forward_hook)


@pytest.mark.parametrize("clip_mode", CLIP_MODES)
def test_nonfinite_layer_skips_it_and_every_later_one_without_synchronising(clip_mode):
    """The documented semantics, decided on the device: the first non-finite layer and every layer after it in the
    backward keep their old bytes and state (two_pass: nothing is written), the step is reported skipped, and the
    layers before it (lm_head, final norm) are written."""
    model = tiny_llama()
    runtime = prepare(model, config(clip_mode, 1))
    batches = token_batches(2)
    run_step(runtime, model, batches[:1])
    before = weights(model)
    steps_before = {item.name: int(runtime.states[item.index]["step"]) for item in runtime.trainables}
    handle = poison_layer_input(model, 1)
    counter = SyncCounter(host_state_tensors(runtime))
    stats = run_step(runtime, model, batches[1:], counter)
    handle.remove()
    assert counter.calls == [], counter.calls
    assert stats["skipped"] and runtime.skipped_steps == 1
    assert len(stats["nonfinite"]) == 1
    after = weights(model)
    steps_after = {item.name: int(runtime.states[item.index]["step"]) for item in runtime.trainables}
    below = [k for k in before if k.startswith(("model.layers.", "model.embed_tokens"))]
    assert below and all(torch.equal(before[k], after[k]) for k in below)
    assert all(steps_after[k] == steps_before[k] for k in steps_after if k.startswith(("model.layers.",
                                                                                         "model.embed")))
    written = [k for k in before if k.startswith(("lm_head", "model.norm"))]
    if clip_mode == "two_pass":
        assert stats["nonfinite"] == ["gradient (two_pass: nothing written)"]
        assert stats["layers_written"] == 0 and all(torch.equal(before[k], after[k]) for k in written)
        assert steps_after == steps_before
    else:
        assert stats["nonfinite"][0].startswith("model.layers.1.")
        assert all(not torch.equal(before[k], after[k]) for k in written)
        assert stats["layers_written"] == 2 == sum(steps_after[k] > steps_before[k] for k in steps_after)
    assert all(torch.isfinite(t).all() for s in runtime.states.values() for k, t in s.items()
               if t.is_floating_point() and "similarity" not in k)
    # The next step trains normally.
    stats = run_step(runtime, model, batches[:1])
    assert not stats["skipped"] and stats["layers_written"] == len(runtime.trainables)


@pytest.mark.gpu
@pytest.mark.parametrize("grad_accum_steps", [1, 2])
@pytest.mark.parametrize("clip_mode", CLIP_MODES)
def test_backward_never_synchronises_cuda(clip_mode, grad_accum_steps):
    model = tiny_llama().cuda()
    runtime = prepare(model, config(clip_mode, grad_accum_steps))
    batches = [ids.cuda() for ids in token_batches(3 * grad_accum_steps)]
    steps = [batches[i:i + grad_accum_steps] for i in range(0, len(batches), grad_accum_steps)]
    run_step(runtime, model, steps[0])        # refresh step: allowed its stated reads
    for batch in steps[1:]:
        for ids in batch:
            with runtime.micro_batch():
                loss = model(input_ids=ids, labels=ids).loss
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    runtime.backward(loss)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
        stats = runtime.step()
        assert not stats["skipped"] and stats["layers_written"] == len(runtime.trainables)


def same(a, b):
    """Bit-equal values, NaN matching NaN (unset similarity slots are NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
    return torch.equal(a, b)


@pytest.mark.parametrize("clip_mode", ["per_tensor", "none"])
def test_nonfinite_refresh_step_books_nothing_for_skipped_layers(clip_mode):
    """Every weight refreshes every step here: a skipped weight's refresh (policy record, stored projector,
    counters, a residual selection) is put back at step()'s read; written weights book theirs."""
    model = tiny_llama()
    runtime = prepare(model, config(clip_mode, 1, refresh="fixed", refresh_interval_steps=1, residual_warmup_steps=2))
    batches = token_batches(2)
    run_step(runtime, model, batches[:1])
    before = {item.name: {k: v.clone() for k, v in runtime.states[item.index].items()}
              for item in runtime.trainables}
    handle = poison_layer_input(model, 1)
    counter = SyncCounter(host_state_tensors(runtime))
    stats = run_step(runtime, model, batches[1:], counter)
    handle.remove()
    lowrank = [item for item in runtime.trainables if item.kind == "lowrank_int8"]
    assert stats["skipped"] and stats["refreshed"] == []     # every low-rank weight sits below the poisoned output
    # at most the range finders' reads (a NaN sketch makes the small SVD raise: the fallback needs no read)
    assert len(counter.calls) <= len(lowrank), counter.calls
    for item in lowrank:
        state = runtime.states[item.index]
        assert set(state) == set(before[item.name]), item.name          # no residual selection kept
        assert all(same(state[k], before[item.name][k]) for k in state), item.name
    stats = run_step(runtime, model, batches[:1])
    assert not stats["skipped"] and len(stats["refreshed"]) == len(lowrank)
    assert all("res_idx" in runtime.states[item.index] for item in lowrank if item.spec.residual)
