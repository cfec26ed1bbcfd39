"""8-bit Adam second moments on gradients of high dynamic range: which encoding keeps the update near fp32.

`python -m benchmarks.moments8_range` runs Adam (β = 0.9, 0.999, ε = 1e-8) with fp32 moments -- the plain formula,
no lowmem code -- and with the moments round-tripped through quant.moments8 after every step, for four encodings
of the second moment v:
  plain          v on the unsigned dynamic map (what lowmem stored before: v/absmax < 1.6e-7 rounds to 0)
  plain+bound    the same, with |N| clamped to Adam's exact bound (lowmem.optim.moments.adam_direction_bound)
  squared        v on the squared unsigned map (sqrt(v) on the unsigned map: the gradient's dynamic range)
  squared+bound  both (what lowmem stores now)
The first moment is always on the signed map. Cases (each a sequence of gradients of shape (rows, 256), one 256-block
per row):
  audit          [1, 1e-4, ...] at step 1, then 0 for the small entries (the float AdamW report)
  spectrum-4096  projected gradient R = noise * sigma_j, sigma_1/sigma_256 = 4096 (a GaLore R of an ill-conditioned G)
  spectrum-1e6   the same with sigma_1/sigma_256 = 1e6
  rare-rows      embedding-like: entries of each block span 1e-6..1, and a row is hit on 10% of the steps
  alternating    one entry of each block flips sign every step (m ~ 0, v ~ 1) beside entries of 1e-7 (the case
                 that underflows even the squared map: only the bound helps there)
Reported per case and encoding: max |N| over all steps (fp32 gives Adam's own), and the worst relative error of
the update over steps, ||N_q - N_32|| / ||N_32||.
"""
from __future__ import annotations

import argparse
import math

import torch

from benchmarks.machine import machine_line
from lowmem.optim.moments import adam_direction_bound
from quant.moments8 import dequantize_moment8, quantize_moment8

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8
ENCODINGS = ("plain", "plain+bound", "squared", "squared+bound")


def _cases(steps: int, gen: torch.Generator) -> dict[str, list[torch.Tensor]]:
    small = torch.full((1, 256), 1e-4)
    small[0, 0] = 1.0
    after = torch.zeros(1, 256)
    after[0, 0] = 1.0
    audit = [small] + [after] * (steps - 1)

    def spectrum(ratio):
        sigma = torch.logspace(0.0, -math.log10(ratio), 256)
        return [torch.randn(128, 256, generator=gen) * sigma for _ in range(steps)]

    scale = torch.logspace(0.0, -6.0, 256)[torch.randperm(256, generator=gen)]
    rare = []
    for _ in range(steps):
        hit = (torch.rand(128, 1, generator=gen) < 0.1).float()
        rare.append(torch.randn(128, 256, generator=gen) * scale * hit)
    alternating = []
    for t in range(steps):
        g = torch.full((16, 256), 1e-7)
        g[:, 0] = (-1.0) ** t
        alternating.append(g)
    return {"audit": audit, "spectrum-4096": spectrum(4096.0), "spectrum-1e6": spectrum(1e6),
            "rare-rows": rare, "alternating": alternating}


def _roundtrip(x: torch.Tensor, *, signed: bool, squared: bool) -> torch.Tensor:
    codes, absmax = quantize_moment8(x, signed=signed, squared=squared)
    return dequantize_moment8(codes, absmax, signed=signed, squared=squared)


def run_case(grads: list[torch.Tensor], encoding: str | None) -> list[torch.Tensor]:
    """Adam directions N_t for the gradient sequence; encoding None = fp32 moments."""
    m = torch.zeros_like(grads[0])
    v = torch.zeros_like(grads[0])
    out = []
    for t, g in enumerate(grads, start=1):
        m = BETA1 * m + (1 - BETA1) * g
        v = BETA2 * v + (1 - BETA2) * g * g
        if encoding is not None:
            m = _roundtrip(m, signed=True, squared=False)
            v = _roundtrip(v, signed=False, squared=encoding.startswith("squared"))
        n = (m / (1 - BETA1 ** t)) / ((v / (1 - BETA2 ** t)).sqrt() + EPS)
        if encoding is not None and encoding.endswith("+bound"):
            bound = adam_direction_bound(t, BETA1, BETA2)
            n = n.clamp(-bound, bound)
        out.append(n)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"# {machine_line()}; {args.steps} steps, seed {args.seed}")
    print(f"{'case':<14} {'encoding':<14} {'max|N|':>10} {'fp32 max|N|':>12} {'worst rel err':>14}")
    for name, grads in _cases(args.steps, gen).items():
        ref = run_case(grads, None)
        ref_max = max(float(n.abs().max()) for n in ref)
        for encoding in ENCODINGS:
            got = run_case(grads, encoding)
            worst = max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(got, ref))
            print(f"{name:<14} {encoding:<14} {max(float(n.abs().max()) for n in got):>10.3g} {ref_max:>12.3g} "
                  f"{worst:>14.3g}")


if __name__ == "__main__":
    main()
