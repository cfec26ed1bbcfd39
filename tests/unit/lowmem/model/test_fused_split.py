"""FusedLayout and SplitLinear (lowmem.model.fused_split): rows of each part against an element-by-element index
reference, fuse(split(W)) == W, and a SplitLinear's output equal to the fused linear's in the fused layout."""
import pytest
import torch
from torch import nn

from lowmem.model.fused_split import FusedLayout, split_linear


def _index_reference(groups, parts):
    """Row indices of each part in the fused weight, written out element by element (the modeling code's views)."""
    group_rows = sum(parts)
    out, offset = [], 0
    for rows in parts:
        out.append(torch.tensor([g * group_rows + offset + j for g in range(groups) for j in range(rows)]))
        offset += rows
    return out


@pytest.mark.parametrize("groups,parts", [(1, (64, 32, 32)), (4, (16, 16, 16)), (2, (32, 16, 16)), (1, (128, 128))])
def test_fused_layout_split_and_fuse_against_index_reference(groups, parts):
    layout = FusedLayout(tuple((f"p{i}", rows) for i, rows in enumerate(parts)), groups=groups)
    fused = torch.randn(layout.out_features, 7)
    pieces = layout.split(fused)
    for piece, index in zip(pieces, _index_reference(groups, parts)):
        assert torch.equal(piece, fused[index])
    assert torch.equal(layout.fuse(pieces), fused)
    bias = torch.randn(layout.out_features)
    assert torch.equal(layout.fuse(layout.split(bias)), bias)
    with pytest.raises(ValueError, match="rows"):
        layout.split(fused[1:])


@pytest.mark.parametrize("groups,parts", [(1, (64, 32, 32)), (4, (16, 16, 16)), (2, (32, 16, 16))])
def test_split_linear_output_equals_the_fused_linear(groups, parts):
    torch.manual_seed(0)
    layout = FusedLayout(tuple((f"p{i}", rows) for i, rows in enumerate(parts)), groups=groups)
    fused = nn.Linear(24, layout.out_features)
    split = split_linear(fused, layout)
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(split(x), fused(x), rtol=0, atol=1e-6)
    for (name, rows), index in zip(layout.parts, _index_reference(groups, parts)):
        part = getattr(split, name)
        assert part.weight.shape == (groups * rows, 24)
        assert torch.equal(part.weight, fused.weight[index]) and torch.equal(part.bias, fused.bias[index])
        assert part.weight.data_ptr() != fused.weight.data_ptr()   # own storage


def test_split_linear_on_meta_reads_no_data():
    with torch.device("meta"):
        fused = nn.Linear(24, 96, bias=False)
    split = split_linear(fused, FusedLayout((("a", 16), ("b", 8)), groups=4))
    assert all(p.device.type == "meta" for p in split.parameters())
    assert split.a.weight.shape == (64, 24) and split.b.weight.shape == (32, 24)
    with pytest.raises(ValueError, match="out_features"):
        split_linear(fused, FusedLayout((("a", 16),)))
