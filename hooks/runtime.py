"""The fused-backward runtime (DESIGN §2, §3.7): every weight is updated inside `loss.backward()` as soon as its
gradient exists, so no model-sized gradient is ever held.

    runtime = prepare(model, LowMemConfig(grad_accum_steps=4))
    for step in range(steps):
        for batch in micro_batches:                 # grad_accum_steps of them
            with runtime.micro_batch():
                runtime.backward(model(**batch).loss)   # or loss.backward(); updates fire on the last micro-batch
        stats = runtime.step()                      # lr schedule, counters, norms, refresh events, peak memory

How gradients reach the update:
- Int8Linear weights hand (A, X) to a gradient sink (lowmem.int8_linear); nn.Linear weights kept in float and every
  other float parameter use `register_post_accumulate_grad_hook`. Low-rank weights accumulate only their projected
  gradient (lowmem.lowrank.accumulate_); float parameters' gradients are moved into the runtime's own fp32/param-dtype
  buffer between micro-batches (`.grad` is None outside backward, so a stray `zero_grad()` cannot lose them and a
  foreign `optimizer.step()` sees nothing to apply: no double update).
- On the last micro-batch of a step each weight is written the moment its gradient is complete.

Clipping (`clip_mode`): `per_tensor` (default) clips each tensor's gradient (the projected R for low-rank weights) to
`grad_clip`; `none`; `two_pass`: exact global clipping. lowmem implements two_pass as a deferred commit, not a second
backward: on the last micro-batch every layer only accumulates; `step()` then settles all projected gradients, computes
the exact global norm and commits every layer with one coefficient. Cost: the projected gradients R of all layers
(~ Σ m·r·4 bytes) and the float parameters' gradients live until `step()`; no extra backward.

Non-finite gradients: no NaN/Inf is ever written into a weight or a moment. With `two_pass` the whole step is skipped
(nothing is written: measure-then-commit). With `per_tensor`/`none` layers are committed during backward, so the
detection is per layer: the first layer whose gradient is non-finite and every layer after it in that backward are
skipped and the step is reported skipped, listing how many layers had already been written with finite gradients.
`runtime.backward(loss)` also refuses a non-finite loss before any backward runs (nothing written).
"""
from __future__ import annotations

import math
import resource
from contextlib import contextmanager
from functools import partial

import torch
from torch import Tensor, nn

from lowmem.config import LowMemConfig
from lowmem.float_adamw import float_adamw_update_, init_float_adamw_state
from lowmem.linop import DenseGrad, squared_norm
from lowmem.lowrank import commit_, init_lowrank_state, accumulate_, settle_
from lowmem.optimizer import float_param_bits, float_param_weight_decay
from lowmem.schedule import lr_at
from lowmem.surgery import convert_int8_to_linears, convert_linears_to_int8, split_fused_projections
from lowmem.trainables import Trainable, collect_trainables, weight_target

_RUNTIME_ATTR = "_lowmem_runtime"


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA allocator peak on GPU; the process's peak resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class Runtime:
    """Attached to one model; owns the optimizer state of every trained tensor. Build it with `prepare`."""

    def __init__(self, model: nn.Module, config: LowMemConfig, trainables: list[Trainable]):
        if getattr(model, _RUNTIME_ATTR, None) is not None:
            raise RuntimeError("lowmem hooks are already attached to this model; call runtime.detach() first")
        if not trainables:
            raise ValueError("prepare(): the model has no trainable tensors (all frozen?)")
        self.model = model
        self.config = config
        self.trainables = trainables
        self.global_step = 0
        self.skipped_steps = 0
        self.states: dict[int, dict[str, Tensor]] = {}
        for item in trainables:
            if item.kind == "float":
                self.states[item.index] = init_float_adamw_state(item.tensor, bits=float_param_bits(item))
            else:
                self.states[item.index] = init_lowrank_state(item.spec, item.config, device=item.tensor.device)
        self._placement = {item.index: (item.tensor.dtype, item.tensor.device) for item in trainables}
        self._handles = []
        self._reset_step()
        self._attach()

    # -- wiring ----------------------------------------------------------------------------------------------------
    def _attach(self) -> None:
        for item in self.trainables:
            if item.kind == "lowrank_int8":
                item.module.grad_sink = partial(self._on_int8_grad, item)
            else:
                self._handles.append(item.tensor.register_post_accumulate_grad_hook(partial(self._on_param_grad,
                                                                                            item)))
        setattr(self.model, _RUNTIME_ATTR, self)

    def detach(self, *, dequantize: bool = False) -> None:
        """Remove every hook and sink. With dequantize=True the Int8Linear layers become nn.Linear again (float
        weights in their compute dtype): a plain model for inference or another trainer. Without it they stay INT8
        (half the memory; `export` still writes a float checkpoint)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for item in self.trainables:
            if item.kind == "lowrank_int8":
                item.module.grad_sink = None
        if getattr(self.model, _RUNTIME_ATTR, None) is self:
            delattr(self.model, _RUNTIME_ATTR)
        if dequantize:
            convert_int8_to_linears(self.model)

    def _reset_step(self) -> None:
        self._micro_done = 0
        self._inside = False
        self._lr = None
        self._accum: dict[int, dict] = {}
        self._float_grads: dict[int, Tensor] = {}
        self._committed: set[int] = set()
        self._sq_norms: dict[int, float] = {}
        self._refreshed: list[str] = []
        self._nonfinite: list[str] = []
        self._losses: list[float] = []

    @property
    def grad_accum_steps(self) -> int:
        return self.config.grad_accum_steps

    @property
    def _deferred(self) -> bool:
        return self.config.clip_mode == "two_pass"

    @property
    def _last_micro(self) -> bool:
        return self._micro_done == self.grad_accum_steps - 1

    # -- the user-facing loop --------------------------------------------------------------------------------------
    @contextmanager
    def micro_batch(self):
        """Marks one micro-batch; the backward inside the last one of a step writes the weights."""
        if self._inside:
            raise RuntimeError("runtime.micro_batch() blocks cannot be nested")
        if self._micro_done >= self.grad_accum_steps:
            raise RuntimeError(f"{self._micro_done} micro-batches already ran (grad_accum_steps="
                               f"{self.grad_accum_steps}); call runtime.step() to finish the step")
        self._check_placement()
        if self._lr is None:
            self._lr = lr_at(self.global_step, self.config)
        self._inside = True
        try:
            yield self
        finally:
            self._inside = False
            self._micro_done += 1

    def backward(self, loss: Tensor) -> None:
        """`loss.backward()` with a guard: a non-finite loss skips the backward (nothing is written)."""
        if not self._inside:
            raise RuntimeError("call runtime.backward(loss) inside `with runtime.micro_batch():`")
        value = float(loss.detach())
        self._losses.append(value)
        if not math.isfinite(value):
            self._nonfinite.append("loss")
            return
        loss.backward()

    def step(self) -> dict:
        """Finish the optimizer step: commit deferred updates, advance the schedule, return the step's stats."""
        if self._micro_done != self.grad_accum_steps:
            raise RuntimeError(f"runtime.step() after {self._micro_done} micro-batches; grad_accum_steps is "
                               f"{self.grad_accum_steps}")
        if self._deferred:
            self._commit_deferred()
        skipped = bool(self._nonfinite)
        if skipped:
            self.skipped_steps += 1
            self._accum.clear()
            self._float_grads.clear()
        grad_sq = sum(self._sq_norms.values())
        device = self.trainables[0].tensor.device
        stats = {
            "step": self.global_step,
            "lr": self._lr,
            "loss": sum(self._losses) / len(self._losses) if self._losses else None,
            "grad_norm": math.sqrt(grad_sq) if not skipped else float("nan"),
            "skipped": skipped,
            "nonfinite": list(self._nonfinite),
            "layers_written": len(self._committed),
            "refreshed": list(self._refreshed),
            "peak_memory_bytes": peak_memory_bytes(device),
        }
        self.global_step += 1
        self._reset_step()
        return stats

    # -- guards ----------------------------------------------------------------------------------------------------
    def _check_placement(self) -> None:
        for item in self.trainables:
            dtype, device = self._placement[item.index]
            if item.tensor.dtype != dtype or item.tensor.device != device:
                raise RuntimeError(
                    f"{item.name} changed from {dtype} on {device} to {item.tensor.dtype} on {item.tensor.device} "
                    "after prepare(); move or cast the model before prepare(), or detach() and prepare() again")

    def _check_inside(self, item: Trainable) -> None:
        if not self._inside:
            raise RuntimeError(f"gradient of {item.name} arrived outside runtime.micro_batch(): run the backward "
                               "inside `with runtime.micro_batch():` (lowmem updates weights during backward)")
        if item.index in self._committed:
            raise RuntimeError(f"{item.name} received a second gradient after it was updated in this step (a module "
                               "used twice in one forward, or two backward calls in the last micro-batch)")

    # -- gradient arrival (called from autograd) -------------------------------------------------------------------
    def _on_int8_grad(self, item: Trainable, module: nn.Module, op) -> None:
        self._check_inside(item)
        self._accumulate_lowrank(item, op)

    def _on_param_grad(self, item: Trainable, param: Tensor) -> None:
        self._check_inside(item)
        grad = param.grad
        param.grad = None
        if grad is None:
            return
        if item.kind == "lowrank_float":
            self._accumulate_lowrank(item, DenseGrad(grad))
            return
        held = self._float_grads.get(item.index)
        self._float_grads[item.index] = grad if held is None else held.add_(grad)
        if self._last_micro and not self._deferred:
            self._commit_float(item, clip_coef=None)

    def _accumulate_lowrank(self, item: Trainable, op) -> None:
        accum = self._accum.setdefault(item.index, {})
        accumulate_(item.spec, item.config, self.states[item.index], accum, op, global_step=self.global_step,
                    micro_index=self._micro_done if accum else 0, num_micro_batches=self.grad_accum_steps)
        if self._last_micro and not self._deferred:
            self._commit_lowrank(item, clip_coef=None)

    # -- commits ---------------------------------------------------------------------------------------------------
    def _commit_lowrank(self, item: Trainable, clip_coef: float | None) -> None:
        accum = self._accum.pop(item.index)
        self._committed.add(item.index)
        if self._nonfinite:
            return  # the step is already poisoned: write nothing more
        stats = commit_(item.spec, item.config, self.states[item.index], accum, weight_target(item),
                        global_step=self.global_step, lr=self._lr, clip_coef=clip_coef)
        if stats["skipped"]:
            self._nonfinite.append(item.name)
            self._committed.discard(item.index)
            return
        self._sq_norms[item.index] = stats["grad_sq"]
        if stats["refreshed"]:
            self._refreshed.append(item.name)

    def _commit_float(self, item: Trainable, clip_coef: float | None) -> None:
        grad = self._float_grads.pop(item.index)
        self._committed.add(item.index)
        if self._nonfinite:
            return
        sq_norm = float(squared_norm(grad))
        if not math.isfinite(sq_norm):
            self._nonfinite.append(item.name)
            self._committed.discard(item.index)
            return
        cfg = item.config
        if clip_coef is None:
            clip_coef = 1.0
            if cfg.clip_mode == "per_tensor" and cfg.grad_clip is not None:
                clip_coef = min(1.0, cfg.grad_clip / (math.sqrt(sq_norm) + 1e-6))
        float_adamw_update_(item.tensor.data, grad if clip_coef == 1.0 else grad * clip_coef,
                            self.states[item.index], lr=self._lr, beta1=cfg.betas[0], beta2=cfg.betas[1],
                            eps=cfg.eps, weight_decay=float_param_weight_decay(item))
        self._sq_norms[item.index] = sq_norm

    def _commit_deferred(self) -> None:
        """two_pass: measure every settled gradient, then commit all with the exact global coefficient."""
        by_index = {item.index: item for item in self.trainables}
        sq_total = 0.0
        for index, accum in self._accum.items():
            sq_total += settle_(by_index[index].spec, by_index[index].config, accum)
        for index, grad in self._float_grads.items():
            sq_total += float(squared_norm(grad))
        if not math.isfinite(sq_total) or self._nonfinite:
            self._nonfinite.append("gradient (two_pass: nothing written)")
            return
        coef = 1.0
        if self.config.grad_clip is not None:
            coef = min(1.0, self.config.grad_clip / (math.sqrt(sq_total) + 1e-6))
        for index in list(self._accum):
            self._commit_lowrank(by_index[index], clip_coef=coef)
        for index in list(self._float_grads):
            self._commit_float(by_index[index], clip_coef=coef)

    # -- state -----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Optimizer state (tensors only) and counters; model weights are the model's own state_dict."""
        return {"state": {index: {k: v.clone() for k, v in st.items()} for index, st in self.states.items()},
                "lowmem": {"global_step": self.global_step, "skipped_steps": self.skipped_steps}}

    def load_state_dict(self, state_dict: dict) -> None:
        if self._micro_done:
            raise RuntimeError("load_state_dict() in the middle of a step")
        for index, saved in state_dict["state"].items():
            index = int(index)
            if index not in self.states:
                raise ValueError(f"saved state names tensor {index}; this model has {len(self.trainables)}")
            current = self.states[index]
            fallback = self.trainables[index].tensor.device
            # Keep each tensor where the live state keeps it (counters on the CPU, moments with the weight).
            self.states[index] = {k: v.clone().to(current[k].device if k in current else fallback)
                                  for k, v in saved.items()}
        self.global_step = int(state_dict["lowmem"]["global_step"])
        self.skipped_steps = int(state_dict["lowmem"]["skipped_steps"])

    def export(self, out_dir, tokenizer=None):
        """Write a bf16 Hugging Face checkpoint of the current weights (lowmem.export.export_hf)."""
        from lowmem.export import export_hf
        return export_hf(self.model, out_dir, tokenizer=tokenizer)


def prepare(model: nn.Module, config: LowMemConfig | None = None) -> Runtime:
    """Model surgery (split fused q/k/v, INT8 linears when `int8_weights`), optimizer state, hooks -> Runtime."""
    cfg = config if config is not None else LowMemConfig()
    split_fused_projections(model)
    if cfg.int8_weights:
        convert_linears_to_int8(model, cfg)
    return Runtime(model, cfg, collect_trainables(model, cfg))
