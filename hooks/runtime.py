"""The fused-backward runtime (DESIGN §2, §3.7): every weight is updated inside `loss.backward()` as soon as its
gradient exists, so no model-sized gradient is ever held.

    runtime = prepare(model, LowMemConfig(grad_accum_steps=4))
    for step in range(steps):
        for batch in micro_batches:                 # grad_accum_steps of them
            with runtime.micro_batch():
                runtime.backward(model(**batch).loss)   # or loss.backward(); updates fire on the last micro-batch
        stats = runtime.step()                      # lr schedule, counters, norms, refresh events, peak memory

How gradients reach the update:
- Int8Linear weights hand (A, X) to a gradient sink (lowmem.model.int8_linear); nn.Linear weights kept in float and every
  other float parameter use `register_post_accumulate_grad_hook`. Low-rank weights accumulate only their projected
  gradient (lowmem.optim.lowrank.accumulate_); float parameters' gradients are moved into the runtime's own fp32/param-dtype
  buffer between micro-batches (`.grad` is None outside backward, so a stray `zero_grad()` cannot lose them and a
  foreign `optimizer.step()` sees nothing to apply: no double update).
- On the last micro-batch of a step each weight is written the moment its gradient is complete.

Clipping (`clip_mode`): `per_tensor` (default) clips each tensor's gradient (the projected R for low-rank weights) to
`grad_clip`; `none`; `two_pass`: exact global clipping of the norm of what the updates consume,
sqrt(Σ ||R||² over low-rank weights + Σ ||g||² over float parameters) (R: the projected gradient; the dense gradient
of a low-rank weight is never formed). LowMemOptimizer clips the same norm, and `stats["grad_norm"]` reports it on
both paths. lowmem implements two_pass as a deferred commit, not a second backward: on the last micro-batch every
layer only accumulates; `step()` then settles all projected gradients, computes the global norm and commits every
layer with one coefficient. Cost: the projected gradients R of all layers
(~ Σ m·r·4 bytes) and the float parameters' gradients live until `step()`; no extra backward.

Data parallelism (`prepare(model, cfg, data_parallel=DataParallel(...))`, lowmem.distributed): every rank runs the
same loop on its slice of the global batch. A low-rank weight's projected gradient R is reduced across ranks when its
last micro-batch's gradient arrives, asynchronously, and the weight is written when the next layer's gradient arrives
(the last one in `step()`): the reduction runs under the next layer's backward. Refresh sketches are reduced inside
the range finder (ReducedGrad), so all ranks compute the same projector. Float parameters' gradients are reduced
(to their owner at ZeRO >= 1, which broadcasts the new values). `step()` agrees on the statistics with one small
all-reduce (mean loss, global norm, skipped anywhere, largest peak) and reports the payload bytes moved
("comm_bytes"). Non-finite gradients are then handled per layer (a layer whose reduced gradient is not finite is not
written on any rank; the step is reported skipped everywhere).

Non-finite gradients: no NaN/Inf is ever written into a weight or a moment. With `two_pass` the whole step is skipped
(nothing is written: measure-then-commit). With `per_tensor`/`none` layers are committed during backward, so the
detection is per layer: the first layer whose gradient is non-finite and every layer after it in that backward are
skipped and the step is reported skipped, with how many layers were written ("layers_written": those before it).
A non-finite loss writes nothing (`runtime.backward(loss)`; with data parallelism its backward does not even run).

No host synchronisation inside backward (one process): norms, clipping coefficients and non-finite flags stay
0-dim device tensors. A running device flag ("poisoned") holds whether the loss or any layer so far in this step
was non-finite; each commit computes its update from a gradient zeroed where the flag holds and keeps its old
weight bytes and state by torch.where (lowmem.optim.lowrank.commit_, skip=...), so the semantics above hold
without the host knowing. A non-finite loss therefore still runs its backward (with every layer discarded on the
device) instead of returning early. `step()` reads everything once (one synchronisation: losses, squared norms,
flags; two_pass reads its global norm in the same one) and then puts back the host-side update counters of the
skipped layers. A refresh step reads the device once per refreshed weight: the range finder's fallback decision
(lowmem.optim.rsvd; early stopping is decided on the device). The refresh's host bookkeeping that depends on the
skip flag (the policy's record, or putting back the projector, counters and a residual selection of a skipped
weight) waits for step()'s read (commit_'s stats["pending"]). Data parallel keeps the host-side decisions (and their
synchronisations), since the ranks must agree on them. Tested in tests/unit/hooks/test_no_sync.py (Python-side
reads counted on CPU; the CUDA variant runs ordinary steps under torch.cuda.set_sync_debug_mode("error")). On CUDA
a refresh step may also wait inside torch.linalg (QR/SVD error checks of the range finder), not counted here.

Length: one class, the step's state machine (micro-batches, arrival of gradients, commits, the device-side flags and
the step's single read) over the same per-step fields; split apart, each piece would need all of them passed in.
"""
from __future__ import annotations

import math
import resource
from contextlib import contextmanager
from functools import partial

import torch
from torch import Tensor, nn

from quant import compiled

from lowmem.config import LowMemConfig
from lowmem.distributed import DataParallel
from lowmem.optim.float_adamw import float_adamw_update_, init_float_adamw_state
from lowmem.optim.linop import DenseGrad, squared_norm
from lowmem.optim.lowrank import (accumulate_, clip_coefficient, commit_, follower_state, init_lowrank_state, settle_,
                                  undo_skipped_commit_)
from lowmem.optimizer import float_param_bits, float_param_weight_decay, global_squared_norm
from lowmem.schedule import lr_at
from lowmem.model.surgery import convert_int8_to_linears, convert_model
from lowmem.model.trainables import Trainable, collect_trainables, sr_key, weight_target

from hooks.state import RuntimeState
from hooks.zero3 import WeightPartition

_RUNTIME_ATTR = "_lowmem_runtime"


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA allocator peak on GPU; the process's peak resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _host_values(tensors: list[Tensor], device: torch.device) -> list[float]:
    """Python floats of one-element tensors (any dtype and device) in order, from one read: the tensors of one dtype
    and device are stacked and widened to fp64 together (a few ops per step instead of three per tensor; a step
    reads about four values per weight)."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    with torch.no_grad():   # a loss still attached to its graph
        parts = [torch.stack([tensors[i].reshape(()) for i in idx]).to(device=device, dtype=torch.float64)
                 for idx in groups.values()]
    flat = torch.cat(parts).tolist() if parts else []
    values = [0.0] * len(tensors)
    for i, value in zip((i for idx in groups.values() for i in idx), flat):
        values[i] = value
    return values


class Runtime(RuntimeState):
    """Attached to one model; owns the optimizer state of every trained tensor. Build it with `prepare`."""

    def __init__(self, model: nn.Module, config: LowMemConfig, trainables: list[Trainable],
                 data_parallel: DataParallel | None = None):
        if getattr(model, _RUNTIME_ATTR, None) is not None:
            raise RuntimeError("lowmem hooks are already attached to this model; call runtime.detach() first")
        if not trainables:
            raise ValueError("prepare(): the model has no trainable tensors (all frozen?)")
        self.model = model
        self.config = config
        compiled.set_enabled(config.compile)
        self._compile_s_seen = compiled.compile_seconds()
        self.trainables = trainables
        self.global_step = 0
        self.skipped_steps = 0
        self.dp = data_parallel
        self.partition: WeightPartition | None = None
        self.states: dict[int, dict[str, Tensor]] = {}
        if data_parallel is not None:
            _check_data_parallel(config, data_parallel)
        sizes: dict[int, int] = {}
        for item in trainables:
            if item.kind == "float":
                state = init_float_adamw_state(item.tensor, bits=float_param_bits(item))
            else:
                state = init_lowrank_state(item.spec, item.config, device=item.tensor.device)
            sizes[item.index] = _state_bytes(state) + (_weight_bytes(item) if self._zero3 else 0)
            self.states[item.index] = state
        if data_parallel is not None:
            data_parallel.assign(sizes)
            for item in trainables:
                if not data_parallel.owns(item.index):
                    self.states[item.index] = {} if item.kind == "float" else follower_state(self.states[item.index])
            if self._zero3:
                self._partition_weights()
        self._placement = {item.index: (item.tensor.dtype, item.tensor.device) for item in trainables}
        self._comm_bytes_at_start = 0 if data_parallel is None else data_parallel.comm.bytes_total
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
        if self.partition is not None:
            self.partition.gather_all_()   # the detached model is whole on every rank
            self.partition = None
        for item in self.trainables:
            if item.kind == "lowrank_int8":
                item.module.grad_sink = None
        if getattr(self.model, _RUNTIME_ATTR, None) is self:
            delattr(self.model, _RUNTIME_ATTR)
        if dequantize:
            convert_int8_to_linears(self.model)

    @property
    def _zero3(self) -> bool:
        return self.dp is not None and self.dp.zero_stage == 3 and self.dp.world_size > 1

    def _partition_weights(self) -> None:
        owners = {item.module: self.dp.owners[item.index] for item in self.trainables if item.kind == "lowrank_int8"}
        self.partition = WeightPartition(self.dp.comm, owners)
        for item in self.trainables:
            if item.kind == "lowrank_int8":
                item.tensor = item.module.weight_q     # drop the table's reference to the full codes

    def _reset_step(self) -> None:
        self._micro_done = 0
        self._inside = False
        self._lr = None
        self._accum: dict[int, dict] = {}
        self._inflight: list = []
        self._float_grads: dict[int, Tensor] = {}
        self._committed: set[int] = set()
        self._sq_norms: dict[int, float | Tensor] = {}
        self._refreshed: list[str] = []
        self._nonfinite: list[str] = []
        self._losses: list[float | Tensor] = []
        # One process: the device-side skip flag and, per loss / commit, (name, trainable or None, first non-finite
        # here, skipped) as 0-dim bool tensors, read once in step().
        self._poisoned: Tensor | None = None
        self._flags: list[tuple[str, Trainable | None, Tensor, Tensor]] = []
        # (trainable, its flag's index, finish(skipped, similarity), similarity tensor or None): a commit's host
        # bookkeeping that waits for the step's read (lowmem.optim.lowrank.commit_)
        self._pending: list = []
        self._layers_written = 0

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
        """`loss.backward()` with a guard: after a non-finite loss nothing of this step is written. One process:
        decided on the device (the backward still runs; every commit discards its update). Data parallel: the ranks
        agree first and skip the backward together (a lone skip would leave the others waiting in the backward's
        collectives)."""
        if not self._inside:
            raise RuntimeError("call runtime.backward(loss) inside `with runtime.micro_batch():`")
        if self.dp is None:
            # No synchronisation: a non-finite loss poisons the step on the device (every layer then keeps its old
            # values) and is reported as "loss" by step().
            detached = loss.detach()
            self._losses.append(detached)
            self._flag("loss", None, ~torch.isfinite(detached))
            loss.backward()
            return
        value = float(loss.detach())
        self._losses.append(value)
        finite = math.isfinite(value)
        if self.dp is not None and self.dp.any_(not finite):
            self._nonfinite.append("loss" if not finite else "loss (on another rank)")
            return
        if not finite:
            self._nonfinite.append("loss")
            return
        loss.backward()

    def step(self) -> dict:
        """Finish the optimizer step: commit deferred updates, advance the schedule, return the step's stats."""
        if self._micro_done != self.grad_accum_steps:
            raise RuntimeError(f"runtime.step() after {self._micro_done} micro-batches; grad_accum_steps is "
                               f"{self.grad_accum_steps}")
        self._finish_inflight()
        if self._deferred:
            self._commit_deferred()
        if self.dp is None:
            self._read_device_stats()
        skipped = bool(self._nonfinite)
        grad_sq = global_squared_norm(self._sq_norms)
        loss = sum(self._losses) / len(self._losses) if self._losses else None
        device = self.trainables[0].tensor.device
        peak_bytes = peak_memory_bytes(device)
        comm_bytes = None
        if self.dp is not None:
            loss, grad_sq, skipped, peak_bytes = self._agree_on_stats(loss, grad_sq, skipped, peak_bytes)
            comm_bytes = self.dp.comm.bytes_total - self._comm_bytes_at_start
            self._comm_bytes_at_start = self.dp.comm.bytes_total
        if skipped:
            self.skipped_steps += 1
            self._accum.clear()
            self._float_grads.clear()
        stats = {
            "step": self.global_step,
            "lr": self._lr,
            "loss": loss,
            "grad_norm": math.sqrt(grad_sq) if not skipped else float("nan"),
            "skipped": skipped,
            "nonfinite": list(self._nonfinite),
            "layers_written": len(self._committed) if self.dp is not None else self._layers_written,
            "refreshed": list(self._refreshed),
            "peak_memory_bytes": peak_bytes,
            "comm_bytes": comm_bytes,
            "compile_s": compiled.compile_seconds() - self._compile_s_seen,  # kernels compiled in this step
        }
        self._compile_s_seen += stats["compile_s"]
        self.global_step += 1
        self._reset_step()
        return stats

    # -- device-side flags (one process) ---------------------------------------------------------------------------
    def _flag(self, name: str, item: Trainable | None, nonfinite: Tensor) -> Tensor:
        """Record `name`'s non-finite flag; returns the skip flag in force before it (what its commit must obey)."""
        before = self._poisoned_on(nonfinite.device)
        self._poisoned = before | nonfinite
        self._flags.append((name, item, nonfinite & ~before, self._poisoned))
        return before

    def _poisoned_on(self, device: torch.device) -> Tensor:
        if self._poisoned is None:
            self._poisoned = torch.zeros((), dtype=torch.bool, device=device)
        return self._poisoned.to(device, non_blocking=True)

    def _read_device_stats(self, extra: Tensor | None = None) -> list[float]:
        """The step's one synchronisation: losses, squared norms, flags (and `extra` values) in one read. Turns
        them into the host values step() reports, puts back the update counters of skipped layers, and returns
        the `extra` values. Values already read are not read again; nothing left to read means no read at all."""
        losses = [v for v in self._losses if isinstance(v, Tensor)]
        read_losses = [v for v in self._losses if not isinstance(v, Tensor)]
        sq_keys = [k for k, v in self._sq_norms.items() if isinstance(v, Tensor)]
        device = self._poisoned.device if self._poisoned is not None else self.trainables[0].tensor.device
        similarities = [sim for *_, sim in self._pending if sim is not None]
        tensors = (losses + [self._sq_norms[k] for k in sq_keys]
                   + [f for _, _, first, after in self._flags for f in (first, after)] + similarities
                   + ([] if extra is None else list(extra.reshape(-1))))
        values = _host_values(tensors, device)
        n_loss, n_sq, n_flags = len(losses), len(sq_keys), 2 * len(self._flags)
        self._losses = read_losses + values[:n_loss]
        self._sq_norms.update(zip(sq_keys, values[n_loss:n_loss + n_sq]))
        flags = values[n_loss + n_sq:n_loss + n_sq + n_flags]
        for (name, item, _, _), first, after in zip(self._flags, flags[0::2], flags[1::2]):
            if first:
                self._nonfinite.append(name)
            if item is None:
                continue
            if not after:
                self._layers_written += 1
            else:
                undo_skipped_commit_(self.states[item.index])
        n_sim = len(similarities)
        sim_values = iter(values[n_loss + n_sq + n_flags:n_loss + n_sq + n_flags + n_sim])
        for item, flag_index, finish, sim in self._pending:
            skipped = bool(flags[2 * flag_index + 1])
            finish(skipped, None if sim is None else next(sim_values))
            if skipped and item.name in self._refreshed:
                self._refreshed.remove(item.name)
        self._pending.clear()
        self._flags.clear()
        self._poisoned = None
        return values[n_loss + n_sq + n_flags + n_sim:]

    def _agree_on_stats(self, loss, grad_sq, skipped, peak_bytes):
        """One small all-reduce so every rank reports the same step: mean loss over ranks, the global squared norm
        (owners' parts summed; at ZeRO 0 every rank already has all of it), skipped anywhere, the largest peak."""
        if self.partition is not None:
            self.partition.flush()
        dp = self.dp
        sums = torch.tensor([0.0 if loss is None else loss, grad_sq if dp.partitioned else 0.0],
                            dtype=torch.float64, device=dp.comm.device)
        maxes = torch.tensor([float(skipped), float(peak_bytes)], dtype=torch.float64, device=dp.comm.device)
        dp.sum_(sums)
        dp.max_(maxes)
        loss = None if loss is None else float(sums[0]) / dp.world_size
        if dp.partitioned:
            grad_sq = float(sums[1])
        return loss, grad_sq, bool(maxes[0]), int(maxes[1])

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
        if self._last_micro:
            if self.dp is not None:
                self._float_grads[item.index] = self.dp.reduce_float_grad(item.index, self._float_grads[item.index])
            if not self._deferred:
                self._commit_float(item, clip_coef=None)

    def _accumulate_lowrank(self, item: Trainable, op) -> None:
        accum = self._accum.setdefault(item.index, {})
        accumulate_(item.spec, item.config, self.states[item.index], accum, op, global_step=self.global_step,
                    micro_index=self._micro_done if accum else 0, num_micro_batches=self.grad_accum_steps,
                    reduce_mean_=None if self.dp is None else self.dp.comm.all_reduce_mean_)
        if self._last_micro:
            if self.dp is None:
                if not self._deferred:
                    self._commit_lowrank(item, clip_coef=None)
                return
            # Data parallel: the reduction of R runs while autograd computes the next layer's gradient; this
            # layer is written when that one arrives (or in step() for the last layer).
            self._inflight.append((item, self.dp.reduce_lowrank_(item.index, accum)))
            self._finish_inflight(keep=1 if self.dp.overlap else 0)

    def _finish_inflight(self, keep: int = 0) -> None:
        while len(self._inflight) > keep:
            item, finish = self._inflight.pop(0)
            finish()
            if not self._deferred:
                self._commit_lowrank(item, clip_coef=None)

    # -- commits ---------------------------------------------------------------------------------------------------
    def _commit_lowrank(self, item: Trainable, clip_coef: float | None) -> None:
        accum = self._accum.pop(item.index)
        self._committed.add(item.index)
        if self.dp is None:
            self._commit_lowrank_on_device(item, accum, clip_coef)
            return
        exchange = None if self.dp is None else self.dp.exchange(item.index, item.tensor.device)
        writes = exchange is None or exchange.writes_weight
        stats = commit_(item.spec, item.config, self.states[item.index], accum,
                        weight_target(item) if writes else None, global_step=self.global_step, lr=self._lr,
                        clip_coef=clip_coef, exchange=exchange)
        if stats["skipped"]:
            self._nonfinite.append(item.name)
            self._committed.discard(item.index)
            return
        if self.dp is None or self.dp.owns(item.index):
            self._sq_norms[item.index] = stats["grad_sq"]
        if stats["refreshed"]:
            self._refreshed.append(item.name)
            if self.dp is not None and self.dp.debug:
                self.dp.check_identical(f"{item.name} projector", self.states[item.index]["proj_data"])

    def _commit_lowrank_on_device(self, item: Trainable, accum: dict, clip_coef: float | None) -> None:
        """One process: commit with the device-side skip flag (no synchronisation on an ordinary step). With a
        clip_coef (two_pass) the host has already found every gradient finite: nothing is flagged."""
        grad_sq = settle_(item.spec, item.config, accum)
        if clip_coef is None:
            skip = self._flag(item.name, item, ~torch.isfinite(grad_sq))
        else:
            skip = False
            self._layers_written += 1
        stats = commit_(item.spec, item.config, self.states[item.index], accum, weight_target(item),
                        global_step=self.global_step, lr=self._lr, clip_coef=clip_coef, skip=skip)
        if stats.get("pending") is not None:   # refresh / residual selection: booked or undone at the step's read
            self._pending.append((item, len(self._flags) - 1, *stats["pending"]))
        if clip_coef is None:
            self._sq_norms[item.index] = stats["grad_sq"]
        if stats["refreshed"]:
            self._refreshed.append(item.name)

    def _commit_float_on_device(self, item: Trainable, grad: Tensor, clip_coef: float | None) -> None:
        if clip_coef is None:
            sq_norm = squared_norm(grad)
            self._flag(item.name, item, ~torch.isfinite(sq_norm))
            self._sq_norms[item.index] = sq_norm
            skip = self._poisoned.to(grad.device)   # this layer's own flag included
        else:   # two_pass: found finite by the host already
            skip = torch.zeros((), dtype=torch.bool, device=grad.device)
            self._layers_written += 1
        cfg = item.config
        if clip_coef is None and cfg.clip_mode == "per_tensor" and cfg.grad_clip is not None:
            clip_coef = clip_coefficient(sq_norm, cfg.grad_clip)
        # in place: the gradient is the runtime's own (popped) and dies with this commit; a scaled copy would hold a
        # second gradient-sized tensor (250 MiB for Llama-2-7B's bf16 head) at the step's peak
        if clip_coef is not None and (isinstance(clip_coef, Tensor) or clip_coef != 1.0):
            grad = grad.mul_(clip_coef)
        grad = grad.masked_fill_(skip, 0.0)   # finite input for the discarded update (8-bit moments refuse NaN)
        float_adamw_update_(item.tensor.data, grad, self.states[item.index], lr=self._lr, beta1=cfg.betas[0],
                            beta2=cfg.betas[1], eps=cfg.eps, weight_decay=float_param_weight_decay(item),
                            sr_key=sr_key(item), keep_old=skip)

    def _commit_float(self, item: Trainable, clip_coef: float | None) -> None:
        grad = self._float_grads.pop(item.index)
        self._committed.add(item.index)
        if self.dp is None:
            self._commit_float_on_device(item, grad, clip_coef)
            return
        if self.dp is not None and not self.dp.owns(item.index):
            self.dp.broadcast_param_(item.index, item.tensor)   # the owner's new values
            return
        if self._nonfinite and self.dp is None:
            return
        sq_norm = float(squared_norm(grad))
        if not math.isfinite(sq_norm):
            self._nonfinite.append(item.name)
            self._committed.discard(item.index)
            if self.dp is not None:
                self.dp.broadcast_param_(item.index, item.tensor)   # unchanged values: the others wait for them
            return
        cfg = item.config
        if clip_coef is None:
            clip_coef = 1.0
            if cfg.clip_mode == "per_tensor" and cfg.grad_clip is not None:
                clip_coef = min(1.0, cfg.grad_clip / (math.sqrt(sq_norm) + 1e-6))
        float_adamw_update_(item.tensor.data, grad if clip_coef == 1.0 else grad.mul_(clip_coef),
                            self.states[item.index], lr=self._lr, beta1=cfg.betas[0], beta2=cfg.betas[1],
                            eps=cfg.eps, weight_decay=float_param_weight_decay(item), sr_key=sr_key(item))
        self._sq_norms[item.index] = sq_norm
        if self.dp is not None:
            self.dp.broadcast_param_(item.index, item.tensor)

    def _commit_deferred(self) -> None:
        """two_pass: measure every settled gradient, then commit all with the exact global coefficient."""
        by_index = {item.index: item for item in self.trainables}
        if self.dp is None:
            self._commit_deferred_on_device(by_index)
            return
        # The norm both paths clip (LowMemOptimizer too): the exactly rounded sum of this rank's owned squared norms.
        sq_norms: dict[int, float] = {}
        for index, accum in self._accum.items():
            sq = settle_(by_index[index].spec, by_index[index].config, accum)
            if self.dp.owns(index):
                sq_norms[index] = float(sq)
        for index, grad in self._float_grads.items():
            if self.dp.owns(index):
                sq_norms[index] = float(squared_norm(grad))
        # A non-finite local sum poisons the global one, so every rank takes the same decision below.
        sq_total = self.dp.total_over_owners(global_squared_norm(sq_norms))
        if self._two_pass_writes(sq_total):
            self._commit_all_clipped(by_index, sq_total)

    def _commit_deferred_on_device(self, by_index: dict[int, Trainable]) -> None:
        """two_pass, one process: every squared norm, the losses and the loss flags in the step's one read."""
        sq = {index: settle_(by_index[index].spec, by_index[index].config, accum)
              for index, accum in self._accum.items()}
        float_sq = {index: squared_norm(grad) for index, grad in self._float_grads.items()}
        keys = list(sq) + list(float_sq)
        parts = [sq[k] for k in sq] + [float_sq[k] for k in float_sq]
        values = self._read_device_stats(None if not parts else
                                         torch.stack([p.double().to(parts[0].device) for p in parts]))
        # the exactly rounded sum LowMemOptimizer clips too (global_squared_norm): hooks on == hooks off
        sq_total = global_squared_norm(dict(zip(keys, values)))
        if self._two_pass_writes(sq_total):
            self._sq_norms.update(zip(keys, values))
            self._commit_all_clipped(by_index, sq_total)

    def _two_pass_writes(self, sq_total: float) -> bool:
        """two_pass is all or nothing: False (and the step reported skipped) when the global squared norm is not
        finite or a loss was not."""
        if not math.isfinite(sq_total) or self._nonfinite:
            self._nonfinite.append("gradient (two_pass: nothing written)")
            return False
        return True

    def _commit_all_clipped(self, by_index: dict[int, Trainable], sq_total: float) -> None:
        """two_pass's commit: every held gradient with one coefficient from the global squared norm `sq_total`."""
        coef = 1.0
        if self.config.grad_clip is not None:
            coef = min(1.0, self.config.grad_clip / (math.sqrt(sq_total) + 1e-6))
        for index in list(self._accum):
            self._commit_lowrank(by_index[index], clip_coef=coef)
        for index in list(self._float_grads):
            self._commit_float(by_index[index], clip_coef=coef)


def prepare(model: nn.Module, config: LowMemConfig | None = None, *,
            data_parallel: DataParallel | None = None) -> Runtime:
    """Model surgery (split fused q/k/v, INT8 linears when `int8_weights`), optimizer state, hooks -> Runtime.

    data_parallel: a lowmem.distributed.DataParallel when several processes train one model (every rank calls
    prepare on an identical model); None for one process.
    """
    cfg = config if config is not None else LowMemConfig()
    convert_model(model, cfg)
    return Runtime(model, cfg, collect_trainables(model, cfg), data_parallel)


def _state_bytes(state: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def _weight_bytes(item: Trainable) -> int:
    if item.kind != "lowrank_int8":
        return 0
    return _state_bytes({"q": item.module.weight_q, "s": item.module.weight_scales})


def _check_data_parallel(cfg: LowMemConfig, dp: DataParallel) -> None:
    """Settings whose data-parallel form would need the dense gradient on one rank are refused up front."""
    if dp.world_size > 1 and cfg.error_feedback != "off":
        raise ValueError(f"error_feedback={cfg.error_feedback!r} keeps the dense gradient residual per weight, which "
                         "would need the dense (m, n) gradient reduced across ranks; it is not available with "
                         f"{dp.world_size} processes: use error_feedback=off (or one process)")
