"""Coverage over every decoder type of architecture_matrix (tiny random configs, no download): prepare -> 5 steps ->
every trained tensor moved -> the export launch.finetune writes (Runtime.export) -> from_pretrained -> logits equal to
the trained in-memory model within bf16 rounding; cross-head projection on q and k wherever the model has them; the
fused loss equals the model's own loss, or is refused naming the model type and `fused_loss=false`. README.md's
table of supported architectures is the one this matrix generates."""
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hooks.runtime import prepare
from lowmem.config import LowMemConfig
from lowmem.model.fused_loss import causal_lm_loss, logit_factor
from tests.unit.lowmem.model.architecture_matrix import (
    FUSED_LOSS_REFUSED,
    MATRIX,
    NO_CROSS_HEAD,
    VOCAB,
    readme_table,
    tiny_model,
)

STEPS = 5
# The export rounds every weight once to bf16 (relative error <= u = 2**-9) from the fp32 value the in-memory model
# computes with. A logit is a chain of ~20 such factors whose first-order errors add with mostly random signs: a few
# u of max|logits| (measured over this matrix: 0.4 u to 3.6 u, olmo2 the largest). Allowed: 8 u of max|logits|
# (2**-6): a transposed, swapped or mis-interleaved projection changes logits by about max|logits| itself.
LOGIT_TOL_OF_MAX = 8 * 2.0**-9
# fp32 fused loss vs the model's loss: the same sums in another order over vocabulary blocks (test_fused_loss.py).
LOSS_RTOL = 1e-5


@pytest.fixture(autouse=True)
def _compiled_kernels_back_on():
    """_config() runs the eager kernel twins (compile=False, a process-wide switch: quant.compiled.set_enabled);
    later tests in the same process expect the default back."""
    yield
    from quant import compiled

    compiled.set_enabled(True)


def _config():
    return LowMemConfig(rank=8, lr=1e-2, warmup_steps=0, lr_schedule="constant", refresh_interval_steps=2,
                        residual_warmup_steps=2, weight_block_size=32, moment_block_size=64, projector_group_size=64,
                        compile=False, seed=3)


def _batches(seed=7, batch=2, seq=12):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (batch, seq), generator=gen) for _ in range(STEPS)]


def _snapshot(runtime):
    """Every trained tensor by name: INT8 codes and scales of a low-rank INT8 weight, the value of anything else."""
    out = {}
    for item in runtime.trainables:
        if item.kind == "lowrank_int8":
            out[item.name] = (item.module.weight_q.clone(), item.module.weight_scales.clone())
        else:
            out[item.name] = (item.tensor.detach().clone(),)
    return out


def _loss(model, ids):
    try:
        logit_factor(model)
    except ValueError:
        return model(input_ids=ids, labels=ids).loss
    return causal_lm_loss(model, ids)


@pytest.mark.parametrize("model_type", list(MATRIX))
def test_prepare_train_export_reload(model_type, tmp_path):
    model = tiny_model(model_type)
    if model_type in NO_CROSS_HEAD:
        with pytest.warns(UserWarning, match=f"cross-head projection is off for model_type '{model_type}'") as seen:
            runtime = prepare(model, _config())
        assert sum("cross-head" in str(w.message) for w in seen) == 1   # said once, not once per layer
    else:
        runtime = prepare(model, _config())

    # Every parameter is trained: each one is (or was converted into) a tensor of the runtime's table.
    trained = {item.name for item in runtime.trainables}
    for name, param in model.named_parameters():
        assert name in trained, f"{model_type}: {name} is not trained"
    assert any(item.kind == "lowrank_int8" for item in runtime.trainables)

    # Cross-head projection on every q and k (split out of a fused projection where there is one).
    cross = {item.name for item in runtime.trainables if item.spec is not None and item.spec.cross_head is not None}
    layers = model.config.num_hidden_layers
    if model_type in NO_CROSS_HEAD:
        assert not cross
    else:
        assert len(cross) == 2 * layers, sorted(cross)
        assert {name.rsplit(".", 2)[-2] for name in cross} == {"q_proj", "k_proj"}

    before = _snapshot(runtime)
    for ids in _batches():
        with runtime.micro_batch():
            runtime.backward(_loss(model, ids))
        stats = runtime.step()
        assert stats.get("skipped", False) is False
    after = _snapshot(runtime)
    unmoved = [name for name in before if all(torch.equal(a, b) for a, b in zip(before[name], after[name]))]
    assert not unmoved, f"{model_type}: not updated in {STEPS} steps: {unmoved}"

    exported = runtime.export(tmp_path / "model")
    model.eval()
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        expected = model(input_ids=ids).logits.float()
        reloaded = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
        got = reloaded(input_ids=ids).logits.float()
    assert type(reloaded).__name__ == type(model).__name__
    error = float((got - expected).abs().max() / expected.abs().max())
    assert error <= LOGIT_TOL_OF_MAX, f"{model_type}: logits differ by {error / 2**-9:.2f} u of max|logits|"


@pytest.mark.parametrize("model_type", list(MATRIX))
def test_fused_loss_equals_the_models_own_or_is_refused(model_type):
    model = tiny_model(model_type).eval()
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    if model_type in FUSED_LOSS_REFUSED:
        with pytest.raises(ValueError) as err:
            causal_lm_loss(model, ids)
        assert repr(model_type) in str(err.value) and "fused_loss=false" in str(err.value)
        assert FUSED_LOSS_REFUSED[model_type] in str(err.value)
        return
    with torch.no_grad():
        reference = model(input_ids=ids, labels=ids).loss
        fused = causal_lm_loss(model, ids)
    assert abs(float(fused) - float(reference)) <= LOSS_RTOL * abs(float(reference))


def test_readme_table_is_current():
    readme = (Path(__file__).resolve().parents[4] / "README.md").read_text(encoding="utf-8")
    table = readme_table()
    assert table in readme, ("README.md's table of supported architectures is stale; regenerate it with "
                             "`python -m tests.unit.lowmem.model.architecture_matrix`:\n" + table)


@pytest.mark.parametrize("model_type", ["gemma", "gemma3_text"])
def test_untied_scaled_embedding_stays_float_and_keeps_its_scale(model_type):
    """Gemma's embedding multiplies by sqrt(hidden) in its own forward; an INT8 lookup would drop that, so an untied
    one stays a float parameter (full-rank AdamW) and prepare() leaves the logits as they were."""
    model = tiny_model(model_type, tie_word_embeddings=False).eval()
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    runtime = prepare(model, _config())
    kinds = {item.name: item.kind for item in runtime.trainables}
    assert kinds["model.embed_tokens.weight"] == "float"
    assert type(model.get_input_embeddings()).__name__.endswith("ScaledWordEmbedding")
    with torch.no_grad():
        after = model(input_ids=ids).logits
    # Only the linears' INT8 rounding differs (measured 0.0015 and 0.020 of max|logits|); dropping the sqrt(64) = 8x
    # scale changes the logits by 0.81 and 0.22 of max|logits|.
    assert float((after - before).abs().max() / before.abs().max()) < 0.1
