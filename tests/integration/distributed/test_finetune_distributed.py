"""`launch.finetune` under several processes: the `deepspeed` launcher and `torchrun`, resume on another world size,
and a rank killed mid-run (the survivor stops with a clear error within the timeout; resume works)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lowmem.checkpoint.store import list_checkpoints

# A 2-process run of the tiny model takes about a minute on an idle 2-core machine (start-up of torch and deepspeed
# in each process dominates); the limits are 20x that, for a busy machine, and only catch a hang.
RUN_TIMEOUT_S = 1200
SURVIVOR_TIMEOUT_S = 600
pytestmark = [pytest.mark.multi_gpu, pytest.mark.slow, pytest.mark.timeout(3 * RUN_TIMEOUT_S)]

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(HERE))
from test_data_parallel import dist_env, free_port  # noqa: E402


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture
def args(tiny_args):
    # 2 processes x 2 sequences = the global batch of the single-process tests' 4.
    return [a for a in tiny_args if not a.startswith(("micro_batch_size=", "max_steps="))] + [
        "micro_batch_size=2", "max_steps=8", "eval_every=4"]


def test_deepspeed_launcher_zero2_then_resume_on_one_process(args, tmp_path):
    run = tmp_path / "run"
    argv = [a for a in args if not a.startswith("output_dir=")] + [f"output_dir={run}"]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "launch.finetune", *argv, "deepspeed=launch/configs/ds_zero2.json"]
    proc = subprocess.run(cmd, cwd=REPO, env=dist_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "data parallel: 2 processes, ZeRO stage 2" in proc.stdout
    assert proc.stdout.count("done: 8 steps") == 1                      # rank 0 reports, once
    records = [r for r in read_log(run) if r["kind"] == "train"]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all(r["comm_bytes"] > 0 for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    ckpt = list_checkpoints(run / "checkpoints")[-1]
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["distributed"] == {"world_size": 2, "zero_stage": 2}
    assert (run / "model" / "config.json").exists()
    # Only rank 0 takes the output_dir's run lock (had rank 1 tried too, it would have been refused and the run
    # would have failed): the lock file names one process, not this one.
    holder = (run / ".lowmem-run.lock").read_text().strip()
    assert holder.isdigit() and int(holder) != os.getpid()

    # The same command on one process with more steps continues from the 2-process checkpoint.
    one = subprocess.run([sys.executable, "-m", "launch.finetune", *argv, "max_steps=10"], cwd=REPO,
                         env=dist_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "resumed from" in one.stdout and "written by 2 process(es)" in one.stdout
    assert [r["step"] for r in read_log(run) if r["kind"] == "train"][-2:] == [9, 10]


def spawn_rank(rank: int, port: int, argv: list[str]) -> subprocess.Popen:
    env = dist_env(port)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    return subprocess.Popen([sys.executable, "-m", "launch.finetune", *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_rank_stops_the_other_with_a_clear_error_then_resume(args, tmp_path):
    run = tmp_path / "run"
    argv = [a for a in args if not a.startswith(("output_dir=", "max_steps="))] + [
        f"output_dir={run}", "max_steps=30", "save_every=2", "eval_every=0", "export=false",
        "deepspeed=launch/configs/ds_zero3.json", "dist_timeout_s=60"]
    port = free_port()
    ranks = [spawn_rank(r, port, argv) for r in (0, 1)]
    deadline = time.time() + RUN_TIMEOUT_S
    while time.time() < deadline and not list_checkpoints(run / "checkpoints"):
        assert all(p.poll() is None for p in ranks), [p.communicate()[1][-2000:] for p in ranks]
        time.sleep(0.2)
    assert list_checkpoints(run / "checkpoints"), f"waited {RUN_TIMEOUT_S} s for the 2-rank run's first checkpoint"
    time.sleep(1.0)
    ranks[1].send_signal(signal.SIGKILL)
    started = time.time()
    # No hang: the survivor gives up after dist_timeout_s (60 s) plus its own teardown; the limits below are that
    # plus headroom for a busy machine, and say what they waited for.
    try:
        _, err = ranks[0].communicate(timeout=SURVIVOR_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"waited {SURVIVOR_TIMEOUT_S} s for rank 0 to stop after rank 1 was killed (dist_timeout_s=60)")
    waited = time.time() - started
    ranks[1].wait(timeout=120)
    assert ranks[0].returncode == 2, err[-2000:]
    assert "rank 0 of 2 lost contact with the other processes" in err
    assert "run the same command again to resume" in err
    assert waited < SURVIVOR_TIMEOUT_S
    last = list_checkpoints(run / "checkpoints")[-1]
    done_before = int(last.name.split("-")[1])
    assert 0 < done_before < 30

    port = free_port()
    argv = [a for a in argv if not a.startswith("max_steps=")] + [f"max_steps={done_before + 4}"]
    ranks = [spawn_rank(r, port, argv) for r in (0, 1)]
    outs = [p.communicate(timeout=RUN_TIMEOUT_S) for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert f"resumed from {last}" in outs[0][0]
    steps = [r["step"] for r in read_log(run) if r["kind"] == "train"]
    assert steps[-1] == done_before + 4
