"""`python -m launch.finetune` end to end: a run, its outputs, exact resume after SIGKILL, and the bad-input table."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch.finetune import main
from lowmem.checkpoint.store import list_checkpoints

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 1200   # a tiny run takes ~30 s on an idle 2-core machine; the limit only catches a hang


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]


def test_tiny_run_trains_exports_and_reports(tiny_args, tmp_path, capsys):
    assert main(tiny_args) == 0
    run = tmp_path / "run"
    log = read_log(run)
    evals = [r["eval_loss"] for r in log if r["kind"] == "eval"]
    assert evals[0] > evals[-1], evals                       # held-out loss falls from step 0
    assert [r["step"] for r in log if r["kind"] == "train"] == list(range(1, 13))
    for name in ("report.md", "loss.png", "memory.png", "config.yaml", "model/config.json"):
        assert (run / name).exists(), name
    assert list_checkpoints(run / "checkpoints")
    out = capsys.readouterr().out
    assert "report:" in out and "exported model:" in out

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, info = AutoModelForCausalLM.from_pretrained(run / "model", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    ids = tokenizer("the quick brown", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 5


def test_print_config_and_typo(tiny_args, capsys):
    assert main(tiny_args + ["--print-config"]) == 0
    assert "max_steps: 12" in capsys.readouterr().out
    assert main(tiny_args + ["optim.rnak=4"]) != 0
    err = capsys.readouterr().err
    assert "did you mean 'optim.rank'" in err


def test_export_subcommand(tiny_args, tmp_path):
    assert main(tiny_args + ["max_steps=2", "eval_every=0", "export=false"]) == 0
    ckpt = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert main(["export", str(ckpt), str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "model.safetensors").exists()


def final_weights(run: Path) -> dict:
    return load_file(str(list_checkpoints(run / "checkpoints")[-1] / "model.safetensors"))


def launch(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "launch.finetune", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
@pytest.mark.timeout(4 * RUN_TIMEOUT_S)
def test_sigkill_and_resume_equals_uninterrupted_run(tiny_args, tmp_path):
    """Killed with SIGKILL at a moment chosen by the clock (mid-step or mid-save), resumed with the same command:
    the final weights equal an uninterrupted run's bit for bit (CPU)."""
    common = [a for a in tiny_args if not a.startswith("output_dir=")] + ["save_every=1", "export=false",
                                                                          "eval_every=0"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert launch(common + [f"output_dir={straight}"]).wait(timeout=RUN_TIMEOUT_S) == 0

    proc = launch(common + [f"output_dir={killed}"])
    deadline = time.time() + RUN_TIMEOUT_S
    while time.time() < deadline:   # wait until a few steps are logged, then kill without warning
        log = killed / "train_log.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    done_before_kill = len(list_checkpoints(killed / "checkpoints"))
    assert 0 < done_before_kill
    assert launch(common + [f"output_dir={killed}"]).wait(timeout=RUN_TIMEOUT_S) == 0

    a, b = final_weights(straight), final_weights(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.timeout(2 * RUN_TIMEOUT_S)
def test_sigterm_saves_and_exits(tiny_args, tmp_path):
    run = tmp_path / "run"
    proc = launch(tiny_args + ["max_steps=500", "eval_every=0", "export=false"])
    deadline = time.time() + RUN_TIMEOUT_S
    while time.time() < deadline and not ((run / "train_log.jsonl").exists()
                                          and (run / "train_log.jsonl").read_text().count("\n") >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=600) == 130   # one step and a checkpoint, with headroom for a busy machine
    assert list_checkpoints(run / "checkpoints")


def expect_error(argv, capsys, *needles):
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith("error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def test_bad_input_table(tiny_args, tmp_path, capsys):
    base = [a for a in tiny_args if not a.startswith(("data.path=", "model=", "output_dir="))]
    model = next(a for a in tiny_args if a.startswith("model="))
    data = next(a for a in tiny_args if a.startswith("data.path="))
    out = f"output_dir={tmp_path / 'run'}"

    expect_error(base + ["model=/no/such/model", data, out], capsys, "/no/such/model", "Tried")
    expect_error(base + [model, "data.path=/no/such.jsonl", out], capsys, "/no/such.jsonl")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine line"}\n{"text": broken\n')
    expect_error(base + [model, f"data.path={bad}", out], capsys, "bad.jsonl:2")

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    expect_error(base + [model, f"data.path={empty}", out], capsys, "empty.jsonl")

    expect_error(tiny_args + ["seq_len=4096"], capsys, "seq_len=4096", "max_position_embeddings")
    expect_error(tiny_args + ["micro_batch_sise=2"], capsys, "did you mean 'micro_batch_size'")

    locked = tmp_path / "file-not-dir"
    locked.write_text("x")
    expect_error(base + [model, data, f"output_dir={locked / 'sub'}"], capsys, "not writable")
    assert not (tmp_path / "run" / "checkpoints").exists() or not list_checkpoints(tmp_path / "run" / "checkpoints")


def test_full_disk_during_checkpoint_leaves_no_corrupt_checkpoint(tiny_args, tmp_path, capsys, monkeypatch):
    import lowmem.checkpoint.store as checkpoint

    real_save_file = checkpoint.save_file if hasattr(checkpoint, "save_file") else None
    calls = {"n": 0}

    def full_disk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:   # the first checkpoint (3 files) lands; the next one hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save_file(*args, **kwargs)

    assert real_save_file is not None, "lowmem.checkpoint.store writes with safetensors' save_file"
    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    err = expect_error(tiny_args + ["save_every=2", "max_steps=6", "eval_every=0", "export=false"], capsys,
                       "disk")
    assert "free" in err.lower() or "space" in err.lower()
    ckpts = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in ckpts] == ["step-00000002"]
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_preflight_refuses_a_run_that_does_not_fit_before_loading_weights(tiny_args, tmp_path, capsys, monkeypatch):
    """With a device of 64 KiB the planner predicts no fit: the run stops with the cheapest change named, before
    any model is built; force=true runs it anyway."""
    import launch.models
    import lowmem.memory.fit

    monkeypatch.setattr(lowmem.memory.fit, "_device_bytes", lambda device: 64 * 2**10)
    built = []
    real_load = launch.models.load_int8_model
    monkeypatch.setattr(launch.models, "load_int8_model", lambda *a, **k: built.append(1) or real_load(*a, **k))
    err = expect_error(tiny_args + ["eval_every=0", "export=false"], capsys, "memory preflight", "exceeds",
                       "force=true")
    assert not built
    assert main(tiny_args + ["max_steps=2", "eval_every=0", "export=false", "force=true"]) == 0
    assert built


def test_damaged_model_weights_stop_before_training_with_tensor_and_file_named(tiny_args, tmp_path, capsys,
                                                                              tiny_tokenizer_dir):
    """A model directory whose weights lack a tensor: the run stops while loading, naming the tensor and the file,
    and leaves no output directory behind."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config_arg = next(a for a in tiny_args if a.startswith("model="))
    model_dir = tmp_path / "damaged"
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_arg.split("=", 1)[1])).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(model_dir)
    weights = model_dir / "model.safetensors"
    with safe_open(weights, "pt") as handle:
        kept = {name: handle.get_tensor(name) for name in handle.keys() if "layers.1.mlp.up_proj" not in name}
    save_file(kept, weights, metadata={"format": "pt"})
    capsys.readouterr()   # the progress bars of making the model
    out = tmp_path / "never"
    argv = [a for a in tiny_args if not a.startswith(("model=", "output_dir=", "tokenizer="))]
    expect_error(argv + [f"model={model_dir}", f"output_dir={out}"], capsys, "model.layers.1.mlp.up_proj.weight",
                 "model.safetensors")
    assert not out.exists()
