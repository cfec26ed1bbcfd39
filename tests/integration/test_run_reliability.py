"""`python -m launch.finetune` as a careless or unlucky user drives it: damaged checkpoints, a resume with other
settings, a log torn by a kill, two runs in one directory, a learning rate that makes training diverge."""
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from launch.finetune import main
from launch.report import read_log
from launch.run_dir import LOCK_NAME
from lowmem.checkpoint.store import list_checkpoints

REPO = Path(__file__).resolve().parents[2]
QUICK = ["eval_every=0", "export=false"]


def without(args, *prefixes):
    return [a for a in args if not a.startswith(prefixes)]


def train_steps(run: Path) -> list[int]:
    return [r["step"] for r in read_log(run / "train_log.jsonl") if r["kind"] == "train"]


def flip_16_floats(path: Path) -> None:
    """Overwrite 16 floats of the first tensor's data with 1e30: same size, valid header; only the hash tells."""
    data = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]
    data[start:start + 64] = struct.pack("<16f", *[1e30] * 16)
    path.write_bytes(bytes(data))


def corrupt_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:12] = b"\x00\xff{["   # the JSON header no longer parses
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)


DAMAGE = {   # name -> (how, words the explanation must contain)
    "bad hash": (lambda ck: flip_16_floats(ck / "model.safetensors"), "sha256"),
    "corrupt header": (lambda ck: corrupt_header(ck / "optim.safetensors"), "corrupt safetensors header"),
    "missing file": (lambda ck: (ck / "optim.safetensors").unlink(), "missing"),
    "truncated file": (lambda ck: truncate(ck / "model.safetensors"), "truncated"),
}


def test_damaged_checkpoint_is_refused_by_path_and_skipped_by_auto(tiny_args, tmp_path, capsys):
    """Each kind of damage to the newest checkpoint: resume=PATH stops with exit 2 naming the damage (nothing is
    loaded), resume=auto prints which checkpoint it skipped and why, resumes from the one before, and the replayed
    step writes exactly the weights the undamaged checkpoint held."""
    base = without(tiny_args, "output_dir=", "max_steps=") + QUICK + ["max_steps=3", "save_every=1", "keep_last=5"]
    pristine = tmp_path / "pristine"
    assert main(base + [f"output_dir={pristine}"]) == 0
    original = load_file(str(pristine / "checkpoints" / "step-00000003" / "model.safetensors"))
    capsys.readouterr()

    for name, (damage, words) in DAMAGE.items():
        run = tmp_path / name.replace(" ", "-")
        shutil.copytree(pristine, run)
        newest = run / "checkpoints" / "step-00000003"
        damage(newest)

        assert main(base + [f"output_dir={run}", f"resume={newest}"]) == 2, name
        captured = capsys.readouterr()
        assert captured.err.startswith("error: ") and "Traceback" not in captured.err, captured.err
        assert str(newest) in captured.err and words in captured.err, (name, captured.err)

        assert main(base + [f"output_dir={run}"]) == 0, name
        out = capsys.readouterr().out
        assert f"skipping checkpoint {newest}: " in out and words in out.split("skipping checkpoint")[1], (name, out)
        assert f"resumed from {run / 'checkpoints' / 'step-00000002'} at step 2" in out, (name, out)
        replayed = load_file(str(newest / "model.safetensors"))
        assert replayed.keys() == original.keys()
        for key in original:
            assert (replayed[key] == original[key]).all(), (name, key)
        assert train_steps(run) == [1, 2, 3], name


def test_export_of_a_tampered_checkpoint_is_refused(tiny_args, tmp_path, capsys):
    assert main(tiny_args + QUICK + ["max_steps=2"]) == 0
    ckpt = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    flip_16_floats(ckpt / "model.safetensors")
    capsys.readouterr()
    assert main(["export", str(ckpt), str(tmp_path / "exported")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "sha256" in err and "Traceback" not in err, err
    assert not (tmp_path / "exported").exists()


@pytest.mark.parametrize("override,key,saved,new", [
    ("optim.rank=8", "optim.rank", "16", "8"),
    ("optim.preset=q_galore", "optim.preset", "'lowmem'", "'q_galore'"),
    ("optim.weight_block_size=32", "optim.weight_block_size", "64", "32"),
    ("model=OTHER", "model", "CONFIG", "OTHER"),
])
def test_resume_with_incompatible_settings_fails_before_writing(tiny_args, tmp_path, capsys, override, key, saved,
                                                                 new):
    run = tmp_path / "run"
    assert main(tiny_args + QUICK + ["max_steps=2"]) == 0
    config = next(a.split("=", 1)[1] for a in tiny_args if a.startswith("model="))
    if override == "model=OTHER":   # another (smaller) model
        other = tmp_path / "other.json"
        other.write_text(Path(config).read_text().replace('"hidden_size": 64', '"hidden_size": 32'))
        override, saved, new = f"model={other}", repr(config), repr(str(other))
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != LOCK_NAME}
    capsys.readouterr()

    args = [a for a in tiny_args if not a.startswith(override.split("=")[0] + "=")]
    assert main(args + QUICK + ["max_steps=4", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert f"{key}: the checkpoint has {saved}, this run {new}" in err, err
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != LOCK_NAME}
    assert after == before   # config.yaml, the log, checkpoints, report: untouched


def test_resume_truncates_the_log_to_the_resumed_step(tiny_args, tmp_path):
    """A kill after steps 3-4 were logged but before their checkpoint, leaving a torn last line: the resumed run
    logs each step once, and the report reads the log."""
    run = tmp_path / "run"
    args = tiny_args + QUICK + ["max_steps=4", "save_every=2", "keep_last=5"]
    assert main(args) == 0
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    with open(run / "train_log.jsonl", "a") as fh:
        fh.write('{"kind": "train", "step": 5, "lo')
    assert main(args) == 0
    assert train_steps(run) == [1, 2, 3, 4]
    assert "| 4 |" in (run / "report.md").read_text()


def test_read_log_passes_over_a_torn_last_line(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text('{"kind": "train", "step": 1, "text": "a\u2028b"}\n{"kind": "train", "st')
    assert read_log(log) == [{"kind": "train", "step": 1, "text": "a\u2028b"}]


def launch(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "launch.finetune", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_second_run_on_one_output_dir_is_refused_and_a_dead_runs_lock_is_taken_over(tiny_args, tmp_path, capsys):
    run = tmp_path / "run"
    first = launch(without(tiny_args, "max_steps=") + QUICK + ["max_steps=100000"])
    try:
        deadline = time.time() + 600   # generous: a busy machine; we wait for the first logged step
        while time.time() < deadline and not train_steps(run) and first.poll() is None:
            time.sleep(0.2)
        assert first.poll() is None and train_steps(run), "the first run did not start training within 600 s"
        assert (run / LOCK_NAME).read_text().strip() == str(first.pid)

        second = launch(tiny_args + QUICK + ["max_steps=2"])
        err = second.communicate(timeout=600)[1]
        assert second.returncode == 2, err
        assert f"in use by another run (pid {first.pid}" in err and "Traceback" not in err, err
        assert first.poll() is None   # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    # The dead run's lock file is still there, with its pid; the kernel released the lock itself.
    assert (run / LOCK_NAME).read_text().strip() == str(first.pid)
    assert main(tiny_args + QUICK + ["max_steps=2", "resume=none"]) == 0
    assert (run / LOCK_NAME).read_text().strip() == str(os.getpid())


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tiny_args, tmp_path, capsys):
    """Three good steps, then lr=1e6: the run stops with exit 2 after max_skipped_steps skipped steps, names the
    learning rate, writes no checkpoint of the ruined state, and a rerun with a sane lr resumes from step 3."""
    run = tmp_path / "run"
    base = without(tiny_args, "max_steps=", "lr=") + QUICK + ["save_every=1", "keep_last=5"]
    assert main(base + ["max_steps=3", "lr=3e-3"]) == 0
    capsys.readouterr()

    assert main(base + ["max_steps=12", "lr=1e6", "max_skipped_steps=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: training diverged") and "Traceback" not in err, err
    assert "lr=1e+06" in err and "too high" in err and "max_skipped_steps=3" in err, err
    assert str(run / "checkpoints" / "step-00000003") in err, err
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-00000001", "step-00000002",
                                                                       "step-00000003"]
    skipped = [r for r in read_log(run / "train_log.jsonl") if r["kind"] == "train" and r["skipped"]]
    assert len(skipped) == 3 and not (run / "model").exists()

    assert main(base + ["max_steps=5", "lr=3e-3"]) == 0
    assert "resumed from " + str(run / "checkpoints" / "step-00000003") in capsys.readouterr().out
    assert train_steps(run) == [1, 2, 3, 4, 5]
    assert not any(r.get("skipped") for r in read_log(run / "train_log.jsonl"))
