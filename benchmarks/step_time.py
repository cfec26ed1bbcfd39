"""Time of one training step (forward + backward + update) of a LLaMA-shaped model, lowmem vs AdamW, in one run.

    python -m benchmarks.step_time                      # CPU default: hidden 512, 4 layers, seq 256, batch 2
    python -m benchmarks.step_time --device cuda --hidden 2048 --layers 8 --seq-len 1024

Every method trains the same randomly initialised model on the same tokens. Reported per method: median steady step
time (no projector refresh), the time of step 0 (every weight refreshes its projector at once: the worst case the
stagger exists to avoid), the ratio of the steady step to fp32 AdamW's, and the peak memory of a step (live tensor
bytes including the model and optimizer state on CPU; the CUDA allocator peak on GPU). Methods that cannot run on the
device (bitsandbytes 8-bit AdamW needs CUDA) are listed as skipped with the reason.

`--call-overhead` adds, for the lowmem presets, where the compiled kernels' host time goes over two more steps: per
kernel the calls per step, the host CPU time inside the compiled graph, and the time each call spends outside it
(dynamo's guards, the AOT wrapper, quant.compiled's dispatch). Thread CPU time, measured apart from the timed steps
(the instrumentation costs a little itself); on CUDA "inside" is the launch cost, not the kernel's run time.

`--update-chunks 262144,1048576` times lowmem's steady step with each update-chunk size (elements per row chunk of a
weight update, lowmem.optim.weights) on one model, the sizes taking turns step by step so that a busy machine slows
all of them alike: per size the median step and the median time of the weight updates inside it (the SR writes with
their back-projections), against the device's current default.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.machine import machine_line
from hooks.runtime import prepare
from lowmem.memory.live_bytes import LiveTensorBytes, baseline_bytes, module_bytes
from lowmem.presets import preset

LOWMEM_METHODS = ("galore", "q_galore", "galore_plus", "lowmem")
# lowmem presets on a bf16 model (bf16 activations and float parameters, INT8 weights dequantised to bf16): the
# compute dtype of adamw_bf16, so that pair compares the optimizers rather than fp32 against bf16 matmuls
BF16_METHODS = {"lowmem_bf16": "lowmem", "q_galore_bf16": "q_galore"}


def build_model(args, dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=args.hidden // 64, max_position_embeddings=args.seq_len)
    return LlamaForCausalLM(cfg).to(device=args.device, dtype=dtype)


def make_step(method: str, model, args):
    """Returns (step_fn, state_tensors_fn). step_fn(ids) runs one full training step."""
    if method in LOWMEM_METHODS or method in BF16_METHODS:
        cfg = preset(BF16_METHODS.get(method, method), rank=args.rank, lr=1e-4, refresh_interval_steps=10_000,
                     max_refresh_interval_steps=10_000, stagger=False, residual_warmup_steps=1)
        runtime = prepare(model, cfg)

        def step(ids):
            with runtime.micro_batch():
                runtime.backward(model(input_ids=ids, labels=ids).loss)
            return runtime.step()
        return step, lambda: [t for s in runtime.states.values() for t in s.values()]
    if method == "adamw8bit":
        import bitsandbytes as bnb
        opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-4)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(ids):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, lambda: [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_method(method: str, args) -> dict:
    dtype = torch.bfloat16 if method == "adamw_bf16" or method in BF16_METHODS else torch.float32
    model = build_model(args, dtype)
    step, state_tensors = make_step(method, model, args)
    if args.compile_model:
        # after prepare(): the compiled forward is that of the INT8 model (its layers trace into the graph)
        model.forward = torch.compile(model.forward)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=gen).to(args.device)
               for _ in range(args.steps + 2)]
    sync(args.device)
    start = time.perf_counter()
    stats = step(batches[0])               # step 0: optimizer state created, every projector computed
    sync(args.device)
    first_s = time.perf_counter() - start
    compile_s = stats.get("compile_s") if isinstance(stats, dict) else None
    step(batches[1])                       # warm-up
    times = []
    for ids in batches[2:]:
        sync(args.device)
        start = time.perf_counter()
        step(ids)
        sync(args.device)
        times.append(time.perf_counter() - start)
    if torch.device(args.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step(batches[0])
        sync(args.device)
        peak = torch.cuda.max_memory_allocated()
    elif args.compile_model:
        peak = None  # the live-bytes meter is a dispatch mode, under which a compiled model does not run its graph
    else:
        resident = module_bytes(model) + baseline_bytes(state_tensors())
        with LiveTensorBytes() as counter:
            step(batches[0])
        peak = resident + counter.peak_bytes
    calls = None
    if args.call_overhead and (method in LOWMEM_METHODS or method in BF16_METHODS):
        calls = compiled_call_profile(step, batches[:2], args.device)
    return {"method": method, "step_s": statistics.median(times), "first_step_s": first_s, "peak_bytes": peak,
            "compile_s": compile_s, "calls": calls}


def compiled_call_profile(step, batches, device) -> dict[str, tuple[float, float, float]] | None:
    """{kernel name: (calls per step, host CPU ms per step inside the compiled graph, host CPU us per call outside
    it)} over one step per batch, by wrapping quant.compiled.call and inductor's compiled-graph call (thread CPU
    time); None when this torch has no CompiledFxGraph to wrap."""
    from quant import compiled
    try:
        from torch._inductor.output_code import CompiledFxGraph
    except ImportError:
        return None
    outer = collections.defaultdict(lambda: [0, 0.0])
    inner = collections.defaultdict(float)
    current = [""]
    real_call, real_graph_call = compiled.call, CompiledFxGraph.__call__

    def timed_call(name, *args, **kwargs):
        current[0], start = name, time.thread_time()
        try:
            return real_call(name, *args, **kwargs)
        finally:
            outer[name][0] += 1
            outer[name][1] += time.thread_time() - start

    def timed_graph_call(self, *args, **kwargs):
        start = time.thread_time()
        try:
            return real_graph_call(self, *args, **kwargs)
        finally:
            inner[current[0]] += time.thread_time() - start

    compiled.call, CompiledFxGraph.__call__ = timed_call, timed_graph_call
    try:
        for ids in batches:
            step(ids)
            sync(device)
    finally:
        compiled.call, CompiledFxGraph.__call__ = real_call, real_graph_call
    steps = len(batches)
    return {name: (count / steps, inner[name] / steps * 1e3, (seconds - inner[name]) / count * 1e6)
            for name, (count, seconds) in sorted(outer.items(), key=lambda kv: -kv[1][1])}


def chunk_sweep(args, chunk_sizes: list[int], rounds: int) -> list[dict]:
    """lowmem's steady step at each update-chunk size, interleaved (see the module docstring)."""
    from lowmem.optim import weights
    model = build_model(args, torch.float32)
    step, _ = make_step("lowmem", model, args)
    update_s = [0.0]

    def timed(apply):
        def run(self, *a, **k):
            sync(args.device)
            start = time.perf_counter()
            apply(self, *a, **k)
            sync(args.device)
            update_s[0] += time.perf_counter() - start
        return run

    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=gen).to(args.device)
               for _ in range(2)]
    name = "DEFAULT_CHUNK_ELEMENTS" if torch.device(args.device).type == "cpu" else "ACCELERATOR_CHUNK_ELEMENTS"
    default = getattr(weights, name)
    originals = {cls: cls.apply_ for cls in (weights.Int8Weight, weights.FloatWeight)}
    times = {size: ([], []) for size in chunk_sizes}
    try:
        for cls, apply in originals.items():
            cls.apply_ = timed(apply)
        step(batches[0])                  # optimizer state and projectors
        for round_index in range(rounds + 1):
            for size in chunk_sizes:
                setattr(weights, name, size)
                update_s[0] = 0.0
                sync(args.device)
                start = time.perf_counter()
                step(batches[round_index % 2])
                sync(args.device)
                if round_index:           # round 0 warms every size up (a compile for a new chunk shape)
                    times[size][0].append(time.perf_counter() - start)
                    times[size][1].append(update_s[0])
    finally:
        setattr(weights, name, default)
        for cls, apply in originals.items():
            cls.apply_ = apply
    return [{"elements": size, "default": size == default, "step_s": statistics.median(times[size][0]),
             "update_s": statistics.median(times[size][1])} for size in chunk_sizes]


def _chunk_sizes(text: str) -> list[int]:
    """argparse type of --update-chunks: positive element counts, comma-separated."""
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas (elements), got {text!r}")
    return sizes


def _mib(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.1f}"


def _ratio(value, base) -> str:
    return "-" if value is None or not base else f"{value / base:.2f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="timed steady steps per method (median reported)")
    parser.add_argument("--methods", default="adamw_fp32,adamw_bf16,adamw8bit," + ",".join(LOWMEM_METHODS))
    parser.add_argument("--compile-model", action="store_true",
                        help="torch.compile every method's model (after lowmem's prepare); step 0 then includes "
                             "the model's compile time, and the CPU peak memory is not measured")
    parser.add_argument("--call-overhead", action="store_true",
                        help="for the lowmem presets, also report the compiled kernels' calls per step and the host "
                             "time each call spends outside its compiled graph (two extra, instrumented steps)")
    parser.add_argument("--update-chunks", type=_chunk_sizes, default=None,
                        help="comma-separated update-chunk sizes (elements) to time lowmem's step with, interleaved "
                             "(replaces the method comparison)")
    args = parser.parse_args(argv)

    print(f"machine: {machine_line(args.device)}")
    print(f"model: LLaMA-shaped hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; batch {args.batch} x "
          f"seq {args.seq_len}; rank {args.rank}{'; every model under torch.compile' if args.compile_model else ''}")
    if args.update_chunks:
        rows = chunk_sweep(args, args.update_chunks, rounds=args.steps)
        base = next((r for r in rows if r["default"]), rows[0])
        print(f"\nlowmem, {args.steps} interleaved rounds (the default chunk is marked *):")
        print("| update chunk, elements | fp32 MiB | median step s | ratio | median weight updates s | ratio |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['elements']}{' *' if r['default'] else ''} | {r['elements'] * 4 / 2**20:g} | "
                  f"{r['step_s']:.3f} | {r['step_s'] / base['step_s']:.2f} | {r['update_s']:.3f} | "
                  f"{r['update_s'] / base['update_s']:.2f} |")
        return 0
    rows = []
    for method in args.methods.split(","):
        if method == "adamw8bit" and torch.device(args.device).type != "cuda":
            print(f"{method:12s} skipped: bitsandbytes 8-bit AdamW runs on CUDA only")
            continue
        rows.append(run_method(method, args))
        print(f"{method:12s} done", flush=True)
    base = next((r for r in rows if r["method"] == "adamw_fp32"), rows[0])
    print()
    bf16 = next((r for r in rows if r["method"] == "adamw_bf16"), None)
    print("| method | steady step s | ratio to adamw_fp32 | ratio to adamw_bf16 | step 0 (all refresh) s | "
          "of which compile s | peak MiB | peak ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        to_bf16 = f"{r['step_s'] / bf16['step_s']:.2f}" if bf16 else "-"
        compile_s = "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
        print(f"| {r['method']} | {r['step_s']:.3f} | {r['step_s'] / base['step_s']:.2f} | {to_bf16} | "
              f"{r['first_step_s']:.3f} | {compile_s} | {_mib(r['peak_bytes'])} | "
              f"{_ratio(r['peak_bytes'], base['peak_bytes'])} |")
    for r in rows:
        if r.get("calls"):
            step_ms = r["step_s"] * 1e3
            print(f"\ncompiled kernels of {r['method']} (host CPU time; steady step {step_ms:.0f} ms wall):")
            print("| kernel | calls per step | inside the graph, ms per step | outside it, us per call | "
                  "outside, ms per step |")
            print("| --- | --- | --- | --- | --- |")
            for name, (calls, inside_ms, outside_us) in r["calls"].items():
                print(f"| {name} | {calls:.0f} | {inside_ms:.1f} | {outside_us:.0f} | {calls * outside_us / 1e3:.1f} |")
            total = sum(calls * outside_us / 1e3 for calls, _, outside_us in r["calls"].values())
            print(f"| all | {sum(c for c, _, _ in r['calls'].values()):.0f} | "
                  f"{sum(i for _, i, _ in r['calls'].values()):.1f} | | {total:.1f} |")
            print(f"\nhost time outside the compiled graphs: {total:.1f} ms per step = {total / step_ms:.1%} of the "
                  f"steady step (target <= 2%)")
    print("\ncompile s: kernels compiled during step 0 (runtime.step()['compile_s']; 0 when an earlier method in this "
          "process, or an earlier run via the inductor cache, already compiled them)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
