"""INT8 x INT8 matmuls (`int8_matmul: true`) against the default dequantising Int8Linear: speed and loss, one run.

    python -m benchmarks.int8_matmul [--device cpu|cuda] [--steps 40] [--hidden 256 --layers 4]

1. Speed: forward + grad_input of one Int8Linear of each LLaMA-7B-like aspect (square and MLP) at `--tokens`,
   median of repeats, default path vs int8_matmul, ratio (< 1: int8 faster), measured side by side.
2. Loss: the same tiny LLaMA trained from the same initialisation on the same batches (a learnable next-token
   pattern) for `--steps` steps with lowmem's runtime, default vs int8_matmul: mean loss of the first and last 5
   steps of each, and the ratio of the final losses.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.machine import machine_line
from hooks.runtime import prepare
from lowmem.model.int8_linear import Int8Linear
from lowmem.presets import preset


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def layer_speed(device, tokens: int, shapes, repeats: int) -> list[dict]:
    rows = []
    for n, m in shapes:
        torch.manual_seed(0)
        layer = Int8Linear(n, m, bias=False, device=device)
        x = torch.randn(tokens, n, device=device, requires_grad=True)
        g = torch.randn(tokens, m, device=device)
        result = {"shape": f"{m} x {n}"}
        for mode in (False, True):
            layer.int8_matmul = mode
            times = []
            for i in range(repeats + 1):
                _sync(device)
                start = time.perf_counter()
                layer(x).backward(g)
                _sync(device)
                if i:
                    times.append(time.perf_counter() - start)
                x.grad = None
            result["int8" if mode else "default"] = statistics.median(times)
        rows.append(result)
    return rows


def train(device, hidden: int, layers: int, steps: int, int8_matmul: bool) -> list[float]:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 64), max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).to(device)
    runtime = prepare(model, preset("lowmem", lr=3e-3, rank=min(64, hidden // 2), int8_matmul=int8_matmul,
                                    warmup_steps=5, total_steps=steps))
    gen = torch.Generator().manual_seed(5)
    losses = []
    for _ in range(steps):
        start = torch.randint(0, 256, (8, 1), generator=gen)
        ids = ((start + torch.arange(64) * 3) % 256).to(device)   # next token = token + 3: learnable
        with runtime.micro_batch():
            runtime.backward(model(input_ids=ids, labels=ids).loss)
        losses.append(runtime.step()["loss"])
    return losses


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args(argv)
    print(f"machine: {machine_line(args.device)}")
    print(f"\n1. forward + grad_input of one Int8Linear, {args.tokens} tokens (median of {args.repeats})\n")
    print("| weight (out x in) | default s | int8_matmul s | ratio int8 / default |")
    print("| --- | --- | --- | --- |")
    for r in layer_speed(args.device, args.tokens, [(2048, 2048), (2048, 5504), (5504, 2048)], args.repeats):
        print(f"| {r['shape']} | {r['default']:.4f} | {r['int8']:.4f} | {r['int8'] / r['default']:.2f} |")
    print(f"\n2. training: tiny LLaMA hidden {args.hidden}, {args.layers} layers, {args.steps} steps, same init and "
          "batches\n")
    base = train(args.device, args.hidden, args.layers, args.steps, False)
    int8 = train(args.device, args.hidden, args.layers, args.steps, True)
    print("| path | mean loss, first 5 steps | mean loss, last 5 steps |")
    print("| --- | --- | --- |")
    for name, losses in (("default", base), ("int8_matmul", int8)):
        print(f"| {name} | {statistics.mean(losses[:5]):.4f} | {statistics.mean(losses[-5:]):.4f} |")
    print(f"\nfinal-loss ratio int8_matmul / default: {statistics.mean(int8[-5:]) / statistics.mean(base[-5:]):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
