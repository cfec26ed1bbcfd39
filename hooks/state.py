"""What a Runtime persists: optimizer state and counters, the model tensors each rank checkpoints, and the export.

`RuntimeState` is a base class of `hooks.runtime.Runtime`; it reads the runtime's `model`, `trainables`, `states`,
`dp` (data parallelism, or None), `partition` (ZeRO 3 weight partition, or None) and step counters. Files on disk
(atomic checkpoints, per-rank directories) are `lowmem.checkpoint`; this module only says what goes into them.
"""
from __future__ import annotations

from pathlib import Path

from torch import Tensor

from lowmem.optim.lowrank import follower_state


class RuntimeState:
    """Mixin of Runtime: save / load (checkpoint directories), state_dict / load_state_dict, model_state /
    load_model_state, export."""

    def save(self, directory, *, meta: dict | None = None, keep_last: int | None = 3) -> Path:
        """Checkpoint everything an exact resume needs into `directory/step-{global_step:08d}/`, the atomic, hashed
        format of lowmem.checkpoint.store: the model's weights (INT8 codes, scales, float parameters), the optimizer
        state, the step counters, torch's CPU (and initialised CUDA) RNG state and Python's `random` state.

        meta: anything JSON-able of yours that a resume needs (the data loader's position, your config); load()
        returns it. keep_last: checkpoints kept under `directory` after this one (None keeps all). Call between
        steps. Data-parallel: a collective (every rank calls it; one directory, a sub-directory per rank).
        Returns the checkpoint's path.
        """
        from lowmem.checkpoint.distributed import save_distributed_checkpoint
        from lowmem.checkpoint.store import python_random_state, save_checkpoint
        if self._micro_done:
            raise RuntimeError("save() in the middle of a step: call it after runtime.step()")
        full_meta = {"user": {} if meta is None else meta, "python_random": python_random_state()}
        if self.dp is None:
            return save_checkpoint(directory, step=self.global_step, model=self.model, runtime_state=self.state_dict(),
                                   meta=full_meta, keep_last=keep_last)
        return save_distributed_checkpoint(directory, step=self.global_step, model_state=self.model_state(),
                                           runtime_state=self.state_dict(), meta=full_meta, comm=self.dp.comm,
                                           zero_stage=self.dp.zero_stage, keep_last=keep_last)

    def load(self, directory) -> dict:
        """Restore what save() wrote, into a runtime prepare()'d from the same model and config: weights,
        optimizer state, step counters and RNG states, so training continues exactly as if it had not stopped.

        directory: one checkpoint (`.../step-00000100`) or the directory given to save(), which loads its newest
        intact checkpoint (damaged newer ones are skipped with a warning). Every file's sha256 is verified first;
        a damaged or missing checkpoint raises lowmem.checkpoint.store.CheckpointError. Returns the `meta` given to
        save() ({} when none).
        """
        import warnings

        from lowmem.checkpoint.distributed import load_any_checkpoint
        from lowmem.checkpoint.store import CheckpointError, set_python_random_state
        from lowmem.checkpoint.verify import select_resume
        if self._micro_done:
            raise RuntimeError("load() in the middle of a step")
        directory = Path(directory)
        if (directory / "meta.json").exists():
            path = select_resume(directory.parent, str(directory))
        else:
            path = select_resume(directory, "auto", on_skip=lambda p, why: warnings.warn(
                f"skipping damaged checkpoint {p}: {why}", stacklevel=3))
            if path is None:
                raise CheckpointError(f"no intact checkpoint under {directory}: save one with runtime.save(dir)")
        model_state, runtime_state, meta = load_any_checkpoint(path, rank=0 if self.dp is None else self.dp.rank,
                                                               verify=False)   # select_resume verified it
        self.load_model_state(model_state)
        self.load_state_dict(runtime_state)
        user = meta.get("meta", {})
        if "python_random" in user:
            set_python_random_state(user["python_random"])
        return user.get("user", {})

    def state_dict(self) -> dict:
        """Optimizer state (tensors only) and counters; model weights are the model's own state_dict."""
        return {"state": {index: {k: v.clone() for k, v in st.items()} for index, st in self.states.items()},
                "lowmem": {"global_step": self.global_step, "skipped_steps": self.skipped_steps}}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load Runtime.state_dict(). Data-parallel: pass the states of every rank merged (lowmem.checkpoint.store does);
        each rank keeps what it owns under the current world size (whole states) and the replicated part of the
        others, so a checkpoint resumes on another world size too."""
        if self._micro_done:
            raise RuntimeError("load_state_dict() in the middle of a step")
        for index, saved in state_dict["state"].items():
            index = int(index)
            if index not in self.states:
                raise ValueError(f"saved state names tensor {index}; this model has {len(self.trainables)}")
            if self.dp is not None and not self.dp.owns(index):
                saved = {} if self.trainables[index].kind == "float" else follower_state(saved)
            elif self.dp is not None and self.trainables[index].kind == "float" and not saved:
                raise ValueError(f"the saved state has no optimizer state for {self.trainables[index].name} (its "
                                 "owner's file is missing from the checkpoint)")
            current = self.states[index]
            fallback = self.trainables[index].tensor.device
            # Keep each tensor where the live state keeps it (counters on the CPU, moments with the weight).
            self.states[index] = {k: v.clone().to(current[k].device if k in current else fallback)
                                  for k, v in saved.items()}
        self.global_step = int(state_dict["lowmem"]["global_step"])
        self.skipped_steps = int(state_dict["lowmem"]["skipped_steps"])

    def model_state(self) -> dict[str, Tensor]:
        """The model tensors this rank checkpoints: all of them in one process; with data parallelism rank 0 writes
        the replicated tensors and every rank its own INT8 weight partitions (ZeRO 3), so nothing is written twice."""
        state = self.model.state_dict()
        if self.dp is None:
            return state
        partitioned = self._partitioned_buffer_names()
        if self.dp.rank == 0:
            return {k: v for k, v in state.items() if k not in partitioned or partitioned[k]}
        return {k: v for k, v in state.items() if partitioned.get(k)}

    def _partitioned_buffer_names(self) -> dict[str, bool]:
        """ZeRO 3: state_dict name of every partitioned buffer -> whether this rank holds it."""
        if self.partition is None:
            return {}
        names = {id(module): name for name, module in self.model.named_modules()}
        out = {}
        for module in self.partition.owners:
            for buffer in ("weight_q", "weight_scales"):
                out[f"{names[id(module)]}.{buffer}"] = self.partition.owns(module)
        return out

    def load_model_state(self, state: dict[str, Tensor]) -> None:
        """Load a whole model state (from any world size): ZeRO 3 ranks keep only the partitions they own."""
        partitioned = self._partitioned_buffer_names()
        if not partitioned:
            self.model.load_state_dict(state)
            return
        modules = dict(self.model.named_modules())
        for name, mine in partitioned.items():
            if mine:
                module_name, buffer = name.rsplit(".", 1)
                getattr(modules[module_name], buffer).copy_(state[name])
        rest = {k: v for k, v in state.items() if k not in partitioned}
        result = self.model.load_state_dict(rest, strict=False)
        missing = [k for k in result.missing_keys if k not in partitioned]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"model state mismatch: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")

    def export(self, out_dir, tokenizer=None, *, format="hf", gguf_type="q8_0"):
        """Write the current weights: format "hf" a bf16 Hugging Face directory (lowmem.checkpoint.export.export_hf),
        "gguf" one GGUF file, out_dir itself when it ends in .gguf, else out_dir/model.gguf, of gguf_type "q8_0",
        "bf16" or "f16" (lowmem.checkpoint.gguf_export.export_gguf). Returns the directory or file written.
        Data-parallel: a collective; rank 0 writes (ZeRO 3 gathers every weight onto every rank for the duration)."""
        from lowmem.checkpoint.export import export_hf
        from lowmem.checkpoint.gguf_export import export_gguf, gguf_path

        if format not in ("hf", "gguf"):
            raise ValueError(f"format must be 'hf' or 'gguf', got {format!r}")

        def write():
            if format == "gguf":
                return export_gguf(self.model, out_dir, tokenizer=tokenizer, gguf_type=gguf_type)
            return export_hf(self.model, out_dir, tokenizer=tokenizer)

        if self.dp is None:
            return write()
        if self.partition is not None:
            self.partition.gather_all_()
        try:
            if self.dp.rank == 0:
                return write()
            return gguf_path(out_dir) if format == "gguf" else Path(out_dir)
        finally:
            if self.partition is not None:
                self.partition.release_()
            self.dp.comm.barrier()
