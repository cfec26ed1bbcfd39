"""INT8 x INT8 matmuls for Int8Linear's forward and grad_input (`int8_matmul: true`; off by default).

Both products run through `torch._int_mm` (int8 operands, int32 accumulation) with per-token dynamic activation
quantisation, as torchao's INT8 mixed-precision training does:

  weight   W (m, n) is stored blockwise: W_ij = q_ij · s_i,b(j) (quant.int8). `_int_mm` needs one scale per output
           row, so `row_codes` re-expresses the codes on the row's largest block scale S_i = max_b s_i,b:
           c_ij = round(q_ij · s_i,b(j) / S_i). EXACT for a row whose blocks share one scale (then c = q) and for
           every element of the block holding the row's absmax scale; elsewhere an extra rounding of at most
           S_i / 2 per element (the finer block's resolution is lost: a block with a 10x smaller scale keeps only
           ~13 of its 255 levels). Computed per call from the current codes (nothing cached between forward and
           backward: the weight changes in between).
  forward  y = x Wᵀ: x (T, n) quantised per token (row absmax / 127, round to nearest):
           y ≈ s_x,t S_j Σ_k x̂_tk c_jk.
           Approximate: activation rounding (relative error ~1/254 of the token's absmax per element) + the above.
  grad_in  dx = g W = Σ_i g_ti S_i c_ij: the row scales S_i lie on the contracted dimension, so they are folded into
           g first (g'_ti = g_ti S_i), then g' is quantised per token and multiplied with the same codes c (m, n).
           Approximate in the same two ways; int32 accumulation is exact for K < 2**31 / 127² ≈ 133 000.
The weight gradient (the update path: FactoredGrad(A, X) to the runtime) is unchanged: it uses the unquantised
activations and output gradients, so what the optimizer sees is exactly what it sees without this option.

`_int_mm` on CUDA needs T > 16 and both other dimensions multiples of 8 (`fits`); shapes that do not fit use the
dequantising path for that call. On CPU every shape works (measured with torch 2.13).
"""
from __future__ import annotations

import torch
from torch import Tensor

_QMAX = 127


def fits(tokens: int, k: int, n: int, device: torch.device) -> bool:
    """Whether torch._int_mm takes (tokens, k) x (k, n) on `device`."""
    if device.type == "cuda":
        return tokens > 16 and k % 8 == 0 and n % 8 == 0
    return device.type == "cpu"


def row_codes(weight_q: Tensor, weight_scales: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """Blockwise codes (m, n) int8 + scales (m, nb) fp32 -> per-row codes c (m, n) int8 and row scales S (m,) fp32.
    See the module docstring for what is exact."""
    m, n = weight_q.shape
    row_scale = weight_scales.amax(dim=1)
    # ratio s_b / S in [0, 1]; an all-zero row (S = 0) has codes 0 and ratio 0.
    ratio = torch.where(row_scale[:, None] > 0, weight_scales / row_scale.clamp_min(torch.finfo(torch.float32).tiny)
                        [:, None], torch.zeros((), device=weight_scales.device))
    n_full = n // block_size
    codes = torch.empty_like(weight_q)
    if n_full:
        head = weight_q[:, :n_full * block_size].view(m, n_full, block_size).float()
        codes[:, :n_full * block_size].view(m, n_full, block_size).copy_(head.mul_(ratio[:, :n_full, None]).round_())
    if n % block_size:
        tail = weight_q[:, n_full * block_size:].float()
        codes[:, n_full * block_size:].copy_(tail.mul_(ratio[:, n_full:n_full + 1]).round_())
    return codes, row_scale


def quantize_tokens(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row (token) symmetric INT8: x (T, k) float -> codes (T, k) int8, scales (T,) fp32 (absmax / 127)."""
    x = x.float()
    scale = x.abs().amax(dim=1) / _QMAX
    safe = torch.where(scale > 0, scale, torch.ones((), device=x.device))
    codes = (x / safe[:, None]).round_().clamp_(-_QMAX, _QMAX).to(torch.int8)
    return codes, scale


def linear_int8(x: Tensor, codes: Tensor, row_scale: Tensor) -> Tensor:
    """y = x Wᵀ for x (T, n) with W ≈ codes · row_scale[:, None]: (T, m) fp32."""
    x_codes, x_scale = quantize_tokens(x)
    acc = torch._int_mm(x_codes, codes.T)
    return acc.float().mul_(x_scale[:, None]).mul_(row_scale[None, :])


def grad_input_int8(grad_out: Tensor, codes: Tensor, row_scale: Tensor) -> Tensor:
    """dx = g W for g (T, m) with W ≈ codes · row_scale[:, None]: (T, n) fp32 (row scales folded into g)."""
    g_codes, g_scale = quantize_tokens(grad_out.float() * row_scale[None, :])
    acc = torch._int_mm(g_codes, codes)
    return acc.float().mul_(g_scale[:, None])
