"""Projector cost and quality: full SVD (GaLore) vs randomized subspace iteration vs cross-head, dense and factored.

    python -m benchmarks.projection                  # scaled-down shapes, ~1 min on 2 CPU cores
    python -m benchmarks.projection --full           # LLaMA-7B shapes (several minutes on CPU)
    python -m benchmarks.projection --full --out benchmarks/results/projection-cpu.md

Synthetic gradients G = Aᵀ X (A (T, m) output gradient, X (T, n) layer input) from random factors whose scales
decay as power laws over tokens and feature directions, so the spectrum of G decays like a real gradient's and the
heads of q/k share an input side (the premise of cross-head projection). For each shape and rank the table gives the
projector time, its ratio to the full SVD timed in the same run, and the captured energy ||G P||² over the exact
top-r energy Σ s_i² (1.0 = as good as the SVD). "form G" is the cost the factored path avoids: the dense methods
start from a formed G, the factored one only from (A, X).
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import dataclass

import torch

from lowmem.optim.linop import DenseGrad, FactoredGrad
from lowmem.optim.projector import CrossHead, compute_projector, project, projection_side


@dataclass(frozen=True)
class Shape:
    name: str
    m: int
    n: int
    num_heads: int | None  # heads along the rows (q/k); None for MLP
    head_dim: int | None


FULL_SHAPES = [Shape("q/k 4096x4096 (32x128)", 4096, 4096, 32, 128), Shape("mlp 11008x4096", 11008, 4096, None, None)]
SMALL_SHAPES = [Shape("q/k 2048x2048 (16x128)", 2048, 2048, 16, 128), Shape("mlp 5504x2048", 5504, 2048, None, None)]
RANKS = (32, 128, 256)


def machine_line(device: torch.device) -> str:
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = platform.processor() or "cpu"
        try:
            with open("/proc/cpuinfo") as f:
                what = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return f"{what}; torch {torch.__version__}; {torch.get_num_threads()} threads; device {device}"


def synthetic_factors(shape: Shape, tokens: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A (T, m), X (T, n) fp32 with power-law scales over tokens and feature directions."""
    g = torch.Generator().manual_seed(seed)
    token_scale = torch.arange(1, tokens + 1, dtype=torch.float32) ** -0.5
    token_scale = token_scale[torch.randperm(tokens, generator=g)]
    out_scale = torch.arange(1, shape.m + 1, dtype=torch.float32) ** -0.3
    in_scale = torch.arange(1, shape.n + 1, dtype=torch.float32) ** -0.7
    A = torch.randn(tokens, shape.m, generator=g)
    A = A * out_scale[torch.randperm(shape.m, generator=g)] * token_scale[:, None]
    X = torch.randn(tokens, shape.n, generator=g) * in_scale[torch.randperm(shape.n, generator=g)]
    return A.to(device), X.to(device)


def timed(fn, repeats: int, device: torch.device, warmup: bool = True):
    """(fastest seconds, last result) over `repeats` calls, after one untimed call unless warmup=False. The minimum,
    not the median: on a shared machine interference only ever adds time (seen here: 0.3 s calls taking 2-3 s)."""
    times, result = [], None
    if warmup:
        fn()
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times), result


def run(shapes, ranks, tokens: int, repeats: int, svd_repeats: int, device: torch.device, power_iters: int,
        oversampling: int):
    rows = []
    for k, shape in enumerate(shapes):
        A, X = synthetic_factors(shape, tokens, seed=k, device=device)
        form_s, G = timed(lambda: A.T @ X, repeats, device)
        side = projection_side((shape.m, shape.n))
        svd_s, (U, S, Vh) = timed(lambda: torch.linalg.svd(G, full_matrices=False), svd_repeats, device,
                                  warmup=False)
        dense, factored = DenseGrad(G), FactoredGrad(A, X)
        for rank in ranks:
            exact_energy = float(S[:rank].double().pow(2).sum())
            exact_basis = Vh[:rank].T if side == "right" else U[:, :rank]

            def energy(P, P_side=side):
                return float(project(dense, P, P_side).double().pow(2).sum()) / exact_energy

            rows.append((shape.name, rank, "form G = Aᵀ X", form_s, svd_s, None))
            rows.append((shape.name, rank, "full SVD (GaLore)", svd_s, svd_s, energy(exact_basis)))
            kwargs = dict(power_iters=power_iters, oversampling=oversampling)
            methods = [("randomized", dense, None), ("randomized, factored", factored, None)]
            if shape.num_heads is not None:
                ch = CrossHead(head_dim=shape.head_dim, num_heads=shape.num_heads)
                methods += [("cross-head randomized", dense, ch), ("cross-head randomized, factored", factored, ch)]
            for label, op, ch in methods:
                method_side = "right" if ch is not None else side

                def call(op=op, ch=ch, method_side=method_side):
                    return compute_projector(op, rank, side=method_side, generator=torch.Generator().manual_seed(rank),
                                             cross_head=ch, **kwargs)

                seconds, res = timed(call, repeats, device)
                tag = label + (" [fell back]" if res.fell_back else "")
                rows.append((shape.name, rank, tag, seconds, svd_s, energy(res.basis, method_side)))
        del A, X, G, U, S, Vh, dense, factored
    return rows


def _load() -> str:
    """1-minute load average as text ('n/a' where the platform has none)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def markdown(rows, header: str) -> str:
    lines = [header, "", "| shape | rank | method | time (s) | time / full SVD | energy / exact top-r |",
             "|---|---:|---|---:|---:|---:|"]
    for name, rank, label, seconds, svd_s, energy in rows:
        e = "—" if energy is None else f"{energy:.4f}"
        lines.append(f"| {name} | {rank} | {label} | {seconds:.3f} | {seconds / svd_s:.4f} | {e} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="LLaMA-7B shapes (4096x4096 q/k, 11008x4096 MLP), T=2048")
    parser.add_argument("--tokens", type=int, default=None, help="T tokens in (A, X); default 2048 full, 1024 small")
    parser.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per method after one warm-up (min)")
    parser.add_argument("--svd-repeats", type=int, default=1, help="timed full SVDs per shape, no warm-up (min)")
    parser.add_argument("--power-iters", type=int, default=2)
    parser.add_argument("--oversampling", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    shapes = FULL_SHAPES if args.full else SMALL_SHAPES
    tokens = args.tokens or (2048 if args.full else 1024)
    which = "LLaMA-7B" if args.full else "scaled-down"
    header = (f"# Projector refresh: full SVD vs randomized vs cross-head ({which} shapes)\n\n"
              f"Machine: {machine_line(device)}  \nT = {tokens} tokens, oversampling {args.oversampling}, power "
              f"iterations {args.power_iters}; timing: fastest of {args.repeats} after a warm-up (full SVD: fastest "
              f"of {args.svd_repeats}). Ratios are against the full SVD of the same gradient in the same run.")
    print(header.splitlines()[2], flush=True)
    torch.linalg.svd(torch.randn(64, 64, device=device))  # initialise the LAPACK/cuSOLVER backends untimed
    start, start_load = time.perf_counter(), _load()
    rows = run(shapes, args.ranks, tokens, args.repeats, args.svd_repeats, device, args.power_iters,
               args.oversampling)
    table = markdown(rows, header)
    # Other work on the machine inflates timings (not the energies); the load average says how much there was.
    footer = (f"Total {time.perf_counter() - start:.1f} s; load average (1 min) {start_load} at start, {_load()} at "
              f"end, on {os.cpu_count()} CPUs.")
    print(table + "\n\n" + footer)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n\n" + footer + "\n")


if __name__ == "__main__":
    main()
