"""quant.moments8: the dynamic map, the CPU twin against brute-force references, error bounds, bitsandbytes."""

import pytest
import torch

from quant import moments8
from quant.moments8 import dequantize_moment8, dynamic_map, quantize_moment8


def midpoints32(table):
    return (table[:-1] + table[1:]) * 0.5  # fp32, as bitsandbytes' CUDA search forms them


# ---- reference twins: brute force over all 256 entries -----------------------------------------------------------
def ref_table(signed, squared=False):
    """The map a reference decodes with: the squared map is built here from the unsigned one."""
    table = dynamic_map(signed)
    return table * table if squared else table


def ref_quantize(x, signed, block, squared=False):
    """codes by counting the fp32 midpoints below v (an exact midpoint goes to the even index), one block at a
    time; v = x * (1 / absmax) in fp32."""
    table = ref_table(signed, squared)
    mids = midpoints32(table)
    odd = torch.arange(255) % 2 == 1
    flat = x.reshape(-1).float()
    codes, absmax = [], []
    for b0 in range(0, flat.numel(), block):
        chunk = flat[b0:b0 + block]
        amax = chunk.abs().max()
        absmax.append(amax)
        if amax == 0:
            codes.append(torch.zeros(chunk.numel(), dtype=torch.long))
            continue
        v = chunk * (1.0 / amax)
        above = (v[:, None] > mids[None, :]) | ((v[:, None] == mids[None, :]) & odd[None, :])
        codes.append(above.sum(dim=1))
    return torch.cat(codes).to(torch.uint8).view(x.shape), torch.stack(absmax).float()


def ref_dequantize(codes, absmax, signed, block, squared=False):
    table = ref_table(signed, squared)
    flat = codes.reshape(-1).long()
    scale = absmax.repeat_interleave(block)[:flat.numel()]
    return (table[flat] * scale).view(codes.shape)


def test_map_shape_order_and_bitsandbytes_equality():
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    for signed in (True, False):
        table = dynamic_map(signed)
        assert table.dtype == torch.float32 and table.shape == (256,)
        assert bool((table[1:] > table[:-1]).all())
        assert float(table[-1]) == 1.0
        assert (-1.0 < float(table[0]) < -0.99) if signed else float(table[0]) == 0.0
        assert float(table[127 if signed else 0]) == 0.0
        assert torch.equal(table, bnb_functional.create_dynamic_map(signed=signed))
    assert dynamic_map(True) is not dynamic_map(True)  # fresh tensors: callers cannot corrupt the cache
    unsigned = dynamic_map(False)
    assert torch.equal(dynamic_map(False, squared=True), unsigned * unsigned)
    with pytest.raises(ValueError, match="signed=False"):
        dynamic_map(True, squared=True)


MAPS = [(True, False), (False, False), (False, True)]  # (signed, squared): first moments, plain v, squared v


CASES = [((1,), 256), ((255,), 256), ((256,), 256), ((257,), 256), ((3, 1000), 256), ((5, 130), 64),
         ((2, 2, 301), 100), ((4097,), 4096), ((9,), 7)]


def make_moment(shape, signed, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.logspace(-8, 2, shape[-1])  # heavy dynamic range along rows
    x = x if signed else x.square()
    flat = x.view(-1)
    if flat.numel() > 600:
        flat[256:512] = 0.0  # an all-zero block (for block 256)
    return x


@pytest.mark.parametrize("signed,squared", MAPS)
@pytest.mark.parametrize("shape,block", CASES)
def test_twin_matches_reference(shape, block, signed, squared):
    x = make_moment(shape, signed, seed=block + len(shape))
    codes, absmax = quantize_moment8(x, signed=signed, block_size=block, squared=squared)
    codes_ref, absmax_ref = ref_quantize(x, signed, block, squared)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert absmax.dtype == torch.float32 and absmax.shape == (-(-x.numel() // block),)
    assert torch.equal(absmax, absmax_ref)
    assert torch.equal(codes, codes_ref)
    out = dequantize_moment8(codes, absmax, signed=signed, block_size=block, squared=squared)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.equal(out, ref_dequantize(codes, absmax, signed, block, squared))
    out16 = dequantize_moment8(codes, absmax, signed=signed, block_size=block, dtype=torch.bfloat16,
                               squared=squared)
    assert torch.equal(out16, out.to(torch.bfloat16))


def test_bf16_input_and_chunking(monkeypatch):
    x = make_moment((4, 1000), True, seed=0)
    codes, absmax = quantize_moment8(x.bfloat16(), signed=True)
    assert torch.equal(codes, ref_quantize(x.bfloat16().float(), True, 256)[0])
    monkeypatch.setattr(moments8, "_CHUNK_ELEMS", 300)  # one block per chunk, and a short last chunk
    codes2, absmax2 = quantize_moment8(x.bfloat16(), signed=True)
    assert torch.equal(codes, codes2) and torch.equal(absmax, absmax2)
    assert torch.equal(dequantize_moment8(codes, absmax, signed=True),
                       ref_dequantize(codes, absmax, True, 256))


@pytest.mark.parametrize("signed,squared", MAPS)
def test_exact_midpoints_go_to_the_even_index(signed, squared):
    """Every fp32 midpoint, in a block whose absmax is 1 (so v = x exactly): the even neighbour wins."""
    table = ref_table(signed, squared)
    mids = midpoints32(table)
    x = torch.cat([mids, torch.ones(1)])
    codes, absmax = quantize_moment8(x, signed=signed, block_size=256, squared=squared)
    assert float(absmax[0]) == 1.0
    k = torch.arange(255)
    assert torch.equal(codes[:255].long(), torch.where(k % 2 == 0, k, k + 1))


@pytest.mark.parametrize("signed,squared", MAPS)
def test_twin_error_bounds(signed, squared):
    """Nearest entry: |x - decode| <= absmax * (largest gap of the map) / 2, plus fp32 rounding of v and of the
    product. Also: no entry is nearer than the chosen one (up to the rounding of the fp32 midpoint)."""
    x = make_moment((8, 1024), signed, seed=3) * 1e3
    codes, absmax = quantize_moment8(x, signed=signed, squared=squared)
    out = dequantize_moment8(codes, absmax, signed=signed, squared=squared)
    table = ref_table(signed, squared)
    max_gap = float((table[1:] - table[:-1]).max())
    scale = absmax.repeat_interleave(256)[:x.numel()].view(x.shape)
    err = (out - x).abs()
    worst = float((err / torch.where(scale > 0, scale, 1.0)).max())
    print(f"moments8 signed={signed} squared={squared}: max |err| / absmax = {worst:.4f}, "
          f"bound (largest gap / 2) = {max_gap / 2:.4f}")
    assert bool((err <= scale * (max_gap / 2 + 2**-22)).all())
    live = (scale > 0).reshape(-1)
    v = (x * (1.0 / scale)).reshape(-1)[live].double()
    dist = (v[:, None] - table.double()[None, :]).abs()
    chosen = dist.gather(1, codes.reshape(-1, 1)[live].long()).squeeze(1)
    assert bool((chosen <= dist.min(dim=1).values + 2**-24).all())


def test_empty_and_zero_inputs():
    codes, absmax = quantize_moment8(torch.zeros(0, 4), signed=True)
    assert codes.shape == (0, 4) and absmax.shape == (0,)
    assert dequantize_moment8(codes, absmax, signed=True).shape == (0, 4)
    codes, absmax = quantize_moment8(torch.zeros(300), signed=False)
    assert bool((codes == 0).all()) and bool((absmax == 0).all())
    assert bool((dequantize_moment8(codes, absmax, signed=False) == 0).all())


def _lut_codes(x, signed, block):
    """bitsandbytes 0.50's CPU rule: v is rounded to a 65536-point grid on [-1, 1], each grid point mapped to the
    entry after the last fp32 midpoint strictly below it."""
    table = dynamic_map(signed)
    mids = midpoints32(table)
    n_lut = 65536
    grid = -1.0 + (2.0 * torch.arange(n_lut, dtype=torch.float32)) / (n_lut - 1)
    lut = torch.searchsorted(mids, grid, right=False)
    flat = x.reshape(-1).float()
    absmax = torch.stack([flat[b:b + block].abs().max() for b in range(0, flat.numel(), block)])
    v = (flat.view(-1, block) * (1.0 / absmax)[:, None]).reshape(-1).clamp(-1, 1)
    index = ((v + 1.0) * 0.5 * (n_lut - 1) + 0.5).nan_to_num(0.0).to(torch.int64)
    codes = lut[index].view(-1, block)
    codes[absmax == 0] = 0  # all-zero blocks are written as code 0
    return codes.to(torch.uint8).view(x.shape)


@pytest.mark.parametrize("signed", [True, False])
def test_agrees_with_bitsandbytes_cpu(signed):
    """bitsandbytes 0.50 has a CPU kernel. It rounds v to a 65536-point grid before the lookup, so for some values
    it is not the nearest entry (the twin, like the CUDA kernel, always is). Asserted: bnb's codes equal the
    twin's exactly, or (0.50.x) equal that documented grid rule exactly and are never nearer than the twin's."""
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    x = make_moment((16, 1024), signed, seed=5)
    x.view(-1)[256:512] = 0.0
    try:
        codes_bnb, state = bnb_functional.quantize_blockwise(x, code=dynamic_map(signed), blocksize=256)
    except (NotImplementedError, RuntimeError) as exc:
        pytest.skip(f"this bitsandbytes has no CPU quantize_blockwise: {exc}")
    codes, absmax = quantize_moment8(x, signed=signed)
    assert torch.equal(state.absmax, absmax)
    mismatch = float((codes_bnb != codes).float().mean())
    print(f"bitsandbytes CPU vs twin (signed={signed}): {100 * mismatch:.3f}% of codes differ")
    if mismatch:
        assert torch.equal(codes_bnb, _lut_codes(x, signed, 256))
        table = dynamic_map(signed)
        v = x.reshape(-1, 256) / absmax[:, None].clamp_min(1e-38)
        d_twin = (table[codes.view(-1, 256).long()] - v).abs()
        d_bnb = (table[codes_bnb.view(-1, 256).long()] - v).abs()
        assert bool((d_twin <= d_bnb + 2**-24).all())
    # decoding is the same formula on both sides
    assert torch.equal(bnb_functional.dequantize_blockwise(codes, absmax=absmax, code=dynamic_map(signed),
                                                           blocksize=256),
                       dequantize_moment8(codes, absmax, signed=signed))


def test_bitsandbytes_dispatch_plumbing_on_cpu(monkeypatch):
    """The CUDA branch (bitsandbytes call, zero-block fix-up, QuantState decode) driven with CPU tensors, so its
    plumbing is exercised on machines without CUDA; codes come from bnb's CPU kernel here (see above)."""
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    monkeypatch.setattr(moments8, "_use_bnb", lambda device, block_size: bnb_functional)
    x = make_moment((4, 1000), True, seed=8)
    x.view(-1)[256:512] = 0.0
    try:
        codes, absmax = quantize_moment8(x, signed=True)
    except (NotImplementedError, RuntimeError) as exc:
        pytest.skip(f"this bitsandbytes has no CPU quantize_blockwise: {exc}")
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert torch.equal(absmax, ref_quantize(x, True, 256)[1])
    assert bool((codes.view(-1)[256:512] == 0).all())
    monkeypatch.setattr(moments8, "_use_bnb", lambda device, block_size: None)
    twin_out = dequantize_moment8(codes, absmax, signed=True, dtype=torch.bfloat16)
    monkeypatch.setattr(moments8, "_use_bnb", lambda device, block_size: bnb_functional)
    assert torch.equal(dequantize_moment8(codes, absmax, signed=True, dtype=torch.bfloat16), twin_out)


BAD = [
    ("int input", lambda: quantize_moment8(torch.ones(4, dtype=torch.int32), signed=True), TypeError, "floating"),
    ("NaN input", lambda: quantize_moment8(torch.tensor([float("nan"), 1.0]), signed=True), ValueError,
     "1 non-finite"),
    ("negative unsigned", lambda: quantize_moment8(torch.tensor([1.0, -2.0, -3.0]), signed=False), ValueError,
     "2 negative"),
    ("signed not bool", lambda: quantize_moment8(torch.ones(3), signed=1), TypeError, "bool"),
    ("block 0", lambda: quantize_moment8(torch.ones(3), signed=True, block_size=0), ValueError, "block_size"),
    ("codes dtype", lambda: dequantize_moment8(torch.ones(3), torch.ones(1), signed=True), TypeError, "uint8"),
    ("absmax size", lambda: dequantize_moment8(torch.zeros(300, dtype=torch.uint8), torch.ones(1), signed=True),
     ValueError, "2 entries"),
    ("absmax rank", lambda: dequantize_moment8(torch.zeros(3, dtype=torch.uint8), torch.ones(1, 1), signed=True),
     ValueError, "1-D"),
    ("absmax NaN", lambda: dequantize_moment8(torch.zeros(3, dtype=torch.uint8), torch.full((1,), float("nan")),
                                              signed=True), ValueError, "non-finite"),
    ("absmax negative", lambda: dequantize_moment8(torch.zeros(3, dtype=torch.uint8), -torch.ones(1), signed=True),
     ValueError, "negative"),
    ("int out dtype", lambda: dequantize_moment8(torch.zeros(3, dtype=torch.uint8), torch.ones(1), signed=True,
                                                 dtype=torch.int32), TypeError, "dtype"),
]


@pytest.mark.parametrize("name,call,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---- CUDA: bitsandbytes kernels against the twin -------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("signed,squared", MAPS)
@pytest.mark.parametrize("block", [64, 256, 4096])
def test_cuda_bitsandbytes_matches_twin(signed, squared, block):
    """Codes from bitsandbytes on CUDA equal the CPU twin's, except where bitsandbytes' --use_fast_math reciprocal
    moves v across a midpoint: such codes differ by one index, v lies within 4 ulp of that midpoint, and they are
    rare (<= 1e-4 of all codes). Decoding is bit-identical."""
    x = make_moment((64, 4096), signed, seed=block)
    codes_cpu, absmax_cpu = quantize_moment8(x, signed=signed, block_size=block, squared=squared)
    codes_gpu, absmax_gpu = quantize_moment8(x.cuda(), signed=signed, block_size=block, squared=squared)
    assert torch.equal(absmax_gpu.cpu(), absmax_cpu)
    diff = codes_gpu.cpu().long() != codes_cpu.long()
    n_diff = int(diff.sum())
    print(f"CUDA bitsandbytes vs twin (signed={signed}, block={block}): {n_diff} of {x.numel()} codes differ")
    if n_diff:
        assert n_diff <= 1e-4 * x.numel()
        a, b = codes_gpu.cpu().long()[diff], codes_cpu.long()[diff]
        assert bool(((a - b).abs() == 1).all())
        mids = midpoints32(ref_table(signed, squared))
        scale = absmax_cpu.repeat_interleave(block)[:x.numel()].view(x.shape)
        v = (x * (1.0 / scale))[diff]
        mid = mids[torch.minimum(a, b)]
        assert bool(((v - mid).abs() <= 4 * torch.finfo(torch.float32).eps * mid.abs()).all())
    for dtype in (torch.float32, torch.bfloat16):
        out_gpu = dequantize_moment8(codes_gpu, absmax_gpu, signed=signed, block_size=block, dtype=dtype,
                                     squared=squared)
        out_cpu = dequantize_moment8(codes_gpu.cpu(), absmax_cpu, signed=signed, block_size=block, dtype=dtype,
                                     squared=squared)
        assert torch.equal(out_gpu.cpu(), out_cpu)


@pytest.mark.gpu
@pytest.mark.parametrize("signed,squared", MAPS)
def test_cuda_ties_and_zero_blocks_match_twin(signed, squared):
    """Exact midpoints (absmax 1, so the fast-math reciprocal is exact) and all-zero blocks: identical codes."""
    mids = midpoints32(ref_table(signed, squared))
    x = torch.cat([mids, torch.ones(1), torch.zeros(256), torch.zeros(10)])
    codes_cpu, _ = quantize_moment8(x, signed=signed, squared=squared)
    codes_gpu, _ = quantize_moment8(x.cuda(), signed=signed, squared=squared)
    assert torch.equal(codes_gpu.cpu(), codes_cpu)


class _BrokenBnbFunctional:
    """Stands in for bitsandbytes.functional of a build for another CUDA: it imports, then fails on first use."""

    def __init__(self):
        self.calls = 0

    def quantize_blockwise(self, *args, **kwargs):
        self.calls += 1
        raise RuntimeError("CUDA Setup failed despite GPU being available.\nmore lines")

    def dequantize_blockwise(self, *args, **kwargs):
        raise AssertionError("never reached")


def test_broken_bitsandbytes_falls_back_to_the_twin_once_with_one_line(monkeypatch, caplog):
    """A bitsandbytes that imports but raises on use: probed once per device, one warning line, and the codec
    gives the twin's codes (the device type is opened to the CPU here so the probe runs on this machine)."""
    import sys
    import types
    from quant import moments8
    broken = _BrokenBnbFunctional()
    package = types.ModuleType("bitsandbytes")
    package.functional = broken
    monkeypatch.setitem(sys.modules, "bitsandbytes", package)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", broken)
    monkeypatch.setattr(moments8, "_BNB_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(moments8, "_bnb_by_device", {})
    x = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0))
    with caplog.at_level("WARNING", logger="quant.moments8"):
        codes, absmax = moments8.quantize_moment8(x, signed=True)
        again = moments8.quantize_moment8(x, signed=True)
        decoded = moments8.dequantize_moment8(codes, absmax, signed=True)
    assert broken.calls == 1                         # probed once for the device
    lines = [r.getMessage() for r in caplog.records if "bitsandbytes" in r.getMessage()]
    assert len(lines) == 1 and "RuntimeError: CUDA Setup failed" in lines[0] and "\n" not in lines[0]
    monkeypatch.setattr(moments8, "_BNB_DEVICE_TYPES", ("cuda",))   # the twin's own result, bnb never asked
    ref_codes, ref_absmax = moments8.quantize_moment8(x, signed=True)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax) and torch.equal(again[0], ref_codes)
    assert torch.equal(decoded, moments8.dequantize_moment8(ref_codes, ref_absmax, signed=True))


def test_missing_bitsandbytes_is_silent(monkeypatch, caplog):
    import sys
    from quant import moments8
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)          # import raises ImportError
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    monkeypatch.setattr(moments8, "_bnb_by_device", {})
    with caplog.at_level("WARNING", logger="quant.moments8"):
        assert moments8._use_bnb(torch.device("cuda", 0), 256) is None
    assert not [r for r in caplog.records if "bitsandbytes" in r.getMessage()]
