"""lowmem.checkpoint.store: bit-exact round trips, RNG, pruning, atomicity under failures and under kill -9."""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from lowmem.checkpoint import store as ckpt
from lowmem.checkpoint.store import (SCHEMA_VERSION, CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint,
                               resolve_resume, save_checkpoint)
from lowmem.model.int8_linear import Int8Linear

REPO_ROOT = Path(__file__).resolve().parents[4]


def tiny_llama(seed: int = 0) -> nn.Module:
    """LLaMA-style, GQA, tied embeddings; every decoder nn.Linear replaced by Int8Linear.from_linear."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, nn.Linear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.model.layers.get_submodule(parent_name), child, Int8Linear.from_linear(module, block_size=32))
    return model


def fake_runtime_state(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "state": {
            0: {"step": torch.tensor(7, dtype=torch.int64),
                "exp_avg_codes": torch.randint(0, 256, (8, 4), generator=gen, dtype=torch.uint8),
                "exp_avg_absmax": torch.rand(1, generator=gen),
                "proj_data": torch.randint(-128, 128, (33,), generator=gen, dtype=torch.int8),
                "residual_index": torch.randint(0, 1 << 40, (5,), generator=gen, dtype=torch.int64)},
            3: {"exp_avg": torch.randn(6, 5, generator=gen),
                "exp_avg_sq": torch.rand(6, 5, generator=gen),
                "bf16_values": torch.randn(4, generator=gen).to(torch.bfloat16),
                "empty": torch.zeros(0, 3)},
        },
        "lowmem": {"global_step": 12, "skipped_steps": 1},
    }


def assert_bit_identical(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, name
    # Compare raw bytes: float equality would call NaN != NaN and -0.0 == 0.0.
    raw = lambda t: t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
    assert torch.equal(raw(a), raw(b)), name


def save(root, step, model=None, state=None, **kw):
    model = model if model is not None else nn.Linear(4, 3)
    return save_checkpoint(root, step=step, model=model, runtime_state=state or fake_runtime_state(step), **kw)


# -- round trip ------------------------------------------------------------------------------------------------------
def test_round_trip_is_bit_identical_with_int8_layers_and_tied_embeddings(tmp_path):
    model = tiny_llama(seed=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    state = fake_runtime_state(seed=1)
    meta = {"config": {"rank": 4, "lr": 1e-3, "targets": ["q_proj", "k_proj"]}, "data_position": {"epoch": 0,
            "index": 17}, "python_random": ckpt.python_random_state()}
    path = save_checkpoint(tmp_path, step=12, model=model, runtime_state=state, meta=meta)
    assert path == tmp_path / "step-00000012"
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.safetensors", "optim.safetensors",
                                                      "rng.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    saved = model.state_dict()
    model_sd, runtime_state, meta_json = load_checkpoint(path, verify=True)
    assert set(model_sd) == set(saved)
    for name in saved:
        assert_bit_identical(saved[name], model_sd[name], name)
    assert model_sd["model.layers.0.self_attn.q_proj.weight_q"].dtype == torch.int8
    # The tied weight is stored once and comes back as one tensor under both names.
    assert model_sd["lm_head.weight"] is model_sd["model.embed_tokens.weight"]
    assert meta_json["aliases"]["model.safetensors"] == {"lm_head.weight": "model.embed_tokens.weight"}

    assert set(runtime_state["state"]) == set(state["state"])
    for index, tensors in state["state"].items():
        assert set(runtime_state["state"][index]) == set(tensors)
        for key, tensor in tensors.items():
            assert_bit_identical(tensor, runtime_state["state"][index][key], f"state/{index}/{key}")
    assert runtime_state["lowmem"] == state["lowmem"]
    assert meta_json["meta"] == meta and meta_json["step"] == 12 and meta_json["schema_version"] == SCHEMA_VERSION
    assert meta_json["complete"] is True and meta_json["rng_restored"] is True

    fresh = tiny_llama(seed=5)
    assert not torch.equal(fresh.model.embed_tokens.weight, model.model.embed_tokens.weight)
    fresh.load_state_dict(model_sd, strict=True)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    for name, tensor in fresh.state_dict().items():
        assert_bit_identical(saved[name], tensor, name)


def test_rng_is_restored_and_python_random_helpers_round_trip(tmp_path):
    torch.manual_seed(123)
    random.seed(9)
    path = save(tmp_path, 1, meta={"python_random": ckpt.python_random_state()})
    expected_torch = torch.rand(16)
    expected_py = [random.random() for _ in range(4)]
    torch.rand(1000)  # move the generators on
    random.random()
    _, _, meta_json = load_checkpoint(path)
    ckpt.set_python_random_state(meta_json["meta"]["python_random"])
    assert torch.equal(torch.rand(16), expected_torch)
    assert [random.random() for _ in range(4)] == expected_py


def test_rng_false_writes_no_rng_file_and_leaves_the_generator_alone(tmp_path):
    path = save(tmp_path, 1, rng=False)
    assert not (path / "rng.safetensors").exists()
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    _, _, meta_json = load_checkpoint(path)
    assert meta_json["rng_restored"] is False
    assert torch.equal(torch.rand(4), expected)


def test_shared_storage_views_are_saved_separately(tmp_path):
    class Views(nn.Module):
        def __init__(self):
            super().__init__()
            base = torch.arange(12.0)
            self.register_buffer("whole", base)
            self.register_buffer("head", base[:6])
            self.register_buffer("strided", base.view(3, 4).t())  # non-contiguous view of the same storage

    model = Views()
    sd, _, _ = load_checkpoint(save(tmp_path, 0, model=model))
    for name, tensor in model.state_dict().items():
        assert torch.equal(sd[name], tensor), name


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="step"):
        save(tmp_path, -1)
    with pytest.raises(ValueError, match="keep_last"):
        save(tmp_path, 1, keep_last=0)
    with pytest.raises(TypeError, match="JSON"):
        save(tmp_path, 1, meta={"bad": object()})
    with pytest.raises(TypeError, match="tensors only"):
        save(tmp_path, 1, state={"state": {0: {"x": [1, 2]}}, "lowmem": {}})
    with pytest.raises(TypeError, match="runtime_state"):
        save_checkpoint(tmp_path, step=1, model=nn.Linear(2, 2), runtime_state={"state": {}})
    assert not list(tmp_path.iterdir()) or not list_checkpoints(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


# -- listing, pruning, replacing -------------------------------------------------------------------------------------
def test_keep_last_prunes_oldest_and_keeps_the_one_just_written(tmp_path):
    for step in (10, 20, 30, 40, 50):
        save(tmp_path, step, keep_last=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000030", "step-00000040", "step-00000050"]
    # A save of an older step (a run resumed from an earlier checkpoint) is never pruned right away.
    save(tmp_path, 5, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000005", "step-00000050"]
    save(tmp_path, 60, keep_last=None)
    assert len(list_checkpoints(tmp_path)) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000005", "step-00000050", "step-00000060"]


def test_same_step_is_replaced_only_by_a_complete_one(tmp_path, monkeypatch):
    save(tmp_path, 7, state=fake_runtime_state(1))
    save(tmp_path, 7, state=fake_runtime_state(2))
    _, runtime_state, _ = load_checkpoint(tmp_path / "step-00000007", verify=True)
    assert torch.equal(runtime_state["state"][3]["exp_avg"], fake_runtime_state(2)["state"][3]["exp_avg"])

    def fail_on_meta(obj, fh, **kw):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ckpt.json, "dump", fail_on_meta)
    with pytest.raises(CheckpointError):
        save(tmp_path, 7, state=fake_runtime_state(3))
    monkeypatch.undo()
    _, runtime_state, _ = load_checkpoint(tmp_path / "step-00000007", verify=True)
    assert torch.equal(runtime_state["state"][3]["exp_avg"], fake_runtime_state(2)["state"][3]["exp_avg"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000007"]


def test_truncated_file_is_skipped_and_latest_falls_back(tmp_path):
    save(tmp_path, 1)
    second = save(tmp_path, 2)
    assert latest_checkpoint(tmp_path) == second
    model_file = second / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:-5])
    assert list_checkpoints(tmp_path) == [tmp_path / "step-00000001"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000001"
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(second)
    (tmp_path / "step-00000001" / "meta.json").write_text("{not json")
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "does-not-exist") is None


def test_verify_detects_a_flipped_byte_and_schema_mismatch_is_refused(tmp_path):
    path = save(tmp_path, 1)
    data = bytearray((path / "optim.safetensors").read_bytes())
    data[-1] ^= 0xFF  # same size: only the hash can tell
    (path / "optim.safetensors").write_bytes(bytes(data))
    load_checkpoint(path, verify=False)   # only when the caller just verified it
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path)   # verifies by default

    path = save(tmp_path, 2)
    meta = json.loads((path / "meta.json").read_text())
    meta["schema_version"] = SCHEMA_VERSION + 1
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="schema_version"):
        load_checkpoint(path)
    # version 1 stored 8-bit second moments on another map: refused, and the message says why
    meta["schema_version"] = 1
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="schema_version 1.*second moments.*squared map"):
        load_checkpoint(path)


# -- failures while saving -------------------------------------------------------------------------------------------
def test_writer_failure_mid_save_leaves_nothing_new(tmp_path, monkeypatch):
    previous = save(tmp_path, 1)
    before = {p.name: p.read_bytes() for p in previous.iterdir()}
    real_save_file = ckpt.save_file
    calls = []

    def failing_save_file(tensors, filename, metadata=None):
        calls.append(Path(filename).name)
        if Path(filename).name == "optim.safetensors":  # the model file is already written at this point
            Path(filename).write_bytes(b"partial")
            raise RuntimeError("simulated writer crash")
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", failing_save_file)
    with pytest.raises(CheckpointError) as info:
        save(tmp_path, 2)
    assert calls == ["model.safetensors", "optim.safetensors"]
    assert str(tmp_path / "step-00000002") in str(info.value)
    assert "simulated writer crash" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]  # temp dir removed
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before
    assert list_checkpoints(tmp_path) == [previous]


def test_rename_failure_leaves_nothing_new(tmp_path, monkeypatch):
    previous = save(tmp_path, 1)

    def failing_rename(src, dst):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(ckpt.os, "rename", failing_rename)
    with pytest.raises(CheckpointError, match="step-00000002"):
        save(tmp_path, 2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]
    assert list_checkpoints(tmp_path) == [previous]


def test_disk_full_message(tmp_path, monkeypatch):
    save(tmp_path, 1)

    def full(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(CheckpointError) as info:
        save(tmp_path, 2)
    message = str(info.value)
    assert "disk is full" in message and "output_dir" in message and str(tmp_path / "step-00000002") in message
    assert "\n" not in message
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]


def test_stale_dirs_of_dead_processes_are_cleaned_and_orphaned_old_is_put_back(tmp_path):
    save(tmp_path, 1)
    save(tmp_path, 2)
    dead_pid = 2 ** 22 + 12345  # above Linux's default pid_max range used by live processes here
    while True:
        try:
            os.kill(dead_pid, 0)
            dead_pid += 1
        except ProcessLookupError:
            break
    # A crashed save, and a replacement killed between its two renames (step 2 sits in .old-*, final name empty).
    (tmp_path / f".tmp-step-00000003-{dead_pid}").mkdir()
    (tmp_path / f".tmp-step-00000003-{dead_pid}" / "model.safetensors").write_bytes(b"half")
    os.rename(tmp_path / "step-00000002", tmp_path / f".old-step-00000002-{dead_pid}")
    # A save in progress in another live process must be left alone.
    live = tmp_path / f".tmp-step-00000009-{os.getppid()}"
    live.mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001"]
    save(tmp_path, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "step-00000001", "step-00000002",
                                                          "step-00000004"]
    load_checkpoint(tmp_path / "step-00000002", verify=True)


# -- resolve_resume --------------------------------------------------------------------------------------------------
def test_resolve_resume(tmp_path):
    root = tmp_path / "run"
    assert resolve_resume(root, "auto") is None
    assert resolve_resume(root, "none") is None and resolve_resume(root, "") is None
    assert resolve_resume(root, None) is None and resolve_resume(root, "None") is None
    first = save(root, 100)
    second = save(root, 200)
    assert resolve_resume(root, "auto") == second
    assert resolve_resume(root, "AUTO") == second
    assert resolve_resume(root, str(first)) == first
    assert resolve_resume(root, "step-00000100") == first  # a name under root
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_resume(root, str(root / "step-00000300"))
    (second / "optim.safetensors").unlink()
    assert resolve_resume(root, "auto") == first
    with pytest.raises(CheckpointError, match="not a complete checkpoint") as info:
        resolve_resume(root, str(second))
    assert str(first) in str(info.value)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_resume(root, str(root))  # the root itself is not a checkpoint


# -- kill -9 in the middle of a save loop ----------------------------------------------------------------------------
_SAVE_LOOP = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from lowmem.checkpoint.store import save_checkpoint
    from lowmem.model.int8_linear import Int8Linear
    torch.manual_seed(0)
    model = nn.Sequential(*[Int8Linear.from_linear(nn.Linear(256, 256), block_size=64) for _ in range(8)],
                          nn.Embedding(512, 256))
    step = 0
    while True:
        state = {"state": {0: {"codes": torch.full((256, 256), step % 251, dtype=torch.uint8),
                               "step": torch.tensor(step)}},
                 "lowmem": {"global_step": step, "skipped_steps": 0}}
        # steps cycle through 0..5 so that replacements of an existing step are interrupted too
        save_checkpoint(sys.argv[1], step=step % 6, model=model, runtime_state=state, keep_last=3)
        print(step, flush=True)
        step += 1
""")


@pytest.mark.slow
def test_kill_9_during_save_loop_leaves_only_complete_checkpoints(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    for round_index, run_after_first_s in enumerate((1.0, 0.37)):
        root = tmp_path / f"run{round_index}"
        proc = subprocess.Popen([sys.executable, "-c", _SAVE_LOOP, str(root)], cwd=REPO_ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            first = proc.stdout.readline()  # blocks until one save finished (torch import included)
            assert first.strip().isdigit(), proc.stderr.read()
            time.sleep(run_after_first_s)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        saves = 1 + len(proc.stdout.read().split())
        assert saves > 3, f"only {saves} saves before the kill: the test did not exercise the loop"
        found = list_checkpoints(root)
        assert found
        finals = [p for p in root.iterdir() if not p.name.startswith(".")]
        assert sorted(finals) == found, "an incomplete checkpoint sits under a final name"
        for path in found:
            model_sd, runtime_state, meta = load_checkpoint(path, verify=True)
            step = runtime_state["lowmem"]["global_step"]
            assert meta["step"] == step % 6 == int(path.name.split("-")[1])
            assert torch.equal(runtime_state["state"][0]["codes"], torch.full((256, 256), step % 251,
                                                                              dtype=torch.uint8))
            nn.Sequential(*[Int8Linear(256, 256, block_size=64) for _ in range(8)],
                          nn.Embedding(512, 256)).load_state_dict(model_sd, strict=True)
        # The next save cleans whatever the killed process left behind.
        save(root, 99, keep_last=10)
        assert not [p for p in root.iterdir() if p.name.startswith(".")], round_index


# -- the real runtime: resume equals an uninterrupted run bit for bit on CPU ----------------------------------------
def test_resume_with_the_real_runtime_is_bit_exact(tmp_path):
    from lowmem import LowMemConfig, prepare

    cfg = LowMemConfig(rank=4, refresh_interval_steps=2)
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 96, (2, 8), generator=gen) for _ in range(4)]

    def train(model, runtime, steps):
        for ids in steps:
            with runtime.micro_batch():
                runtime.backward(model(input_ids=ids, labels=ids).loss)
            runtime.step()

    model = tiny_llama(seed=0)
    runtime = prepare(model, cfg)
    train(model, runtime, batches[:2])
    path = save_checkpoint(tmp_path, step=runtime.global_step, model=model, runtime_state=runtime.state_dict())
    train(model, runtime, batches[2:])
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_state = runtime.state_dict()

    resumed = tiny_llama(seed=7)
    resumed_runtime = prepare(resumed, cfg)
    model_sd, runtime_state, _ = load_checkpoint(resolve_resume(tmp_path, "auto"), verify=True)
    assert path == resolve_resume(tmp_path, "auto")
    resumed.load_state_dict(model_sd, strict=True)
    resumed_runtime.load_state_dict(runtime_state)
    assert resumed_runtime.global_step == 2
    train(resumed, resumed_runtime, batches[2:])
    for name, tensor in resumed.state_dict().items():
        assert_bit_identical(expected[name], tensor, name)
    for index, tensors in expected_state["state"].items():
        for key, tensor in tensors.items():
            assert_bit_identical(tensor, resumed_runtime.state_dict()["state"][index][key], f"{index}/{key}")


@pytest.mark.gpu
def test_cuda_tensors_and_cuda_rng_round_trip(tmp_path):
    model = tiny_llama(seed=0).cuda()
    state = fake_runtime_state(0)
    state["state"][0]["exp_avg_codes"] = state["state"][0]["exp_avg_codes"].cuda()
    torch.cuda.manual_seed_all(11)
    path = save_checkpoint(tmp_path, step=1, model=model, runtime_state=state)
    expected = torch.rand(8, device="cuda")
    model_sd, runtime_state, meta = load_checkpoint(path, verify=True)
    assert meta["rng_restored"] is True
    assert torch.equal(torch.rand(8, device="cuda"), expected)
    for name, tensor in model.state_dict().items():
        assert model_sd[name].device.type == "cpu"
        assert_bit_identical(tensor.cpu(), model_sd[name], name)
    assert torch.equal(runtime_state["state"][0]["exp_avg_codes"], state["state"][0]["exp_avg_codes"].cpu())
