"""Packed INT4 with symmetric per-group scales, for projectors stored between refreshes (DESIGN §3.2).

Format: x of any shape is flattened row-major and cut into groups of group_size consecutive values (the last group
may be short). Per group, scale = max|x| / 7 (fp32) and code = round(x / scale) in [-7, 7] (ties to even; an
all-zero group has scale 0 and codes 0). Codes are stored as unsigned nibbles code + 8 in [1, 15], two per byte,
the even flat index in the low nibble; an odd numel pads the last high nibble with code 0. Nibble 0 (code -8) is
never written and is rejected on unpack as corrupt data.

Error: for every element |x - code * scale| <= scale / 2 (plus fp32 rounding), since |x / scale| <= 7 and rounding
to the nearest integer moves it by at most 1/2.
"""
from __future__ import annotations

import math

import torch

from quant import _checks

GROUP_SIZE = 256
_QMAX = 7
_ZERO_NIBBLE = 8


def _group_views(flat: torch.Tensor, group_size: int, *, writable: bool = False):
    """flat (N,) -> full groups (N // G, G) and the tail (N % G,)."""
    n_full = flat.numel() // group_size
    head = flat[:n_full * group_size]
    full = head.view(n_full, group_size) if writable else head.reshape(n_full, group_size)
    return full, flat[n_full * group_size:]


def pack_int4(x: torch.Tensor, *, group_size: int = GROUP_SIZE,
              check_values: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x to packed signed 4-bit codes. check_values=False skips the finiteness check of x (a host
    synchronisation on CUDA) for callers whose x is finite by construction.

    Args:
        x: any shape, fp32/bf16/fp16, finite.
        group_size: values per scale group (>= 1).
    Returns:
        packed uint8 (ceil(numel / 2),) and scales fp32 (ceil(numel / group_size),), on x's device; empty x gives
        two empty tensors.
    """
    _checks.floating(x, "x")
    group_size = _checks.integer(group_size, "group_size", minimum=1)
    if check_values:
        _checks.finite(x, "x")
    flat = x.reshape(-1).float()
    numel = flat.numel()
    n_groups = -(-numel // group_size)
    scales = torch.empty(n_groups, dtype=torch.float32, device=x.device)
    full, tail = _group_views(flat, group_size)
    n_full = full.shape[0]
    if n_full:
        torch.amax(full.abs(), dim=1, out=scales[:n_full])
    if tail.numel():
        scales[n_full] = tail.abs().amax()
    scales.div_(_QMAX)

    # Codes in fp32, one extra slot so an odd numel pads with code 0.
    codes = torch.zeros(numel + numel % 2, dtype=torch.float32, device=x.device)
    codes_full, codes_tail = _group_views(codes[:numel], group_size, writable=True)
    torch.div(full, scales[:n_full, None], out=codes_full)
    if tail.numel():
        torch.div(tail, scales[n_full], out=codes_tail)
    codes.nan_to_num_(nan=0.0).round_().clamp_(-_QMAX, _QMAX).add_(_ZERO_NIBBLE)
    nibbles = codes.to(torch.uint8).view(-1, 2)
    packed = nibbles[:, 0] | (nibbles[:, 1] << 4)
    return packed, scales


def unpack_int4(packed: torch.Tensor, scales: torch.Tensor, shape: tuple[int, ...], *,
                group_size: int = GROUP_SIZE, dtype: torch.dtype = torch.float32,
                check_values: bool = True) -> torch.Tensor:
    """Inverse of pack_int4: codes * scale, reshaped to `shape`, in `dtype` (computed in fp32, then rounded).

    check_values=False skips the finiteness check of the scales and the corrupt-nibble check (host
    synchronisations on CUDA) for data this process wrote with pack_int4 and reads every step.

    Args:
        packed: uint8 (ceil(numel / 2),); scales: float (ceil(numel / group_size),), finite;
        shape: the original shape (numel = prod(shape)).
    Returns:
        `dtype` tensor of `shape` on packed's device (a fresh buffer: a transient for use, never the stored form).
    """
    _checks.dtype_is(packed, "packed", torch.uint8)
    _checks.rank(packed, "packed", 1)
    _checks.floating(scales, "scales")
    _checks.rank(scales, "scales", 1)
    _checks.same_device(packed, scales, "packed", "scales")
    group_size = _checks.integer(group_size, "group_size", minimum=1)
    _checks.float_dtype(dtype)
    try:
        shape = tuple(_checks.integer(s, "shape entry", minimum=0) for s in shape)
    except TypeError:
        raise TypeError(f"shape must be a tuple of ints, got {shape!r}") from None
    numel = math.prod(shape)
    if packed.numel() != -(-numel // 2):
        raise ValueError(f"packed must have {-(-numel // 2)} bytes for shape {shape}, got {packed.numel()}")
    if scales.numel() != -(-numel // group_size):
        raise ValueError(f"scales must have {-(-numel // group_size)} entries for shape {shape} and group_size "
                         f"{group_size}, got {scales.numel()}")
    if check_values:
        _checks.finite(scales, "scales")

    nibbles = torch.stack((packed & 0xF, packed >> 4), dim=1).view(-1)[:numel]
    n_corrupt = int((nibbles == 0).sum()) if numel and check_values else 0
    if n_corrupt:
        raise ValueError(f"packed holds {n_corrupt} nibble(s) equal to 0 (code -8), which pack_int4 never writes; "
                         "the data is corrupt or not from pack_int4")
    out = torch.empty(numel, dtype=torch.float32, device=packed.device)
    out.copy_(nibbles).sub_(_ZERO_NIBBLE)
    out_full, out_tail = _group_views(out, group_size, writable=True)
    n_full = out_full.shape[0]
    out_full.mul_(scales[:n_full, None].float())
    if out_tail.numel():
        out_tail.mul_(scales[n_full].float())
    out = out.view(shape)
    return out if dtype == torch.float32 else out.to(dtype)
