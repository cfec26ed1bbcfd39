"""Fused projections split into separate linears for training, and fused back for export (DESIGN §3.2, §3.10).

A fused weight W (out, in) stacks the rows of several projections (q, k and v; or gate and up). Its rows form
`groups` equal groups; group g holds, in part order, `rows` of part 0, then of part 1, ... :

    phi3 qkv_proj, glm4/phi3 gate_up_proj, falcon multi-query: groups = 1        [q | k | v]
    gpt_neox query_key_value, falcon (classic):                 groups = heads   [q_0 k_0 v_0 | q_1 k_1 v_1 | ...]
    falcon new_decoder_architecture:                            groups = kv heads [q_g0..q_gm k_g v_g | ...]

A part's own rows keep their order across groups, so a split q is (heads * head_dim, in) head after head, the layout
cross-head projection slices. Everything here works on views and `torch.cat`, so it runs on `meta` tensors too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class FusedLayout:
    """parts: ((name, rows per group), ...) in the order they appear within a group; groups: how many groups."""

    parts: tuple[tuple[str, int], ...]
    groups: int = 1

    @property
    def group_rows(self) -> int:
        return sum(rows for _, rows in self.parts)

    @property
    def out_features(self) -> int:
        return self.groups * self.group_rows

    def split(self, fused: Tensor) -> list[Tensor]:
        """fused (out_features, ...) -> one (groups * rows_i, ...) tensor per part (views where possible)."""
        if fused.shape[0] != self.out_features:
            raise ValueError(f"fused tensor has {fused.shape[0]} rows, the layout {self} needs {self.out_features}")
        rest = tuple(fused.shape[1:])
        grouped = fused.reshape(self.groups, self.group_rows, *rest)
        pieces = torch.split(grouped, [rows for _, rows in self.parts], dim=1)
        return [piece.reshape(-1, *rest) for piece in pieces]

    def fuse(self, parts: list[Tensor]) -> Tensor:
        """The inverse of split: parts (groups * rows_i, ...) -> fused (out_features, ...), a new tensor."""
        if len(parts) != len(self.parts):
            raise ValueError(f"expected {len(self.parts)} parts for {self}, got {len(parts)}")
        for tensor, (name, rows) in zip(parts, self.parts):
            if tensor.shape[0] != self.groups * rows:
                raise ValueError(f"part {name!r} has {tensor.shape[0]} rows, the layout needs {self.groups * rows}")
        rest = tuple(parts[0].shape[1:])
        grouped = [tensor.reshape(self.groups, rows, *rest) for tensor, (_, rows) in zip(parts, self.parts)]
        return torch.cat(grouped, dim=1).reshape(self.out_features, *rest)


class SplitLinear(nn.Module):
    """Separate nn.Linear parts standing in for one fused projection: the same output, in the fused layout.

    parts: (name, nn.Linear) pairs sharing in_features, in the layout's part order; layout: how their outputs
    interleave. forward x (..., in) -> (..., out_features), exactly what the fused linear returned.
    """

    def __init__(self, parts: list[tuple[str, nn.Module]], layout: FusedLayout | None = None):
        super().__init__()
        if not parts:
            raise ValueError("SplitLinear needs at least one part")
        if layout is None:  # plain concatenation
            layout = FusedLayout(tuple((name, linear.out_features) for name, linear in parts))
        if tuple(name for name, _ in parts) != tuple(name for name, _ in layout.parts):
            raise ValueError(f"parts {[name for name, _ in parts]} do not match the layout {layout}")
        self.layout = layout
        self.part_names = tuple(name for name, _ in parts)
        for name, linear in parts:
            self.add_module(name, linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [getattr(self, name)(x) for name in self.part_names]
        if self.layout.groups == 1:
            return torch.cat(outputs, dim=-1)
        # (..., groups * rows_i) -> (..., groups, rows_i), concatenated per group, flattened back.
        grouped = [y.unflatten(-1, (self.layout.groups, -1)) for y in outputs]
        return torch.cat(grouped, dim=-1).flatten(-2)


def split_linear(linear: nn.Linear, layout: FusedLayout) -> SplitLinear:
    """One fused nn.Linear -> SplitLinear of plain nn.Linear parts with the same output; weights are split rows of
    the original (copied; on `meta`, no data is touched), in its dtype and on its device, with its requires_grad."""
    if linear.out_features != layout.out_features:
        raise ValueError(f"linear has out_features {linear.out_features}, the layout {layout} needs "
                         f"{layout.out_features}")
    weights = layout.split(linear.weight.detach())
    biases = layout.split(linear.bias.detach()) if linear.bias is not None else [None] * len(weights)
    parts = []
    for (name, _), weight, bias in zip(layout.parts, weights, biases):
        part = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        # Built on meta so no random init is paid for; real storage (or meta again) is assigned here.
        # Own storage (not a view of the fused weight): a checkpoint writer may refuse tensors sharing storage.
        part.weight = nn.Parameter(weight.clone(memory_format=torch.contiguous_format),
                                   requires_grad=linear.weight.requires_grad)
        if bias is not None:
            part.bias = nn.Parameter(bias.clone(memory_format=torch.contiguous_format),
                                     requires_grad=linear.bias.requires_grad)
        parts.append((name, part))
    return SplitLinear(parts, layout)
