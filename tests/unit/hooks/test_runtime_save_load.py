"""Runtime.save(dir) / Runtime.load(dir): exact resume for Python users, in the checkpoint format of
lowmem.checkpoint.store (atomic, sha256 in meta.json)."""
import random
import struct

import pytest
import torch

from hooks.runtime import prepare
from lowmem.checkpoint.store import CheckpointError, list_checkpoints
from tests.unit.hooks.test_runtime import VOCAB, small, tiny_llama


def train_steps(runtime, model, steps, accum):
    """Batches come from torch's global RNG and Python's `random`: a resume that lost either would diverge."""
    for _ in range(steps):
        for _ in range(accum):
            start = torch.randint(0, VOCAB, (4, 1))
            ids = (start + torch.arange(16) + random.randrange(3)) % VOCAB
            with runtime.micro_batch():
                runtime.backward(model(input_ids=ids, labels=ids).loss / accum)
        runtime.step()


def snapshot(model, runtime):
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    states = {(i, k): v.clone() for i, st in runtime.states.items() for k, v in st.items()}
    return weights, states


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for key in a:   # exactly equal; NaN placeholders (unfilled similarity history) count as equal
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, equal_nan=True, msg=str(key))


@pytest.mark.parametrize("name,accum,clip", [("lowmem", 1, "per_tensor"), ("lowmem", 2, "two_pass"),
                                             ("q_galore", 1, "per_tensor")])
def test_save_then_load_into_a_fresh_runtime_continues_bit_identically(tmp_path, name, accum, clip):
    cfg = small(name, grad_accum_steps=accum, clip_mode=clip)
    torch.manual_seed(1)
    random.seed(1)
    model = tiny_llama(seed=0)
    runtime = prepare(model, cfg)
    train_steps(runtime, model, 4, accum)                  # N steps (a projector refresh and the residual warm-up)
    path = runtime.save(tmp_path / "ckpt", meta={"data": {"epoch": 0, "position": 123}})
    assert path.name == "step-00000004" and list_checkpoints(tmp_path / "ckpt") == [path]
    train_steps(runtime, model, 3, accum)                  # M more
    expected_weights, expected_states = snapshot(model, runtime)
    expected_step = runtime.global_step

    torch.manual_seed(999)                                 # whatever the RNGs hold now, load() restores them
    random.seed(999)
    fresh = tiny_llama(seed=7)                             # other initial weights: load() must replace them all
    fresh_runtime = prepare(fresh, cfg)
    meta = fresh_runtime.load(tmp_path / "ckpt")           # the directory given to save(): its newest checkpoint
    assert meta == {"data": {"epoch": 0, "position": 123}}
    assert fresh_runtime.global_step == 4
    train_steps(fresh_runtime, fresh, 3, accum)
    got_weights, got_states = snapshot(fresh, fresh_runtime)
    assert fresh_runtime.global_step == expected_step
    assert_identical(expected_weights, got_weights)
    assert_identical(expected_states, got_states)


def test_without_the_rng_state_the_continuation_differs(tmp_path):
    """The test above can fail: restoring everything but torch's RNG gives other batches, other weights."""
    cfg = small("lowmem")
    torch.manual_seed(1)
    random.seed(1)
    model = tiny_llama(seed=0)
    runtime = prepare(model, cfg)
    train_steps(runtime, model, 2, 1)
    runtime.save(tmp_path)
    train_steps(runtime, model, 2, 1)
    fresh = tiny_llama(seed=0)
    fresh_runtime = prepare(fresh, cfg)
    fresh_runtime.load(tmp_path / "step-00000002")        # one checkpoint directory works too
    torch.manual_seed(12345)                               # then lose the RNG state
    train_steps(fresh_runtime, fresh, 2, 1)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_load_verifies_hashes_and_falls_back_past_a_damaged_newest(tmp_path):
    cfg = small("lowmem")
    model = tiny_llama(seed=0)
    runtime = prepare(model, cfg)
    train_steps(runtime, model, 1, 1)
    first = runtime.save(tmp_path)
    train_steps(runtime, model, 1, 1)
    second = runtime.save(tmp_path)
    weights = second / "model.safetensors"
    data = bytearray(weights.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]
    data[start:start + 64] = struct.pack("<16f", *[1e30] * 16)   # same size: only the hash can tell
    weights.write_bytes(bytes(data))

    fresh_runtime = prepare(tiny_llama(seed=0), cfg)
    with pytest.raises(CheckpointError, match="sha256"):
        fresh_runtime.load(second)
    with pytest.warns(UserWarning, match=f"skipping damaged checkpoint {second}.*sha256"):
        fresh_runtime.load(tmp_path)
    assert fresh_runtime.global_step == 1 and first.name == "step-00000001"
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        fresh_runtime.load(tmp_path / "empty")
