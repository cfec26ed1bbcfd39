"""No op that waits for the device in a whole optimizer step (forward, backward, step()), one process, every path:
fused and plain loss, float and INT8 head, Int8Embedding, residuals (on q/k, and on every weight), each clip mode,
accumulation 1 and 2, activation offload, a refresh step (DESIGN §3.7; the auditor is lowmem.diagnostics).

Ordinary steps: no hit at all; the allowed waits are step()'s one read of the step's statistics and, on the fused
loss without an attention mask, one read per forward inside transformers (masking_utils' packed-sequence check:
the model library's code, which lowmem cannot change; the plain path skips it because Hugging Face then builds a
KV cache). A refresh step may add the range finder's waits, each listed by name: its fallback decision (one read
per refreshed weight) and the small SVD of the sketch's triangular factor (torch checks the solver's info on the
host), at most power_iters + 1 per refreshed weight; under accumulation, the Rayleigh-Ritz SVD of the accumulated
sketch (one per refreshed weight).
The data-parallel paths (ZeRO 0-3 over 2 gloo processes) are in tests/integration/distributed.
"""
import pytest
import torch

from hooks.runtime import prepare
from lowmem.diagnostics import AllowedWait, DeviceWaitAuditor
from lowmem.model.fused_loss import causal_lm_loss
from lowmem.model.offload import enable_offloaded_checkpointing
from tests.unit.hooks.sync_counter import host_state_tensors
from tests.unit.hooks.test_no_sync import config
from tests.unit.hooks.test_runtime import tiny_llama, token_batches, weights

STEP_READ = AllowedWait("tolist", "hooks/runtime.py:_host_values")
HF_PACKED_CHECK = AllowedWait("_local_scalar_dense", "transformers/masking_utils.py:find_packed_sequence_indices")
REFRESH_FALLBACK_READ = AllowedWait("tolist", "lowmem/optim/rsvd.py:resolve_subspaces")
REFRESH_SMALL_SVD = AllowedWait("_linalg_svd", "lowmem/optim/rsvd.py:_top_right")
RAYLEIGH_RITZ_SVD = AllowedWait("_linalg_svd", "lowmem/optim/lowrank.py:_settle_projection")
ALLOWED = (STEP_READ, HF_PACKED_CHECK, REFRESH_FALLBACK_READ, REFRESH_SMALL_SVD, RAYLEIGH_RITZ_SVD)


def audited_step(runtime, model, batches, *, fused: bool):
    """One optimizer step (forward, backward, step()) under the auditor -> (stats, auditor)."""
    audit = DeviceWaitAuditor(host_state_tensors(runtime), allowed=ALLOWED)
    with audit:
        for ids in batches:
            with runtime.micro_batch():
                loss = causal_lm_loss(model, ids) if fused else model(input_ids=ids, labels=ids).loss
                runtime.backward(loss / len(batches))
        stats = runtime.step()
    return stats, audit


def check_ordinary(stats, audit, *, fused: bool, micro_batches: int) -> None:
    assert audit.hits == [], audit.report()
    assert not stats["skipped"] and stats["refreshed"] == []
    expected = {"tolist": 1}
    if fused:
        expected["_local_scalar_dense"] = micro_batches
    assert audit.counts(allowed=True) == expected, audit.report()


def check_refresh(stats, audit, runtime, *, fused: bool, micro_batches: int) -> None:
    assert audit.hits == [], audit.report()
    refreshed = len(stats["refreshed"])
    assert refreshed > 0
    by_place = {}
    for wait in audit.allowed_hits:
        by_place[(wait.op, wait.where if wait.via is None else wait.via)] = by_place.get(
            (wait.op, wait.where if wait.via is None else wait.via), 0) + 1
    assert by_place.pop(("tolist", STEP_READ.where)) == 1
    if fused:
        assert by_place.pop(("_local_scalar_dense", HF_PACKED_CHECK.where)) == micro_batches
    assert by_place.pop(("tolist", REFRESH_FALLBACK_READ.where)) == refreshed
    svds = by_place.pop(("_linalg_svd", REFRESH_SMALL_SVD.where))
    assert refreshed <= svds <= (runtime.config.power_iters + 1) * refreshed
    rayleigh_ritz = by_place.pop(("_linalg_svd", RAYLEIGH_RITZ_SVD.where), 0)
    uses_rayleigh_ritz = micro_batches > 1 and runtime.config.refresh_sketch == "rayleigh_ritz"
    assert rayleigh_ritz == (refreshed if uses_rayleigh_ritz else 0), audit.report()
    assert by_place == {}, audit.report()


def run_three_steps(model, cfg, *, fused: bool):
    """Step 0 refreshes every low-rank weight; steps 1 and 2 are ordinary (residual indices chosen at step 0's
    commit, so they run the residual path too)."""
    runtime = prepare(model, cfg)
    accum = cfg.grad_accum_steps
    batches = token_batches(3 * accum)
    stats, audit = audited_step(runtime, model, batches[:accum], fused=fused)
    check_refresh(stats, audit, runtime, fused=fused, micro_batches=accum)
    for k in (1, 2):
        before = weights(model)
        stats, audit = audited_step(runtime, model, batches[k * accum:(k + 1) * accum], fused=fused)
        check_ordinary(stats, audit, fused=fused, micro_batches=accum)
        assert stats["layers_written"] == len(runtime.trainables)
        after = weights(model)
        assert any(not torch.equal(before[name], after[name]) for name in before)
    return runtime


@pytest.mark.parametrize("grad_accum_steps", [1, 2])
@pytest.mark.parametrize("clip_mode", ["per_tensor", "two_pass", "none"])
def test_fused_loss_int8_head_int8_embedding_residuals_everywhere(clip_mode, grad_accum_steps):
    """The widest path: INT8 head under the fused loss (SoftmaxCEGrad), Int8Embedding (RowScatterGrad), sparse
    residuals on every low-rank weight (their gathers run on both operators)."""
    model = tiny_llama()
    cfg = config(clip_mode, grad_accum_steps, exclude_modules=(), residual_modules=("*",))
    runtime = run_three_steps(model, cfg, fused=True)
    kinds = {item.name: (item.kind, item.spec.residual if item.kind != "float" else None)
             for item in runtime.trainables}
    assert kinds["lm_head.weight"] == ("lowrank_int8", True)
    assert kinds["model.embed_tokens.weight"][0] == "lowrank_int8" and kinds["model.embed_tokens.weight"][1]


@pytest.mark.parametrize("grad_accum_steps", [1, 2])
@pytest.mark.parametrize("fused", [True, False])
def test_float_head_default_residuals(fused, grad_accum_steps):
    """The default preset: float head (8-bit AdamW), INT8 embedding, residuals on q/k; fused and plain loss."""
    model = tiny_llama()
    runtime = run_three_steps(model, config("per_tensor", grad_accum_steps), fused=fused)
    assert {item.name: item.kind for item in runtime.trainables}["lm_head.weight"] == "float"


def test_plain_loss_int8_head_tied_float_embedding():
    """Plain loss with an INT8 head (FactoredGrad) and a tied float embedding."""
    model = tiny_llama(tie=True)
    run_three_steps(model, config("two_pass", 1, exclude_modules=()), fused=False)


def test_activation_offload():
    """Offloaded checkpointing (lowmem.model.offload) runs on the CPU as well (its copies are then host to host,
    which the auditor cannot tell from a device read: on CUDA they are non_blocking from pinned memory)."""
    model = tiny_llama()
    model.train()
    assert enable_offloaded_checkpointing(model) >= 2
    run_three_steps(model, config("per_tensor", 2), fused=True)


@pytest.mark.parametrize("clip_mode", ["per_tensor", "two_pass"])
def test_refresh_with_a_previous_projector(clip_mode):
    """Every weight refreshes every step: the second refresh compares the new projector with the old one (the
    lazy policy's similarity). per_tensor defers it to step()'s one read; two_pass commits in step() and reads it
    once per refreshed weight (listed by name)."""
    similarity = AllowedWait("_local_scalar_dense", "lowmem/optim/rsvd.py:subspace_similarity")
    model = tiny_llama()
    runtime = prepare(model, config(clip_mode, 1, refresh="fixed", refresh_interval_steps=1))
    batches = token_batches(2)
    audited_step(runtime, model, batches[:1], fused=False)
    audit = DeviceWaitAuditor(host_state_tensors(runtime), allowed=ALLOWED + (similarity,))
    with audit:
        with runtime.micro_batch():
            runtime.backward(model(input_ids=batches[1], labels=batches[1]).loss)
        stats = runtime.step()
    assert audit.hits == [], audit.report()
    refreshed = len(stats["refreshed"])
    assert refreshed == sum(item.kind != "float" for item in runtime.trainables)
    counts = {}
    for wait in audit.allowed_hits:
        counts[(wait.op, wait.where)] = counts.get((wait.op, wait.where), 0) + 1
    assert counts.pop(("tolist", REFRESH_FALLBACK_READ.where)) == refreshed
    assert counts.pop(("tolist", STEP_READ.where)) == 1
    assert counts.pop(("_local_scalar_dense", similarity.where), 0) == (refreshed if clip_mode == "two_pass" else 0)
    assert set(counts) == {("_linalg_svd", REFRESH_SMALL_SVD.where)}, audit.report()


def test_an_injected_nonzero_in_the_backward_is_caught(monkeypatch):
    """The audit is not vacuous: one `nonzero` slipped into every low-rank commit shows up, with its caller."""
    import hooks.runtime as runtime_module
    original = runtime_module.settle_

    def settle_with_a_wait(spec, cfg, accum):
        grad_sq = original(spec, cfg, accum)
        torch.nonzero(grad_sq.reshape(1) > 0)
        return grad_sq

    model = tiny_llama()
    runtime = prepare(model, config("per_tensor", 1))
    batches = token_batches(2)
    audited_step(runtime, model, batches[:1], fused=False)
    monkeypatch.setattr(runtime_module, "settle_", settle_with_a_wait)
    stats, audit = audited_step(runtime, model, batches[1:], fused=False)
    lowrank = sum(item.kind != "float" for item in runtime.trainables)
    assert audit.counts() == {"nonzero": lowrank}
    assert {wait.where for wait in audit.hits} == {"hooks/runtime.py:_commit_lowrank_on_device"}
    with pytest.raises(AssertionError, match="nonzero at hooks/runtime.py"):
        check_ordinary(stats, audit, fused=False, micro_batches=1)
