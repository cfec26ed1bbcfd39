"""Stochastic rounding of fp32 values to bfloat16 with counter-based noise (DESIGN §3.1, for float weights).

bf16 is the upper 16 bits of an fp32 word. Rounding |x| to nearest loses any update smaller than half a bf16 ulp
(|x|·2⁻⁹): 100 updates of 1e-3 on a weight of 1.0 leave it at 1.0. Stochastic rounding adds a uniform integer
r ∈ [0, 2¹⁶) to the low 16 bits of the fp32 bit pattern and truncates them: the magnitude rounds up with
probability (low bits) / 2¹⁶, i.e. by exactly the fraction of an ulp it lies above the lower bf16 neighbour, so
E[round(x)] = x for every finite x whose upper neighbour is finite (the sign bit is untouched; subnormals work the
same way, the carry into the exponent is the correct next value). Values within half an ulp below bf16's largest
finite value may round up to inf; lowmem's weights stay far from 3.4e38.

Noise: u = counter_uniform(seed, stream, step, counter) (quant.noise), counter = `offset` + flat index, r =
floor(u·2¹⁶) (u is a multiple of 2⁻²⁴, so r is uniform on 0 .. 2¹⁶−1). Same key, same bits: on resume, on every
data-parallel rank, for every chunking of the rows.
"""
from __future__ import annotations

import torch

from quant import _checks, compiled
from quant.noise import _mix64, counter_uniform, stream_key

_LOW_BITS = 16


def sr_to_bf16(x: torch.Tensor, *, seed: int, stream: int, step: int, offset: int = 0) -> torch.Tensor:
    """Stochastically rounded bf16 copy of x.

    Args:
        x: any shape, fp32 (other float dtypes are read as fp32), finite.
        seed, stream, step: the noise key (quant.noise.counter_uniform); offset: counter of x's first element.
    Returns:
        bf16 tensor of x's shape on x's device; each element is one of the two bf16 neighbours of x (x itself
        when x is representable), the upper one with probability equal to x's distance from the lower one in
        units of their gap.
    """
    _checks.floating(x, "x")
    flat = x.reshape(-1).to(torch.float32).contiguous()
    noise = counter_uniform(flat.numel(), seed=seed, stream=stream, step=step, offset=offset, device=x.device)
    r = noise.mul_(float(1 << _LOW_BITS)).to(torch.int32)  # exact: u·2¹⁶ < 2¹⁶ has no rounding in fp32
    bits = flat.view(torch.int32)
    # sign-magnitude: adding to the low bits moves |x| up; the sign bit is untouched unless |x| overflows to NaN
    # patterns, which needs |x| at the very top of the exponent range (excluded in the module docstring).
    rounded = (bits + r).bitwise_and_(~((1 << _LOW_BITS) - 1))
    return rounded.view(torch.float32).to(torch.bfloat16).view(x.shape)


def sr_noise_keys(numel: int, *, seed: int, stream: int, step: int, offset: int, device) -> torch.Tensor:
    """int32 (8,) key words for `sr_to_bf16_traceable` over numel (< 2**31) values whose first has counter
    `offset`: the noise sr_to_bf16(x, seed=seed, stream=stream, step=step, offset=offset) draws."""
    return compiled.key_words(stream_key(seed, stream, step), offset, numel, _mix64, device)


def sr_to_bf16_traceable(x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """sr_to_bf16 of flat fp32 x (numel,) as plain traceable ops, for a caller's compiled kernel (keys from
    sr_noise_keys): the same bits."""
    r = (compiled.uniform_traceable(x.shape[0], keys) * float(1 << _LOW_BITS)).to(torch.int32)
    rounded = (x.view(torch.int32) + r) & ~((1 << _LOW_BITS) - 1)
    return rounded.view(torch.float32).to(torch.bfloat16)
