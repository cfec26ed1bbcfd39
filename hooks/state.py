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
    """Mixin of Runtime: state_dict / load_state_dict, model_state / load_model_state, export."""

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

    def export(self, out_dir, tokenizer=None):
        """Write a bf16 Hugging Face checkpoint of the current weights (lowmem.checkpoint.export.export_hf). Data-parallel: a
        collective; rank 0 writes (ZeRO 3 gathers every weight onto every rank for the duration)."""
        from lowmem.checkpoint.export import export_hf
        if self.dp is None:
            return export_hf(self.model, out_dir, tokenizer=tokenizer)
        if self.partition is not None:
            self.partition.gather_all_()
        try:
            if self.dp.rank == 0:
                return export_hf(self.model, out_dir, tokenizer=tokenizer)
            return Path(out_dir)
        finally:
            if self.partition is not None:
                self.partition.release_()
            self.dp.comm.barrier()
