"""Checkpoints of a data-parallel run: one directory per step, one sub-directory per rank (DESIGN §3.8, §4).

    root/step-{step:08d}/
      meta.json        {"schema_version", "step", "lowmem", "meta", "distributed": {"world_size", "zero_stage"},
                        "ranks": ["rank-00000", ...], "files": {"rank-00000/model.safetensors": {bytes, sha256}, ...},
                        "complete": true}
      rank-00000/      a single-process checkpoint (lowmem.checkpoint.store layout) of what rank 0 holds: the model's
                       replicated tensors and its weight partitions (ZeRO 3), the optimizer state it owns (whole) and
                       the replicated part of the rest, its RNG state
      rank-00001/      the same for rank 1 (no model tensors below ZeRO 3: rank 0 has them all)

Atomicity: every rank writes into the same hidden `root/.tmp-step-N-<pid of rank 0>/`; when every rank reports
success, rank 0 writes the top meta.json and renames the directory (one atomic operation), exactly as a
single-process save. A rank that dies mid-save leaves only the hidden directory, which the next save removes and
resume never sees.

Loading merges the ranks: the union of model tensors, and per trained tensor the fullest optimizer state (its
owner's); so a run resumes on any world size (each rank keeps what it owns under the new ownership).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import load_file
from torch import Tensor

from lowmem.checkpoint import store as ckpt


def _rank_dir(rank: int) -> str:
    return f"rank-{rank:05d}"


def _agree(comm, error: str | None) -> None:
    errors = [e for e in comm.all_gather_object(error) if e]
    if errors:
        raise ckpt.CheckpointError(errors[0])


def save_distributed_checkpoint(root, *, step: int, model_state: dict[str, Tensor], runtime_state: dict,
                                meta: dict, comm, zero_stage: int, keep_last: int | None = 3) -> Path:
    """Collective: every rank calls it with what it holds; returns the final path on every rank."""
    root = Path(root)
    final = ckpt._step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{comm.all_gather_object(os.getpid())[0]}"
    error = None
    if comm.rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            ckpt._clean_stale(root)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            error = ckpt._failure_message(final, exc)
    _agree(comm, error)

    files: dict[str, dict] = {}
    try:
        sidecar = {"schema_version": ckpt.SCHEMA_VERSION, "step": step,
                   "lowmem": json.loads(json.dumps(runtime_state["lowmem"], allow_nan=False)), "meta": {}}
        groups = {ckpt._MODEL: ckpt._storable(model_state, "model state"),
                  ckpt._OPTIM: ckpt._storable(ckpt._flatten_optim(runtime_state["state"]), "runtime state"),
                  ckpt._RNG: ckpt._storable(ckpt._rng_tensors(), "RNG state")}
        rank_dir = tmp / _rank_dir(comm.rank)
        rank_dir.mkdir()
        ckpt._write_files(rank_dir, groups, sidecar)
        written = json.loads((rank_dir / ckpt._META).read_text())["files"]
        files = {f"{_rank_dir(comm.rank)}/{name}": info for name, info in written.items()}
    except Exception as exc:  # noqa: BLE001
        error = ckpt._failure_message(final, exc)
    _agree(comm, error)

    all_files = {}
    for part in comm.all_gather_object(files):
        all_files.update(part)
    if comm.rank == 0:
        try:
            top = {"schema_version": ckpt.SCHEMA_VERSION, "step": step,
                   "lowmem": json.loads(json.dumps(runtime_state["lowmem"], allow_nan=False)),
                   "meta": json.loads(json.dumps(meta, allow_nan=False)),
                   "distributed": {"world_size": comm.world_size, "zero_stage": zero_stage},
                   "ranks": [_rank_dir(r) for r in range(comm.world_size)], "files": all_files, "complete": True}
            with open(tmp / ckpt._META, "w") as fh:
                json.dump(top, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            ckpt._fsync_path(tmp)
            if final.exists():
                ckpt._retire(root, final)
            os.rename(tmp, final)
            ckpt._fsync_path(root)
            if keep_last is not None:
                older = [p for p in ckpt.list_checkpoints(root) if p != final]
                for path in older[:max(0, len(older) - (keep_last - 1))]:
                    ckpt._retire(root, path)
        except Exception as exc:  # noqa: BLE001
            shutil.rmtree(tmp, ignore_errors=True)
            error = ckpt._failure_message(final, exc)
    _agree(comm, error)
    return final


def is_distributed_checkpoint(path) -> bool:
    meta, _ = ckpt._read_complete_meta(Path(path))
    return bool(meta and meta.get("distributed"))


def load_distributed_checkpoint(path, *, rank: int, verify: bool = True) -> tuple[dict, dict, dict]:
    """(model_state, runtime_state, meta) merged over the ranks of a distributed checkpoint (module docstring);
    restores this rank's RNG state when the checkpoint has one for `rank`. verify: first check every rank's files
    (sizes, headers, sha256: lowmem.checkpoint.verify.damage); False only when that was just done."""
    path = Path(path)
    meta, why = ckpt._read_complete_meta(path)
    if meta is None or not meta.get("distributed"):
        raise ckpt.CheckpointError(f"{path} is not a complete distributed lowmem checkpoint: {why or 'no ranks'}")
    if verify:
        from lowmem.checkpoint.verify import damage
        why = damage(path)
        if why is not None:
            raise ckpt.CheckpointError(f"checkpoint {path} is damaged: {why}. Resume from another checkpoint.")
    model_state: dict[str, Tensor] = {}
    states: dict[int, dict[str, Tensor]] = {}
    try:
        for rank_name in meta["ranks"]:
            rank_path = path / rank_name
            rank_meta = json.loads((rank_path / ckpt._META).read_text())
            model_part = load_file(rank_path / ckpt._MODEL, device="cpu")
            for alias, kept in rank_meta.get("aliases", {}).get(ckpt._MODEL, {}).items():
                model_part[alias] = model_part[kept]
            model_state.update(model_part)
            for index, state in ckpt._unflatten_optim(load_file(rank_path / ckpt._OPTIM, device="cpu")).items():
                if len(state) > len(states.get(index, {})):
                    states[index] = state   # the owner's whole state beats a follower's replicated part
    except (OSError, ValueError, KeyError) as exc:
        raise ckpt.CheckpointError(f"cannot read {path} ({type(exc).__name__}: {exc}); resume from another "
                                   "checkpoint") from exc
    own_rng = path / _rank_dir(rank) / ckpt._RNG
    meta["rng_restored"] = own_rng.exists()
    if own_rng.exists():
        ckpt._restore_rng(load_file(own_rng, device="cpu"))
    return model_state, {"state": states, "lowmem": meta["lowmem"]}, meta


def load_any_checkpoint(path, *, rank: int = 0, verify: bool = True) -> tuple[dict, dict, dict]:
    """load_checkpoint for a single-process checkpoint, load_distributed_checkpoint for a data-parallel one
    (both verify the files' hashes first unless verify=False)."""
    if is_distributed_checkpoint(path):
        return load_distributed_checkpoint(path, rank=rank, verify=verify)
    return ckpt.load_checkpoint(path, verify=verify)
