"""Several processes for one run: what `python -m launch.finetune` does differently under `deepspeed` or `torchrun`.

    deepspeed --num_gpus 2 -m launch.finetune CONFIG.yaml deepspeed=launch/configs/ds_zero2.json
    torchrun --nproc_per_node 2 -m launch.finetune CONFIG.yaml              # ZeRO 0 unless deepspeed= is given

Both launchers set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; `setup` reads them, applies the
DeepSpeed JSON (stage, micro-batch per process, accumulation, clipping, bf16: launch.deepspeed_config), picks the
device (cuda:LOCAL_RANK with NCCL, or the CPU with gloo — DS_ACCELERATOR=cpu for DeepSpeed itself) and opens the
process group through DeepSpeed (`deepspeed.init_distributed`). The global batch is micro_batch_size x
grad_accum_steps x world_size sequences: every rank draws the same global batch and trains on its slice.

Failure: a collective that cannot complete (a rank died, the network broke, `dist_timeout_s` passed) raises on the
surviving ranks; `describe_failure` turns that into one paragraph naming the rank and what to do, and the launcher
exits without waiting for the dead peer. gloo raises by itself. NCCL does not: by default (torch 2.11-2.13,
TORCH_NCCL_ASYNC_ERROR_HANDLING=3) its watchdog thread kills the process once a collective outlives the timeout, so
nothing is printed, and before that the main thread waits in whatever device read follows the stuck collective.
`nccl_failure_env` therefore asks for mode 2 (the watchdog aborts the communicators and leaves the process alive):
the device read returns, and the next collective raises DistBackendError ("NCCL communicator was aborted ...") in
the main thread, which `is_comm_failure` recognises. Blocking wait (TORCH_NCCL_BLOCKING_WAIT=1) would raise at
the stuck `wait()` itself, but it makes the host wait for every collective to finish, which ends the overlap of
communication with the backward (DESIGN 3.7: no host waits in the hot path), and it protects only collectives
someone waits on; it is left as the user sets it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from launch.config import ConfigError, TrainConfig


@dataclass
class Parallel:
    """The run's process layout. One process: rank 0 of 1, no communication (comm and data_parallel are None)."""
    cfg: TrainConfig
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    zero_stage: int = 0
    device: torch.device | None = None
    comm: object = None
    data_parallel: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.comm is not None

    def barrier(self) -> None:
        if self.comm is not None:
            self.comm.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on any rank (agreeing to stop after the same step)."""
        return flag if self.data_parallel is None else self.data_parallel.any_(flag)

    def sum_(self, values: list[float]) -> list[float]:
        if self.comm is None:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.comm.device)
        self.comm.all_reduce_sum_(tensor)
        return tensor.tolist()

    def my_rows(self, global_rows: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a global batch of micro_batch_size x world_size row indices."""
        per_rank = global_rows.shape[0] // self.world_size
        return global_rows[self.rank * per_rank:(self.rank + 1) * per_rank]

    def shutdown(self, *, clean: bool) -> None:
        if self.comm is not None:
            from lowmem.distributed import shutdown
            shutdown(self.comm, clean=clean)
            self.comm = None


def launched_world_size() -> int:
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(text)
    except ValueError:
        raise ConfigError(f"environment variable WORLD_SIZE must be an int >= 1, got {text!r}") from None
    if world < 1:
        raise ConfigError(f"environment variable WORLD_SIZE must be an int >= 1, got {text!r}")
    return world


def setup(cfg: TrainConfig, resolve_device) -> Parallel:
    """Resolve the layout for `cfg` (applying its DeepSpeed JSON) and open the process group when WORLD_SIZE > 1.

    resolve_device(cfg) -> torch.device: the launcher's single-process choice; under several processes a CUDA
    choice becomes cuda:LOCAL_RANK.
    """
    from launch.deepspeed_config import apply_plan, load_deepspeed_config
    world = launched_world_size()
    plan = load_deepspeed_config(cfg.deepspeed, cfg, world)
    cfg = apply_plan(cfg, plan)
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(cfg)
    if device.type == "cuda" and world > 1:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are "
                             "visible; launch at most that many processes per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    par = Parallel(cfg=cfg, rank=rank, world_size=world, local_rank=local_rank, zero_stage=plan.zero_stage,
                   device=device)
    if rank == 0:
        for notice in plan.notices:
            print(f"deepspeed config: {notice}", flush=True)
    if world > 1:
        if cfg.optim_error_feedback_on():
            raise ConfigError("error feedback (optim.error_feedback) needs each weight's dense gradient and is not "
                             "available with several processes; set optim.error_feedback=off")
        from lowmem.distributed import DataParallel, init_distributed
        if device.type == "cuda":
            settings, notices = nccl_failure_env(os.environ)
            os.environ.update(settings)     # read when the NCCL process group is built, just below
            if rank == 0:
                for notice in notices:
                    print(f"nccl: {notice}", flush=True)
        par.comm = init_distributed(device=device, timeout_s=cfg.dist_timeout_s)
        par.data_parallel = DataParallel(par.comm, plan.zero_stage, debug=cfg.dist_debug)
        if par.is_main:
            print(f"data parallel: {world} processes, ZeRO stage {plan.zero_stage} ({plan.source}), "
                  f"{cfg.micro_batch_size} x {cfg.grad_accum_steps} sequences per process per step, "
                  f"{'NCCL' if device.type == 'cuda' else 'gloo'} on {device.type}", flush=True)
    return par


# TORCH_NCCL_ASYNC_ERROR_HANDLING: 0 no handling, 1 abort communicators and kill the process, 2 abort communicators
# only, 3 kill the process without aborting (torch's default since 2.2; the same names in 2.11-2.13).
NCCL_ABORT_COMMUNICATORS_ONLY = "2"
_NCCL_KILLS_PROCESS = {"1": "aborts the communicators, then kills the process",
                       "3": "kills the process without aborting the communicators"}


def nccl_failure_env(environ) -> tuple[dict[str, str], list[str]]:
    """The environment a NCCL process group needs so that a dead peer raises in the main thread (module docstring):
    returns (variables to set, notices for the user). A value the user set is kept; one that would kill the
    process instead of raising gets a notice saying what it costs."""
    settings: dict[str, str] = {}
    notices: list[str] = []
    mode = environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING")
    if mode is None:
        settings["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = NCCL_ABORT_COMMUNICATORS_ONLY
    elif mode.strip() in _NCCL_KILLS_PROCESS and environ.get("TORCH_NCCL_BLOCKING_WAIT", "0").strip() != "1":
        notices.append(f"TORCH_NCCL_ASYNC_ERROR_HANDLING={mode.strip()} (set in the environment) "
                       f"{_NCCL_KILLS_PROCESS[mode.strip()]} when a collective times out: a dead rank then ends "
                       "this process without naming the last complete checkpoint; unset it (lowmem uses "
                       f"{NCCL_ABORT_COMMUNICATORS_ONLY}) to get that message")
    return settings, notices


_COMM_FAILURE_WORDS = ("connection closed", "connection reset", "broken pipe", "timed out", "timeout", "gloo",
                       "nccl", "peer", "socket", "distbackenderror", "process group")


def is_comm_failure(err: BaseException) -> bool:
    text = f"{type(err).__name__}: {err}".lower()
    return isinstance(err, RuntimeError) and any(word in text for word in _COMM_FAILURE_WORDS)


def describe_failure(par: Parallel, err: BaseException, *, step: int | None, checkpoint) -> str:
    where = f" during step {step + 1}" if step is not None else ""
    resume = (f"the last complete checkpoint is {checkpoint}; run the same command again to resume from it"
              if checkpoint else "no checkpoint was saved yet; run the same command again to start over")
    first_line = " ".join(str(err).split())[:300]
    return (f"rank {par.rank} of {par.world_size} lost contact with the other processes{where} "
            f"({type(err).__name__}: {first_line}). Another rank probably died or was killed (look at its output), "
            f"or a collective waited longer than dist_timeout_s={par.cfg.dist_timeout_s:g}. The run stopped; "
            f"{resume}.")
