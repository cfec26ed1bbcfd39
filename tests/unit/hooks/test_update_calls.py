"""Compiled calls per optimizer step (lowmem.optim.fused_update): at most one per trainable weight, and the one-call
update gives the bits of the eager split path it replaces.

The model has rows of whole 256-blocks (hidden 256, intermediate 512), the shape class of the 7B-class models the
one-call path is for; its q/k weights carry sparse residuals (the lowmem preset), so they take the split path.
"""
import collections

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hooks.runtime as runtime_module
from hooks.runtime import prepare
from lowmem.presets import preset
from quant import compiled


def _model(device="cpu"):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(device)


def _train(model, *, compile, steps, counts=None, **overrides):
    """Train `steps` steps; counts (a list): per step, a Counter of the compiled calls made by the optimizer update
    (inside the runtime's commit of an INT8 weight or its float AdamW step), appended step by step."""
    cfg = preset("lowmem", **{**dict(lr=1e-3, rank=64, weight_decay=0.1, refresh_interval_steps=2,
                                     max_refresh_interval_steps=2, stagger=False, compile=compile), **overrides})
    runtime = prepare(model, cfg)
    gen = torch.Generator().manual_seed(1)
    real_call, real_commit, real_float = compiled.call, runtime_module.commit_, runtime_module.float_adamw_update_
    inside = [0]

    def counting(name, *args, **kwargs):
        if inside[0]:
            counts[-1][name] += 1
        return real_call(name, *args, **kwargs)

    def within(fn):
        def run(*args, **kwargs):
            inside[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                inside[0] -= 1
        return run

    for _ in range(steps):
        ids = torch.randint(0, 512, (2, 32), generator=gen).to(next(model.parameters()).device)
        if counts is not None:
            counts.append(collections.Counter())
            compiled.call = counting
            runtime_module.commit_, runtime_module.float_adamw_update_ = within(real_commit), within(real_float)
        try:
            with runtime.micro_batch():
                runtime.backward(model(input_ids=ids, labels=ids).loss)
            runtime.step()
        finally:
            compiled.call = real_call
            runtime_module.commit_, runtime_module.float_adamw_update_ = real_commit, real_float
    return runtime


def test_compiled_calls_per_step_at_most_the_trainable_weights():
    """Counted over steady steps and refresh steps: the compiled calls of the optimizer update per step <= the
    number of trainable weights, and every INT8 weight without residuals is one call. (The forward and backward
    dequantise each INT8 layer through a compiled kernel too: model compute, like its matmuls, not counted here.)"""
    compiled._reset_for_tests()
    counts = []
    runtime = _train(_model(), compile=True, steps=4, counts=counts)
    assert compiled.failure() is None
    trainable = len(runtime.trainables)
    int8 = [item for item in runtime.trainables if item.kind == "lowrank_int8"]
    plain = [item for item in int8 if not item.spec.residual]
    assert len(plain) >= 8 and trainable > len(int8)
    for step, count in enumerate(counts[1:], start=1):
        total = sum(count.values())
        print(f"step {step}: {total} compiled update calls for {trainable} trainable weights: {dict(count)}")
        assert total <= trainable, count
        assert count["lowrank_update"] == len(plain), count


def _bytes(model, runtime):
    out = {f"buffer {k}": v for k, v in model.state_dict().items()}
    for index, state in runtime.states.items():
        out.update({f"state {index} {k}": v for k, v in state.items()})
    return out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])])
@pytest.mark.parametrize("chunk_elements", [None, 1 << 15])
@pytest.mark.parametrize("overrides", [{}, {"stochastic_rounding": False, "weight_decay": 0.0, "rank": 256}])
def test_one_call_update_gives_the_eager_twins_bits(overrides, device, chunk_elements, monkeypatch):
    """Four steps (two with projector refreshes, whose moment reset brings per-coordinate bias masses) with
    compilation on (the one-call update for most weights) and off (the eager split path): every weight byte and
    every state tensor equal. Rank 64 (left and right projections), and full rank without decay or SR; with the
    default update chunks and with chunks that cut the larger weights into four on the split path. On CUDA the
    compiled graph (Triton, with its eager-numerics options, and cuBLAS for the back-projection) against eager CUDA."""
    if chunk_elements is not None:
        # update chunks of 32 Ki elements: the 512 x 256 weights take four row chunks on the eager split path and
        # one call (a whole-weight back-projection) on the compiled path
        from lowmem.optim import weights
        monkeypatch.setattr(weights, "DEFAULT_CHUNK_ELEMENTS", chunk_elements)
        monkeypatch.setattr(weights, "ACCELERATOR_CHUNK_ELEMENTS", chunk_elements)
    compiled._reset_for_tests()
    counts = []
    model_c = _model(device)
    runtime_c = _train(model_c, compile=True, steps=4, counts=counts, **overrides)
    assert compiled.failure() is None and sum(c["lowrank_update"] for c in counts) > 0
    model_e = _model(device)
    runtime_e = _train(model_e, compile=False, steps=4, **overrides)
    got, want = _bytes(model_c, runtime_c), _bytes(model_e, runtime_e)
    assert got.keys() == want.keys()
    # equal_nan: the refresh history holds nan where it is still empty
    different = [k for k in want if not torch.equal(got[k], want[k])
                 and not (got[k].is_floating_point() and torch.allclose(got[k], want[k], rtol=0, atol=0,
                                                                        equal_nan=True))]
    assert not different, different[:5]
    start = _model(device).state_dict()
    assert any(not torch.equal(v, start[k.split(" ", 1)[1]]) for k, v in want.items()
               if k.startswith("buffer") and k.split(" ", 1)[1] in start)
    compiled._reset_for_tests()
