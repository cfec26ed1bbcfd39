"""quant.compiled on CUDA: the compile options that make Triton round like eager CUDA, and the bits they give.

CPU tests (run everywhere): the options are chosen from this torch's own inductor config (every name exists, the
division-rounding one included), handed to torch.compile for a non-CPU device only (the device check mocked), scoped
to lowmem's compiles (the process config is untouched), and a torch without a division-rounding setting runs the
eager twins there. `gpu` tests (skip without CUDA): every compiled kernel gives its eager CUDA twin's bits and the
CPU bits: SR write, dequantisation, noise, the 8-bit moment codec, the low-rank 8-bit Adam step and the fused 8-bit
AdamW step (bf16 stochastic rounding included). torch.equal throughout: these kernels are built from correctly rounded
ops, so any difference is an op rounded differently, never a tolerance question.
"""
import logging

import pytest
import torch

from quant import compiled
from quant.int8 import dequantize_int8, quantize_int8, sr_update_int8_
from quant.noise import counter_uniform

KEY = dict(seed=11, stream=3, step=5)


@pytest.fixture(autouse=True)
def _policy():
    compiled._reset_for_tests()
    yield
    compiled._reset_for_tests()
    compiled.triton_numerics_options.cache_clear()


def _inductor_config():
    from torch._inductor import config
    return config


def test_numerics_options_exist_in_this_torch():
    """Each option names a setting of this torch's inductor config; division rounding and the casts (which turn
    Triton's fp fusion off) are there. Independent check of the division name: the attribute itself."""
    options = compiled.triton_numerics_options()
    assert options is not None
    known = _inductor_config().get_config_copy()
    assert options and all(name in known and value is True for name, value in options.items())
    assert "emulate_precision_casts" in options
    division = [n for n in options if "division_rounding" in n or "divison_rounding" in n]
    assert len(division) == 1
    if hasattr(_inductor_config(), "eager_numerics"):  # torch >= 2.11 (and 2.13, where the brief's name is)
        assert division == ["eager_numerics.division_rounding"]
        assert hasattr(_inductor_config().eager_numerics, "division_rounding")
    assert compiled.compile_options("cpu") == {}
    assert compiled.compile_options("cuda") == options


def test_older_and_missing_names(monkeypatch):
    """The older spelling is used where it is the one that exists; without any division-rounding setting there is
    no bit-identical compile (None); disable_ftz is optional."""
    monkeypatch.setattr(compiled, "_inductor_option_names",
                        lambda: {"emulate_divison_rounding", "emulate_precision_casts", "max_autotune"})
    compiled.triton_numerics_options.cache_clear()
    assert compiled.triton_numerics_options() == {"emulate_divison_rounding": True, "emulate_precision_casts": True}
    monkeypatch.setattr(compiled, "_inductor_option_names", lambda: {"emulate_precision_casts"})
    compiled.triton_numerics_options.cache_clear()
    assert compiled.triton_numerics_options() is None
    assert compiled.compile_options("cuda") is None and compiled.compile_options("cpu") == {}


def _sr_case():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 768, generator=g) * torch.logspace(-3, 1, 768)
    return quantize_int8(w), torch.randn(5, 768, generator=g) * 5e-2


def test_cuda_path_compiles_with_the_options(monkeypatch):
    """The device check mocked to CUDA (the tensors stay on CPU): the kernel is compiled with the eager-numerics
    options, these reach torch.compile, the compile still gives the eager twin's bits (C++ ignores the Triton-only
    settings), and the process's inductor config is what it was (the options are scoped to lowmem's compiles)."""
    config = _inductor_config()
    before = config.get_config_copy()
    seen = []
    real_compile = torch.compile

    def recording_compile(fn, **kwargs):
        seen.append(kwargs.get("options"))
        return real_compile(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    monkeypatch.setattr(compiled, "_kernels", {})
    monkeypatch.setattr(compiled, "_device_type", lambda args: "cuda")
    (q, s), delta = _sr_case()
    q_ref, s_ref = q.clone(), s.clone()
    compiled.set_enabled(False)
    sr_update_int8_(q_ref, s_ref, delta, **KEY)
    compiled.set_enabled(True)
    sr_update_int8_(q, s, delta, **KEY)
    assert compiled.failure() is None
    assert seen and all(options == compiled.triton_numerics_options() for options in seen)
    assert all(key[1] == "cuda" for key in compiled._kernels)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert config.get_config_copy() == before


def test_cpu_path_compiles_without_options(monkeypatch):
    seen = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw.get("options")) or real_compile(fn, **kw))
    monkeypatch.setattr(compiled, "_kernels", {})
    (q, s), delta = _sr_case()
    sr_update_int8_(q, s, delta, **KEY)
    assert seen == [None] * len(seen) and seen


def test_no_division_setting_runs_eager_twin_on_cuda(monkeypatch, caplog):
    """A torch whose inductor cannot round Triton's division like eager: the CUDA path runs the eager twin (same
    bits), says so in one line, and compilation stays on for the CPU."""
    monkeypatch.setattr(compiled, "triton_numerics_options", lambda: None)
    monkeypatch.setattr(compiled, "_kernels", {})
    monkeypatch.setattr(compiled, "_eager_devices", set())
    monkeypatch.setattr(compiled, "_device_type", lambda args: "cuda")
    monkeypatch.setattr(compiled, "_specialise", lambda *a, **k: pytest.fail("nothing may be compiled for CUDA"))
    (q, s), delta = _sr_case()
    q_ref, s_ref = q.clone(), s.clone()
    compiled.set_enabled(False)
    sr_update_int8_(q_ref, s_ref, delta, **KEY)
    compiled.set_enabled(True)
    with caplog.at_level(logging.WARNING, logger="quant.compiled"):
        sr_update_int8_(q, s, delta, **KEY)
        sr_update_int8_(q.clone(), s.clone(), delta, **KEY)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    lines = [r.getMessage() for r in caplog.records if r.name == "quant.compiled"]
    assert len(lines) == 1 and "division" in lines[0]
    assert compiled.enabled() and compiled.failure() is None


# ---- on a CUDA device ----

def _both_on_cuda(fn):
    """(eager, compiled) results of fn() on CUDA; the compiled run really compiled a CUDA kernel."""
    compiled.set_enabled(False)
    eager = fn()
    compiled.set_enabled(True)
    out = fn()
    assert compiled.failure() is None and "cuda" not in compiled._eager_devices
    assert any(key[1] == "cuda" for key in compiled._kernels)
    return eager, out


def _to_cpu(values):
    return tuple(v.cpu() if isinstance(v, torch.Tensor) else _to_cpu(v) for v in values)


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, tuple):
            _assert_same(x, y)
        else:
            assert x.dtype == y.dtype and torch.equal(x, y)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 512), (7, 1000), (64, 4096)])
def test_cuda_dequantize_and_noise(shape, dtype):
    q, s = quantize_int8(torch.randn(*shape, generator=torch.Generator().manual_seed(1)))

    def run(device):
        return (dequantize_int8(q.to(device), s.to(device), dtype=dtype),
                counter_uniform(70_001, offset=2**32 - 70_000, device=device, **KEY))

    eager, comp = _both_on_cuda(lambda: run("cuda"))
    _assert_same(_to_cpu(comp), _to_cpu(eager))
    _assert_same(_to_cpu(comp), run("cpu"))


def _moment_values(shape, signed, seed):
    from quant.moments8 import dynamic_map
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.logspace(-9, 3, shape[-1])
    flat = x.view(-1)
    table = dynamic_map(signed)
    midpoints = (table[:-1] + table[1:]) / 2
    flat[:40] = midpoints[torch.arange(40) * 6 % 255]  # exact midpoints: the even-index tie rule
    flat[256:512] = 0.0                                 # an all-zero block
    return x if signed else x.abs()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("signed, squared", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("shape", [(4, 700), (33, 4096)])
def test_cuda_moment_codec(shape, signed, squared):
    """The moment encoder on CUDA is the pure-torch twin (compiled or not), not bitsandbytes: the CPU codes."""
    from quant.moments8 import dequantize_moment8, quantize_moment8
    x = _moment_values(shape, signed, seed=sum(shape))

    def run(device):
        codes, absmax = quantize_moment8(x.to(device), signed=signed, squared=squared)
        return codes, absmax, dequantize_moment8(codes, absmax, signed=signed, squared=squared)

    eager, comp = _both_on_cuda(lambda: run("cuda"))
    _assert_same(_to_cpu(comp), _to_cpu(eager))
    _assert_same(_to_cpu(comp), run("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", [(128, 64), (50, 45), (4096, 128)])
def test_cuda_lowrank_adam8_step(shape):
    """Five low-rank 8-bit Adam steps (decode, Adam with its fp64 root, encode): compiled CUDA == eager CUDA == CPU,
    directions, V' and the stored codes."""
    from lowmem.optim.moments import adam_direction_, init_moments

    def run(device):
        gen = torch.Generator().manual_seed(3)
        state = init_moments(shape, bits=8, device=device)
        out = []
        for t in range(1, 6):
            g = (torch.randn(shape, generator=gen) * torch.logspace(-6, 0, shape[-1])).to(device)
            out.append(adam_direction_(state, g, step=t, beta1=0.9, beta2=0.999, eps=1e-8, bits=8))
        return tuple(out) + tuple(state[k] for k in sorted(state))

    eager, comp = _both_on_cuda(lambda: run("cuda"))
    _assert_same(_to_cpu(comp), _to_cpu(eager))
    _assert_same(_to_cpu(comp), run("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype, sr_key", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, (7, 2))])
def test_cuda_float_adamw8_step(dtype, sr_key):
    """The fused 8-bit AdamW step (decode, AdamW with decay, encode, the param written back; bf16 to nearest or
    stochastically rounded): compiled CUDA == eager CUDA == CPU over three steps."""
    from lowmem.optim.float_adamw import float_adamw_update_, init_float_adamw_state

    def run(device):
        gen = torch.Generator().manual_seed(5)
        param = (torch.randn(300, 257, generator=gen) * 0.02).to(device=device, dtype=dtype)
        state = init_float_adamw_state(param, bits=8)
        for _ in range(3):
            grad = (torch.randn(300, 257, generator=gen) * torch.logspace(-5, 0, 257)).to(device=device, dtype=dtype)
            float_adamw_update_(param, grad, state, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                                sr_key=sr_key)
        return (param,) + tuple(state[k] for k in sorted(state) if k != "step")

    eager, comp = _both_on_cuda(lambda: run("cuda"))
    _assert_same(_to_cpu(comp), _to_cpu(eager))
    _assert_same(_to_cpu(comp), run("cpu"))
