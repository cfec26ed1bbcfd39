"""Shared input validation for the quant kernels: one place that says what is wrong and what was expected.

Every public kernel calls these before touching data, so bad input fails loudly (TypeError for a wrong kind of
value, ValueError for a wrong shape or a non-finite entry) instead of producing silent garbage.
"""
from __future__ import annotations

import operator

import torch

_MAX_KEY = 2**63


def tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def floating(x, name: str) -> torch.Tensor:
    """x must be a real floating-point tensor (fp32/bf16/fp16/fp64); integer, bool and complex are refused."""
    tensor(x, name)
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor (fp32, bf16 or fp16), got dtype {x.dtype}")
    return x


def dtype_is(x, name: str, dtype: torch.dtype) -> torch.Tensor:
    tensor(x, name)
    if x.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {x.dtype}")
    return x


def rank(x: torch.Tensor, name: str, ndim: int) -> torch.Tensor:
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)} ({x.dim()}-D)")
    return x


_FP32_MAX = torch.finfo(torch.float32).max


def all_finite(x: torch.Tensor) -> bool:
    """Whether x has no NaN or +-Inf. A finite sum implies that (NaN and Inf propagate through every addition), and
    a sum is one pass with no allocation (~10x cheaper than isfinite(x).all() on CPU); only a non-finite sum
    (a bad entry, or a sum beyond the float range) pays for the exact test."""
    accumulate = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else None
    if bool(torch.isfinite(x.sum(dtype=accumulate))):
        return True
    return bool(torch.isfinite(x).all())


def finite(x: torch.Tensor, name: str, where: str = "") -> torch.Tensor:
    """Raise ValueError naming how many entries of x are NaN or +-Inf (one reduction; a sync on CUDA). fp64 input
    must also fit fp32, since every kernel computes in fp32."""
    if x.numel() and not all_finite(x):
        n_bad = int((~torch.isfinite(x)).sum())
        n_nan = int(torch.isnan(x).sum())
        raise ValueError(f"{name}{where} has {n_bad} non-finite value(s) ({n_nan} NaN, {n_bad - n_nan} Inf) "
                         f"out of {x.numel()}; finite input is required")
    if x.dtype == torch.float64 and x.numel() and bool((x.abs() > _FP32_MAX).any()):
        n_big = int((x.abs() > _FP32_MAX).sum())
        raise ValueError(f"{name}{where} has {n_big} value(s) beyond the fp32 range (|x| > {_FP32_MAX:.3e}); "
                         "the kernels compute in fp32")
    return x


def integer(value, name: str, *, minimum: int | None = None) -> int:
    """A Python int (or anything with __index__, not bool) with an optional lower bound."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def key(value, name: str) -> int:
    """A noise-key component (seed, stream, step): an int in [0, 2**63)."""
    value = integer(value, name, minimum=0)
    if value >= _MAX_KEY:
        raise ValueError(f"{name} must be < 2**63, got {value}")
    return value


def float_dtype(dtype, name: str = "dtype") -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point torch.dtype, got {dtype!r}")
    return dtype


def same_device(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}; they must share a device")
