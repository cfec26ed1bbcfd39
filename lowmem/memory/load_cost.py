"""Predict the peak memory of loading a checkpoint and building the runtime, from the model config alone: DESIGN §5.

The streaming loader (`lowmem.load_pretrained`) builds the model skeleton on `meta`, turns the target linears and
embeddings into Int8Linear / Int8Embedding, then takes the checkpoint one tensor at a time in file order: read it
(safetensors, memory-mapped, on the host, in the file's dtype) -> `.to(device, dtype)` -> a target weight goes
through `quant.int8.quantize_int8(t, block_size)` (fp32 one row chunk at a time) into its codes and scales and its
float copy is dropped; a float parameter (norms, a float or tied head, biases) is copied in `dtype`. Then
`hooks.runtime.prepare` builds the Runtime, whose constructor allocates the optimizer state (moments, error
feedback; projectors and residuals only come with the first refresh).

The device peak is the larger of two moments, each = what is resident then + what is alive:
  stream   every other weight resident (INT8 codes + scales, float params: an upper bound, since the checkpoint's
           order is not in the config) + the one tensor being loaded, the worst over the tensors:
             a target (m, n): its copy in the load dtype, quantize_int8's workspace (one row chunk in fp32 and
               w / s, or w / s alone for an fp32 copy, plus the chunk's block absmax) and the codes and scales it
               writes; on a CPU device also the read tensor, which the loader holds until the tensor is placed,
               unless it is itself the load-dtype copy (same dtype: `.to` returns it);
             a float parameter: its copy in the load dtype (the loader always copies, so a parameter never views
               the file), and on a CPU device the read tensor beside it.
  prepare  every weight + the optimizer state the Runtime's constructor allocates (the step estimate's
           optimizer_moments and error_feedback: an upper bound, each state is made in turn) + the largest transient
           of making one tensor's state (fp32 zeros, then stored: STATE_INIT_* below). Every rank of a data-parallel
           run builds every state before dropping what it does not own (hooks.runtime.Runtime), so at ZeRO stages
           0-2 a rank's load peak is this single-process figure; stage 3 differs (ZERO3 below).
On a CUDA device the CUDA context and allocator slack are added as in the step estimate (cost_model). The host
holds the tensor being read (memory-mapped pages, file dtype): `host_peak_bytes` is the largest tensor's file bytes
on a GPU run; on a CPU run host and device are the same memory and it equals `peak_bytes`. Scalar counters of the
optimizer state (< 100 bytes per trained tensor) are not counted.

ZERO3: under ZeRO stage 3 on several ranks a rank defers its INT8 weights (hooks.load.load_pretrained): it places
the float parameters, builds the Runtime with placeholder codes (every state made, then the ones it does not own
dropped: the prepare moment holds no INT8 weight), then quantises only the weights it owns (the stream moment of a
target: float parameters + the rank's share of INT8 weights and optimizer state, cost_model's per-rank view).

Checked against lowmem.memory.live_bytes.LiveTensorBytes around a streamed load + prepare of sharded safetensors
(tests/unit/lowmem/memory/test_load_cost.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowmem.memory.cost_model import (ALLOCATOR_SLACK, CUDA_CONTEXT_BYTES, ModelShape, embedding_is_lowrank, estimate,
                                      head_is_lowrank)
from quant.int8 import quantize_chunk_rows

__all__ = ["LOAD_COMPONENTS", "LoadBreakdown", "estimate_load", "format_load_breakdown"]

LOAD_COMPONENTS = ("weights_int8", "weight_scales", "float_params", "optimizer_moments", "error_feedback",
                   "state_init", "read_tensor", "load_dtype_copy", "quantize_workspace", "cuda_context",
                   "allocator_slack")
# quantize_int8's workspace per row chunk (quant.int8.quantize_chunk_rows rows), measured with LiveTensorBytes around
# quant.int8.quantize_int8 on CPU (shapes 64x64 to 32000x1024), beyond its input and its codes and scales: fp32
# input, one fp32 chunk (|w| for the block maxima, then w / s, rounded and clamped in place); bf16 / fp16 input, one
# more (the chunk converted to fp32); plus the chunk's fp32 block absmax
QUANTIZE_FP32_BUFFERS = 1
QUANTIZE_FP32_BUFFERS_HALF_INPUT = 2
# Zero moments (lowmem.optim.moments.init_moments, optim.float_adamw.init_float_adamw_state), beyond the state they
# leave, per element of the moment (measured with LiveTensorBytes, shapes 64x64 to 32000x1024): 8-bit, nothing (the
# codes and absmax of zeros are written directly); 16-bit, fp32 zeros and their bf16 form (6 bytes); 32-bit, the
# fp32 zeros (4 bytes) of a low-rank moment, nothing for a float parameter (its zeros become exp_avg).
STATE_INIT_FP32_BYTES = 4


@dataclass
class LoadBreakdown:
    """The load phase's predicted device peak (`components` at the winning moment, keys LOAD_COMPONENTS; their sum is
    `peak_bytes`), the host's (`host_peak_bytes`), which moment wins ("stream" or "prepare"), each moment's
    components (`moment_components`, before CUDA context and slack), the tensor whose load the stream moment
    carries and its bytes then, and notes."""
    components: dict[str, int]
    peak_bytes: int
    host_peak_bytes: int
    moment: str
    moment_components: dict[str, dict[str, int]]
    largest_tensor: str
    tensor_peak_bytes: int     # the largest_tensor's own bytes at the worst step of its load (stream - the others)
    notes: list[str] = field(default_factory=list)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _file_dtype(model_config, file_dtype: torch.dtype | None) -> torch.dtype:
    """The checkpoint's dtype: given, else the config's `dtype` / `torch_dtype` (Hugging Face writes it), else bf16."""
    if file_dtype is not None:
        return file_dtype
    get = model_config.get if isinstance(model_config, dict) else (lambda k: getattr(model_config, k, None))
    named = get("dtype") or get("torch_dtype")
    if isinstance(named, torch.dtype):
        return named
    if isinstance(named, str) and isinstance(getattr(torch, named.replace("torch.", ""), None), torch.dtype):
        return getattr(torch, named.replace("torch.", ""))
    return torch.bfloat16


def _target_bytes(m: int, n: int, fb: int, db: int, block_size: int,
                  device_type: str) -> tuple[dict[str, int], dict[str, int]]:
    """(its final bytes, its device bytes while it is quantised) of one target weight (m, n): the read tensor (on a
    CPU device, when it is not itself the load-dtype copy), the copy in the load dtype, quantize_int8's workspace
    and the codes and scales it writes (module docstring)."""
    numel = m * n
    rows = min(m, quantize_chunk_rows(n, device_type))
    codes = {"weights_int8": numel, "weight_scales": 4 * m * _cdiv(n, block_size)}
    buffers = QUANTIZE_FP32_BUFFERS if db == 4 else QUANTIZE_FP32_BUFFERS_HALF_INPUT
    return codes, {"read_tensor": fb * numel if device_type == "cpu" and fb != db else 0,
                   "load_dtype_copy": db * numel,
                   "quantize_workspace": 4 * buffers * rows * n + 4 * rows * _cdiv(n, block_size), **codes}


def _float_bytes(numel: int, fb: int, db: int, device_type: str) -> tuple[dict[str, int], dict[str, int]]:
    """(its final bytes, its device bytes while it is placed) of one float parameter: its copy in the load dtype
    and, on a CPU device, the read tensor beside it (the loader always copies: a parameter never views the file)."""
    final = {"float_params": db * numel}
    return final, {**final, "read_tensor": fb * numel if device_type == "cpu" else 0}


def _state_init_bytes(numel: int, bits: int, lowrank: bool) -> int:
    """Transient bytes of making one tensor's zero moments of `numel` elements at `bits` (the comment above)."""
    if bits == 8:
        return 0
    if bits == 16:
        return (STATE_INIT_FP32_BYTES + 2) * numel
    return STATE_INIT_FP32_BYTES * numel if lowrank else 0


def _largest_state_init(cfg, targets: list[tuple[str, int, int]], floats: list[tuple[str, int]]) -> int:
    """The largest transient of the Runtime's constructor making one trained tensor's zero state: a low-rank
    weight's moments ((m, n) at full rank, else max(m, n) x rank), a float parameter's AdamW moments, or an
    error-feedback buffer (fp32 zeros of the weight, then stored). targets: (module name, out, in)."""
    worst = 0
    for module, m, n in targets:
        unit = cfg.for_module(module)
        full = unit.rank >= min(m, n)
        numel = m * n if full else max(m, n) * min(unit.rank, m, n)
        worst = max(worst, _state_init_bytes(numel, unit.optim_bits, lowrank=True))
        if unit.error_feedback != "off" and not full:
            worst = max(worst, STATE_INIT_FP32_BYTES * m * n)
    for _, numel in floats:
        bits = 8 if cfg.float_optim_bits == 8 and numel >= cfg.float_optim_min_numel else 32
        worst = max(worst, _state_init_bytes(numel, bits, lowrank=False))
    return worst


def estimate_load(model_config, lowmem_config=None, *, dtype: torch.dtype = torch.bfloat16,
                  device_type: str = "cuda", file_dtype: torch.dtype | None = None, zero_stage: int = 0,
                  world_size: int = 1) -> LoadBreakdown:
    """Predicted peak bytes of `lowmem.load_pretrained` + the Runtime it builds, on the device and on the host, for
    one of `world_size` ranks under lowmem's ZeRO `zero_stage` (only stage 3 on several ranks differs: ZERO3 above).

    model_config: a LLaMA-like Hugging Face config (object or dict). lowmem_config: the LowMemConfig of the run
    (None: the defaults). dtype: the load (compute) dtype. device_type: "cuda" or "cpu". file_dtype: the
    checkpoint's dtype (None: the config's `dtype` / `torch_dtype`, else bf16). See the module docstring."""
    from lowmem.config import LowMemConfig
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"device_type must be 'cuda' or 'cpu', got {device_type!r}")
    cfg = lowmem_config if lowmem_config is not None else LowMemConfig()
    fdtype = _file_dtype(model_config, file_dtype)
    if not fdtype.is_floating_point:
        raise TypeError(f"file_dtype must be a float dtype, got {fdtype}")
    # the resident state does not depend on the batch shape: the step estimate's components at one token
    step = estimate(model_config, method="lowmem", seq_len=1, micro_batch_size=1, gradient_checkpointing=False,
                    lowmem_config=cfg, dtype=dtype, device_type="cpu")
    weights = {k: step.components[k] for k in ("weights_int8", "weight_scales", "float_params")}
    deferred = zero_stage == 3 and world_size > 1 and cfg.int8_weights
    if deferred:   # one rank's share of the INT8 weights and of the optimizer state (cost_model's per-rank view)
        rank = estimate(model_config, method="lowmem", seq_len=1, micro_batch_size=1, gradient_checkpointing=False,
                        lowmem_config=cfg, dtype=dtype, device_type="cpu", zero_stage=3, world_size=world_size)
        owned = {k: rank.components[k] for k in ("weights_int8", "weight_scales", "optimizer_moments",
                                                 "error_feedback")}
    s = ModelShape.from_config(model_config)
    db, fb = torch.finfo(dtype).bits // 8, torch.finfo(fdtype).bits // 8
    head_lr, emb_lr = head_is_lowrank(s, cfg), embedding_is_lowrank(s, cfg)
    # by module name (every layer modelled with layer 0's names, as in cost_model)
    targets = [(f"model.layers.0.{'self_attn' if name[0] in 'qkvo' else 'mlp'}.{name}", m, n)
               for name, m, n in s.linears()]
    if head_lr:
        targets.append(("lm_head", s.vocab, s.hidden))
    if emb_lr:
        targets.append(("model.embed_tokens", s.vocab, s.hidden))
    floats = ([] if emb_lr else [("model.embed_tokens", s.embed_numel())]) + (
        [] if s.tied or head_lr else [("lm_head", s.embed_numel())]) + [("model.norm", s.hidden)]
    # (name, (its final bytes, its bytes while it loads)): the stream moment is the other weights + the worst one
    if cfg.int8_weights:
        candidates = [(name, _target_bytes(m, n, fb, db, cfg.weight_block_size, device_type))
                      for name, m, n in targets]
    else:   # float linear weights (still low-rank trained): placed like any float parameter
        candidates = [(name, _float_bytes(m * n, fb, db, device_type)) for name, m, n in targets]
    candidates += [(name, _float_bytes(numel, fb, db, device_type)) for name, numel in floats]
    streams = []
    for name, (final, during) in candidates:
        others = {k: v - final.get(k, 0) for k, v in weights.items()}
        if deferred and "weights_int8" in final:     # after prepare: the rank's share of weights and state
            others = {**others, **{k: v - final.get(k, 0) for k, v in owned.items()}}
        elif deferred:                               # before prepare: float parameters only
            others = {"float_params": others["float_params"]}
        streams.append((sum(others.values()) + sum(during.values()), sum(during.values()), name,
                        {k: others.get(k, 0) + during.get(k, 0) for k in {*others, *during}}))
    _, tensor_peak, largest_name, stream = max(streams, key=lambda c: c[0])
    state = {"optimizer_moments": step.components["optimizer_moments"],
             "error_feedback": step.components["error_feedback"],
             "state_init": _largest_state_init(cfg, targets, floats)}
    resident = {**weights, "weights_int8": 0, "weight_scales": 0} if deferred else weights
    moments = {name: {k: parts.get(k, 0) for k in LOAD_COMPONENTS}
               for name, parts in (("stream", stream), ("prepare", {**resident, **state}))}
    moment = max(moments, key=lambda k: sum(moments[k].values()))
    components = dict.fromkeys(LOAD_COMPONENTS, 0)
    components.update(moments[moment])
    if device_type == "cuda":
        components["allocator_slack"] = int(ALLOCATOR_SLACK * sum(components.values()))
        components["cuda_context"] = CUDA_CONTEXT_BYTES
    peak = sum(components.values())
    largest_file = fb * max([m * n for _, m, n in targets] + [numel for _, numel in floats])
    host = peak if device_type == "cpu" else largest_file
    notes = [f"peak at '{moment}' (stream {sum(moments['stream'].values()) / 2**20:.1f} MiB: every weight + "
             f"{largest_name} being loaded; prepare {sum(moments['prepare'].values()) / 2**20:.1f} MiB: every weight "
             f"+ the optimizer state; before CUDA context and slack)",
             f"checkpoint read in {str(fdtype).replace('torch.', '')}, memory-mapped: the host holds "
             f"{largest_file / 2**20:.1f} MiB (the largest tensor) at a time"
             + ("; on a CPU device host and device are the same memory" if device_type == "cpu" else "")]
    return LoadBreakdown(components, peak, host, moment, moments, largest_name, tensor_peak, notes)


def format_load_breakdown(b: LoadBreakdown) -> str:
    """A fixed-width table of the load phase's components in GiB, the device and host peaks, then the notes."""
    width = max(len(k) for k in LOAD_COMPONENTS)
    lines = ["memory breakdown: load + prepare", f"  {'component':<{width}}  {'GiB':>8}"]
    lines += [f"  {key:<{width}}  {b.components.get(key, 0) / 2**30:8.3f}" for key in LOAD_COMPONENTS]
    lines += [f"  {'peak':<{width}}  {b.peak_bytes / 2**30:8.3f}", f"  {'host peak':<{width}}  "
              f"{b.host_peak_bytes / 2**30:8.3f}"]
    return "\n".join(lines + [f"  note: {n}" for n in b.notes])
