"""Throughput of the quant/ kernels against x.clone() of the same fp32 matrix, measured in one run.

    python -m benchmarks.quant_kernels [--device cpu|cuda] [--rows M --cols N] [--repeats R] [--threads T]

Default: a 4096 x 4096 fp32 matrix on CPU (a few minutes on 2 cores). Each kernel runs once to warm up (for the
compiled kernels that includes compiling them, or loading them from the inductor cache), then R times; the table gives
the median time, the input elements per second, and the ratio of the kernel's time to the clone's (the clone reads
and writes 4 bytes per element: a memory-bandwidth yardstick on this machine). A clone allocates its result, and on
CPU a fresh 64 MiB tensor is new pages from the kernel (glibc maps blocks above 32 MiB afresh on every call): their
page faults are most of the clone's time, and every kernel that allocates its output pays them too. The rows "into a
reused buffer" (the copy, the noise with `out=`) show the same work without them. The hot kernels (SR update,
dequantisation, noise) are timed twice, compiled (quant.compiled, the default) and eager (the reference twin), side by
side; `--eager-only` skips the compiled rows. So are the two optimizer steps built on them: the 8-bit float AdamW step
(lowmem.optim.float_adamw) on an fp32 and on a bf16 param (stochastic rounding), with the runtime's device-side skip
flag, and the low-rank 8-bit Adam step (lowmem.optim.moments) on an (M, 128) projected gradient, with the global
bias correction and with per-coordinate bias masses (the state after a projector refresh that resets the moments).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.machine import machine_line
from lowmem.optim.float_adamw import float_adamw_update_, init_float_adamw_state
from lowmem.optim.moments import adam_direction_, init_moments, transfer_moments_
from quant import compiled
from quant import (counter_uniform, dequantize_int8, dequantize_moment8, pack_int4, quantize_int8,
                   quantize_moment8, sr_update_int8_, unpack_int4)


def machine(device: torch.device) -> str:
    lines = [machine_line(device)]
    if device.type == "cuda":
        try:
            import bitsandbytes
            lines.append(f"bitsandbytes {bitsandbytes.__version__} (moments8 on CUDA uses its kernels)")
        except ImportError:
            lines.append("bitsandbytes not installed (moments8 uses the torch twin)")
    return "\n".join(lines)


def time_op(fn, setup, device: torch.device, repeats: int) -> float:
    """Median seconds of fn(*setup()) over `repeats` runs after one warm-up; setup is not timed."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    for i in range(repeats + 1):
        args = setup()
        sync()
        start = time.perf_counter()
        fn(*args)
        sync()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice); 1 is steadier on a shared machine")
    parser.add_argument("--eager-only", action="store_true", help="time only the eager twins")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device on this machine")

    print(machine(device))
    m, n = args.rows, args.cols
    numel = m * n
    print(f"matrix: {m} x {n} fp32 ({numel * 4 / 2**20:.0f} MiB), median of {args.repeats} runs after a warm-up\n")

    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, n, generator=g).to(device)
    delta = (torch.randn(m, n, generator=g) * 1e-3).to(device)
    q, scales = quantize_int8(x)
    packed, group_scales = pack_int4(x)
    codes, absmax = quantize_moment8(x, signed=True)
    key = dict(seed=0, stream=0, step=1)
    keep_flag = torch.tensor(False, device=device)

    def fresh_weights():
        return q.clone(), scales.clone()

    adamw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, keep_old=keep_flag)
    params = {dtype: x.to(dtype) for dtype in (torch.float32, torch.bfloat16)}
    states = {dtype: init_float_adamw_state(params[dtype], bits=8) for dtype in params}
    lowrank_grad = delta[:, :128].contiguous()
    lowrank_state = init_moments(tuple(lowrank_grad.shape), bits=8)
    lowrank_steps = [0]

    def lowrank_step():
        lowrank_steps[0] += 1
        adam_direction_(lowrank_state, lowrank_grad, step=lowrank_steps[0], beta1=0.9, beta2=0.999, eps=1e-8, bits=8)

    # the same step on a state with per-coordinate bias masses: every step after a projector refresh under the
    # default moment_transfer "reset" (or "rotate")
    masses_state = init_moments(tuple(lowrank_grad.shape), bits=8)
    basis = torch.eye(128, device=device)
    transfer_moments_(masses_state, basis, basis, side="right", mode="reset", bits=8, steps_done=0,
                      betas=(0.9, 0.999))
    masses_steps = [0]

    def masses_step():
        masses_steps[0] += 1
        adam_direction_(masses_state, lowrank_grad, step=masses_steps[0], beta1=0.9, beta2=0.999, eps=1e-8, bits=8,
                        coord_dim=1)

    noise_buffer = torch.empty(numel, device=device)
    hot = [
        ("counter_uniform (same numel)", lambda: counter_uniform(numel, **key, device=device), lambda: ()),
        ("counter_uniform into a reused buffer (out=)", lambda: counter_uniform(numel, **key, out=noise_buffer),
         lambda: ()),
        ("dequantize_int8", lambda a, b: dequantize_int8(a, b), lambda: (q, scales)),
        ("sr_update_int8_ (tensor delta)", lambda a, b: sr_update_int8_(a, b, delta, **key), fresh_weights),
        # the runtime's call: a device-side skip flag (False: written), decided inside the same pass
        ("sr_update_int8_ (keep flag)", lambda a, b: sr_update_int8_(a, b, delta, keep=keep_flag, **key),
         fresh_weights),
        ("quantize_int8 stochastic", lambda t: quantize_int8(t, stochastic=True, **key), lambda: (x,)),
        ("8-bit AdamW step, fp32 param", lambda: float_adamw_update_(
            params[torch.float32], delta, states[torch.float32], **adamw), lambda: ()),
        ("8-bit AdamW step, bf16 param (SR)", lambda: float_adamw_update_(
            params[torch.bfloat16], delta, states[torch.bfloat16], sr_key=(0, 1), **adamw), lambda: ()),
        (f"low-rank 8-bit Adam step ({m} x 128)", lowrank_step, lambda: ()),
        (f"low-rank 8-bit Adam step, bias masses ({m} x 128)", masses_step, lambda: ()),
    ]
    other = [
        ("quantize_int8 nearest", lambda t: quantize_int8(t), lambda: (x,)),
        ("pack_int4", lambda t: pack_int4(t), lambda: (x,)),
        ("unpack_int4", lambda a, b: unpack_int4(a, b, (m, n)), lambda: (packed, group_scales)),
        ("quantize_moment8 signed", lambda t: quantize_moment8(t, signed=True), lambda: (x,)),
        ("dequantize_moment8 signed", lambda a, b: dequantize_moment8(a, b, signed=True), lambda: (codes, absmax)),
    ]
    results = [("x.clone() (baseline)", time_op(lambda t: t.clone(), lambda: (x,), device, args.repeats))]
    # the same traffic into a buffer that already exists: what a fresh allocation's page faults add to the clone
    copy_target = torch.empty_like(x)
    results.append(("copy_ into a reused buffer", time_op(lambda t: copy_target.copy_(t), lambda: (x,), device,
                                                          args.repeats)))
    modes = [False] if args.eager_only else [True, False]
    for name, fn, setup in hot:
        for use_compiled in modes:
            compiled.set_enabled(use_compiled)
            label = f"{name} [{'compiled' if use_compiled else 'eager'}]"
            results.append((label, time_op(fn, setup, device, args.repeats)))
    compiled.set_enabled(True)
    if compiled.failure():
        print(f"compilation unavailable ({compiled.failure()}): the 'compiled' rows ran eagerly")
    for name, fn, setup in other:
        results.append((name, time_op(fn, setup, device, args.repeats)))
    # the clone again at the end: how much the machine's speed drifted during the run
    results.append(("x.clone() (again, at the end)", time_op(lambda t: t.clone(), lambda: (x,), device, args.repeats)))
    baseline = results[0][1]
    print(f"{'kernel':<58}{'ms':>10}{'Melem/s':>12}{'x clone':>10}")
    for name, seconds in results:
        print(f"{name:<58}{seconds * 1e3:>10.1f}{numel / seconds / 1e6:>12.0f}{seconds / baseline:>10.2f}")
    print(f"\ncompile time of the hot kernels in this process: {compiled.compile_seconds():.1f} s")


if __name__ == "__main__":
    main()
