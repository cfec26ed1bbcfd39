"""Predict the peak memory of one training step from a Hugging Face config alone (no weights): DESIGN §5.

(Longer than 450 lines: one estimate composes every component of every method at each moment of a step; the
vocabulary-table and fused-loss moments share its resident-state terms, so splitting them out would scatter one
formula across modules.)

Shapes (LLaMA-like): h = hidden_size, i = intermediate_size, L = layers, nh / nkv heads, d = h / nh head dim,
V = vocab, tok = micro_batch_size * seq_len. Per layer seven linears, (out, in): q (nh·d, h), k and v (nkv·d, h),
o (h, nh·d), gate and up (i, h), down (h, i). Per-module overrides (LowMemConfig.overrides: rank, bits, ...) apply
by module name; every layer is modelled with layer 0's names (an override that names some layers only is counted as
if all had layer 0's settings).

The peak is the largest of four moments of a step, each = resident state + what is alive then:
  loss      forward done, logits and log-softmax alive (vocabulary-sized, fp32);
  head      start of backward: saved activations, the log-softmax gradient, lm_head's weight gradient and update;
  layer     backward of a layer: activations + one layer's transients (fused: dequantised weight for grad_input,
            projected gradient, fp32 update chunk; plain autograd: every weight gradient made so far);
  end       end of backward: embedding gradient (tied embeddings: lm_head's and the embedding's gradients plus their
            sum, the accumulation autograd does) and its AdamW update workspace.
`MemoryBreakdown.components` describes the winning moment; `notes` names it and the others.

Activation bytes per token per layer were measured with lowmem.memory.live_bytes on HF LlamaForCausalLM (eager/SDPA, fp32)
and match 8h + 2·nkv·d + 4i elements + (nh + 2) fp32 scalars (RMSNorm rsqrt, attention log-sum-exp) exactly; with
non-reentrant checkpointing a layer keeps only its input (h) and one layer is recomputed at a time.

Per-rank view (`zero_stage`, `world_size`; lowmem's distributed semantics, DESIGN §4; methods 'lowmem' and
'q_galore' only, which run on lowmem's runtime). The result is the peak of ONE rank. With world_size = 1 it is the
single-process estimate exactly, whatever the stage; with N > 1 ranks:
  stage 0    everything replicated: the single-process estimate.
  stage 1, 2 (identical in lowmem: no rank ever holds a full gradient) the optimizer state is partitioned by bytes,
             each tensor whole on one owner: optimizer_moments (low-rank moments and the float parameters' AdamW
             moments), residuals and error_feedback become ceil(total / N) each. A rank's real share can exceed the
             even split by at most the largest single parameter's state, named in the notes. Projectors, weights
             and float params stay replicated (every rank projects its own gradient). comm_buffers, alive for the
             whole step (an upper bound for per-layer buffers): the largest linear's projected gradient R
             (r x n or m x r, fp32, the full gradient for a full-rank linear) reduced, the broadcast update direction
             of the same size (float parameters' gradients are reduced in place, in their own buffer and dtype).
  stage 3    stage 2, plus the linear weights (INT8 + scales, or compute-dtype floats when int8_weights is off)
             partitioned as ceil(total / N), and gathered_weights: two gathered linears alive at a time (the one in
             use and the one prefetched), 2 x the largest linear's bytes. Float params (embeddings, norms, lm_head)
             stay replicated.
  Activations, logits and the per-layer transients are per rank and unchanged (any rank may own the largest layer).
Other methods (DeepSpeed's own ZeRO on torch optimizers keeps fp32 master weights and bucketed gradients, which
this model does not describe) raise ValueError for world_size > 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lowmem.optim.float_adamw import GUARD_CHUNK_ELEMENTS
from lowmem.optim.weights import rows_per_chunk

GIB = 1 << 30
METHODS = ("lowmem", "adamw_bf16", "adamw_fp32", "adamw_8bit", "galore", "q_galore", "lora", "qlora", "dora")
COMPONENTS = ("weights_int8", "weight_scales", "float_params", "grad_buffers", "optimizer_moments", "projectors",
              "residuals", "error_feedback", "activations", "logits_and_loss", "layer_transients", "comm_buffers",
              "gathered_weights", "cuda_context", "allocator_slack")
PARTITIONED = ("optimizer_moments", "residuals", "error_feedback")   # split across ranks from ZeRO stage 1 on
DISTRIBUTED_METHODS = ("lowmem", "q_galore")
ADAPTER_RANK = 16
CUDA_CONTEXT_BYTES = 500 * (1 << 20)   # CUDA context + cuBLAS workspace, typical of torch 2.x on one GPU
ALLOCATOR_SLACK = 0.05                 # caching-allocator fragmentation, fraction of the allocated peak
# fp32 buffers of one row chunk of an INT8 update with stochastic rounding (the delta, w, w/s, noise, floor, frac,
# masks): measured with LiveTensorBytes around quant.int8.sr_update_int8_, 6.5-6.9 chunk-sized fp32 buffers
UPDATE_FP32_BUFFERS = 7
# the same with the compiled SR write (quant.compiled, the default where a compiler works), which keeps no
# chunk-sized intermediate: the back-projected delta and its scaled copy, the dequantised rows that weight decay
# reads, one spare. From the kernel's structure (the CPU estimate runs under the live-bytes meter, i.e. eagerly,
# so it keeps the eager count); not measured on a GPU yet.
UPDATE_FP32_BUFFERS_COMPILED = 4


@dataclass
class MemoryBreakdown:
    components: dict[str, int]     # bytes per component (keys: COMPONENTS)
    peak_bytes: int
    method: str
    notes: list[str] = field(default_factory=list)


# Decoders whose MLP is 4 x hidden when the config names no size (GPT-2's n_inner None; BLOOM has no key).
_FFN_4X_TYPES = ("gpt2", "gpt_bigcode", "bloom", "falcon")


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """The LLaMA-shaped summary of a Hugging Face config (an object or a dict). Other decoders map onto it by
        their own names: GPT-2's n_inner (None: 4 x hidden, as BLOOM's MLP), Falcon's ffn_hidden_size, n_head_kv,
        multi_query / num_kv_heads for key/value heads. MoE experts are not counted (float parameters for now)."""
        get = (config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d))

        def first(*keys):
            return next((get(k) for k in keys if get(k) is not None), None)

        hidden = first("hidden_size", "n_embd", "d_model")
        heads = first("num_attention_heads", "n_head", "num_heads")
        layers = first("num_hidden_layers", "n_layer", "num_layers")
        inter = first("intermediate_size", "n_inner", "ffn_hidden_size", "ffn_dim")
        if inter is None and hidden is not None and get("model_type") in _FFN_4X_TYPES:
            inter = 4 * int(hidden)   # unset means 4 x hidden in these models' MLPs
        missing = [name for name, value in (("hidden_size", hidden), ("intermediate_size", inter),
                                            ("num_hidden_layers", layers), ("num_attention_heads", heads),
                                            ("vocab_size", get("vocab_size"))) if value is None]
        if missing:
            raise ValueError(f"model config lacks {missing}; a decoder-only Hugging Face config (LLaMA-like names, or "
                             "GPT-2's / Falcon's) is expected")
        heads, hidden = int(heads), int(hidden)
        head_dim = get("head_dim") or hidden // heads
        kv_heads = first("num_key_value_heads", "n_head_kv")
        if kv_heads is None:   # Falcon: multi_query means one key/value head unless the new decoder architecture
            multi_query = get("multi_query") and not get("new_decoder_architecture")
            kv_heads = 1 if multi_query else (get("num_kv_heads") or heads)
        return cls(hidden, int(inter), int(layers), heads, int(kv_heads), int(head_dim), int(get("vocab_size")),
                   bool(get("tie_word_embeddings", False)))

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, out, in) of one layer's linears."""
        h, i, q, kv = self.hidden, self.inter, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, q),
                ("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)]

    def embed_numel(self) -> int:
        return self.vocab * self.hidden

    def float_numels(self) -> list[int]:
        """Non-linear trainable tensors: embedding, lm_head (untied), 2 norms per layer, final norm."""
        sizes = [self.embed_numel()] + ([] if self.tied else [self.embed_numel()])
        return sizes + [self.hidden] * (2 * self.layers + 1)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _moments8(numel: int, block: int = 256) -> int:
    return 2 * (numel + 4 * _cdiv(numel, block))


def _activations(s: ModelShape, tok: int, dtype_bytes: int, checkpointing: bool, offload: bool = False,
                 recompute: bool = True) -> int:
    """Saved-for-backward bytes of the whole forward (layers + embedding output + final norm + RoPE tables).
    With checkpointing, `recompute`: during a layer's backward, one layer rebuilt (otherwise, at the loss and the
    head, only the kept inputs). offload (lowmem.model.offload): the layer inputs wait in host memory; one stays on
    the device: the last layer's (kept for its recompute) at the loss and the head, the previous layer's (prefetched
    while this layer runs its backward) during a layer's backward."""
    per_layer = tok * (dtype_bytes * (8 * s.hidden + 2 * s.kv_heads * s.head_dim + 4 * s.inter)
                       + 4 * (s.heads + 2))
    if dtype_bytes < 4:   # HF RMSNorm upcasts to fp32: input copy and normalised value kept in fp32 (2 norms)
        per_layer += tok * 2 * (8 - 2 * dtype_bytes) * s.hidden
    outer = tok * (dtype_bytes * 3 * s.hidden + 4) + 2 * 4 * tok * s.head_dim
    if checkpointing:   # layer inputs only, plus one layer rebuilt during its backward
        if not recompute:
            return (1 if offload else s.layers) * tok * s.hidden * dtype_bytes + outer
        # in a layer's backward the final norm's and the head's saved tensors are gone (their backward ran) and the
        # embedding's output is layer 0's kept input: RoPE tables and the loss's per-token scalar remain. Kept inputs:
        # all L on the device; with offload the copy brought back is the rebuilt layer's saved input (in per_layer)
        # and one more is there: the previous layer's, prefetched. Measured with LiveTensorBytes around a lowmem step
        # (tests/unit/lowmem/memory/test_memory.py): offload frees L - 1 inputs' bytes
        kept_inputs = 1 if offload else s.layers
        return kept_inputs * tok * s.hidden * dtype_bytes + per_layer + 4 * tok + 2 * 4 * tok * s.head_dim
    return s.layers * per_layer + outer


# The 8-bit float AdamW twin (lowmem.optim.float_adamw._update_8bit_twin_; "auto" always runs it) on n elements
# holds at its peak both decoded moments, an fp32 copy of the param, the denominator and |m| (five fp32 n-tensors,
# 20 bytes each element), plus the new uint8 codes; the moment codec (quant.moments8) then works in blocks of
# QUANT_CHUNK_ELEMENTS with ~26 bytes of int32 / fp32 / int64 temporaries per element while three fp32 n-tensors
# (m, v, the param copy: the denominator is gone) and two code tensors (14 bytes each element) are alive. Measured with lowmem.memory.measure around
# float_adamw_update_ (fp32 param and grad, CPU): whole tensor 24.0 n bytes (the codec's value checks add one
# more n-sized temporary), guarded chunk 26.0 c (its copies of param and codes first); below a few 1e5 elements
# the codec's block term wins (2.03 MB measured vs 2.03 MB modelled at n = 65536). bf16 param and grad, with and
# without stochastic rounding, whole and guarded, at 2e5 and 2e6 elements: within 0.3% of the measured peak.
TWIN_FP32_BUFFERS = 5
QUANT_CHUNK_ELEMENTS = 1 << 15
QUANT_CHUNK_BYTES_PER_ELEMENT = 26
# quant.bf16.sr_to_bf16 on n fp32 values (a bf16 param written with stochastic rounding): counter noise, its int32
# form, the rounded bits and the bf16 result, 14.0 bytes per element measured beyond its input
SR_BF16_BYTES_PER_ELEMENT = 14


def _twin8_bytes(n: int, param_bytes: int, checked: bool, sr: bool) -> int:
    """Peak workspace of the 8-bit twin on n elements beyond param, grad and state (comment above). A non-fp32
    param or grad adds its fp32 grad copy (grad.to(float32)); checked: the codec's finiteness/sign checks; sr: the
    bf16 param is written with stochastic rounding while m, v, p, the denominator and the new codes are alive."""
    grad32 = 4 * n if param_bytes != 4 else 0
    codec = 14 * n + QUANT_CHUNK_BYTES_PER_ELEMENT * min(n, QUANT_CHUNK_ELEMENTS)
    write = 18 * n + SR_BF16_BYTES_PER_ELEMENT * n if sr else 0
    return grad32 + max(4 * TWIN_FP32_BUFFERS * n + (4 * n if checked else 0), codec, write)


def _float_update_bytes(numel: int, param_bytes: int, bits: int, guarded: bool = True, sr: bool = False) -> int:
    """Workspace of one float parameter's AdamW update beyond its gradient (lowmem.optim.float_adamw).

    guarded (the fused one-process runtime, hooks.runtime: keep_old): flat chunks of GUARD_CHUNK_ELEMENTS, each
    chunk's param and moments copied first so that a non-finite step is undone on the device, then the update of
    that chunk, then one torch.where result at a time. Not guarded (lowmem.LowMemOptimizer, data-parallel owners):
    the whole tensor at once, with the codec's value checks. sr: a bf16 param written by quant.bf16.sr_to_bf16
    (stochastic_rounding on)."""
    sr = sr and param_bytes == 2
    if bits == 8:
        if not guarded:
            return _twin8_bytes(numel, param_bytes, checked=True, sr=sr)
        chunk = min(numel, GUARD_CHUNK_ELEMENTS)
        snapshot = chunk * (param_bytes + 2)     # param chunk + both uint8 code chunks (absmax: 1/64 of that)
        return snapshot + _twin8_bytes(chunk, param_bytes, checked=False, sr=sr)
    chunk = min(numel, GUARD_CHUNK_ELEMENTS) if guarded else numel
    snapshot = chunk * (param_bytes + 8) if guarded else 0    # param chunk + fp32 m and v chunks
    select = chunk * max(param_bytes, 4) if guarded else 0
    # sqrt and the division allocate one fp32 tensor each; a non-fp32 param an fp32 copy and the grad another;
    # the stochastic-rounding write runs after the division's tensors are freed
    work = 2 * 4 * chunk + (8 * chunk if param_bytes != 4 else 0)
    if sr:
        work = max(work, 8 * chunk + SR_BF16_BYTES_PER_ELEMENT * chunk)
    return snapshot + max(work, select)


def _unit_state(module: str, short: str, m: int, n: int, cfg) -> tuple[dict[str, int], int]:
    """({moments, projectors, residuals, error feedback} bytes, numel of the projected gradient R) of one low-rank
    linear (m, n) named `module` (`short`: its last name component) under LowMemConfig `cfg` with its per-module
    overrides for that name applied."""
    from fnmatch import fnmatchcase
    cfg = cfg.for_module(module)
    out = dict.fromkeys(("optimizer_moments", "projectors", "residuals", "error_feedback"), 0)
    full = cfg.rank >= min(m, n)
    r = min(cfg.rank, m, n)
    cross = cfg.cross_head and short in ("q_proj", "k_proj") and any(
        fnmatchcase(module, p) for p in cfg.cross_head_modules)
    right = cross or m >= n
    numel = m * n if full else (m * r if right else r * n)
    out["optimizer_moments"] = {8: _moments8(numel, cfg.moment_block_size), 16: 4 * numel,
                                32: 8 * numel}[cfg.optim_bits]
    if full:
        return out, numel
    d = n if right else m
    pn = d * r
    g = cfg.projector_group_size
    out["projectors"] = {4: _cdiv(pn, 2) + 4 * _cdiv(pn, g), 8: pn + 4 * d * _cdiv(r, g),
                         16: 2 * pn, 32: 4 * pn}[cfg.projector_bits]
    if cfg.residual_ratio > 0 and any(fnmatchcase(module, p) for p in cfg.residual_modules):
        k = max(1, math.ceil(cfg.residual_ratio * m * n - 1e-9))
        out["residuals"] = k * ((4 if m * n < 2 ** 31 else 8) + 2 * (4 if cfg.residual_dtype == "fp32" else 2))
    if cfg.error_feedback == "bf16":
        out["error_feedback"] = 2 * m * n
    elif cfg.error_feedback == "int8":
        out["error_feedback"] = m * n + 4 * m * _cdiv(n, cfg.weight_block_size)
    return out, numel


def _lowrank_units(s: ModelShape, cfg) -> list[tuple[str, dict[str, int], int]]:
    """Per linear of ONE layer: (name, {moments, projectors, residuals, error feedback} bytes, numel of its projected
    gradient R) under LowMemConfig `cfg`."""
    units = []
    for name, m, n in s.linears():
        module = f"model.layers.0.{'self_attn' if name[0] in 'qkvo' else 'mlp'}.{name}"
        out, numel = _unit_state(module, name, m, n, cfg)
        units.append((name, out, numel))
    return units


def _selected(module: str, cfg) -> bool:
    from fnmatch import fnmatchcase
    return (any(fnmatchcase(module, p) for p in cfg.target_modules)
            and not any(fnmatchcase(module, p) for p in cfg.exclude_modules))


def head_is_lowrank(s: ModelShape, cfg) -> bool:
    """An untied lm_head selected by target_modules and not excluded: a low-rank linear (INT8 with int8_weights);
    a tied head shares the embedding's float weight and never is (lowmem.model.trainables)."""
    return not s.tied and _selected("lm_head", cfg)


def embedding_is_lowrank(s: ModelShape, cfg) -> bool:
    """An untied input embedding (model.embed_tokens) selected and not excluded: a low-rank INT8 weight
    (lowmem.model.int8_embedding) whose gradient is its batch rows."""
    return not s.tied and _selected("model.embed_tokens", cfg)


def _lowrank_state(s: ModelShape, cfg) -> dict[str, int]:
    """Moments, projectors, residuals, error feedback of every low-rank linear under LowMemConfig `cfg`."""
    out = dict.fromkeys(("optimizer_moments", "projectors", "residuals", "error_feedback"), 0)
    for _, unit, _ in _lowrank_units(s, cfg):
        for key in out:
            out[key] += unit[key]
    return {k: v * s.layers for k, v in out.items()}


def _float_moment_bytes(numel: int, cfg) -> int:
    """AdamW moments of one float parameter: 8-bit for big ones when float_optim_bits is 8, else fp32."""
    return _moments8(numel) if cfg.float_optim_bits == 8 and numel >= cfg.float_optim_min_numel else 8 * numel


def _per_rank(s: ModelShape, cfg, c: dict[str, int], zero_stage: int, world: int, db: int) -> list[str]:
    """Turn the single-process resident components `c` into one rank's share, in place (module docstring)."""
    units = _lowrank_units(s, cfg)
    even = {key: _cdiv(c[key], world) for key in PARTITIONED}
    biggest = max([(sum(u[k] for k in PARTITIONED), f"{name} of one layer") for name, u, _ in units]
                  + [(_float_moment_bytes(n, cfg), "embedding" if n == s.embed_numel() else "a norm")
                     for n in s.float_numels()])
    c.update(even)
    # R reduced + the update direction broadcast; float gradients are reduced in place in their own buffer.
    c["comm_buffers"] = 2 * 4 * max(numel for _, _, numel in units)
    notes = [f"ZeRO stage {zero_stage} on {world} ranks, one rank's peak: optimizer state partitioned "
             f"({sum(even.values()) / 2**20:.1f} MiB even share); owners hold whole tensors, so a rank may hold up "
             f"to {biggest[0] / 2**20:.1f} MiB more (the largest single state: {biggest[1]}); projectors, float "
             f"params{' and weights' if zero_stage < 3 else ''} replicated"]
    if zero_stage == 3:
        per_linear = [m * n + 4 * m * _cdiv(n, cfg.weight_block_size) if cfg.int8_weights else db * m * n
                      for _, m, n in s.linears()]
        if cfg.int8_weights:
            c["weights_int8"] = _cdiv(c["weights_int8"], world)
            c["weight_scales"] = _cdiv(c["weight_scales"], world)
        else:
            linear_bytes = db * s.layers * sum(m * n for _, m, n in s.linears())
            c["float_params"] = c["float_params"] - linear_bytes + _cdiv(linear_bytes, world)
        c["gathered_weights"] = 2 * max(per_linear)
        notes.append(f"stage 3: linear weights partitioned (whole tensors: a rank may hold up to one linear, "
                     f"{max(per_linear) / 2**20:.1f} MiB, above the even share), two gathered linears alive "
                     "(in use + prefetched)")
    return notes


def _update_rows(m: int, n: int, device_type: str) -> int:
    """Rows of one update chunk (lowmem.optim.weights.rows_per_chunk): the update is written chunk by chunk."""
    return rows_per_chunk((m, n), device_type)


def _update_buffers(cfg, device_type: str) -> int:
    """fp32 chunk-sized buffers of one INT8 update chunk: the compiled write on an accelerator, else the eager one."""
    return UPDATE_FP32_BUFFERS_COMPILED if device_type != "cpu" and cfg.compile else UPDATE_FP32_BUFFERS


def _head_sink_transient(s: ModelShape, cfg, tok: int, db: int, a_block: int, module: str = "lm_head", *,
                         device_type: str, products_extra: int = 0) -> int:
    """The low-rank head's (or INT8 embedding's: `module`) update inside the backward: products with its gradient
    (R = G P (V, r) fp32, X P, one block of the logits' gradient `a_block` bytes, and `products_extra` bytes alive
    only while they are formed, such as a fused loss's dequantised head block), then the commit (R and its two
    decoded moments, fp32, or one update chunk of five fp32 buffers)."""
    cfg = cfg.for_module(module)
    V, h = s.vocab, s.hidden
    r = min(cfg.rank, V, h)
    full = cfg.rank >= min(V, h)
    r_numel = V * h if full else V * r
    products = 4 * r_numel + 4 * tok * r + a_block + products_extra
    # the commit's Adam on R: R and both decoded moments (as for a layer's linear), then one update chunk while R,
    # the Adam direction and V' (each the size of R: the whole (V, h) gradient at full rank) are still alive
    commit = max(4 * 3 * r_numel,
                 (_update_buffers(cfg, device_type) if cfg.int8_weights else 2) * 4 * _update_rows(V, h, device_type)
                 * h + 4 * 3 * r_numel)
    return max(products, commit)


def _lowrank_layer_transient(s: ModelShape, cfg, tok: int, dtype_bytes: int, *, device_type: str) -> int:
    """Largest one-linear transient of the fused backward: dequantised weight (compute dtype) for grad_input, the
    fp32 update chunk with its noise, the projected gradient and decoded projector (fp32), grad_input itself."""
    worst = 0
    layer_cfg = cfg
    for name, m, n in s.linears():
        cfg = layer_cfg.for_module(f"model.layers.0.{'self_attn' if name[0] in 'qkvo' else 'mlp'}.{name}")
        r = min(cfg.rank, m, n)
        full = cfg.rank >= min(m, n)
        dense = m * n * dtype_bytes if cfg.int8_weights else 0
        # fp32 update of one row chunk on the commit (the update is written chunk by chunk): INT8+SR holds the
        # delta, w' = w + delta, w'/s', the noise and the floor's temporaries; a float weight its fp32 copy and delta
        buffers = _update_buffers(cfg, device_type) if cfg.int8_weights else 2
        update = buffers * 4 * _update_rows(m, n, device_type) * n
        # device-side skip (lowmem.optim.weights keep_old): one row chunk's old codes + scales and its torch.where
        # result (a float weight: the chunk in its dtype, twice), and the moments before the commit, held until the
        # new ones are chosen
        chunk = rows_per_chunk((m, n), device_type) * n
        update += 2 * chunk * ((1 + 4 / cfg.weight_block_size) if cfg.int8_weights else dtype_bytes)
        moment_numel = m * n if full else max(m, n) * r
        update += int(2 * moment_numel * (1 if cfg.optim_bits == 8 else cfg.optim_bits / 8))
        projected = 4 * (m * n if full else 3 * max(m, n) * r)
        worst = max(worst, dense + tok * n * dtype_bytes + max(update, projected))
    return worst


def _fused_loss_moments(s: ModelShape, cfg, tok: int, db: int, acts: int, head_lr: bool, head_grad: int,
                        head_update: int, *, device_type: str) -> dict[str, dict[str, int]]:
    """The loss's moments with lowmem.model.fused_loss: one (tok, block_rows) fp32 logits block at a time (plus
    its compute-dtype twin when that is not fp32), the input's gradient in fp32; a float head's weight gradient
    (tied or not) is written block by block into one tensor, a low-rank head's update runs in the backward."""
    from lowmem.model.head_grad import block_rows_for
    vb = block_rows_for(tok, s.vocab)
    twin = db if db < 4 else 0
    block = tok * vb * (4 + twin)
    deq = vb * s.hidden * db if head_lr and cfg.int8_weights else 0      # one dequantised row block of an INT8 head
    th = tok * s.hidden
    grad_hidden = 4 * th + twin * th                                     # fp32 sum + one block's product
    out = {"loss": {"activations": acts, "logits_and_loss": block + 3 * 4 * tok, "layer_transients": deq},
           "head": {"activations": acts, "logits_and_loss": block, "layer_transients": head_grad + grad_hidden + deq}}
    if head_lr:
        x32 = 4 * th if db < 4 else 0     # the operator's fp32 copy of X
        out["head_update"] = {"activations": acts, "logits_and_loss": 0,
                              "layer_transients": 4 * th + x32
                              + _head_sink_transient(s, cfg, tok, db, tok * vb * (4 + twin),
                                                     device_type=device_type, products_extra=deq)}
    else:
        out["head_update"] = {"activations": acts, "logits_and_loss": 0,
                              "layer_transients": head_grad + th * db + head_update}
    return out


def estimate(model_config, *, method: str, seq_len: int, micro_batch_size: int, gradient_checkpointing: bool,
             lowmem_config=None, dtype: torch.dtype = torch.bfloat16, device_type: str = "cuda",
             zero_stage: int = 0, world_size: int = 1, fused_loss: bool = False,
             activation_offload: bool = False) -> MemoryBreakdown:
    """Predicted peak bytes of one training step of `method` (see METHODS) on ONE of `world_size` ranks under
    lowmem's ZeRO `zero_stage` (0..3); the defaults are the single-process estimate. `fused_loss`: the loss is
    lowmem.model.fused_loss (vocabulary blocks) instead of the model's own logits + cross-entropy (methods 'lowmem'
    and 'q_galore'). `activation_offload` (needs gradient_checkpointing): the checkpointed layer inputs wait in host
    memory (lowmem.model.offload), which is not counted. See the module docstring."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(zero_stage, bool) or zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if world_size > 1 and method not in DISTRIBUTED_METHODS:
        raise ValueError(f"the per-rank view (world_size={world_size}) is modelled only for lowmem's runtime "
                         f"(methods {DISTRIBUTED_METHODS}), not {method!r}; use world_size=1")
    for name, value in (("seq_len", seq_len), ("micro_batch_size", micro_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"device_type must be 'cuda' or 'cpu', got {device_type!r}")
    if activation_offload and not gradient_checkpointing:
        raise ValueError("activation_offload moves the inputs that gradient checkpointing keeps: it needs "
                         "gradient_checkpointing=True")
    s = ModelShape.from_config(model_config)
    tok = seq_len * micro_batch_size
    db = torch.finfo(dtype).bits // 8
    c = dict.fromkeys(COMPONENTS, 0)
    notes: list[str] = []
    lin_numel = s.layers * sum(m * n for _, m, n in s.linears())
    float_numels = s.float_numels()
    emb = s.embed_numel()
    fused = method in ("lowmem", "q_galore")
    if fused_loss and not fused:
        raise ValueError(f"fused_loss is modelled for lowmem's runtime (methods 'lowmem', 'q_galore'), not {method!r}")
    cfg = None
    head_lr = emb_lr = False
    if fused:
        from lowmem.config import LowMemConfig
        from lowmem.presets import preset
        cfg = lowmem_config if method == "lowmem" and lowmem_config is not None else (
            preset("q_galore") if method == "q_galore" else LowMemConfig())
        head_lr, emb_lr = head_is_lowrank(s, cfg), embedding_is_lowrank(s, cfg)
        vocab_tables = int(head_lr) + int(emb_lr)     # (V, h) tables that are low-rank weights, not float params
        float_numels = [emb] * ((1 if s.tied else 2) - vocab_tables) + [s.hidden] * (2 * s.layers + 1)
        if cfg.int8_weights:
            c["weights_int8"] = lin_numel + vocab_tables * emb
            c["weight_scales"] = 4 * (s.layers * sum(m * _cdiv(n, cfg.weight_block_size) for _, m, n in s.linears())
                                      + vocab_tables * s.vocab * _cdiv(s.hidden, cfg.weight_block_size))
        else:
            c["float_params"] += db * (lin_numel + vocab_tables * emb)
        c["float_params"] += db * sum(float_numels)
        c.update({k: c[k] + v for k, v in _lowrank_state(s, cfg).items()})
        for name in (["lm_head"] if head_lr else []) + (["model.embed_tokens"] if emb_lr else []):
            table_state, _ = _unit_state(name, name.split(".")[-1], s.vocab, s.hidden, cfg)
            c.update({k: c[k] + v for k, v in table_state.items()})
        for numel in float_numels:
            c["optimizer_moments"] += _float_moment_bytes(numel, cfg)
        if world_size > 1 and zero_stage > 0:
            notes += _per_rank(s, cfg, c, zero_stage, world_size, db)
        emb_bits = 8 if cfg.float_optim_bits == 8 and emb >= cfg.float_optim_min_numel else 32
        sr = bool(cfg.stochastic_rounding)   # bf16 float params written with stochastic rounding
        layer_transient = _lowrank_layer_transient(s, cfg, tok, db, device_type=device_type)
    else:
        emb_bits = 32
        lora = method in ("lora", "qlora", "dora")
        if method == "qlora":   # NF4 + double-quantised absmax: 0.5 byte + ~1 byte per 64 + 4 per 16384
            c["weights_int8"] = _cdiv(lin_numel, 2)
            c["weight_scales"] = _cdiv(lin_numel, 64) + 4 * _cdiv(lin_numel, 64 * 256)
        else:
            c["float_params"] += (4 if method == "adamw_fp32" else db) * lin_numel
        c["float_params"] += (4 if method == "adamw_fp32" else db) * sum(float_numels)
        if lora:
            adapters = s.layers * sum(ADAPTER_RANK * (m + n) + (m if method == "dora" else 0)
                                      for _, m, n in s.linears())
            c["float_params"] += 4 * adapters
            c["grad_buffers"] = 4 * adapters
            c["optimizer_moments"] = 8 * adapters
            notes.append(f"{method}: rank-{ADAPTER_RANK} fp32 adapters on q/k/v/o/gate/up/down, base frozen "
                         f"({'NF4' if method == 'qlora' else 'compute dtype'}), fp32 Adam on adapters")
        else:
            total = lin_numel + sum(float_numels)
            pb = 4 if method == "adamw_fp32" else db
            c["grad_buffers"] = pb * total
            if method == "adamw_fp32":
                c["optimizer_moments"] = 8 * total
            elif method == "adamw_bf16":
                c["optimizer_moments"] = 2 * db * total
                notes.append("adamw_bf16: weights, gradients and both moments in the compute dtype")
            elif method == "adamw_8bit":
                c["optimizer_moments"] = _moments8(total)
            else:   # galore reference: full gradients, fp32 low-rank moments and projectors on linears
                from lowmem.presets import preset
                gcfg = preset("galore", rank=lowmem_config.rank if lowmem_config is not None else 256)
                st = _lowrank_state(s, gcfg)
                c["optimizer_moments"] = st["optimizer_moments"] + 8 * sum(float_numels)
                c["projectors"] = st["projectors"]
                notes.append("galore: reference implementation (float weights, full gradients, fp32 moments)")
        layer_transient = 0
        if method in ("qlora", "dora"):   # one dequantised / normalised weight at a time
            layer_transient = max(m * n for _, m, n in s.linears()) * db * (2 if method == "dora" else 1)

    # -- the four moments of a step -----------------------------------------------------------------------------
    acts = _activations(s, tok, db, gradient_checkpointing, activation_offload)
    # lowmem's runtime: at the loss and the head no checkpointed layer is being rebuilt yet
    acts_head = _activations(s, tok, db, gradient_checkpointing, activation_offload, recompute=False) if fused \
        else acts
    btv = tok * s.vocab
    up = 0 if db == 4 else 4   # logits upcast to fp32 before the loss
    logits_fwd = btv * (db + up + 4)
    logits_bwd = btv * (4 + 4 + 4)            # saved log-softmax, its gradient, the logits' gradient
    emb_param_bytes = db if (fused or method in ("adamw_bf16", "adamw_8bit", "galore")) else 4
    head_trained = not method in ("lora", "qlora", "dora")
    head_grad = emb * emb_param_bytes if head_trained else 0
    moments = {"loss": {"activations": acts_head, "logits_and_loss": logits_fwd, "layer_transients": 0}}
    if fused:
        # a low-rank head's gradient reaches the runtime as an operator, never as a tensor (head_grad stays the
        # size of the embedding's gradient, used at 'end')
        head_w_grad = 0 if head_lr else head_grad
        head_update = 0 if s.tied or head_lr else _float_update_bytes(emb, emb_param_bytes, emb_bits, sr=sr)
        th = tok * s.hidden
        if fused_loss:
            moments.update(_fused_loss_moments(s, cfg, tok, db, acts_head, head_lr, head_w_grad, head_update,
                                               device_type=device_type))
        elif head_lr:
            # the model's own loss with an Int8Linear head: its forward dequantises the whole head, its backward
            # again for grad_input, then hands the logits' gradient (and an fp32 copy) with X to the runtime
            a32 = 4 * btv if db < 4 else 0
            moments["head_fwd"] = {"activations": acts_head, "logits_and_loss": btv * db,
                                   "layer_transients": emb * db}
            moments["head"] = {"activations": acts_head, "logits_and_loss": logits_bwd, "layer_transients": 0}
            moments["head_mm"] = {"activations": acts_head, "logits_and_loss": 4 * btv + btv * db,
                                  "layer_transients": emb * db + th * db}
            moments["head_update"] = {"activations": acts_head, "logits_and_loss": btv * db + a32,
                                      "layer_transients": th * db + (4 * th if db < 4 else 0)
                                      + _head_sink_transient(s, cfg, tok, db, 0, device_type=device_type)}
        else:
            # CE backward: log-softmax, its gradient and the logits' gradient; then lm_head's node holds the logits'
            # gradient, grad_hidden and the weight gradient; its AdamW update runs after the logits' gradient is freed
            moments["head"] = {"activations": acts_head, "logits_and_loss": logits_bwd, "layer_transients": 0}
            moments["head_mm"] = {"activations": acts_head, "logits_and_loss": 4 * btv,
                                  "layer_transients": head_w_grad + th * db}
            moments["head_update"] = {"activations": acts_head, "logits_and_loss": 0,
                                      "layer_transients": head_w_grad + th * db + head_update}
        held = head_grad if s.tied else 0     # tied: lm_head's gradient waits for the embedding's
        moments["layer"] = {"activations": acts, "logits_and_loss": 0, "layer_transients": held + layer_transient}
        grad_sum = 3 * head_grad if s.tied else head_grad
        # commit: squared-norm temp, then the update workspace (the sum's inputs are freed by then; clipping scales
        # the gradient in place)
        update = max(grad_sum, head_grad + max(4 * emb, _float_update_bytes(emb, emb_param_bytes, emb_bits, sr=sr)))
        if emb_lr:
            # Int8Embedding's backward: the output gradient, its rows summed per distinct id (fp32, ids int64),
            # then the same low-rank products and commit as a (V, h) head
            update = tok * s.hidden * (db + 4) + 2 * 8 * tok + _head_sink_transient(
                s, cfg, tok, db, 0, "model.embed_tokens", device_type=device_type)
        moments["end"] = {"activations": 0, "logits_and_loss": 0, "layer_transients": update}
    else:
        moments["head"] = {"activations": acts, "logits_and_loss": logits_bwd, "layer_transients": 0}
        moments["head_mm"] = {"activations": acts, "logits_and_loss": 4 * btv, "layer_transients": head_grad}
        grads_resident = c["grad_buffers"]
        # plain autograd: every gradient exists at the end; tied embeddings add their accumulation sum
        extra = 2 * head_grad if s.tied and head_trained else 0
        moments["end"] = {"activations": 0, "logits_and_loss": 0,
                          "layer_transients": extra + layer_transient}
        if method == "adamw_fp32" or method == "adamw_bf16":
            # torch AdamW (foreach) step: per-tensor temporaries; the largest tensor's sqrt and denominator
            biggest = max([emb] + [m * n for _, m, n in s.linears()])
            moments["step"] = {"activations": 0, "logits_and_loss": 0,
                               "layer_transients": 2 * biggest * (4 if method == "adamw_fp32" else db)}
        c["grad_buffers"] = 0
        for mom in moments.values():    # gradients grow during backward; count them whole from the head on
            mom["grad_buffers"] = 0
        for key in ("end", "step"):
            if key in moments:
                moments[key]["grad_buffers"] = grads_resident
    winner = max(moments, key=lambda k: sum(moments[k].values()))
    c.update(moments[winner])
    allocated = sum(c.values())
    if device_type == "cuda":
        c["cuda_context"] = CUDA_CONTEXT_BYTES
        c["allocator_slack"] = int(ALLOCATOR_SLACK * allocated)
    notes.insert(0, f"peak at '{winner}' ({', '.join(f'{k} {sum(v.values()) / 2**20:.1f} MiB' for k, v in moments.items())}"
                    f" of transients beyond the resident state)")
    if fused and cfg.residual_ratio > 0:
        notes.append("residuals are counted from their first selection (step >= residual_warmup_steps)")
    return MemoryBreakdown(components=c, peak_bytes=sum(c.values()), method=method, notes=notes)
