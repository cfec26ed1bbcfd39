"""The output directory of one run: who owns it, which checkpoint a resume may use, the log it continues, and
what a diverged run leaves behind. launch.finetune calls these in this order.

- `claim_output_dir` / `RunLock`: one run per output_dir. An exclusive advisory `fcntl.flock` on
  `output_dir/.lowmem-run.lock`, held for the life of the run; the file holds the holder's pid so a refused second
  run can name it. The kernel drops the lock when its process dies (even by SIGKILL), so a lock file left by a dead
  run is simply taken over; the pid in it is then stale and is overwritten. Under DeepSpeed/torchrun only rank 0
  takes it, and every rank learns whether it got it (they stop together).
- `choose_checkpoint`: rank 0 picks the verified checkpoint (lowmem.checkpoint.verify.select_resume: damaged ones
  passed over with a printed reason under resume=auto, an error for a damaged resume=PATH) and tells the others.
- `check_compatible` / `load_resumed_state`: a checkpoint resumes only into a run whose state has the same shapes:
  the same model and the same state-shaping optim settings; otherwise the run stops before anything is written,
  naming each setting, its value in the checkpoint and in this run.
- `truncate_log`: on resume, train_log.jsonl keeps only the records up to the resumed step (written to a temporary
  file, fsynced, renamed over the log), so steps replayed after a kill are not logged twice.
- `SkipStreak`: max_skipped_steps consecutive skipped steps stop the run; the checkpoints that hold the state which
  produced them are renamed `diverged-step-N` (`set_aside_diverged`: kept for inspection, never picked by
  resume=auto), so the newest `step-N` is the last good one.
- `missing_dirs` / `remove_unused_dirs`: the directories a run creates, removed again (with only its own hidden files
  in them: the write probe, the lock) when the run fails before writing anything, so a typo in the model name
  leaves no empty outputs/... behind.
Every failure here is a `RunDirError`: one paragraph for the user, exit 2.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

LOCK_NAME = ".lowmem-run.lock"

# LowMemConfig fields that decide the shape or encoding of the optimizer state or the INT8 weights: a checkpoint
# written with other values cannot be loaded into this run. Learning-rate, schedule, clipping and refresh-timing
# settings may change on resume.
STATE_SHAPING = ("rank", "weight_block_size", "projector_bits", "projector_group_size", "optim_bits",
                 "moment_block_size", "residual_ratio", "residual_modules", "residual_dtype", "residual_mode",
                 "error_feedback", "cross_head", "cross_head_modules", "target_modules", "exclude_modules",
                 "float_optim_bits", "float_optim_min_numel", "freeze", "overrides")


class RunDirError(Exception):
    """The output directory cannot be used by this run (held by another run, or an incompatible checkpoint)."""


def _holder_pid(path: Path) -> str:
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


class RunLock:
    """Exclusive lock on an output directory for the life of a run (module docstring). Context manager."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise RunDirError naming the holder's pid. The directory must exist."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                # Some network file systems have no locks: run unguarded rather than not at all, and say so.
                warnings.warn(f"the file system of {self.path.parent} does not support locks ({exc.strerror}): a "
                              "second run started in this output_dir would not be detected")
                self._fd = fd
                return self
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            pid = _holder_pid(self.path)
            raise RunDirError(
                f"output_dir {self.path.parent} is in use by another run (pid {pid}, lock file {self.path}). Two "
                "runs in one directory overwrite each other's checkpoints and log: wait for that run to finish, "
                "stop it, or choose another output_dir=PATH.") from None
        # Ours now (a previous holder, if any, is dead: its pid is stale). Record who holds it.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)   # closing would release it too; explicit for the reader
            except OSError:
                pass   # a file system without locks (acquire warned)
            finally:
                os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


# ---- the run's start: claim the directory, choose the checkpoint (every rank agrees) ----------------------------

def _agreed_error(par, error: str | None) -> str | None:
    """Several processes: the first rank's error (every rank gets the same answer, so all stop together)."""
    if not par.distributed:
        return error
    errors = [e for e in par.comm.all_gather_object(error) if e]
    return errors[0] if errors else None


def claim_output_dir(par, check_writable: Callable[[Path], None]) -> RunLock | None:
    """Rank 0 checks output_dir is writable (check_writable raises an exception whose text is the message) and takes
    its RunLock for the life of the run; every rank stops with the same RunDirError when either fails (a lone
    failing rank would leave the others waiting in a collective). Returns the lock (None on other ranks)."""
    error, lock = None, None
    if par.is_main:
        out = Path(par.cfg.output_dir)
        try:
            check_writable(out)
            lock = RunLock(out).acquire()
        except Exception as err:  # noqa: BLE001 - the message travels to every rank; the user fixes the cause
            error = str(err)
    error = _agreed_error(par, error)
    if error:
        if lock is not None:
            lock.release()
        raise RunDirError(error)
    return lock


def choose_checkpoint(par, ckpt_root: Path) -> Path | None:
    """The verified checkpoint to resume from (lowmem.checkpoint.verify.select_resume), chosen by rank 0 (which
    alone reads every byte for the hashes) and shared with the others; damaged ones passed over are printed."""
    from lowmem.checkpoint.store import CheckpointError
    from lowmem.checkpoint.verify import select_resume

    def skipped(path: Path, why: str) -> None:
        print(f"resume=auto: skipping checkpoint {path}: {why}", flush=True)

    choice, error = None, None
    if par.is_main:
        try:
            found = select_resume(ckpt_root, par.cfg.resume, on_skip=skipped)
            choice = None if found is None else str(found)
        except CheckpointError as err:
            error = str(err)
    error = _agreed_error(par, error)
    if error:
        raise RunDirError(error)
    if par.distributed:
        choice = par.comm.all_gather_object(choice)[0]
    return None if choice is None else Path(choice)


def load_resumed_state(runtime, model_state: dict, runtime_state: dict, checkpoint: Path) -> None:
    """Load a checkpoint's tensors into the runtime; a state that does not fit (a shape check the settings
    comparison could not foresee) is a RunDirError, raised before the run writes anything."""
    try:
        runtime.load_model_state(model_state)
        runtime.load_state_dict(runtime_state)
    except (RuntimeError, ValueError, KeyError) as err:
        raise RunDirError(f"cannot resume from {checkpoint}: its state does not fit this model and optim settings "
                          f"({' '.join(str(err).split())[:400]}). Nothing was written. Resume with the settings the "
                          "checkpoint was written with, or choose another output_dir (or resume=none).") from None


def check_compatible(cfg, checkpoint: Path) -> None:
    """Stop (RunDirError) before anything is written when the checkpoint was made with settings its state cannot
    load into; cfg is this run's TrainConfig."""
    meta = json.loads((checkpoint / "meta.json").read_text())
    check_resume_compatible(cfg, checkpoint, (meta.get("meta") or {}).get("config"))


# ---- resume compatibility -----------------------------------------------------------------------------------------

def _show(value) -> str:
    text = repr(list(value) if isinstance(value, tuple) else value)
    return text if len(text) <= 120 else text[:117] + "..."


def resume_differences(cfg, saved_config: dict) -> list[tuple[str, str, str]]:
    """[(key, value in the checkpoint, value in this run)] for the settings that must match on resume.

    cfg: this run's TrainConfig; saved_config: the checkpoint's meta["meta"]["config"] (TrainConfig.to_dict())."""
    from launch.config import TrainConfig
    from launch.finetune import config_from_dict
    if not isinstance(saved_config, dict):
        return [("config", "missing", "present")]
    saved_optim = saved_config.get("optim") if isinstance(saved_config.get("optim"), dict) else {}
    diffs = []
    if saved_config.get("model") != cfg.model:
        diffs.append(("model", _show(saved_config.get("model")), _show(cfg.model)))
    if saved_optim.get("preset", "lowmem") != cfg.optim.preset:
        diffs.append(("optim.preset", _show(saved_optim.get("preset", "lowmem")), _show(cfg.optim.preset)))
    try:
        saved: TrainConfig = config_from_dict(saved_config)
    except Exception as exc:  # noqa: BLE001 - an unreadable recorded config is itself a difference to report
        diffs.append(("config", f"unreadable by this version ({type(exc).__name__})", "valid"))
        return diffs
    old, new = saved.lowmem_config(), cfg.lowmem_config()
    for name in STATE_SHAPING:
        if getattr(old, name) != getattr(new, name):
            diffs.append((f"optim.{name}", _show(getattr(old, name)), _show(getattr(new, name))))
    return diffs


def check_resume_compatible(cfg, checkpoint: Path, saved_config: dict) -> None:
    """Raise RunDirError naming every setting that differs between the checkpoint and this run."""
    diffs = resume_differences(cfg, saved_config)
    if not diffs:
        return
    listed = "; ".join(f"{key}: the checkpoint has {old}, this run {new}" for key, old, new in diffs)
    fix = " ".join(f"{key}={old}" for key, old, _ in diffs if key != "config")
    raise RunDirError(
        f"cannot resume from {checkpoint}: it was written with other settings ({listed}); its optimizer state "
        f"does not fit this run. Nothing was written. Resume with the checkpoint's settings ({fix}), or start a "
        "new run: another output_dir=PATH, or resume=none (which overwrites this directory's checkpoints).")


# ---- the step log --------------------------------------------------------------------------------------------------

def truncate_log(path: Path, step: int) -> int:
    """Keep the records of train_log.jsonl with step <= `step` (and drop a torn last line), atomically.

    Returns the number of records dropped. A missing log is left missing."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh.read().split("\n"):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                dropped += 1   # a line torn by a kill mid-write
                continue
            record_step = record.get("step") if isinstance(record, dict) else None
            if isinstance(record_step, int) and record_step > step:
                dropped += 1
                continue
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write("".join(line + "\n" for line in kept))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dropped


# ---- divergence ----------------------------------------------------------------------------------------------------

def set_aside_diverged(ckpt_root: Path, first_bad_step: int) -> list[Path]:
    """Rename the complete checkpoints with step >= first_bad_step to `diverged-step-N`; returns the new paths."""
    from lowmem.checkpoint.store import list_checkpoints
    moved = []
    for path in list_checkpoints(ckpt_root):
        if int(path.name.split("-")[1]) >= first_bad_step:
            target = path.with_name(f"diverged-{path.name}")
            if target.exists():
                import shutil
                shutil.rmtree(target)
            os.rename(path, target)
            moved.append(target)
    return moved


def _divergence_message(limit: int, lr: float, first_step: int, last_step: int, nonfinite: list[str],
                        resume_point: Path | None, set_aside: list[Path]) -> str:
    what = ", ".join(nonfinite[:3]) + (" ..." if len(nonfinite) > 3 else "") if nonfinite else "loss or gradients"
    where = (f"it resumes from {resume_point}, the last checkpoint saved before the divergence" if resume_point
             else "no checkpoint was saved before the divergence, so it starts from the beginning")
    aside = (f" The checkpoints holding the diverged state were renamed: {', '.join(p.name for p in set_aside)}."
             if set_aside else "")
    return (f"training diverged: steps {first_step}-{last_step} ({last_step - first_step + 1} in a row, "
            f"max_skipped_steps={limit}) had non-finite values ({what}) and were skipped. The learning rate "
            f"lr={lr:g} is most likely too high: lower it (e.g. lr={lr / 10:g}) or raise warmup_steps, then run the "
            f"same command again; {where}.{aside}")


class SkipStreak:
    """Counts consecutive skipped (non-finite) steps; `max_skipped_steps` of them in a row mean the run diverged.

    The state after step `first_step - 1` is the one that produced the non-finite steps (a skipped step writes
    nothing, or only the layers whose gradients were finite before the bad one), so on divergence every
    checkpoint from that step on is set aside and the run stops without a final save."""

    def __init__(self, limit: int, lr: float):
        self.limit, self.lr = limit, lr
        self.count, self.first_step, self.last_step = 0, 0, 0
        self.nonfinite: list[str] = []

    @property
    def diverged(self) -> bool:
        return self.count >= self.limit

    def update(self, stats: dict, step: int) -> bool:
        """Record Runtime.step()'s stats for optimizer step `step` (1-based); True once the run has diverged."""
        if not stats["skipped"]:
            self.count = 0
            return False
        self.count += 1
        if self.count == 1:
            self.first_step = step
        self.last_step, self.nonfinite = step, list(stats.get("nonfinite") or [])
        return self.diverged

    def stop(self, par, ckpt_root: Path) -> None:
        """Set the diverged checkpoints aside (rank 0), then raise RunDirError with the message on every rank."""
        from lowmem.checkpoint.store import list_checkpoints
        aside = set_aside_diverged(ckpt_root, self.first_step - 1) if par.is_main else []
        par.barrier()
        good = list_checkpoints(ckpt_root)
        raise RunDirError(_divergence_message(self.limit, self.lr, self.first_step, self.last_step, self.nonfinite,
                                              good[-1] if good else None, aside))


# ---- the directories a run creates, removed again when it fails before writing anything -------------------------

def missing_dirs(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first (what this run would create)."""
    missing, current = [], path.absolute()
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    return missing


def remove_unused_dirs(created: list[Path]) -> None:
    """After a run that failed before writing anything: remove the directories it created (deepest first) that hold
    nothing but its own hidden files (the write probe, a lock), so a typo leaves no empty outputs/... behind."""
    for folder in created:
        try:
            entries = list(folder.iterdir()) if folder.is_dir() else None
            if entries is None or any(not e.name.startswith(".") or not e.is_file() for e in entries):
                return
            for entry in entries:
                entry.unlink()
            folder.rmdir()
        except OSError:
            return
