"""`LowMemOptimizer`: a standard torch optimizer over lowmem's per-parameter updates.

This is the plain path (full backward, then `optimizer.step()`), used on its own and as the reference twin of the
fused runtime: both call `lowmem.optim.lowrank` (accumulate_, settle_, commit_) and
`lowmem.optim.float_adamw.float_adamw_update_` with the same parameter table (`lowmem.model.trainables`), so
hooks-on and hooks-off give the same weights.

    model = ...                                   # nn.Linear or Int8Linear layers
    opt = LowMemOptimizer(model, preset("lowmem", lr=1e-4))
    loss.backward(); opt.step(); opt.zero_grad()

Int8Linear weights are not leaves: for them the optimizer installs a gradient sink that accumulates the dense weight
gradient (fp32, one per layer: this path is the reference, not the memory-saving one; use the fused runtime for that).

Clipping: `per_tensor` clips each tensor's (projected) gradient to `grad_clip`; `two_pass` clips the global norm
sqrt(Σ ||R||² over low-rank weights + Σ ||g||² over float parameters), R being the projected gradient each low-rank
update consumes (the full gradient for a full-rank one): the same norm as the fused runtime, which never has the
dense gradient of a low-rank weight. This path settles every R first (a refresh that is due happens there), then
commits with one coefficient. `last_stats["grad_norm"]` reports that norm. A step with any non-finite gradient
writes nothing (all gradients are checked first) and is counted in `skipped_steps`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from quant import compiled

from lowmem.config import LowMemConfig
from lowmem.optim.float_adamw import float_adamw_update_, init_float_adamw_state
from lowmem.optim.linop import DenseGrad, squared_norm
from lowmem.optim.lowrank import accumulate_, commit_, init_lowrank_state, settle_
from lowmem.model.trainables import Trainable, collect_trainables, sr_key, weight_target

_DENSE_GRAD_ATTR = "_lowmem_dense_grad"


def _accumulate_dense_grad(module: nn.Module, op) -> None:
    grad = op.dense()
    previous = getattr(module, _DENSE_GRAD_ATTR, None)
    setattr(module, _DENSE_GRAD_ATTR, grad if previous is None else previous.add_(grad))


def global_squared_norm(sq_norms: dict[int, float]) -> float:
    """Σ of per-tensor squared norms {parameter index: ||·||²}, exactly rounded (math.fsum: independent of the order
    the tensors arrived in), so the fused runtime and this optimizer take bit-identical two_pass coefficients."""
    return math.fsum(sq_norms.values())


def float_param_bits(item: Trainable) -> int:
    """8-bit moments for big float tensors, fp32 for small ones (norms, biases)."""
    cfg = item.config
    return 8 if cfg.float_optim_bits == 8 and item.tensor.numel() >= cfg.float_optim_min_numel else 32


def float_param_weight_decay(item: Trainable) -> float:
    """Decoupled weight decay on matrices only (embeddings, lm_head); never on norms and biases."""
    return item.config.weight_decay if item.tensor.dim() >= 2 else 0.0


class LowMemOptimizer(torch.optim.Optimizer):
    def __init__(self, model: nn.Module, config: LowMemConfig | None = None):
        self.config = config if config is not None else LowMemConfig()
        compiled.set_enabled(self.config.compile)
        self.trainables = collect_trainables(model, self.config)
        if not self.trainables:
            raise ValueError("LowMemOptimizer: the model has no trainable tensors (all frozen?)")
        super().__init__([t.tensor for t in self.trainables], {"lr": self.config.lr})
        self.global_step = 0
        self.skipped_steps = 0
        self.last_stats: dict = {}
        for item in self.trainables:
            if item.kind == "lowrank_int8":
                item.module.grad_sink = _accumulate_dense_grad

    # -- gradients -----------------------------------------------------------------------------------------------
    def _gradient(self, item: Trainable) -> Tensor | None:
        if item.kind == "lowrank_int8":
            return getattr(item.module, _DENSE_GRAD_ATTR, None)
        return item.tensor.grad

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for item in self.trainables:
            if item.kind == "lowrank_int8":
                setattr(item.module, _DENSE_GRAD_ATTR, None)

    def _state_for(self, item: Trainable) -> dict[str, Tensor]:
        state = self.state[item.tensor]
        if not state:
            if item.kind == "float":
                state.update(init_float_adamw_state(item.tensor, bits=float_param_bits(item)))
            else:
                state.update(init_lowrank_state(item.spec, item.config, device=item.tensor.device))
        return state

    # -- the step --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lr = float(self.param_groups[0]["lr"])
        grads = [(item, self._gradient(item)) for item in self.trainables]
        grads = [(item, g) for item, g in grads if g is not None]
        # Measure, then commit: nothing is written unless every gradient is finite.
        if not all(math.isfinite(float(squared_norm(g))) for _, g in grads):
            self.skipped_steps += 1
            self.last_stats = {"skipped": True, "grad_norm": float("nan"), "step": self.global_step}
            return loss
        # The norm that clipping bounds is that of what the updates consume (the fused runtime's definition): the
        # projected gradient R of each low-rank weight (settled first, refreshing its projector when due), the
        # gradient of each float parameter.
        accums: dict[int, dict] = {}
        sq_norms: dict[int, float] = {}
        for item, grad in grads:
            if item.kind == "float":
                sq_norms[item.index] = float(squared_norm(grad))
                continue
            accum: dict = {}
            accumulate_(item.spec, item.config, self._state_for(item), accum, DenseGrad(grad),
                        global_step=self.global_step, micro_index=0, num_micro_batches=1)
            sq_norms[item.index] = settle_(item.spec, item.config, accum)
            accums[item.index] = accum
        grad_sq = global_squared_norm(sq_norms)
        grad_norm = math.sqrt(grad_sq)
        cfg = self.config
        global_coef = None
        if cfg.clip_mode == "two_pass" and cfg.grad_clip is not None:
            global_coef = min(1.0, cfg.grad_clip / (grad_norm + 1e-6))
        refreshed = []
        for item, grad in grads:
            state = self._state_for(item)
            if item.kind == "float":
                coef = global_coef
                if coef is None:
                    coef = 1.0
                    if item.config.clip_mode == "per_tensor" and item.config.grad_clip is not None:
                        coef = min(1.0, item.config.grad_clip / (math.sqrt(sq_norms[item.index]) + 1e-6))
                g = grad if coef == 1.0 else grad * coef
                float_adamw_update_(item.tensor.data, g, state, lr=lr, beta1=item.config.betas[0],
                                    beta2=item.config.betas[1], eps=item.config.eps,
                                    weight_decay=float_param_weight_decay(item), sr_key=sr_key(item))
            else:
                stats = commit_(item.spec, item.config, state, accums.pop(item.index), weight_target(item),
                                global_step=self.global_step, lr=lr, clip_coef=global_coef)
                if stats["refreshed"]:
                    refreshed.append(item.name)
        self.last_stats = {"skipped": False, "grad_norm": grad_norm, "step": self.global_step,
                           "refreshed": refreshed}
        self.global_step += 1
        return loss

    # -- state -----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """{"state": {index: {key: tensor}}, "param_groups": [...], "lowmem": {...}}: tensors only."""
        index_of = {id(item.tensor): item.index for item in self.trainables}
        state = {index_of[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in self.state.items() if s}
        groups = [{"lr": g["lr"], "params": [index_of[id(p)] for p in g["params"]]} for g in self.param_groups]
        return {"state": state, "param_groups": groups,
                "lowmem": {"global_step": self.global_step, "skipped_steps": self.skipped_steps}}

    def load_state_dict(self, state_dict: dict) -> None:
        """Exact restore (no dtype casts, unlike torch's default which casts float state to the param dtype)."""
        if len(state_dict["param_groups"]) != len(self.param_groups):
            raise ValueError("optimizer state has a different number of parameter groups")
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group["lr"] = saved["lr"]
        self.state.clear()
        for index, saved in state_dict["state"].items():
            index = int(index)
            if index >= len(self.trainables):
                raise ValueError(f"optimizer state names parameter {index}, the model has {len(self.trainables)}")
            tensor = self.trainables[index].tensor
            self.state[tensor] = {k: v.clone().to(tensor.device) for k, v in saved.items()}
        self.global_step = int(state_dict["lowmem"]["global_step"])
        self.skipped_steps = int(state_dict["lowmem"]["skipped_steps"])
