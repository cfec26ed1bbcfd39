"""Compiled twins of the hot quant kernels, and the one place that decides whether they are used.

What is compiled (torch.compile, inductor: C++ on CPU, Triton on CUDA, from the same source):
  - `sr_chunk_`: one row chunk of the stochastic-rounding update (quant.int8.sr_update_int8_): INT8 codes + scales
    -> fp32, + the update chunk, + counter noise, exact stochastic floor, new block absmax, codes and scales
    written in place, as one loop nest per (row, block): no chunk-sized intermediate goes to memory. Rows with a
    short last block are split into their whole blocks and their short ones (two contiguous copies, see sr_chunk_).
  - `uniform`: quant.noise.counter_uniform's hash.
  - `dequantize`: quant.int8.dequantize_int8's q * s (rows of whole blocks; others run the eager twin).
  - `moment8_encode`: quant.moments8's pure-torch encoder (absmax, scaling, nearest-code search by table lookups).
The counter hash runs on int32 words (wrapping multiply; logical shifts as masked arithmetic shifts), the same bits
as the eager twin's int64 arithmetic with half the vector lanes' cost. The eager functions in quant.int8 /
quant.noise / quant.moments8 are the reference twins; every compiled kernel gives the same bits
(tests/unit/quant/test_compiled.py), on CPU and on CUDA. Why that holds:
  - every float op is a single correctly rounded IEEE op (mul, add, div, abs, floor, compare, max, the fp64 root of
    lowmem.optim.moments), which C++ evaluates like eager torch; the stochastic floor is the exact no-rounding form
    of quant.int8; 127 enters the kernels as a 0-dim tensor, so the scale division stays a true division whatever a
    backend does with division by a literal (a multiplication by a rounded reciprocal would change bits);
  - on CUDA (Triton) three of inductor's defaults would not: `/` (and reciprocal) lowers to the approximate
    `div.full`, `a * b + c` is contracted to one fused multiply-add, and subnormals may be flushed to zero. Eager
    CUDA kernels divide with IEEE rounding, run each op as its own kernel and keep subnormals, so lowmem compiles its
    own kernels for a non-CPU device with inductor's eager-numerics settings (`triton_numerics_options`: torch
    2.11-2.13 `eager_numerics.division_rounding` (env TORCHINDUCTOR_EMULATE_DIVISION_ROUNDING), older releases
    `emulate_divison_rounding`; `emulate_precision_casts`, which also turns Triton's fp fusion off;
    `eager_numerics.disable_ftz` where it exists), passed as torch.compile options: they apply to these compiles
    only, never to the caller's own torch.compile or to the process's config. A torch without a division-rounding
    setting runs the eager twins on CUDA (one warning line) rather than claim bits it cannot give;
  - the twin on CUDA is the pure-torch code on the same device, not bitsandbytes: quant.moments8 encodes moments with
    its own nearest-code search on every device (bitsandbytes' blockwise quantiser, built with fast math, can move a
    value lying within an ulp of a code midpoint to the neighbouring code: a third variant). So CPU, CUDA eager and
    CUDA compiled give one set of bits for these kernels, and an eager fallback mid-run (a recompile limit, a
    compiler failure) does not change them. (bitsandbytes remains an explicit choice: lowmem.optim.float_adamw's
    backend="bnb".)
Inside a caller's own torch.compile the kernels' ops join the caller's graph under the caller's settings; what a
compiled model traces is dequantisation, an exact product q * s (one rounding, no division, nothing to contract).

Shapes are dynamic (every tensor dimension marked dynamic, sizes 0/1 not specialised, no duck shaping; see
`_shape_policy_patchers`): per kernel and static setting (block size, rounding mode, dtype) a couple of graphs (rows
a whole number of blocks or not) serve every matrix shape and chunk size, so a 7B model does not compile once per weight
shape (tests/unit/quant/test_compiled.py::test_recompiles_bounded_across_shapes). The inductor FX-graph cache is on by default and lives in
TORCHINDUCTOR_CACHE_DIR (default /tmp/torchinductor_<user>): a second run, or a second test process, loads the
compiled kernels from disk instead of compiling again.

Policy (`enabled()`): on by default where torch.compile works; off when LOWMEM_COMPILE=0 (environment, wins over
everything), when set_enabled(False) was called (LowMemConfig.compile=False), or after a compilation failed (no C++
compiler, inductor error): then one warning line is logged and every kernel runs its eager twin for the rest of
the process; a kernel inductor cannot lower (a LoweringException) runs its eager twin on its own, the others stay
compiled. Under a TorchDispatchMode (lowmem.memory's live-bytes meter) the eager twin runs, as dynamo does not
trace under such modes. `compile_seconds()` is the wall time spent in calls that compiled a new graph (the first-use cost).
"""
from __future__ import annotations

import functools
import logging
import os
import threading
import time
import types
from typing import Callable

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters as _dynamo_counters
from torch.utils._python_dispatch import _get_current_dispatch_mode

log = logging.getLogger(__name__)

ENV_VAR = "LOWMEM_COMPILE"
_QMAX = 127
_MASK32 = 0xFFFFFFFF
_MUL1 = 0x21F0AAAD
_MUL2 = 0x735A2D97
_INV_2_24 = 2.0**-24
_RECOMPILE_LIMIT = 16

_lock = threading.Lock()
_configured: bool = True     # set_enabled(); LowMemConfig.compile
_failed: str | None = None   # the first compilation error, once one happened
_compile_s: float = 0.0
_kernels: dict[tuple, Callable] = {}
_over_limit: set[tuple] = set()
_eager_devices: set[str] = set()   # device types without a bit-identical compile (warned once)
_uncompilable: set[tuple] = set()  # kernels inductor could not lower (LoweringException): run eagerly


# inductor settings that make Triton evaluate float ops as eager CUDA does (module docstring). Each entry lists the
# names one setting has had across torch releases, newest first; `required` ones must exist for the bits to hold.
_EAGER_NUMERICS = (
    (("eager_numerics.division_rounding", "emulate_divison_rounding"), True),  # `/` as div_rn, not div.full
    (("emulate_precision_casts",), True),           # also enable_fp_fusion=False: no a * b + c -> fma
    (("eager_numerics.disable_ftz",), False),       # keep subnormals (absent before torch 2.11: then best effort)
)


def _inductor_option_names() -> set[str]:
    """Every option name this torch's inductor config knows (nested ones dotted, as torch.compile takes them)."""
    from torch._inductor import config as inductor_config
    return set(inductor_config.get_config_copy())


@functools.lru_cache(maxsize=None)
def triton_numerics_options() -> dict[str, bool] | None:
    """{inductor option: True} that make this torch's Triton kernels round like eager CUDA (module docstring), as
    torch.compile(options=...) takes them; None when this torch lacks a required one (no division-rounding
    setting): then no compiled kernel can be bit-identical on CUDA."""
    known = _inductor_option_names()
    options = {}
    for names, required in _EAGER_NUMERICS:
        name = next((n for n in names if n in known), None)
        if name is None and required:
            return None
        if name is not None:
            options[name] = True
    return options


def compile_options(device_type: str) -> dict[str, bool] | None:
    """The inductor options lowmem's kernels are compiled with on a device of `device_type`: none on CPU (C++ is
    already eager's arithmetic), triton_numerics_options() elsewhere (None: no bit-identical compile possible)."""
    return {} if device_type == "cpu" else triton_numerics_options()


def _specialise(fn: Callable, static: dict, options: dict | None = None) -> Callable:
    """torch.compile of fn with the keyword-only `static` values baked in as constants (block size, rounding mode,
    dtype), every tensor dimension dynamic, and inductor `options` (compile_options) for these graphs only.

    The function gets its own copy of fn's code object: dynamo keeps its graphs (and its recompile limit) per code
    object, so each specialisation has its own few shape classes instead of all of them sharing one limit. Ints
    passed as arguments would instead be traced as symbols and guarded on; a functools.partial shares one code
    object across all specialisations.
    """
    clone = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    clone.__kwdefaults__ = {**(fn.__kwdefaults__ or {}), **static}   # fn's own keyword defaults stay
    return torch.compile(clone, dynamic=None, fullgraph=True, options=options or None)


def set_enabled(flag: bool) -> None:
    """The configured choice (LowMemConfig.compile). LOWMEM_COMPILE=0 still forces eager."""
    global _configured
    _configured = bool(flag)


def env_disabled() -> bool:
    return os.environ.get(ENV_VAR, "").strip().lower() in {"0", "false", "no", "off"}


def enabled() -> bool:
    """Whether the compiled kernels are used now (see the module docstring)."""
    return _configured and _failed is None and not env_disabled() and not torch.compiler.is_compiling()


def wanted() -> bool:
    """Whether callers should route through `call`: enabled(), or being traced by the caller's own torch.compile
    with compilation not switched off (then `call` inlines the plain kernel ops into that graph)."""
    if torch.compiler.is_compiling():
        return _configured and not env_disabled()
    return enabled()


def failure() -> str | None:
    """The one-line reason compilation was given up in this process, or None."""
    return _failed


def compile_seconds() -> float:
    """Seconds spent so far in kernel calls that compiled a new graph (process-wide, monotonic)."""
    return _compile_s


def _reset_for_tests() -> None:
    global _configured, _failed
    _configured, _failed = True, None


@functools.lru_cache(maxsize=1)
def _shape_policy_patchers() -> tuple[Callable, Callable]:
    """Dynamo settings for our kernels only (the caller's own torch.compile keeps its settings): sizes 0 and 1 are
    not specialised (size-oblivious), equal sizes are not assumed equal (no duck shaping), and a recompile limit of
    at least _RECOMPILE_LIMIT (the process's limit when the first kernel ran, if higher) for the few shape classes
    left (block padding or not). Each patcher sets its values and returns the function that restores the previous
    ones: torch's low-overhead closure patchers (config.patch costs several times more per call), made once."""
    fx_config, dynamo_config = torch.fx.experimental._config, torch._dynamo.config
    return (fx_config._make_closure_patcher(backed_size_oblivious=True, use_duck_shape=False),
            dynamo_config._make_closure_patcher(recompile_limit=max(dynamo_config.recompile_limit,
                                                                    _RECOMPILE_LIMIT)))


def _graphs() -> int:
    return int(_dynamo_counters["stats"]["unique_graphs"])


def _device_type(args: tuple) -> str:
    """The device type ("cpu", "cuda", ...) of a kernel call: that of its first tensor argument."""
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.device.type
    return "cpu"


def call(name: str, fn: Callable, eager: Callable, *args, **static):
    """fn compiled (once per device type and static values, dynamic shapes) applied to args; eager(*args) when
    compilation is off or fails.

    Called while the caller's own model is being traced by torch.compile, fn is traced inline (no nested compile).
    A compilation failure (BackendCompilerFailed: no C++ compiler, an inductor error) is logged as one warning
    line and turns compilation off for the process; errors raised by the kernel's own inputs propagate. On a device
    whose compiler cannot give the eager twin's bits (compile_options is None) the eager twin runs.
    """
    global _failed, _compile_s
    if torch.compiler.is_compiling() and _configured and not env_disabled():
        return fn(*args, **static)  # inside the caller's torch.compile: the kernel's plain ops join its graph
    if not enabled() or _get_current_dispatch_mode() is not None:
        # A TorchDispatchMode (lowmem.memory's live-bytes meter, a profiler mode) sees each aten op: the eager twin
        # gives it the ops it expects, and dynamo does not trace under such modes.
        return eager(*args, **static)
    device_type = _device_type(args)
    cache_key = (name, device_type, *static.items())   # each call site passes its static values in one order
    kernel = _kernels.get(cache_key)
    if cache_key in _uncompilable:
        return eager(*args, **static)
    if kernel is None:
        options = compile_options(device_type)
        if options is None:
            if device_type not in _eager_devices:
                _eager_devices.add(device_type)
                log.warning("lowmem: this torch %s has no inductor setting for IEEE division in Triton; the quant "
                            "kernels run eagerly on %s (compiled ones would not give the eager bits)",
                            torch.__version__, device_type)
            return eager(*args, **static)
        with _lock:
            kernel = _kernels.setdefault(cache_key, _specialise(fn, static, options))
    before = _graphs()
    start = time.perf_counter()
    for arg in args:
        if isinstance(arg, torch.Tensor) and arg.dim():
            torch._dynamo.maybe_mark_dynamic(arg, list(range(arg.dim())))   # one call per tensor, not per dim
    shape_policy, recompile_policy = _shape_policy_patchers()
    try:
        restore_shapes, restore_limit = shape_policy(), recompile_policy()
        try:
            out = kernel(*args)
        finally:
            restore_limit()
            restore_shapes()
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        # More shape classes than dynamo's recompile limit for one specialisation: this call runs eagerly.
        if cache_key not in _over_limit:
            _over_limit.add(cache_key)
            log.warning("lowmem: %s hit torch.compile's recompile limit; such calls run eagerly", name)
        return eager(*args, **static)
    except torch._dynamo.exc.BackendCompilerFailed as exc:
        cause = getattr(exc, "inner_exception", None) or exc
        text = str(cause).strip()
        reason = f"{type(cause).__name__}: {text.splitlines()[0] if text else ''}"[:300]
        if type(cause).__name__ == "LoweringException":
            # inductor cannot lower this one graph (torch 2.11: the moment encoder's short last block); the other
            # kernels stay compiled, this specialisation runs its eager twin from now on (the same bits)
            _uncompilable.add(cache_key)
            log.warning("lowmem: this torch cannot compile the %s kernel (%s); its calls run eagerly", name, reason)
            return eager(*args, **static)
        _failed = reason
        log.warning("lowmem: torch.compile is unavailable here (%s); the quant kernels run eagerly "
                    "(set %s=0 to skip trying)", _failed, ENV_VAR)
        return eager(*args, **static)
    if _graphs() != before:
        _compile_s += time.perf_counter() - start
    return out


# ---- kernels (traced by torch.compile; plain torch ops, readable as the reference formulas) ----
#
# The hash runs on int32 words. quant.noise's eager twin computes it on int64 holding 32-bit values; int32 gives
# the same bits because multiplication and addition wrap modulo 2**32 and the logical shifts of the construction
# are arithmetic shifts with the sign-extended bits masked off. Half the vector lanes of int64, and no 64-bit
# multiply: the hash is the kernels' largest cost on CPU.
#
# The SR kernel sees a matrix chunk as blocks, (rows, blocks, block length), of a contiguous tensor: no padding and
# no slicing inside the graph, so inductor emits one loop nest: per (row, block) the absmax reduction and the
# elementwise write share the loaded block, and no chunk-sized intermediate goes to memory. Rows with a short last
# block are handed over as two contiguous pieces (sr_chunk_).

_MUL1_I32 = _MUL1  # both multipliers are < 2**31: valid int32 constants
_MUL2_I32 = _MUL2
_LOW24 = 0xFFFFFF
# The int32 key words of a kernel call (_key_words): where each sits in the (8,) tensor.
_BASE_LO, _K1, _K2, _K1_NEXT, _K2_NEXT, _SPLIT, _ROW_STRIDE, _COL0 = range(8)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """quant.noise's H on int32 words: x ^= x >>> 16; x *= M1; x ^= x >>> 15; x *= M2; x ^= x >>> 15 (mod 2**32)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _MUL1_I32
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _MUL2_I32
    return x ^ ((x >> 15) & 0x1FFFF)


def _uniform_at(local: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """u fp32 for int32 local counters (0 <= local < 2**31) relative to the call's base counter: the low 32 bits
    of the global counter are base_lo + local (mod 2**32); counters at local >= split lie in the next 2**32
    segment, whose key words differ (quant.noise folds the high counter bits into the key)."""
    second = local >= keys[_SPLIT]
    k1 = torch.where(second, keys[_K1_NEXT], keys[_K1])
    k2 = torch.where(second, keys[_K2_NEXT], keys[_K2])
    x = _hash32((local + keys[_BASE_LO]) ^ k1)
    x = _hash32(x ^ k2)
    return ((x >> 8) & _LOW24).to(torch.float32) * _INV_2_24


def _uniform_kernel(out: torch.Tensor, keys: torch.Tensor) -> None:
    out.copy_(_uniform_at(torch.arange(out.shape[0], dtype=torch.int32, device=out.device), keys))


def _stochastic_floor(y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """floor(y + u) without rounding the sum (quant.int8._stochastic_floor_)."""
    magnitude = y.abs()
    whole = torch.floor(magnitude)
    frac = magnitude - whole
    non_negative = y >= 0
    bump = torch.where(non_negative, frac >= 1.0 - u, frac > u)
    whole = whole + bump.to(torch.float32)
    return torch.where(non_negative, whole, -whole)


def _dequantize_kernel(q: torch.Tensor, scales: torch.Tensor, *, block_size: int, dtype: torch.dtype,
                       tail: bool) -> torch.Tensor:
    """q int8 (r, n) * scales fp32 (r, nb), formed in fp32, as (r, n) of dtype; tail: whether n is not a multiple
    of block_size (then each column reads the scale of block column // block_size).

    Why not pad the rows to whole blocks and slice the padding off: inductor (torch 2.13, CPU) miscompiles that form
    (and a sliced repeat_interleave of the scales) once a pointwise consumer fuses with it, e.g. an embedding lookup
    followed by tanh in a caller's graph: the last block's values come out as garbage
    (tests/unit/quant/test_compiled.py::test_dequantize_with_short_block_fused_into_a_consumer)."""
    rows, n = q.shape
    if tail:
        column_block = torch.arange(n, device=q.device) // block_size
        return (q.to(torch.float32) * scales.to(torch.float32)[:, column_block]).to(dtype)
    num_blocks = scales.shape[1]
    w = q.view(rows, num_blocks, block_size).to(torch.float32) * scales[:, :, None].to(torch.float32)
    return w.view(rows, n).to(dtype)


def _sr_blocks_values(q: torch.Tensor, scales: torch.Tensor, delta: torch.Tensor, qmax: torch.Tensor,
                      keys: torch.Tensor, keep: torch.Tensor | None, *,
                      stochastic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(new codes int8 (r, nb, B), new scales fp32 (r, nb)) of requantize(q * s + delta) for q int8 (r, c) and
    scales fp32 (r, nb), contiguous, c = nb * B, per block of B = c // nb consecutive columns; where keep (bool
    (1,), or None) holds, the old codes and scales instead. Element (i, j) has the local counter
    i * keys[_ROW_STRIDE] + keys[_COL0] + j (the columns of a larger matrix's rows, _key_words)."""
    rows, cols = q.shape
    num_blocks = scales.shape[1]
    block = cols // num_blocks
    old = q.view(rows, num_blocks, block).to(torch.float32)
    w = old * scales[:, :, None] + delta.view(rows, num_blocks, block).to(torch.float32)
    scale = torch.amax(w.abs(), dim=-1) / qmax
    y = w / scale[:, :, None]
    y = torch.where(scale[:, :, None] == 0, 0.0, y)  # all-zero block: 0 / 0
    if stochastic:
        local = (torch.arange(rows, dtype=torch.int32, device=q.device)[:, None, None] * keys[_ROW_STRIDE]
                 + keys[_COL0]
                 + torch.arange(num_blocks, dtype=torch.int32, device=q.device)[None, :, None] * block
                 + torch.arange(block, dtype=torch.int32, device=q.device))
        y = _stochastic_floor(y, _uniform_at(local, keys))
    else:
        y = torch.round(y)
    y = y.clamp(-_QMAX, _QMAX)
    if keep is not None:
        # chosen in fp32, before the one cast: the old codes are exact there, and the select stays in the vector
        # lanes of the float computation (a select on the int8 codes compiled to a slower loop on CPU)
        y = torch.where(keep, old, y)
        scale = torch.where(keep, scales, scale)
    return y.to(torch.int8), scale


def _sr_blocks_kernel(q: torch.Tensor, scales: torch.Tensor, delta: torch.Tensor, qmax: torch.Tensor,
                      keys: torch.Tensor, *, stochastic: bool) -> None:
    """In place on q int8 (r, c) and scales fp32 (r, nb): requantize(q * s + delta) (_sr_blocks_values)."""
    codes, scale = _sr_blocks_values(q, scales, delta, qmax, keys, None, stochastic=stochastic)
    q.view(codes.shape).copy_(codes)
    scales.copy_(scale)


def _sr_blocks_kept_kernel(q: torch.Tensor, scales: torch.Tensor, delta: torch.Tensor, qmax: torch.Tensor,
                           keys: torch.Tensor, keep: torch.Tensor, *, stochastic: bool) -> None:
    """_sr_blocks_kernel, except that where keep (bool (1,)) holds q and scales keep their bytes: the device-side
    skip of a non-finite step, chosen in the same pass (the old bytes are loaded for the update anyway)."""
    codes, scale = _sr_blocks_values(q, scales, delta, qmax, keys, keep, stochastic=stochastic)
    q.view(codes.shape).copy_(codes)
    scales.copy_(scale)


# ---- entry points used by quant.int8 / quant.noise ----

def segment_keys(key: int, counter_start: int, numel: int, mix64: Callable[[int], int]) -> tuple[list[int], int]:
    """([k1, k2, k1', k2'], hi0) for counters [counter_start, counter_start + numel), numel <= 2**32: the keys of
    the segment holding counter_start and of the next one (quant.noise's per-segment key)."""
    hi0 = counter_start >> 32
    words = []
    for hi in (hi0, hi0 + 1):
        segment_key = mix64(key ^ (hi * 0xD1B54A32D192ED03 & 0xFFFFFFFFFFFFFFFF))
        words += [segment_key & _MASK32, segment_key >> 32]
    return words, hi0


def _int32(word: int) -> int:
    """A 32-bit word as the int32 with the same bits."""
    word &= _MASK32
    return word - (1 << 32) if word >= 1 << 31 else word


def device_constants(values: list, *, dtype: torch.dtype, device) -> torch.Tensor:
    """A 1-D tensor of a few Python numbers on `device` without a host synchronisation: on CUDA through pinned memory
    and a non-blocking copy (a plain torch.tensor(..., device="cuda") copies from pageable memory and waits for the
    stream: one wait per call, inside the backward for the kernels' keys and scalars); elsewhere directly. The
    caching host allocator keeps the pinned block until the copy has run."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


@functools.lru_cache(maxsize=32)
def cached_constants(values: tuple, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """device_constants(values) made once and shared (read only, never write into it): for constants every weight
    of a step passes to a kernel (127; one step's Adam scalars), one host-to-device copy instead of one per weight.
    Made outside inference mode: an inference tensor could not be used by a later training step."""
    with torch.inference_mode(False):
        return device_constants(list(values), dtype=dtype, device=device)


def _key_words(key: int, counter_start: int, numel: int, mix64: Callable[[int], int], device, *,
               row_stride: int = 0, col0: int = 0) -> torch.Tensor:
    """int32 (8,) [base_lo, k1, k2, k1', k2', split, row_stride, col0] for a call whose local counters lie in
    [0, numel), numel < 2**31: base_lo = the low word of counter_start; local counters >= split are in the next
    2**32 segment; row_stride and col0 place a kernel's (i, j) at local counter i * row_stride + col0 + j. One 1-D
    tensor, not 0-dim ones: dynamo, when it traces a new graph, turns a 0-dim integer CPU argument into a symbol by
    reading its value (a host read on every first compile); entries of a 1-D tensor stay tensor data in the graph."""
    if not 0 <= numel < 1 << 31:
        raise ValueError(f"a compiled kernel call covers fewer than 2**31 counters, got {numel}")
    words, _ = segment_keys(key, counter_start, numel, mix64)
    base_lo = counter_start & _MASK32
    split = min((1 << 32) - base_lo, (1 << 31) - 1)
    return device_constants([_int32(base_lo), *(_int32(w) for w in words), split, row_stride, col0],
                            dtype=torch.int32, device=device)


def key_words(key: int, counter_start: int, numel: int, mix64: Callable[[int], int], device) -> torch.Tensor:
    """The int32 (8,) key words of a traced noise call covering counters [counter_start, counter_start + numel),
    numel < 2**31 (see `uniform_traceable`); built on the host, sent without a synchronisation."""
    return _key_words(key, counter_start, numel, mix64, device)


def uniform_traceable(count: int, keys: torch.Tensor) -> torch.Tensor:
    """fp32 (count,) counter noise at the local counters 0 .. count-1 of the call keyed by `keys` (key_words): the
    uniform kernel's plain ops, for tracing into a caller's kernel (the same bits as quant.noise.counter_uniform)."""
    return _uniform_at(torch.arange(count, dtype=torch.int32, device=keys.device), keys)


def uniform_(out: torch.Tensor, *, key: int, offset: int, mix64: Callable[[int], int], eager: Callable) -> None:
    """out fp32 (numel,) <- counter noise at counters offset .. offset + numel - 1 (numel < 2**31)."""
    if _eager_needed():
        eager(out)
        return
    call("uniform", _uniform_kernel, _run_plain(_uniform_kernel), out,
         _key_words(key, offset, out.numel(), mix64, out.device))


def _eager_needed() -> bool:
    """Whether an entry point should run its eager reference twin for the whole call: compilation off or given up,
    or a TorchDispatchMode active (lowmem.memory's live-bytes meter counts the twin's few chunk buffers; dynamo does
    not trace under such modes). Inside the caller's own torch.compile the kernels are traced inline instead."""
    if torch.compiler.is_compiling():
        return not (_configured and not env_disabled())
    return not enabled() or _get_current_dispatch_mode() is not None


def use_kernels() -> bool:
    """Whether a caller with its own compiled kernel (built on `call`) should use it now: the opposite of
    `_eager_needed` (compilation off or failed, or a TorchDispatchMode such as the live-bytes meter active)."""
    return not _eager_needed()


def _run_plain(fn: Callable) -> Callable:
    """The kernel's own ops run eagerly: the fallback of one kernel call that could not be compiled (a recompile
    limit, a compiler failure mid-run). Same ops, same bits as the compiled kernel, only slower."""
    def run(*args, **static):
        with torch.no_grad():
            return fn(*args, **static)
    return run


def _dense_copy(x: torch.Tensor) -> torch.Tensor:
    """A fresh row-major copy (storage offset 0, stride (cols, 1)); .contiguous() would return a one-row slice
    as it is, with the parent's row stride and offset, which the compiler guards on."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device).copy_(x)


def sr_chunk_(q: torch.Tensor, scales: torch.Tensor, delta: torch.Tensor, *, key: int, counter_start: int,
              block_size: int, stochastic: bool, mix64: Callable[[int], int], eager: Callable,
              keep: torch.Tensor | None = None) -> None:
    """One row chunk of sr_update_int8_ in place (q int8 (r, n) and scales fp32 (r, nb) contiguous, delta float
    (r, n), r * n < 2**31); counter_start = global row index of q[0] * n. eager(q, scales, delta) is the reference
    path. keep: None, or a 0-dim bool tensor on q's device: where True, q and scales keep their bytes.

    Rows that are a whole number of blocks go to the kernel as they are. Otherwise (a short last block, e.g. width
    576 = 2 * 256 + 64) the whole blocks and the short ones are copied into two contiguous pieces, updated, and
    copied back: the int8 codes and scales cost little to copy, the delta one pass. Block views of the unpadded
    rows would instead give the compiler stride relations and storage offsets to guard on (a new graph for each
    combination), and a padded form compiled to a kernel ~5x slower than the aligned one."""
    if _eager_needed() or q.numel() == 0:  # inductor asserts on some empty layouts; an empty chunk is a no-op anyway
        eager(q, scales, delta)
        return
    rows, n = q.shape
    device = q.device
    qmax = cached_constants((float(_QMAX),), dtype=torch.float32, device=device)[0]
    # keep as a 1-D tensor: a 0-dim bool argument would be read on the host when dynamo traces a new graph
    kept = () if keep is None else (keep.reshape(1),)
    name, kernel = ("sr_blocks", _sr_blocks_kernel) if keep is None else ("sr_blocks_kept", _sr_blocks_kept_kernel)
    n_full = n // block_size
    full = n_full * block_size
    if full == n:
        call(name, kernel, _run_plain(kernel), q, scales, delta.contiguous(), qmax,
             _key_words(key, counter_start, rows * n, mix64, device, row_stride=n), *kept, stochastic=stochastic)
        return
    for c0, c1, b0, b1 in ((0, full, 0, n_full), (full, n, n_full, n_full + 1)):
        if c1 == c0:
            continue
        q_part, s_part, d_part = _dense_copy(q[:, c0:c1]), _dense_copy(scales[:, b0:b1]), _dense_copy(delta[:, c0:c1])
        part_keys = _key_words(key, counter_start, rows * n, mix64, device, row_stride=n, col0=c0)
        if c1 - c0 == 1:
            # a one-column block: the kernel's ops run eagerly (same bits), as inductor 2.11 fails to generate code
            # for the kept form at block length 1 (IndexError), which would turn compilation off for the process
            _run_plain(kernel)(q_part, s_part, d_part, qmax, part_keys, *kept, stochastic=stochastic)
        else:
            call(name, kernel, _run_plain(kernel), q_part, s_part, d_part, qmax, part_keys, *kept,
                 stochastic=stochastic)
        q[:, c0:c1].copy_(q_part)
        scales[:, b0:b1].copy_(s_part)


def sr_write_inputs(shape: tuple[int, int], *, key: int, mix64: Callable[[int], int], device
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(qmax fp32 0-dim, int32 key words) for writing a whole (m, n) matrix, m * n < 2**31, inside a caller's kernel
    with sr_write_traceable_: element (i, j) draws the noise of counter i * n + j (sr_update_int8_'s)."""
    m, n = shape
    qmax = cached_constants((float(_QMAX),), dtype=torch.float32, device=torch.device(device))[0]
    return qmax, _key_words(key, 0, m * n, mix64, device, row_stride=n)


def sr_write_traceable_(q: torch.Tensor, scales: torch.Tensor, delta: torch.Tensor, qmax: torch.Tensor,
                        keys: torch.Tensor, keep: torch.Tensor | None, *, stochastic: bool) -> None:
    """The SR kernel's plain ops for a caller's kernel: q int8 (m, n) and scales fp32 (m, nb), contiguous, n a
    multiple of the block size, <- requantize(q * s + delta) in place (kept where keep (1,) holds). The same bits as
    sr_update_int8_ with the (qmax, keys) of sr_write_inputs."""
    codes, scale = _sr_blocks_values(q, scales, delta, qmax, keys, keep, stochastic=stochastic)
    q.view(codes.shape).copy_(codes)
    scales.copy_(scale)


def dequantize(q: torch.Tensor, scales: torch.Tensor, *, block_size: int, dtype: torch.dtype,
               eager: Callable) -> torch.Tensor:
    """q int8 (r, n) * scales (r, nb) -> (r, n) of dtype, formed in fp32 (quant.int8.dequantize_int8). Rows with a
    short last block run the eager twin (two multiplications into views of the output; a padded compiled form was
    ~4x slower than it), except inside the caller's own torch.compile, which traces the padded form."""
    tail = q.shape[1] % block_size != 0
    if _eager_needed() or q.numel() == 0 or (tail and not torch.compiler.is_compiling()):
        return eager(q, scales, block_size, dtype)
    return call("dequantize", _dequantize_kernel, _run_plain(_dequantize_kernel), q, scales,
                block_size=block_size, dtype=dtype, tail=tail)


# ---- the 8-bit moment codec's encoder (quant.moments8's pure-torch twin) ----
# Decoding stays eager on CPU: a table gather plus a multiply, which the chunked index_select does faster than
# inductor's scalar gather loop (measured 0.20 vs 0.40 ms for 176k values, one thread).

def moment8_encode_ops(x: torch.Tensor, midpoints: torch.Tensor, buckets: torch.Tensor, *, block_size: int,
                      tail: bool, bucket_shift: int, buckets_half: int):
    """x float (numel,) -> (uint8 codes (numel,), fp32 absmax (nb,)): quant.moments8._quantize_twin in one pass.
    tail: numel is not a multiple of block_size (the last block is padded with zeros, absmax-neutral). Plain
    traceable ops: compiled on its own by moment8_encode, or traced into a caller's kernel (lowmem's fused 8-bit
    AdamW)."""
    numel = x.shape[0]
    padded = (numel + block_size - 1) // block_size * block_size
    flat = F.pad(x.to(torch.float32), (0, padded - numel)) if tail else x.to(torch.float32)
    blocks = flat.view(-1, block_size)
    absmax = torch.amax(blocks.abs(), dim=1)
    inv = torch.where(absmax == 0, 0.0, torch.reciprocal(absmax))  # all-zero block: v = 0, not 0 * inf
    v = blocks * inv[:, None]
    bits = v.view(torch.int32)
    bucket = ((bits ^ ((bits >> 31) & 0x7FFFFFFF)) >> bucket_shift) + buckets_half
    below = buckets[bucket.to(torch.int64)]
    mid = midpoints[below.to(torch.int64)]
    codes = below + (v > mid).to(torch.int32) + ((v == mid) & ((below & 1) == 1)).to(torch.int32)
    codes = torch.where(absmax[:, None] == 0, 0, codes).to(torch.uint8).view(-1)
    return (codes[:numel] if tail else codes), absmax


def moment8_encode(x: torch.Tensor, midpoints: torch.Tensor, buckets: torch.Tensor, *, block_size: int,
                   bucket_shift: int, buckets_half: int, eager: Callable):
    """quant.moments8's twin encode of flat x (numel,) as one compiled kernel; eager(x) is the reference path."""
    if _eager_needed() or x.numel() == 0:
        return eager(x)
    return call("moment8_encode", moment8_encode_ops, _run_plain(moment8_encode_ops), x, midpoints,
                buckets, block_size=block_size, tail=x.shape[0] % block_size != 0, bucket_shift=bucket_shift,
                buckets_half=buckets_half)


def moment8_decode_ops(codes: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, *, block_size: int,
                       tail: bool) -> torch.Tensor:
    """uint8 codes (numel,) -> fp32 table[code] * absmax[block] (numel,): quant.moments8's decode as plain ops, for
    tracing into a caller's kernel (on its own the eager chunks are faster on CPU, see above)."""
    numel = codes.shape[0]
    num_blocks = absmax.shape[0]
    padded = num_blocks * block_size
    flat = F.pad(codes, (0, padded - numel)) if tail else codes
    values = (table[flat.to(torch.int64)].view(num_blocks, block_size) * absmax[:, None]).view(-1)
    return values[:numel] if tail else values
