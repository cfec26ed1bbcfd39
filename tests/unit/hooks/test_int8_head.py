"""The LM head under the fused runtime: an untied head is a low-rank INT8 linear whose gradient arrives as the fused
loss's recomputing operator; a tied head stays the embedding's float weight. Both train the same as the plain path
(model(...).loss, whose head gradient arrives as factors), step for step: the two gradients differ only in summation
order (fp32), far below the stochastic-rounding step, so the written codes agree except at rare rounding ties."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hooks.runtime import prepare
from lowmem.model.fused_loss import causal_lm_loss
from lowmem.model.int8_linear import Int8Linear
from lowmem.presets import preset


def _model(tied):
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, tie_word_embeddings=tied, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).float()


def _train(tied, fused, steps=4, **changes):
    model = _model(tied)
    runtime = prepare(model, preset("lowmem", rank=16, lr=1e-3, **changes))
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))   # one batch: loss must fall
    losses = []
    for _ in range(steps):
        with runtime.micro_batch():
            loss = causal_lm_loss(model, ids, ids) if fused else model(input_ids=ids, labels=ids).loss
            runtime.backward(loss)
        losses.append(runtime.step()["loss"])
    return model, runtime, losses


@pytest.mark.parametrize("tied", [False, True])
def test_head_kind_and_fused_training_follows_the_plain_path(tied):
    plain_model, plain_rt, plain_losses = _train(tied, fused=False)
    model, runtime, losses = _train(tied, fused=True)
    kinds = {item.name: item.kind for item in runtime.trainables}
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert "lm_head.weight" not in kinds and kinds["model.embed_tokens.weight"] == "float"
    else:
        assert isinstance(model.lm_head, Int8Linear) and kinds["lm_head.weight"] == "lowrank_int8"
        assert kinds["model.embed_tokens.weight"] == "float"
    assert losses[-1] < losses[0]
    assert losses == pytest.approx(plain_losses, rel=1e-4)
    if tied:
        # Adam normalises: where a gradient entry is ~0, rounding-level differences move m/sqrt(v) by up to a few
        # percent of lr per step (lr 1e-3, 4 steps): bound 0.1 * lr, against the weights' own change of ~4 * lr.
        assert float((model.lm_head.weight - plain_model.lm_head.weight).abs().max()) <= 1e-4
    else:
        same = (model.lm_head.weight_q == plain_model.lm_head.weight_q).float().mean()
        assert same >= 0.99, float(same)
        assert torch.allclose(model.lm_head.weight_scales, plain_model.lm_head.weight_scales, rtol=1e-3)


def test_excluding_the_head_keeps_it_float():
    model, runtime, losses = _train(False, fused=True, steps=2, exclude_modules=("*lm_head", "*embed*"))
    assert not isinstance(model.lm_head, Int8Linear)
    assert {item.name: item.kind for item in runtime.trainables}["lm_head.weight"] == "float"
    assert losses[-1] < losses[0]


def test_two_pass_clipping_and_accumulation_with_an_int8_head():
    """Deferred commit: the operator's products all happen in the backward (accumulate), before any write."""
    model = _model(False)
    runtime = prepare(model, preset("lowmem", rank=16, lr=1e-3, clip_mode="two_pass", grad_accum_steps=2))
    g = torch.Generator().manual_seed(1)
    before = model.lm_head.weight_q.clone()
    for _ in range(2):
        ids = torch.randint(0, 300, (2, 24), generator=g)
        with runtime.micro_batch():
            runtime.backward(causal_lm_loss(model, ids, ids) / 2)
    stats = runtime.step()
    assert not stats["skipped"] and stats["layers_written"] == len(runtime.trainables)
    assert not torch.equal(before, model.lm_head.weight_q)
