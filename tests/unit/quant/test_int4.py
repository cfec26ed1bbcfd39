"""quant.int4: packed 4-bit codes against an element-by-element reference twin, grid round trips, projector error."""
import math

import pytest
import torch

from quant.int4 import pack_int4, unpack_int4


# ---- reference twin: one group and one element at a time in plain Python ----------------------------------------
def ref_pack(x, group):
    flat = x.reshape(-1).float().tolist()
    scales, nibbles = [], []
    for g0 in range(0, len(flat), group):
        chunk = flat[g0:g0 + group]
        scale = torch.tensor(max(abs(v) for v in chunk), dtype=torch.float32) / 7  # fp32, as the format says
        scales.append(float(scale))
        for v in chunk:
            code = 0 if scale == 0 else int(torch.round(torch.tensor(v, dtype=torch.float32) / scale))
            nibbles.append(max(-7, min(7, code)) + 8)
    if len(nibbles) % 2:
        nibbles.append(8)
    packed = [nibbles[i] | (nibbles[i + 1] << 4) for i in range(0, len(nibbles), 2)]
    return torch.tensor(packed, dtype=torch.uint8), torch.tensor(scales, dtype=torch.float32)


def ref_unpack(packed, scales, shape, group):
    values = []
    for i, byte in enumerate(packed.tolist()):
        values += [(byte & 15) - 8, (byte >> 4) - 8]
    numel = math.prod(shape)
    out = [torch.tensor(c, dtype=torch.float32) * scales[i // group] for i, c in enumerate(values[:numel])]
    return torch.stack(out).view(shape) if out else torch.zeros(shape)


CASES = [((1, 1), 256), ((1, 257), 256), ((3, 5, 7), 4), ((513,), 256), ((2, 33), 64), ((7,), 3), ((4, 100), 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,group", CASES)
def test_pack_and_unpack_match_reference(shape, group, dtype):
    g = torch.Generator().manual_seed(math.prod(shape) + group)
    x = (torch.randn(shape, generator=g) * torch.logspace(-4, 4, shape[-1])).to(dtype)
    if x.numel() > 8:
        x.view(-1)[:min(group, x.numel())] = 0  # an all-zero group
    packed, scales = pack_int4(x, group_size=group)
    packed_ref, scales_ref = ref_pack(x, group)
    assert packed.dtype == torch.uint8 and packed.shape == (-(-x.numel() // 2),)
    assert scales.dtype == torch.float32 and scales.shape == (-(-x.numel() // group),)
    assert torch.equal(scales, scales_ref)
    assert torch.equal(packed, packed_ref)
    out = unpack_int4(packed, scales, tuple(shape), group_size=group)
    assert out.shape == tuple(shape) and out.dtype == torch.float32
    assert torch.equal(out, ref_unpack(packed, scales, shape, group))
    assert torch.equal(unpack_int4(packed, scales, tuple(shape), group_size=group, dtype=torch.bfloat16),
                       out.to(torch.bfloat16))


@pytest.mark.parametrize("shape,group", CASES + [((64, 64), 64)])
def test_round_trip_exact_on_grid(shape, group):
    """Values code * 2**e with |code| <= 7 and a +-7 in every group are reproduced exactly: scale = 7 * 2**e / 7
    is exact for a power of two, and so is every code * scale."""
    g = torch.Generator().manual_seed(1)
    numel = math.prod(shape)
    codes = torch.randint(-7, 8, (numel,), generator=g).float()
    codes[::group] = torch.where(torch.rand(len(codes[::group]), generator=g) < 0.5, -7.0, 7.0)
    exponents = torch.randint(-20, 20, (-(-numel // group),), generator=g).float()
    x = (codes * torch.exp2(exponents).repeat_interleave(group)[:numel]).view(shape)
    for dtype in (torch.float32, torch.bfloat16):  # the grid values are exact in bf16 too
        packed, scales = pack_int4(x.to(dtype), group_size=group)
        assert torch.equal(unpack_int4(packed, scales, tuple(shape), group_size=group), x)


def test_odd_numel_pads_with_code_zero():
    packed, _ = pack_int4(torch.tensor([1.0, -1.0, 0.5]), group_size=256)
    assert packed.shape == (2,) and int(packed[1]) >> 4 == 8


@pytest.mark.parametrize("group", [256, 64])
def test_orthonormal_projector_error(group):
    """Q of a Gaussian (512, 64): every element errs by at most scale / 2 of its group (rounding to the nearest
    code moves x / scale by <= 1/2), plus an ulp of fp32 rounding of x / scale and code * scale."""
    g = torch.Generator().manual_seed(0)
    p, _ = torch.linalg.qr(torch.randn(512, 64, generator=g))
    packed, scales = pack_int4(p, group_size=group)
    p_hat = unpack_int4(packed, scales, tuple(p.shape), group_size=group)
    err = (p_hat - p).abs().reshape(-1)
    scale_per_elem = scales.repeat_interleave(group)[:p.numel()]
    ratio = float((err / scale_per_elem).max())
    rel_frob = float((p_hat - p).norm() / p.norm())
    ortho = float((p_hat.T @ p_hat - torch.eye(64)).abs().max())
    print(f"int4 group {group}: max |err| / scale = {ratio:.4f} (bound 0.5), max |err| = {float(err.max()):.3e}, "
          f"relative Frobenius error = {rel_frob:.4f}, max |P^T P - I| = {ortho:.4f}")
    assert bool((err <= scale_per_elem / 2 + p.abs().reshape(-1) * 2**-22).all())
    # the per-element bound gives ||err||_F <= sqrt(sum (scale/2)**2); check the aggregate is consistent with it
    assert rel_frob <= float(((scale_per_elem / 2) ** 2).sum().sqrt() / p.norm()) + 1e-6


def test_empty():
    packed, scales = pack_int4(torch.zeros(0, 5))
    assert packed.shape == (0,) and scales.shape == (0,)
    assert unpack_int4(packed, scales, (0, 5)).shape == (0, 5)


def _packed():
    return pack_int4(torch.randn(10, 10), group_size=16)


def _corrupt():
    packed, scales = _packed()
    packed[3] = packed[3] & 0xF0  # low nibble 0: code -8, never written
    return unpack_int4(packed, scales, (10, 10), group_size=16)


BAD = [
    ("int input", lambda: pack_int4(torch.ones(4, dtype=torch.int64)), TypeError, "floating"),
    ("NaN input", lambda: pack_int4(torch.tensor([1.0, float("nan"), float("nan")])), ValueError, "2 non-finite"),
    ("Inf input", lambda: pack_int4(torch.tensor([float("inf")])), ValueError, "1 non-finite"),
    ("group 0", lambda: pack_int4(torch.ones(4), group_size=0), ValueError, "group_size"),
    ("packed dtype", lambda: unpack_int4(torch.ones(2), torch.ones(1), (4,)), TypeError, "uint8"),
    ("packed rank", lambda: unpack_int4(torch.ones(1, 2, dtype=torch.uint8), torch.ones(1), (4,)), ValueError, "1-D"),
    ("shape mismatch", lambda: unpack_int4(*_packed(), (10, 11), group_size=16), ValueError, "bytes"),
    ("scales mismatch", lambda: unpack_int4(_packed()[0], torch.ones(3), (10, 10), group_size=16), ValueError,
     "scales"),
    ("NaN scales", lambda: unpack_int4(_packed()[0], torch.full((7,), float("nan")), (10, 10), group_size=16),
     ValueError, "non-finite"),
    ("corrupt nibble", _corrupt, ValueError, "corrupt"),
    ("int dtype", lambda: unpack_int4(*_packed(), (10, 10), group_size=16, dtype=torch.int8), TypeError, "dtype"),
    ("float shape", lambda: unpack_int4(*_packed(), (10.0, 10), group_size=16), TypeError, "shape"),
]


@pytest.mark.parametrize("name,call,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.gpu
def test_cuda_matches_cpu_bitwise():
    x = torch.randn(300, 77, generator=torch.Generator().manual_seed(3))
    packed, scales = pack_int4(x, group_size=64)
    packed_gpu, scales_gpu = pack_int4(x.cuda(), group_size=64)
    assert torch.equal(packed_gpu.cpu(), packed) and torch.equal(scales_gpu.cpu(), scales)
    assert torch.equal(unpack_int4(packed_gpu, scales_gpu, (300, 77), group_size=64).cpu(),
                       unpack_int4(packed, scales, (300, 77), group_size=64))
