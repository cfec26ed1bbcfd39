"""quant.compiled: the compiled kernels give the eager twins' bits; the on/off policy and the no-compiler fallback.

Bit identity is asserted with torch.equal (codes, scales, noise, dequantized values): the kernels are built from
correctly rounded IEEE ops only, so any difference is a bug (an op inductor rewrote), never a tolerance question.
Odd shapes: tails shorter than a block, 1-row matrices, single blocks, all-zero blocks; counters beyond 2**31 and
across a 2**32 segment boundary are reached through the counter offset (as a > 2**31-element matrix would).
"""
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from quant import compiled
from quant.int8 import _sr_rows_eager_, dequantize_int8, quantize_int8, sr_update_int8_
from quant.noise import _mix64, counter_uniform, stream_key

SHAPES = [(1, 1), (1, 256), (1, 300), (3, 700), (5, 1000), (17, 256), (4, 513), (2, 77)]
KEY = dict(seed=11, stream=3, step=5)


@pytest.fixture(autouse=True)
def _policy():
    compiled._reset_for_tests()
    yield
    compiled._reset_for_tests()


def both(fn):
    """(eager result, compiled result) of fn(); the compiled run must really have used the compiled kernels."""
    compiled.set_enabled(False)
    eager = fn()
    compiled.set_enabled(True)
    assert compiled.enabled(), compiled.failure()
    return eager, fn()


def weights(m, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g) * torch.logspace(-3, 1, n)  # blocks of very different magnitude
    if m > 2 and n > 256:
        w[1, :256] = 0.0  # an all-zero block (scale 0) that stays zero
    return w, torch.randn(m, n, generator=g) * 5e-2


@pytest.mark.parametrize("stochastic", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_sr_update_tensor_delta_bit_identical(shape, stochastic):
    w, delta = weights(*shape)
    if shape[0] > 2 and shape[1] > 256:
        delta[1, :256] = 0.0
    q, s = quantize_int8(w)

    def run():
        qq, ss = q.clone(), s.clone()
        sr_update_int8_(qq, ss, delta, stochastic=stochastic, rows_per_chunk=2, **KEY)
        return qq, ss

    (q_eager, s_eager), (q_comp, s_comp) = both(run)
    assert torch.equal(q_comp, q_eager)
    assert torch.equal(s_comp, s_eager)
    assert not torch.equal(q_eager, q) or shape == (1, 1)  # the update did something (not a vacuous comparison)


@pytest.mark.parametrize("shape", [(1, 300), (6, 513), (9, 256)])
def test_sr_update_callable_delta_bit_identical(shape):
    """The runtime's path: delta_rows(row_start, row_end, w_rows) with weight decay reading w_rows."""
    w, delta = weights(*shape, seed=1)
    q, s = quantize_int8(w)
    seen = []

    def delta_rows(r0, r1, w_rows):
        seen.append(w_rows.clone())
        return delta[r0:r1] - 1e-2 * w_rows

    def run():
        seen.clear()
        qq, ss = q.clone(), s.clone()
        sr_update_int8_(qq, ss, delta_rows, rows_per_chunk=4, **KEY)
        return qq, ss, [t for t in seen]

    (q_e, s_e, w_e), (q_c, s_c, w_c) = both(run)
    assert torch.equal(q_c, q_e) and torch.equal(s_c, s_e)
    assert len(w_e) == len(w_c) and all(torch.equal(a, b) for a, b in zip(w_e, w_c))  # same w_rows handed out


@pytest.mark.parametrize("shape", [(1, 1), (3, 700), (17, 256), (4, 513)])
def test_sr_update_keep_flag(shape):
    """keep (the device-side skip): False gives the unguarded bytes, True the old bytes; compiled == eager for
    both, with a tensor delta and a callable one, whole blocks and rows with a short last block."""
    w, delta = weights(*shape, seed=3)
    q, s = quantize_int8(w)

    def run(keep, callable_delta):
        qq, ss = q.clone(), s.clone()
        d = (lambda r0, r1, w_rows: delta[r0:r1] - 1e-2 * w_rows) if callable_delta else delta
        sr_update_int8_(qq, ss, d, rows_per_chunk=2, keep=keep, **KEY)
        return qq, ss

    for callable_delta in (False, True):
        (q_plain, s_plain), _ = both(lambda: run(None, callable_delta))
        for flag in (False, True):
            (q_e, s_e), (q_c, s_c) = both(lambda: run(torch.tensor(flag), callable_delta))
            assert torch.equal(q_c, q_e) and torch.equal(s_c, s_e)
            expected = (q, s) if flag else (q_plain, s_plain)
            assert torch.equal(q_c, expected[0]) and torch.equal(s_c, expected[1])
        assert not torch.equal(q_plain, q) or shape == (1, 1)
    with pytest.raises(TypeError, match="keep"):
        sr_update_int8_(q.clone(), s.clone(), delta, keep=torch.tensor(1), **KEY)


@pytest.mark.parametrize("row_start, n", [(2**31 // 700 + 1, 700), (2**32 // 1000, 1000), (2**40 // 300, 300)])
def test_sr_chunk_large_counters_bit_identical(row_start, n):
    """Rows of a > 2**31-element matrix, simulated by the chunk's global row index: the counter offset is
    row_start * n (the second case crosses the 2**32 boundary inside the chunk, where the noise key changes)."""
    w, delta = weights(3, n, seed=2)
    q, s = quantize_int8(w)
    q_e, s_e = q.clone(), s.clone()
    _sr_rows_eager_(q_e, s_e, delta, block_size=256, stochastic=True, row_start=row_start, **KEY)
    q_c, s_c = q.clone(), s.clone()

    def fail(*_):
        raise AssertionError("the compiled kernel was not used")

    compiled.sr_chunk_(q_c, s_c, delta, key=stream_key(**KEY), counter_start=row_start * n, block_size=256,
                       stochastic=True, mix64=_mix64, eager=fail)
    assert compiled.failure() is None
    assert torch.equal(q_c, q_e) and torch.equal(s_c, s_e)


@pytest.mark.parametrize("numel, offset", [(1, 0), (777, 5), (4099, 2**31 - 17), (3000, 2**32 - 1234),
                                           (1000, 2**40 + 3), (513, 2**63 - 513)])
def test_noise_bit_identical(numel, offset):
    eager, comp = both(lambda: counter_uniform(numel, offset=offset, **KEY))
    assert torch.equal(comp, eager)


def test_noise_matches_scalar_formula():
    """Independent reference: the documented construction evaluated on Python ints, element by element."""
    def h(x):
        x ^= x >> 16
        x = (x * 0x21F0AAAD) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x735A2D97) & 0xFFFFFFFF
        return x ^ (x >> 15)

    offset = 2**32 - 3  # crosses a segment boundary
    compiled.set_enabled(True)
    got = counter_uniform(6, offset=offset, **KEY)
    key = stream_key(**KEY)
    for i in range(6):
        c = offset + i
        sk = _mix64(key ^ ((c >> 32) * 0xD1B54A32D192ED03 & 0xFFFFFFFFFFFFFFFF))
        x = h(h((c & 0xFFFFFFFF) ^ (sk & 0xFFFFFFFF)) ^ (sk >> 32))
        assert got[i].item() == (x >> 8) * 2.0**-24
    assert compiled.failure() is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_bit_identical(shape, dtype):
    w, _ = weights(*shape)
    q, s = quantize_int8(w)
    rows = (0, shape[0]) if shape[0] < 3 else (1, shape[0] - 1)
    eager, comp = both(lambda: dequantize_int8(q, s, dtype=dtype, row_start=rows[0], row_end=rows[1]))
    assert comp.dtype == dtype and torch.equal(comp, eager)


def test_recompiles_bounded_across_shapes():
    """After one shape of each kind (full blocks / short tail, one row / several, one block / several), further
    matrix shapes reuse the graphs: a model compiles each kernel a bounded number of times, not once per shape."""
    from torch._dynamo.utils import counters
    compiled.set_enabled(True)

    def update(m, n):
        w, delta = weights(m, n, seed=m * n)
        q, s = quantize_int8(w)
        sr_update_int8_(q, s, delta, rows_per_chunk=max(1, m // 2), **KEY)
        dequantize_int8(q, s)

    for m, n in [(1, 256), (1, 100), (4, 256), (4, 300), (4, 1024), (4, 1100)]:
        update(m, n)
    graphs = counters["stats"]["unique_graphs"]
    for m, n in [(6, 512), (10, 768), (3, 2048), (7, 1500), (12, 333), (5, 4096), (1, 640), (2, 5000)]:
        update(m, n)
    assert counters["stats"]["unique_graphs"] == graphs
    assert compiled.failure() is None


def test_env_var_forces_eager(monkeypatch):
    monkeypatch.setenv(compiled.ENV_VAR, "0")
    assert not compiled.enabled()
    used = []
    out = compiled.call("never", lambda *a: used.append("compiled"), lambda *a: used.append("eager") or 7)
    assert out == 7 and used == ["eager"]
    monkeypatch.setenv(compiled.ENV_VAR, "1")
    assert compiled.enabled()


def test_compile_failure_falls_back_with_one_line(monkeypatch, caplog):
    """A backend failure (what a missing C++ compiler raises) logs one warning and the eager twin gives the
    result; later calls go straight to eager."""
    def broken(*args, **kwargs):
        raise torch._dynamo.exc.BackendCompilerFailed(lambda *a: None, RuntimeError("Failed to find C compiler"), None)

    monkeypatch.setattr(compiled, "_specialise", lambda fn, static, options=None: broken)
    monkeypatch.setattr(compiled, "_kernels", {})
    w, delta = weights(3, 300)
    q, s = quantize_int8(w)
    q_ref, s_ref = q.clone(), s.clone()
    compiled.set_enabled(False)
    sr_update_int8_(q_ref, s_ref, delta, **KEY)
    compiled.set_enabled(True)
    with caplog.at_level(logging.WARNING, logger="quant.compiled"):
        sr_update_int8_(q, s, delta, **KEY)
        sr_update_int8_(q.clone(), s.clone(), delta, **KEY)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    lines = [r for r in caplog.records if r.name == "quant.compiled"]
    assert len(lines) == 1 and "unavailable" in lines[0].getMessage()
    assert "\n" not in lines[0].getMessage()
    assert not compiled.enabled() and "C compiler" in compiled.failure()


def test_missing_cxx_compiler_subprocess(tmp_path):
    """The real failure: inductor pointed at a C++ compiler that does not exist, with an empty cache. The run
    completes with the eager twin's bytes; stderr has one warning line and no traceback."""
    script = textwrap.dedent("""
        import torch, torch._inductor.config as cfg
        cfg.cpp.cxx = ("/nonexistent/bin/g++",)
        from quant import compiled
        from quant.int8 import quantize_int8, sr_update_int8_
        w = torch.randn(3, 300, generator=torch.Generator().manual_seed(0))
        q, s = quantize_int8(w)
        sr_update_int8_(q, s, torch.full_like(w, 1e-3), seed=1, stream=2, step=3)
        print("failure:", compiled.failure() is not None, int(q.long().sum()))
        compiled.set_enabled(False)
        q2, s2 = quantize_int8(w)
        sr_update_int8_(q2, s2, torch.full_like(w, 1e-3), seed=1, stream=2, step=3)
        print("eager:", int(q2.long().sum()))
    """)
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    env.pop(compiled.ENV_VAR, None)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = dict(line.split(": ", 1) for line in proc.stdout.strip().splitlines())
    assert out["failure"].startswith("True")
    assert out["failure"].split()[1] == out["eager"]
    assert "Traceback" not in proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "torch.compile is unavailable" in line]
    assert len(warnings) == 1, proc.stderr[-3000:]


def test_compile_seconds_counts_first_use():
    compiled.set_enabled(True)
    before = compiled.compile_seconds()
    # a dtype no earlier test used here makes a new graph in this process (or loads it from the FX cache)
    q, s = quantize_int8(torch.randn(3, 300))
    dequantize_int8(q, s, dtype=torch.float64)
    assert compiled.compile_seconds() >= before
    assert compiled.failure() is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("keep", [None, False, True])
@pytest.mark.parametrize("shape", [(1, 300), (5, 1000), (64, 4096)])
def test_cuda_bit_identical(shape, keep):
    """Triton kernels (same source) against the eager twin on CUDA, and against the CPU bits; with and without the
    device-side keep flag."""
    w, delta = weights(*shape)
    q, s = quantize_int8(w)

    def run(device):
        qq, ss = q.clone().to(device), s.clone().to(device)
        flag = None if keep is None else torch.tensor(keep, device=device)
        sr_update_int8_(qq, ss, delta.to(device), rows_per_chunk=2, keep=flag, **KEY)
        return qq.cpu(), ss.cpu(), counter_uniform(4099, offset=2**32 - 7, device=device, **KEY).cpu()

    (q_e, s_e, u_e), (q_c, s_c, u_c) = both(lambda: run("cuda"))
    assert torch.equal(q_c, q_e) and torch.equal(s_c, s_e) and torch.equal(u_c, u_e)
    q_cpu, s_cpu, u_cpu = run("cpu")
    assert torch.equal(q_c, q_cpu) and torch.equal(s_c, s_cpu) and torch.equal(u_c, u_cpu)


def test_dequantize_traces_into_callers_graph():
    """Inside a caller's torch.compile (Int8Linear's forward or grad_input compiled with the model), dequantisation
    is plain traceable ops: no graph break, and the compiled layer agrees with eager (to fp32 matmul rounding: the
    compiled matmul may sum in another order)."""
    q, s = quantize_int8(torch.randn(5, 300, generator=torch.Generator().manual_seed(3)))

    def layer(x, q, s):
        return x @ dequantize_int8(q, s, dtype=torch.float32, check_values=False).T

    x = torch.randn(2, 300)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(layer)(x, q, s)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled.set_enabled(False)
    expected = layer(x, q, s)
    compiled.set_enabled(True)
    torch.testing.assert_close(torch.compile(layer)(x, q, s), expected)  # fp32 defaults: rtol 1.3e-6, atol 1e-5


@pytest.mark.parametrize("rows,cols,block", [(8, 24, 16), (5, 300, 256), (3, 576, 256), (4, 512, 256)])
def test_dequantize_with_short_block_fused_into_a_consumer(rows, cols, block):
    """Dequantisation traced into a caller's graph with a pointwise consumer fused onto it (an embedding lookup
    followed by an activation), short last block or not: the dequantised values are those of the eager twin, bit for
    bit (a padded-rows form gave garbage in the last block here), static and dynamic shapes."""
    q, s = quantize_int8(torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows)), block_size=block)
    ids = torch.tensor([rows - 1, 0, 1, 0])

    def lookup(q, s, ids):
        w = dequantize_int8(q.index_select(0, ids), s.index_select(0, ids), block_size=block, check_values=False)
        return w * 2.0, w - 1.0

    compiled.set_enabled(False)
    expected = lookup(q, s, ids)
    compiled.set_enabled(True)
    for dynamic in (False, True):
        torch._dynamo.reset()
        got = torch.compile(lookup, dynamic=dynamic, fullgraph=True)(q, s, ids)
        for g, e in zip(got, expected):
            assert torch.equal(g, e)


def test_under_dispatch_mode_runs_eager_twin():
    """Under a TorchDispatchMode (lowmem.memory's live-bytes meter) the eager twin runs: same bytes, no error."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountOps.ops += 1
            return func(*args, **(kwargs or {}))

    w, delta = weights(4, 300)
    q, s = quantize_int8(w)
    q_ref, s_ref = q.clone(), s.clone()
    compiled.set_enabled(False)
    sr_update_int8_(q_ref, s_ref, delta, **KEY)
    compiled.set_enabled(True)
    with CountOps():
        sr_update_int8_(q, s, delta, **KEY)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert CountOps.ops > 10 and compiled.failure() is None  # the eager ops were seen one by one


MOMENT_SHAPES = [(1,), (255,), (256,), (300,), (4, 700), (17, 256), (3, 5, 77)]


@pytest.mark.parametrize("signed, squared", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("shape", MOMENT_SHAPES)
def test_moment8_codec_bit_identical(shape, signed, squared):
    """The compiled moment codec (encode and decode) gives the eager twin's codes, absmax and decoded values:
    values over twelve decades (the dynamic map's whole range and beyond), exact map midpoints (the even-index
    tie rule), and an all-zero block."""
    from quant.moments8 import dequantize_moment8, dynamic_map, quantize_moment8
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g) * torch.logspace(-9, 3, shape[-1])
    flat = x.view(-1)
    table = dynamic_map(signed, squared=squared)
    midpoints = (table[:-1] + table[1:]) / 2
    flat[: min(flat.numel(), 40)] = midpoints[torch.arange(min(flat.numel(), 40)) * 6 % 255]  # ties, absmax <= 1
    if flat.numel() >= 512:
        flat[256:512] = 0.0
    if not signed:
        x = x.abs()

    def run():
        codes, absmax = quantize_moment8(x, signed=signed, squared=squared)
        return codes, absmax, dequantize_moment8(codes, absmax, signed=signed, squared=squared)

    (c_e, a_e, d_e), (c_c, a_c, d_c) = both(run)
    assert compiled.failure() is None
    assert torch.equal(c_c, c_e) and torch.equal(a_c, a_e) and torch.equal(d_c, d_e)
    assert x.numel() < 200 or len(torch.unique(c_e)) > 20  # many distinct codes: not a vacuous comparison


def test_empty_inputs_leave_compilation_on():
    """Empty matrices and moments take the eager path and do not turn compilation off for the process (an empty
    layout made inductor assert, which the policy would have read as a missing compiler)."""
    from quant.moments8 import quantize_moment8
    compiled.set_enabled(True)
    for shape in [(0, 10), (4, 0), (0, 0), (3, 512)]:
        q, s = quantize_int8(torch.ones(shape))
        assert dequantize_int8(q, s).shape == shape
        sr_update_int8_(q, s, torch.zeros(shape), **KEY)
        quantize_moment8(torch.zeros(shape), signed=True)
        assert compiled.failure() is None, shape


def test_device_constants_hold_the_values():
    from quant.compiled import device_constants
    t = device_constants([1, -2, 2**31 - 1], dtype=torch.int32, device="cpu")
    assert t.dtype == torch.int32 and t.tolist() == [1, -2, 2**31 - 1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: no CUDA device on this machine")
def test_device_constants_do_not_synchronise_on_cuda():
    """The kernels' keys and scalars are made inside the backward: under sync debug mode "error" a synchronising
    copy would raise."""
    from quant.compiled import device_constants
    torch.cuda.set_sync_debug_mode("error")
    try:
        t = device_constants([0.5, 2.0], dtype=torch.float32, device="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert t.device.type == "cuda" and t.cpu().tolist() == [0.5, 2.0]


def test_cached_constants_are_made_once_and_usable_for_training():
    """The shared kernel constants: the values of device_constants, one tensor per (values, dtype, device), and not
    an inference tensor even when first made under inference mode (a later training step reads it)."""
    values = (127.0, 0.1, 1.0 / 3.0)
    with torch.inference_mode():
        first = compiled.cached_constants(values, dtype=torch.float32, device=torch.device("cpu"))
    assert not first.is_inference()
    assert torch.equal(first, torch.tensor(list(values), dtype=torch.float32))
    assert compiled.cached_constants(values, dtype=torch.float32, device=torch.device("cpu")) is first
    other = compiled.cached_constants(values, dtype=torch.float64, device=torch.device("cpu"))
    assert other is not first and other.dtype == torch.float64


def test_a_graph_inductor_cannot_lower_runs_eagerly_alone(monkeypatch, caplog):
    """A LoweringException (inductor cannot lower one graph: torch 2.11's moment encoder with a short last block)
    makes that kernel run its eager twin, with one warning line; compilation stays on for every other kernel."""
    class LoweringException(Exception):   # inductor's class name is what the policy reads
        pass

    def unlowerable(*args, **kwargs):
        raise torch._dynamo.exc.BackendCompilerFailed(lambda *a: None, LoweringException("NotImplementedError: View"),
                                                      None)

    real = compiled._specialise
    monkeypatch.setattr(compiled, "_kernels", {})
    monkeypatch.setattr(compiled, "_uncompilable", set())
    monkeypatch.setattr(compiled, "_specialise",
                        lambda fn, static, options=None: unlowerable if fn is compiled.moment8_encode_ops
                        else real(fn, static, options))
    from quant.moments8 import quantize_moment8
    x = torch.randn(3, 300, generator=torch.Generator().manual_seed(4))
    compiled.set_enabled(False)
    want = quantize_moment8(x, signed=True)
    compiled.set_enabled(True)
    with caplog.at_level(logging.WARNING, logger="quant.compiled"):
        got = [quantize_moment8(x, signed=True) for _ in range(2)]
    assert all(torch.equal(g[0], want[0]) and torch.equal(g[1], want[1]) for g in got)
    lines = [r.getMessage() for r in caplog.records if r.name == "quant.compiled"]
    assert len(lines) == 1 and "moment8_encode" in lines[0] and "View" in lines[0]
    assert compiled.enabled() and compiled.failure() is None
    w, delta = weights(3, 512)
    q, s = quantize_int8(w)
    sr_update_int8_(q, s, delta, **KEY)
    assert any(key[0] == "sr_blocks" for key in compiled._kernels)   # the SR write still compiled
