"""Merge-and-restart training of LoRA-style adapters: the ReLoRA family of "Approximations may be all you need"
(shared/papers/approximations-low-rank-pretraining.txt, §3-4.1), built on peft's public API.

Every `interval_steps` optimizer steps the adapters are merged into the base weights (`merge_and_unload`), new
adapters are created on the merged model (`get_peft_model`), and the adapters' optimizer is rebuilt, so their Adam
state starts from zero; the learning rate then re-warms linearly over `rewarm_steps` (ReLoRA's jagged schedule; the
paper uses 100 re-warm-up steps per 2500-step cycle). What the new adapters start from is the method:

- ReLoRA: peft's LoRA init (A Kaiming-uniform, B = 0): the restart leaves the model's function unchanged.
- ReDoRA: DoRA, magnitude re-initialised from the column norms of the merged weight: function unchanged.
- RePiSSA: PiSSA on the merged weight (principal part in the adapters, residual frozen): function unchanged.
- ReLoQRa (`qr_init_`): W = Q R (reduced QR of the merged weight W (m, n)); B = Q[:, :r] (m, r), A = R[:r, :] (r, n)
  scaled so that the adapter adds exactly Q_r R_r, the base weight staying W -- the paper's eq. (5) "W = W + Q[:, :r]
  R[:r, :]", with the original weight kept frozen. Unlike the others this changes the function at every restart (the
  paper reports the larger weight norm it gives); peft's "olora" init is the function-preserving variant (it
  subtracts Q_r R_r from the base).

Parameters that are not adapted (embeddings, norms, lm_head) keep their optimizer state across restarts; they are
trained at all only when `train_other` is set (pre-training from scratch, as ReLoRA does).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters that belong to peft adapter layers (lora_*, vera_*, magnitude vectors)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    seen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for name, p in module.named_parameters():
                if p.requires_grad and not name.startswith("base_layer."):
                    seen[id(p)] = p
    return list(seen.values())


def set_other_trainable(model: nn.Module, adapter_params: list[nn.Parameter]) -> list[nn.Parameter]:
    """Make every floating-point parameter that is not an adapter parameter and not the base weight/bias of an
    adapted layer trainable (peft freezes them all); return them."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    frozen = {id(p) for m in model.modules() if isinstance(m, BaseTunerLayer)
              for p in m.get_base_layer().parameters()}
    adapter = {id(p) for p in adapter_params}
    other = []
    for p in model.parameters():
        if id(p) not in frozen and id(p) not in adapter and p.is_floating_point():
            p.requires_grad_(True)
            other.append(p)
    return other


@torch.no_grad()
def qr_init_(model: nn.Module, adapter_name: str = "default") -> None:
    """ReLoQRa initialisation of every LoRA layer of `model` (a PeftModel): with W (m, n) the layer's base weight
    (fp32 math), Q (m, k), R (k, n), k = min(m, n), the reduced QR of W: lora_B = Q[:, :r], lora_A = R[:r, :] / s with s
    the layer's LoRA scaling, so s * B A = Q[:, :r] R[:r, :]. The base weight is not changed."""
    from peft.tuners.lora import LoraLayer

    found = False
    for module in model.modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            weight = module.get_base_layer().weight
            if not weight.is_floating_point():
                raise TypeError(f"ReLoQRa needs a floating-point base weight, got {weight.dtype}; do not quantize it")
            r, scale = module.r[adapter_name], module.scaling[adapter_name]
            q, rr = torch.linalg.qr(weight.float(), mode="reduced")
            lora_a, lora_b = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
            lora_b.copy_(q[:, :r].to(lora_b.dtype))
            lora_a.copy_((rr[:r] / scale).to(lora_a.dtype))
            found = True
    if not found:
        raise ValueError(f"no LoRA layer with adapter {adapter_name!r} in the model; expected a peft LoRA model")


class RestartingAdapter:
    """A model trained through adapters that are merged and re-created every `interval_steps` steps.

    model: the plain model (wrapped in place). config: the peft config (copied for every wrap). reinit: called on
    the fresh PeftModel after each wrap (e.g. `qr_init_`). make_optimizer: builds the adapters' optimizer from their
    parameters. The caller runs steps and calls `after_step(step, total_steps)` after each optimizer step."""

    def __init__(self, model: nn.Module, config, *, interval_steps: int, rewarm_steps: int, train_other: bool,
                 make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
                 reinit: Callable[[nn.Module], None] | None = None, seed: int = 0):
        if not isinstance(interval_steps, int) or interval_steps < 1:
            raise ValueError(f"interval_steps must be an int >= 1, got {interval_steps!r}")
        if not isinstance(rewarm_steps, int) or rewarm_steps < 0:
            raise ValueError(f"rewarm_steps must be an int >= 0, got {rewarm_steps!r}")
        self.config, self.interval_steps, self.rewarm_steps = config, interval_steps, rewarm_steps
        self.train_other, self.make_optimizer, self.reinit, self.seed = train_other, make_optimizer, reinit, seed
        self.restarts = 0
        self.last_restart_step = 0
        self._wrap(model)

    def _wrap(self, model: nn.Module) -> None:
        from peft import get_peft_model

        device = next(model.parameters()).device
        # Each restart's random init comes from (seed, restart count), whatever else used the global generator.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed * 1_000_003 + self.restarts)
            self.model = get_peft_model(model, copy.deepcopy(self.config))
            if self.reinit is not None:
                self.reinit(self.model)
        self.adapter_params = adapter_parameters(self.model)
        self.other_params = set_other_trainable(self.model, self.adapter_params) if self.train_other else []
        self.optimizer = self.make_optimizer(self.adapter_params)

    def merged(self) -> nn.Module:
        """Merge the adapters into the base weights and return the plain model (this object is spent until
        `restart` wraps it again)."""
        return self.model.merge_and_unload()

    def restart(self, step: int) -> None:
        """Merge, re-create the adapters on the merged weights, fresh adapter optimizer; `step` is the next step."""
        base = self.merged()
        self.restarts += 1
        self.last_restart_step = step
        self._wrap(base)

    def after_step(self, step: int, total_steps: int) -> bool:
        """Restart after optimizer step `step` (0-based) when a cycle ends, except after the last step."""
        if (step + 1) % self.interval_steps == 0 and step + 1 < total_steps:
            self.restart(step + 1)
            return True
        return False

    def lr_factor(self, step: int) -> float:
        """Multiplier on the schedule's lr at `step`: linear re-warm-up (k + 1) / (rewarm_steps + 1) for the k-th step
        after a restart (k < rewarm_steps), else 1. No re-warm-up before the first restart."""
        since = step - self.last_restart_step
        if self.restarts == 0 or since >= self.rewarm_steps:
            return 1.0
        return (since + 1) / (self.rewarm_steps + 1)
