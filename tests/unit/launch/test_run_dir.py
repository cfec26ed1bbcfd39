"""launch.run_dir: the output directory's lock, the log truncation on resume, setting aside diverged checkpoints,
and which settings a resume compares."""
import json
import os

import pytest
from torch import nn

from launch.config import TrainConfig
from launch.config_loader import load_train_config
from launch.run_dir import (
    LOCK_NAME,
    RunDirError,
    RunLock,
    check_resume_compatible,
    resume_differences,
    set_aside_diverged,
    truncate_log,
)
from lowmem.checkpoint.store import list_checkpoints, save_checkpoint


def test_lock_is_exclusive_names_the_holder_and_is_free_after_release(tmp_path):
    first = RunLock(tmp_path).acquire()
    assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
    with pytest.raises(RunDirError, match=rf"in use by another run \(pid {os.getpid()}"):
        RunLock(tmp_path).acquire()          # flock: another open file description conflicts, even in-process
    first.release()
    with RunLock(tmp_path):
        pass


def test_a_stale_lock_file_is_taken_over_and_an_unreadable_pid_is_reported_as_unknown(tmp_path):
    (tmp_path / LOCK_NAME).write_text("999999999\n")   # left by a dead run: the file stays, its lock does not
    with RunLock(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
        (tmp_path / LOCK_NAME).write_text("")            # a holder that has not written its pid yet
        with pytest.raises(RunDirError, match=r"pid unknown"):
            RunLock(tmp_path).acquire()


def test_a_file_system_without_locks_warns_and_runs(tmp_path, monkeypatch):
    import errno

    from launch import run_dir

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(run_dir.fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="does not support locks"):
        lock = RunLock(tmp_path).acquire()
    lock.release()


def test_truncate_log_keeps_steps_up_to_the_resumed_one_and_drops_a_torn_line(tmp_path):
    log = tmp_path / "train_log.jsonl"
    records = [{"kind": "eval", "step": 0}] + [{"kind": "train", "step": s} for s in range(1, 6)] + [
        {"kind": "eval", "step": 3}]
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "train", "st')
    assert truncate_log(log, 3) == 3   # steps 4, 5 and the torn line
    kept = [json.loads(line) for line in log.read_text().splitlines()]
    assert kept == [r for r in records if r["step"] <= 3]
    assert log.read_text().endswith("\n") and not list(tmp_path.glob(".*tmp*"))
    assert truncate_log(tmp_path / "absent.jsonl", 3) == 0 and not (tmp_path / "absent.jsonl").exists()


def test_set_aside_diverged_renames_the_checkpoints_from_the_bad_step(tmp_path):
    model = nn.Linear(2, 2)
    state = {"state": {}, "lowmem": {"global_step": 0, "skipped_steps": 0}}
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step=step, model=model, runtime_state=state, keep_last=None)
    moved = set_aside_diverged(tmp_path, 3)
    assert [p.name for p in moved] == ["diverged-step-00000003", "diverged-step-00000004"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001", "step-00000002"]


def test_resume_differences_name_state_shaping_settings_only(tmp_path):
    base = load_train_config(None, ["optim.rank=16", "lr=1e-3"])
    saved = base.to_dict()
    same = load_train_config(None, ["optim.rank=16", "lr=5e-4", "max_steps=99", "optim.grad_clip=0.5"])
    assert resume_differences(same, saved) == []
    other = load_train_config(None, ["optim.rank=8", "optim.weight_block_size=128", "model=other"])
    diffs = {key: (old, new) for key, old, new in resume_differences(other, saved)}
    assert diffs == {"model": ("'smollm2-135m'", "'other'"), "optim.rank": ("16", "8"),
                     "optim.weight_block_size": ("256", "128")}
    with pytest.raises(RunDirError, match=r"optim.rank: the checkpoint has 16, this run 8.*Nothing was written"):
        check_resume_compatible(other, tmp_path, saved)
    assert isinstance(base, TrainConfig)


def test_skip_streak_counts_consecutive_skips_only(tmp_path):
    from types import SimpleNamespace

    from launch.run_dir import SkipStreak
    streak = SkipStreak(3, lr=0.5)
    ok, bad = {"skipped": False}, {"skipped": True, "nonfinite": ["loss"]}
    assert [streak.update(s, i) for i, s in enumerate([bad, bad, ok, bad, bad], start=1)] == [False] * 5
    assert streak.count == 2 and streak.first_step == 4
    assert streak.update(bad, 6) and streak.diverged
    par = SimpleNamespace(is_main=True, barrier=lambda: None)
    with pytest.raises(RunDirError, match=r"steps 4-6 \(3 in a row, max_skipped_steps=3\).*\(loss\).*lr=0.5 .*"
                                          r"lr=0.05.*starts from the beginning"):
        streak.stop(par, tmp_path / "checkpoints")
