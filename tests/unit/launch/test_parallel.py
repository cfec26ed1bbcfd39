"""launch.parallel on one CPU process: the NCCL settings that make a dead peer raise (the backend choice is mocked:
no GPU, no process group) and the last-checkpoint message `launch.finetune` prints for a NCCL failure."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as torch_dist

from launch.config import TrainConfig
from launch.parallel import NCCL_ABORT_COMMUNICATORS_ONLY, Parallel, is_comm_failure, nccl_failure_env

# What a survivor's next collective raises once the NCCL watchdog has aborted the communicators (torch 2.11-2.13
# wording, DistBackendError).
NCCL_ABORTED = ("NCCL communicator was aborted on rank 0. Original reason for failure was: [PG ID 0 PG GUID "
                "0(default_pg) Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=418, "
                "OpType=BROADCAST, NumelIn=1, NumelOut=1, Timeout(ms)=60000) ran for 60012 milliseconds before "
                "timing out.")


def test_nccl_failure_env_asks_the_watchdog_to_abort_communicators_only():
    assert nccl_failure_env({}) == ({"TORCH_NCCL_ASYNC_ERROR_HANDLING": NCCL_ABORT_COMMUNICATORS_ONLY}, [])
    assert NCCL_ABORT_COMMUNICATORS_ONLY == "2"
    # the user's own choice is kept; one that kills the process is named, with what it costs
    assert nccl_failure_env({"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}) == ({}, [])
    settings, notices = nccl_failure_env({"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"})
    assert settings == {} and len(notices) == 1
    assert "kills the process" in notices[0] and "last complete checkpoint" in notices[0]
    # with blocking wait the stuck wait() raises in the main thread whatever the mode: no notice
    assert nccl_failure_env({"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "TORCH_NCCL_BLOCKING_WAIT": "1"}) == ({}, [])


class _FakeComm:
    def __init__(self, device="cpu", dist=None):
        self.device = torch.device(device)
        self.rank, self.world_size = 0, 2


@pytest.fixture
def two_ranks(monkeypatch):
    """WORLD_SIZE=2 rank 0, deepspeed.init_distributed recorded instead of run, the NCCL variables unset."""
    import deepspeed

    import lowmem.distributed
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    for name in ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_BLOCKING_WAIT"):
        monkeypatch.delenv(name, raising=False)
    calls = []

    def init_distributed(dist_backend, timeout):
        calls.append({"backend": dist_backend, "timeout_s": timeout.total_seconds(),
                      "error_handling": os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING")})
    monkeypatch.setattr(deepspeed, "init_distributed", init_distributed)
    monkeypatch.setattr(lowmem.distributed, "Comm", _FakeComm)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    return calls


def test_setup_on_cuda_opens_nccl_with_the_timeout_and_abort_only_error_handling(two_ranks, capsys):
    from launch.parallel import setup
    par = setup(TrainConfig(dist_timeout_s=42.0), lambda cfg: torch.device("cuda"))
    assert two_ranks == [{"backend": "nccl", "timeout_s": 42.0, "error_handling": NCCL_ABORT_COMMUNICATORS_ONLY}]
    assert par.device == torch.device("cuda", 0) and par.distributed
    assert "NCCL on cuda" in capsys.readouterr().out


def test_setup_on_cpu_opens_gloo_and_leaves_the_nccl_variables_alone(two_ranks):
    from launch.parallel import setup
    setup(TrainConfig(dist_timeout_s=42.0), lambda cfg: torch.device("cpu"))
    assert two_ranks == [{"backend": "gloo", "timeout_s": 42.0, "error_handling": None}]


def test_setup_names_a_process_killing_mode_the_user_set(two_ranks, monkeypatch, capsys):
    from launch.parallel import setup
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    setup(TrainConfig(), lambda cfg: torch.device("cuda"))
    assert two_ranks[0]["error_handling"] == "3"
    assert "nccl: TORCH_NCCL_ASYNC_ERROR_HANDLING=3" in capsys.readouterr().out


def test_a_nccl_abort_is_a_comm_failure_and_other_errors_are_not():
    assert is_comm_failure(torch_dist.DistBackendError(NCCL_ABORTED))
    assert not is_comm_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 7x8)"))
    assert not is_comm_failure(ValueError("nccl"))


def test_finetune_prints_the_last_checkpoint_when_nccl_aborts(monkeypatch, tmp_path, capsys):
    """The path the gloo failure takes (launch.finetune.train): one paragraph naming the rank, the step and the last
    complete checkpoint, then an immediate exit with status 2 (no barrier, no destroy: the peer is gone)."""
    import launch.finetune as finetune
    import launch.parallel
    import launch.run_dir
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), dist_timeout_s=60.0)
    monkeypatch.setattr(launch.parallel, "setup",
                        lambda cfg, resolve: Parallel(cfg=cfg, rank=0, world_size=2, comm=_FakeComm()))
    monkeypatch.setattr(launch.run_dir, "claim_output_dir", lambda par, check: None)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-6"

    def train_until_the_peer_dies(par, progress):
        progress.update(step=7, checkpoint=checkpoint)
        raise torch_dist.DistBackendError(NCCL_ABORTED)
    monkeypatch.setattr(finetune, "_train", train_until_the_peer_dies)

    def exit_now(code):
        raise SystemExit(code)
    monkeypatch.setattr(os, "_exit", exit_now)
    with pytest.raises(SystemExit) as stopped:
        finetune.train(cfg)
    assert stopped.value.code == finetune.EXIT_ERROR
    err = capsys.readouterr().err
    assert "rank 0 of 2 lost contact with the other processes during step 8" in err
    assert f"the last complete checkpoint is {checkpoint}; run the same command again to resume" in err
    assert "DistBackendError: NCCL communicator was aborted on rank 0" in err
