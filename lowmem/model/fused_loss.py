"""Fused linear + cross-entropy over vocabulary blocks: the (tokens, vocab) logits never exist in fp32.

    loss = causal_lm_loss(model, input_ids, labels)          # instead of model(input_ids=..., labels=...).loss
    runtime.backward(loss)

The plain path (HF `ForCausalLMLoss`) builds logits (T, V) in the compute dtype, an fp32 copy, the log-softmax and in
backward the logits' gradient, each T·V elements: for Llama-3-8B at 2048 tokens about 1 GiB apiece. Here the head's
rows are taken `block_rows` at a time (lowmem.model.head_grad.block_rows_for: a (T, block_rows) fp32 block of at most
LOGITS_BLOCK_ELEMENTS): the forward keeps a running log-sum-exp (T,) fp32 and the target logits; the backward
rebuilds each block's logits, turns them into the block's gradient A_b = c·(softmax − onehot) and adds A_b W_b to the
input's gradient. The head's weight gradient, per kind of head:

  - a float weight (nn.Linear, tied or untied with the input embedding): its rows A_bᵀ X are written block by block
    into one gradient tensor in the weight's dtype, which autograd hands on as usual (a tied weight sums it with the
    embedding's gradient);
  - an Int8Linear head (lowmem's INT8 low-rank head): no gradient tensor at all; the module's grad sink receives a
    `SoftmaxCEGrad` operator that rebuilds A block by block for every product the low-rank update asks for.

Both match `F.cross_entropy(hidden @ Wᵀ, labels, ignore_index=...)` (mean over non-ignored tokens; NaN when none is)
up to the summation order of the log-sum-exp over blocks and of the input's gradient over blocks.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lowmem.model.head_grad import LOGITS_BLOCK_ELEMENTS, HeadRows, SoftmaxCEGrad, block_rows_for, logits_gradient
from lowmem.model.int8_linear import Int8Linear
from lowmem.optim.linop import DenseGrad

__all__ = ["causal_lm_loss", "linear_cross_entropy"]


class _LinearCrossEntropy(torch.autograd.Function):
    """loss = mean_t∈valid (lse_t − z_t[y_t]), z = hidden Wᵀ, by vocabulary blocks (module docstring).

    Inputs: hidden (T, h) compute dtype; weight (V, h) float Parameter or None (Int8Linear head in `module`);
    labels (T,) int64; module: Int8Linear or None; ignore_index; block_elements.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, module, ignore_index, block_elements):
        head = HeadRows(weight) if module is None else HeadRows(module=module)
        T, V = hidden.shape[0], head.shape[0]
        valid = labels != ignore_index
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        if valid.any() and (int(safe.min()) < 0 or int(safe.max()) >= V):
            raise ValueError(f"labels must lie in [0, {V}) or equal ignore_index={ignore_index}")
        lse = torch.full((T,), float("-inf"), dtype=torch.float32, device=hidden.device)
        target = torch.zeros(T, dtype=torch.float32, device=hidden.device)
        step = block_rows_for(T, V, block_elements)
        for s in range(0, V, step):
            e = min(V, s + step)
            z = (hidden @ head.rows(s, e, hidden.dtype).T).float()
            in_block = (safe >= s) & (safe < e)
            picked = z.gather(1, (safe - s).clamp(0, e - s - 1)[:, None]).squeeze(1)
            target += torch.where(in_block, picked, torch.zeros_like(picked))
            # log-sum-exp of the block in place (torch.logsumexp would allocate two more blocks)
            top = z.amax(dim=1)
            block_lse = z.sub_(top[:, None]).exp_().sum(dim=1).log_().add_(top)
            lse = torch.logaddexp(lse, block_lse)
            del z
        n_valid = valid.sum()
        loss = torch.where(valid, lse - target, torch.zeros_like(lse)).sum() / n_valid
        ctx.save_for_backward(hidden, weight, lse, safe, valid)
        ctx.module = module
        ctx.block_elements = block_elements
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, lse, safe, valid = ctx.saved_tensors
        module = ctx.module
        head = HeadRows(weight) if module is None else HeadRows(module=module, phase="backward")
        T, V = hidden.shape[0], head.shape[0]
        token_weight = valid.float() * (grad_loss.float() / valid.sum())
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) \
            if ctx.needs_input_grad[0] else None
        grad_weight = torch.empty_like(weight) if weight is not None and ctx.needs_input_grad[1] else None
        if grad_hidden is not None or grad_weight is not None:
            step = block_rows_for(T, V, ctx.block_elements)
            for s in range(0, V, step):
                e = min(V, s + step)
                w = head.rows(s, e, hidden.dtype)
                a = logits_gradient(hidden, w, lse, safe, token_weight, row_start=s)
                if grad_hidden is not None:
                    if a.dtype == torch.float32:
                        grad_hidden.addmm_(a, w)
                    else:
                        grad_hidden += (a @ w).float()
                if grad_weight is not None:
                    if grad_weight.dtype == a.dtype:
                        torch.mm(a.T, hidden, out=grad_weight[s:e])
                    else:
                        grad_weight[s:e] = a.T @ hidden
                del a, w
        if module is not None and module.grad_sink is not None:
            op = SoftmaxCEGrad(hidden, lse, safe, token_weight, head, block_elements=ctx.block_elements)
            module.grad_sink(module, DenseGrad(op.dense()) if module.dense_grad else op)
            del op
        grad_hidden = None if grad_hidden is None else grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy(hidden: Tensor, head: nn.Module, labels: Tensor, *, ignore_index: int = -100,
                         block_elements: int = LOGITS_BLOCK_ELEMENTS) -> Tensor:
    """Mean cross-entropy of the logits hidden @ head.weightᵀ against labels, never forming (T, V) logits.

    hidden (..., h) float; labels (...) int64 of the same leading shape (ignore_index entries do not count);
    head: nn.Linear (V, h) without bias (its weight may be tied to the input embedding) or an Int8Linear without
    bias. Returns a 0-d fp32 loss; backward gives hidden's gradient and the head's weight gradient (float head) or
    hands it to the Int8Linear's grad sink (module docstring). `block_elements`: size of one fp32 logits block.
    """
    if not isinstance(head, (nn.Linear, Int8Linear)):
        raise TypeError(f"head must be an nn.Linear or Int8Linear, got {type(head).__name__}")
    if head.bias is not None:
        raise ValueError("linear_cross_entropy supports heads without bias (as LLaMA-like models have)")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
    h = hidden.shape[-1]
    flat_hidden = hidden.reshape(-1, h)
    flat_labels = labels.reshape(-1).long()
    if isinstance(head, Int8Linear):
        if h != head.in_features:
            raise ValueError(f"hidden size {h} does not match the head's in_features {head.in_features}")
        return _LinearCrossEntropy.apply(flat_hidden.to(head.compute_dtype), None, flat_labels, head,
                                         ignore_index, block_elements)
    if h != head.in_features:
        raise ValueError(f"hidden size {h} does not match the head's in_features {head.in_features}")
    return _LinearCrossEntropy.apply(flat_hidden.to(head.weight.dtype), head.weight, flat_labels, None,
                                     ignore_index, block_elements)


# Logit transforms of *ForCausalLM.forward that are a scalar factor, so they are folded into the hidden state
# (z = (c h) Wᵀ for a head without bias): config key -> (model types that apply it, factor from the value).
_LOGIT_FACTORS = {
    "logit_scale": (("cohere", "cohere2"), lambda value: value),                      # logits * logit_scale
    "logits_scaling": (("granite", "granitemoe", "granitemoeshared", "granitemoehybrid"),
                       lambda value: 1.0 / value),                                    # logits / logits_scaling
}
# Config keys that transform the logits in a way a scalar cannot express (a soft-capping tanh) or add to the loss.
_REFUSED = ("final_logit_softcapping", "output_multiplier_scale", "output_router_logits")


def _refuse(model_type: str, why: str) -> ValueError:
    return ValueError(f"causal_lm_loss: model_type {model_type!r} {why}, which lowmem's fused loss does not "
                      "compute; set fused_loss=false (launch.finetune) or use model(input_ids=..., labels=...).loss")


def logit_factor(model: nn.Module) -> float:
    """The scalar c with model(...).logits == c * (hidden @ headᵀ) for `model`'s config (Cohere's logit_scale,
    Granite's 1 / logits_scaling; 1.0 for most models). ValueError naming the model type and `fused_loss=false`
    when the model's logits or loss are something the fused loss cannot reproduce (Gemma 2's final-logit
    soft-capping, a head with a bias, router auxiliary losses)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    for key in _REFUSED:
        value = getattr(config, key, None)
        if value is True or (value not in (None, False) and not isinstance(value, bool) and value not in (0, 1)):
            raise _refuse(model_type, f"sets {key}={value!r}")
    factor = 1.0
    for key, (types, to_factor) in _LOGIT_FACTORS.items():
        value = getattr(config, key, None)
        if value is None:
            continue
        if model_type in types:
            factor *= float(to_factor(value))
        elif value != 1:
            raise _refuse(model_type, f"sets {key}={value!r} (applied as a logit factor only for {', '.join(types)})")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if getattr(head, "bias", None) is not None:
        raise _refuse(model_type, "has an output head with a bias")
    return factor


def causal_lm_loss(model: nn.Module, input_ids: Tensor, labels: Tensor | None = None, *,
                   attention_mask: Tensor | None = None, ignore_index: int = -100,
                   block_elements: int = LOGITS_BLOCK_ELEMENTS) -> Tensor:
    """The loss of `model(input_ids=..., labels=...).loss` for a Hugging Face *ForCausalLM (the head is a linear of
    the decoder's last hidden state, times a scalar), through `linear_cross_entropy`.

    input_ids, labels (B, S) int64 (labels None: input_ids); as in HF, position t predicts labels[:, t + 1].
    Model-specific details: an embedding scale lives in the model body (Gemma), so it is applied there; a scalar
    logit factor (Cohere's logit_scale, Granite's logits_scaling) scales the hidden state; models whose logits or
    loss the fused loss cannot reproduce are refused by `logit_factor` with a message naming `fused_loss=false`.
    """
    factor = logit_factor(model)
    head = model.get_output_embeddings()
    base = model.base_model
    if head is None or base is model:
        raise ValueError(f"causal_lm_loss needs a Hugging Face *ForCausalLM model (a base model and an output "
                         f"embedding), got {type(model).__name__}")
    labels = input_ids if labels is None else labels
    out = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    hidden = hidden[:, :-1]
    if factor != 1.0:
        hidden = hidden * factor
    return linear_cross_entropy(hidden, head, labels[:, 1:], ignore_index=ignore_index,
                                block_elements=block_elements)
