"""Does it fit my card? Predicted peak memory of full-parameter training per method, per component.

    python -m benchmarks.memory_budget --model llama3-8b --gpu 3060-12gb --seq-len 256 2048
    python -m benchmarks.memory_budget --model path/to/config.json --gpu 4090 --seq-len 1024
    python -m benchmarks.memory_budget --model llama2-7b --gpu 4090 --measure     # + measured vs predicted on a
                                                                                # scaled-down copy on this machine
    python -m benchmarks.memory_budget --model llama2-7b --world-size 8 --zero-stage 3   # one rank's view

Predictions come from `lowmem.memory.estimate` (model config only, no weights). Sequences of 1024 tokens or more are
planned with activation checkpointing (the memory-saving setting a user would pick there); shorter ones without.
The terminal gets a compact table (method, peak, fits); the report file gets the wide one (every component), a PNG
of stacked bars per sequence length, and lowmem's breakdown before and after the memory levers side by side (float
tables + plain loss; the shipped defaults; what fit: auto picks for the card): memory-budget-<model>-<gpu>.md in a new
run directory, outputs/benchmarks/memory-budget-<date>-<time>/ (or --out DIR), whose path is printed; the committed
reports in benchmarks/results/ are only rewritten with --out benchmarks/results. With --world-size N (and
--zero-stage K, default 2) it prints lowmem's per-rank breakdown at (N, K) instead and writes
memory-budget-<model>-per-rank.md: ZeRO stages 0/1/2/3 at 2/4/8 ranks (and N) against one GPU, and lowmem's per-rank
state against the ZeRO paper's model-state formula for mixed-precision AdamW. All sizes are GiB (2**30 bytes).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from benchmarks.machine import machine_line  # noqa: E402
from lowmem.memory import COMPONENTS, GPUS, LOAD_COMPONENTS, estimate, estimate_load, format_breakdown  # noqa: E402
from lowmem.memory.cost_model import ModelShape  # noqa: E402
from lowmem.presets import preset  # noqa: E402

GIB = 2**30
BUILTIN = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096),
}
# Published peaks for LLaMA-7B, batch 1, in bytes (the papers print GB = 1e9 bytes), shown in GiB beside ours.
PUBLISHED_7B = {"GaLore (paper, 8-bit, layer-wise)": ("", 22.7e9), "Q-GaLore (paper)": ("~", 15e9),
                "APOLLO quantized variant (paper, batch 1, seq 256)": ("< ", 12e9)}
# The project's goal for lowmem on LLaMA-2-7B, in bytes: seq 256 plain, seq 2048 with checkpointing.
GOALS_7B = {256: 9e9, 2048: 11e9}
METHODS = [("lowmem", "lowmem"), ("q_galore", "lowmem:q_galore"), ("galore (reference)", "galore"),
           ("adamw bf16", "adamw_bf16"), ("adamw 8-bit", "adamw_8bit"), ("lora r16", "lora"),
           ("qlora r16", "qlora"), ("dora r16", "dora")]


def load_model_config(spec: str) -> tuple[str, LlamaConfig]:
    if spec in BUILTIN:
        return spec, LlamaConfig(**BUILTIN[spec])
    path = Path(spec)
    if not path.is_file():
        raise SystemExit(f"--model {spec!r}: not a built-in ({', '.join(BUILTIN)}) and not a config.json file")
    return path.stem, LlamaConfig(**json.loads(path.read_text()))


def breakdowns(model_config, seq_len: int, micro_batch: int, rank: int):
    checkpointing = seq_len >= 1024
    rows = []
    for label, method in METHODS:
        kwargs = {}
        if method.startswith("lowmem"):
            name = method.split(":")[1] if ":" in method else "lowmem"
            kwargs["lowmem_config"] = preset(name, rank=rank)
            method = "lowmem"
            kwargs["fused_loss"] = True     # launch.finetune's default loss (lowmem.model.fused_loss)
        rows.append((label, estimate(model_config, method=method, seq_len=seq_len, micro_batch_size=micro_batch,
                                     gradient_checkpointing=checkpointing, dtype=torch.bfloat16,
                                     device_type="cuda", **kwargs)))
    return checkpointing, rows


def lever_columns(model_config, seq_len: int, micro_batch: int, rank: int, card: int):
    """lowmem before and after the memory levers, side by side: (label, breakdown or None, note) per column.

    today: float embedding and lm_head (bf16 + full-rank 8-bit AdamW), the model's own logits + cross-entropy;
    new: the defaults (fused linear + cross-entropy, INT8 low-rank embedding, float head); + INT8 head: the head as a
    low-rank INT8 weight too (opt-in: it learned slower in a short comparison); + offload: that with gradient
    checkpointing and the kept layer inputs in host memory (lowmem.model.offload); fit: auto: what the planner picks
    for this card (lowmem.memory.auto_fit) on the defaults, or with the INT8 head when nothing else fits."""
    from types import SimpleNamespace

    from lowmem.memory import auto_fit
    checkpointing = seq_len >= 1024
    common = dict(method="lowmem", seq_len=seq_len, micro_batch_size=micro_batch, dtype=torch.bfloat16,
                  device_type="cuda")
    today = estimate(model_config, gradient_checkpointing=checkpointing, fused_loss=False,
                     lowmem_config=preset("lowmem", rank=rank, exclude_modules=("*lm_head", "*embed*")), **common)
    new = estimate(model_config, gradient_checkpointing=checkpointing, fused_loss=True,
                   lowmem_config=preset("lowmem", rank=rank), **common)
    int8_head = estimate(model_config, gradient_checkpointing=checkpointing, fused_loss=True,
                         lowmem_config=preset("lowmem", rank=rank, exclude_modules=()), **common)
    offloaded = estimate(model_config, gradient_checkpointing=True, activation_offload=True, fused_loss=True,
                         lowmem_config=preset("lowmem", rank=rank, exclude_modules=()), **common)
    fitted, chosen = None, "nothing tried fits"
    for extra, label in (({}, ""), ({"exclude_modules": ()}, "INT8 head, ")):
        run = SimpleNamespace(seq_len=seq_len, micro_batch_size=micro_batch, gradient_checkpointing=checkpointing,
                              fused_loss=True, grad_accum_steps=1, dtype="bf16",
                              lowmem_config=lambda extra=extra: preset("lowmem", rank=rank, **extra))
        plan = auto_fit(run, model_config, torch.device("cuda"), device_bytes=card)
        if plan is not None:
            chosen = label + (", ".join(f"{k}={v}" for k, v in plan.changes.items()) or "as configured")
            fitted = estimate(model_config, fused_loss=True,
                              gradient_checkpointing=plan.changes.get("gradient_checkpointing", checkpointing),
                              activation_offload=plan.changes.get("activation_offload", False),
                              lowmem_config=preset("lowmem", rank=plan.changes.get("optim.rank", rank), **extra),
                              **{**common, "micro_batch_size": plan.changes.get("micro_batch_size", micro_batch)})
            break
    return [("today", today, "float tables, plain loss"), ("new", new, "defaults: fused loss, INT8 embedding"),
            ("+ INT8 head", int8_head, "exclude_modules=[]"),
            ("+ offload", offloaded, "INT8 head, gradient_checkpointing and activation_offload"),
            ("fit: auto", fitted, chosen)]


def lever_table(model_config, seq_len: int, micro_batch: int, rank: int, card: int) -> list[str]:
    cols = lever_columns(model_config, seq_len, micro_batch, rank, card)
    today, new = cols[0][1], cols[1][1]
    lines = [f"### lowmem today vs new, per component (seq {seq_len})", "",
             "| component | " + " | ".join(f"{label} ({note})" for label, _, note in cols) + " | saved (today - new) |",
             "| --- | " + " | ".join("---" for _ in cols) + " | --- |"]
    for c in COMPONENTS:
        values = [b.components.get(c, 0) if b is not None else None for _, b, _ in cols]
        if not any(values):
            continue
        cells = " | ".join("-" if v is None else f"{v / GIB:.2f}" for v in values)
        lines.append(f"| {c} | {cells} | {(today.components.get(c, 0) - new.components.get(c, 0)) / GIB:+.2f} |")
    peaks = " | ".join("-" if b is None else f"**{b.peak_bytes / GIB:.2f}**" for _, b, _ in cols)
    lines.append(f"| peak | {peaks} | {(today.peak_bytes - new.peak_bytes) / GIB:+.2f} |")
    fits = " | ".join("-" if b is None else ("yes" if b.peak_bytes <= 0.95 * card else "no") for _, b, _ in cols)
    lines += [f"| fits (95%) | {fits} | |", ""]
    return lines


def load_table(model_config, rank: int, card: int) -> tuple[list[str], str]:
    """The load phase (lowmem.memory.estimate_load: the checkpoint streamed into INT8 on the card, then the optimizer
    state) for lowmem's defaults and with the INT8 head: (report lines, one terminal line)."""
    cols = [("defaults", preset("lowmem", rank=rank)), ("+ INT8 head", preset("lowmem", rank=rank, exclude_modules=()))]
    loads = [(label, estimate_load(model_config, cfg, dtype=torch.bfloat16, device_type="cuda")) for label, cfg in cols]
    lines = ["## Load phase (streamed checkpoint, then the optimizer state)", "",
             "Predicted by `lowmem.memory.estimate_load` for `lowmem.load_pretrained` (bf16 checkpoint, memory-mapped; "
             "each weight quantised on the card as it arrives). A run must fit both this and the step; the preflight "
             "and `fit: auto` judge the larger.", "",
             "| component | " + " | ".join(label for label, _ in loads) + " |", "| --- | --- | --- |"]
    for key in LOAD_COMPONENTS:
        if any(b.components[key] for _, b in loads):
            lines.append(f"| {key} | " + " | ".join(f"{b.components[key] / GIB:.2f}" for _, b in loads) + " |")
    at = {label: b.largest_tensor + " streamed" if b.moment == "stream" else "optimizer state" for label, b in loads}
    lines += ["| peak | " + " | ".join(f"**{b.peak_bytes / GIB:.2f}** ({at[label]})" for label, b in loads) + " |",
              "| host peak | " + " | ".join(f"{b.host_peak_bytes / GIB:.2f}" for _, b in loads) + " |",
              "| fits (95%) | " + " | ".join("yes" if b.peak_bytes <= 0.95 * card else "no" for _, b in loads) + " |",
              ""]
    first = loads[0][1]
    fits = "fits" if first.peak_bytes <= 0.95 * card else "does not fit"
    terminal = (f"load phase (defaults): peak {first.peak_bytes / GIB:.2f} GiB on the card ({fits}), host "
                f"{first.host_peak_bytes / GIB:.2f} GiB")
    return lines, terminal


def plot(path: Path, title: str, rows, card_bytes: int) -> None:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = [label for label, _ in rows]
    bottom = [0.0] * len(rows)
    colors = plt.get_cmap("tab20").colors  # 13 components: the default 10-colour cycle would repeat
    for index, component in enumerate(COMPONENTS):
        values = [b.components.get(component, 0) / GIB for _, b in rows]
        if any(values):
            ax.bar(labels, values, bottom=bottom, label=component, color=colors[index % len(colors)])
            bottom = [x + y for x, y in zip(bottom, values)]
    ax.axhline(card_bytes / GIB, color="black", linestyle="--", label="card")
    ax.set_ylabel("GiB")
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(model_name: str, model_config, gpu: str, seq_lens, micro_batch: int, rank: int, out_dir: Path) -> Path:
    card = GPUS[gpu]
    terminal = [f"{model_name} on {gpu} ({card / GIB:.1f} GiB), predicted peak per method (GiB; fits = under 95% "
                "of the card):"]
    lines = [f"# Memory budget: {model_name} on {gpu} ({card / GIB:.1f} GiB)", "",
             f"Predicted by `lowmem.memory.estimate` from the model config alone (bf16 compute, micro-batch "
             f"{micro_batch}, lowmem rank {rank}; sequences >= 1024 tokens with activation checkpointing). "
             "These are predictions, not GPU measurements: the planner's accuracy is tested against measured peaks "
             "on CPU (tests/unit/lowmem/test_memory.py, within 5%); CUDA context (500 MiB) and allocator slack (5%) "
             "are modelled.", "",
             f"Command: `python -m benchmarks.memory_budget --model {model_name} --gpu {gpu} --seq-len "
             f"{' '.join(map(str, seq_lens))}`", ""]
    for seq_len in seq_lens:
        checkpointing, rows = breakdowns(model_config, seq_len, micro_batch, rank)
        shown = [c for c in COMPONENTS if any(b.components.get(c, 0) for _, b in rows)]
        lines += [f"## seq {seq_len}{' (activation checkpointing)' if checkpointing else ''}", "",
                  "| method | peak GiB | fits | " + " | ".join(shown) + " |",
                  "| --- | --- | --- | " + " | ".join("---" for _ in shown) + " |"]
        terminal += ["", f"seq {seq_len}{' (activation checkpointing)' if checkpointing else ''}",
                     f"  {'method':<20} {'peak GiB':>9}  fits"]
        for label, b in rows:
            fits = "yes" if b.peak_bytes <= 0.95 * card else "no"
            cells = " | ".join(f"{b.components.get(c, 0) / GIB:.2f}" for c in shown)
            lines.append(f"| {label} | {b.peak_bytes / GIB:.2f} | {fits} | {cells} |")
            terminal.append(f"  {label:<20} {b.peak_bytes / GIB:>9.2f}  {fits}")
        png = out_dir / f"memory-budget-{model_name}-{gpu}-seq{seq_len}.png"
        plot(png, f"{model_name}, seq {seq_len}, {gpu}", rows, card)
        lines += ["", f"![stacked components]({png.name})", ""]
        lines += lever_table(model_config, seq_len, micro_batch, rank, card)
        lowmem_peak = rows[0][1]
        if model_name == "llama2-7b" and seq_len in GOALS_7B:
            # The card decides "fits" (above); this is the project's own, stricter size goal for 7B, kept apart.
            goal = GOALS_7B[seq_len]
            verdict = "within" if lowmem_peak.peak_bytes <= goal else "above"
            lines.append(f"Size goal (independent of the card): lowmem's predicted peak "
                         f"{lowmem_peak.peak_bytes / GIB:.2f} GiB is {verdict} the project's goal of "
                         f"{goal / GIB:.2f} GiB for LLaMA-2-7B at seq {seq_len}.")
            if lowmem_peak.peak_bytes > goal:
                biggest = sorted(lowmem_peak.components.items(), key=lambda kv: -kv[1])[:4]
                lines.append("Largest components: " + ", ".join(
                    f"{name} {value / GIB:.2f} GiB" for name, value in biggest) + ".")
            lines.append("")
    load_lines, load_line = load_table(model_config, rank, card)
    lines += load_lines
    terminal += ["", load_line]
    if model_name == "llama2-7b":
        lines += ["## Published figures (LLaMA-7B)", "", "| system | peak GiB (converted from the paper's GB) |",
                  "| --- | --- |"]
        lines += [f"| {k} | {prefix}{value / GIB:.1f} |" for k, (prefix, value) in PUBLISHED_7B.items()]
        lines.append("")
    path = out_dir / f"memory-budget-{model_name}-{gpu}.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(terminal))
    return path


WORLDS = (2, 4, 8)
STATE = ("weights_int8", "weight_scales", "float_params", "optimizer_moments", "projectors", "residuals",
         "error_feedback", "comm_buffers", "gathered_weights")   # resident per-rank state, activations excluded


def per_rank(model_config, seq_len: int, micro_batch: int, rank: int, world: int, stage: int):
    return estimate(model_config, method="lowmem", seq_len=seq_len, micro_batch_size=micro_batch,
                    gradient_checkpointing=seq_len >= 1024, lowmem_config=preset("lowmem", rank=rank),
                    dtype=torch.bfloat16, device_type="cuda", zero_stage=stage, world_size=world)


def zero_paper_state_bytes(params: int, world: int, stage: int) -> float:
    """Model states per GPU of mixed-precision Adam under DeepSpeed ZeRO (Rajbhandari et al. 2020, Figure 1):
    bf16 weights 2, bf16 gradients 2, fp32 master weights + two moments 12 bytes per parameter."""
    return params * {0: 16, 1: 4 + 12 / world, 2: 2 + 14 / world, 3: 16 / world}[stage]


def per_rank_report(model_name: str, model_config, gpu: str, seq_lens, micro_batch: int, rank: int, worlds,
                    out_dir: Path, command: str) -> Path:
    card = GPUS[gpu]
    shape = ModelShape.from_config(model_config)
    params = shape.layers * sum(m * n for _, m, n in shape.linears()) + sum(shape.float_numels())
    lines = [f"# Per-rank memory budget: {model_name}, lowmem rank {rank}, ZeRO stages on several GPUs", "",
             "One rank's predicted peak from `lowmem.memory.estimate(..., zero_stage=K, world_size=N)` (bf16 compute, "
             f"micro-batch {micro_batch} per rank; sequences >= 1024 tokens with activation checkpointing). lowmem's "
             "semantics: stage 1 = stage 2 (optimizer state partitioned by bytes, projectors and weights "
             "replicated, low-rank reduce buffers), stage 3 adds partitioned INT8 weights with two gathered linears. "
             "Predictions, not GPU measurements; the composition is in lowmem/memory/cost_model.py's docstring.", "",
             f"Command: `{command}`", "",
             f"Computed on: {machine_line('cpu')}", ""]
    for seq_len in seq_lens:
        single = per_rank(model_config, seq_len, micro_batch, rank, 1, 0)
        rows = [("1", "-", single)] + [(str(w), str(k), per_rank(model_config, seq_len, micro_batch, rank, w, k))
                                       for w in worlds for k in (0, 1, 2, 3)]
        shown = [c for c in COMPONENTS if any(b.components.get(c, 0) for _, _, b in rows)]
        lines += [f"## seq {seq_len}{' (activation checkpointing)' if seq_len >= 1024 else ''}", "",
                  f"| ranks | ZeRO stage | peak GiB | vs 1 GPU | fits {gpu} | " + " | ".join(shown) + " |",
                  "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in shown) + " |"]
        for world, stage, b in rows:
            fits = "yes" if b.peak_bytes <= 0.95 * card else "no"
            cells = " | ".join(f"{b.components.get(c, 0) / GIB:.2f}" for c in shown)
            lines.append(f"| {world} | {stage} | {b.peak_bytes / GIB:.2f} | {b.peak_bytes / single.peak_bytes:.2f}x "
                         f"| {fits} | {cells} |")
        lines.append("")
    comm = per_rank(model_config, seq_lens[0], micro_batch, rank, max(worlds), 1).components["comm_buffers"]
    lines += [f"Stages 1/2 remove the partitioned optimizer state from each rank at the cost of small communication "
              f"buffers ({comm / GIB:.2f} GiB: one layer's projected gradient reduced and its update direction "
              "broadcast; float gradients are reduced in place in their own dtype). The saving is bounded by the "
              "optimizer state, which lowmem already keeps small; stage 3 is where one rank's peak falls with the "
              "rank count (INT8 weights are most of the resident state).", ""]
    lines += ["## Resident state per rank: lowmem vs DeepSpeed ZeRO with mixed-precision AdamW", "",
              f"{params / 1e9:.2f} B parameters. ZeRO column: the ZeRO paper's model states per GPU (2 + 2 + 12 "
              "bytes per parameter: bf16 weights, bf16 gradients, fp32 master weights and Adam moments), without "
              "activations or buffers. lowmem column: weights, scales, float params, optimizer state, projectors, "
              "residuals, communication buffers and gathered weights of one rank, from the same estimates.", "",
              "| ranks | ZeRO stage | ZeRO paper GiB | lowmem GiB | lowmem / ZeRO |", "| --- | --- | --- | --- | --- |"]
    for world in (1, *worlds):
        for stage in ((0,) if world == 1 else (0, 1, 2, 3)):
            b = per_rank(model_config, seq_lens[0], micro_batch, rank, world, stage)
            ours = sum(b.components[c] for c in STATE)
            theirs = zero_paper_state_bytes(params, world, stage)
            lines.append(f"| {world} | {stage} | {theirs / GIB:.2f} | {ours / GIB:.2f} | {ours / theirs:.3f} |")
    lines.append("")
    path = out_dir / f"memory-budget-{model_name}-per-rank.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def measure_scaled(model_config, seq_len: int, rank: int) -> None:
    """Measured vs predicted on a scaled-down copy that runs on this machine (2 layers, hidden / 8)."""
    from hooks.runtime import prepare
    from lowmem.memory.live_bytes import module_bytes
    from lowmem.memory import measure
    from transformers import LlamaForCausalLM

    heads = max(1, model_config.num_attention_heads // 8)
    kv = max(1, model_config.num_key_value_heads // 8)
    small = LlamaConfig(hidden_size=model_config.hidden_size // 8, intermediate_size=model_config.intermediate_size // 8,
                        num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv,
                        vocab_size=min(model_config.vocab_size, 8000), max_position_embeddings=seq_len)
    seq = min(seq_len, 128)
    torch.manual_seed(0)
    model = LlamaForCausalLM(small).float()
    cfg = preset("lowmem", rank=min(rank, small.hidden_size // 4), refresh_interval_steps=1000,
                 max_refresh_interval_steps=1000)
    runtime = prepare(model, cfg)
    ids = torch.randint(0, small.vocab_size, (1, seq))

    def step():
        with runtime.micro_batch():
            runtime.backward(model(input_ids=ids, labels=ids).loss)
        runtime.step()

    step()
    measured = measure(step, device=torch.device("cpu"),
                       baseline_tensors=(t for t in list(model.state_dict().values())
                                         + [v for s in runtime.states.values() for v in s.values()]))
    predicted = estimate(small, method="lowmem", seq_len=seq, micro_batch_size=1, gradient_checkpointing=False,
                         lowmem_config=cfg, dtype=torch.float32, device_type="cpu").peak_bytes
    print(f"measured on this machine ({machine_line('cpu')}): scaled-down copy hidden {small.hidden_size}, "
          f"2 layers, seq {seq}: predicted {predicted / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB, "
          f"error {100 * (predicted - measured) / measured:+.1f}% (model {module_bytes(model) / 2**20:.1f} MiB)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help=f"built-in ({', '.join(BUILTIN)}) or a config.json")
    parser.add_argument("--gpu", default="4060ti-16gb", choices=sorted(GPUS))
    parser.add_argument("--seq-len", type=int, nargs="+", default=[256, 2048])
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--out", default=None,
                        help="directory for the report and PNGs (default: a new outputs/benchmarks/memory-budget-"
                             "<date>-<time>/; the committed reports are in benchmarks/results)")
    parser.add_argument("--measure", action="store_true", help="also measure a scaled-down copy on this machine")
    parser.add_argument("--world-size", type=int, default=None,
                        help="print one rank's view on N ranks and write the per-rank report instead")
    parser.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2, 3),
                        help="lowmem's ZeRO stage for --world-size (default 2)")
    args = parser.parse_args(argv)
    name, model_config = load_model_config(args.model)
    out = Path(args.out) if args.out else Path("outputs") / "benchmarks" / time.strftime("memory-budget-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    if args.world_size is not None:
        if args.world_size < 1:
            parser.error(f"--world-size must be >= 1, got {args.world_size}")
        print(machine_line("cpu"))
        for seq_len in args.seq_len:
            b = per_rank(model_config, seq_len, args.micro_batch, args.rank, args.world_size, args.zero_stage)
            print(f"{name}, seq {seq_len}, one of {args.world_size} ranks, ZeRO stage {args.zero_stage}:")
            print(format_breakdown(b))
        worlds = tuple(sorted({*WORLDS, args.world_size} - {1}))
        command = ("python -m benchmarks.memory_budget " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
        path = per_rank_report(name, model_config, args.gpu, args.seq_len, args.micro_batch, args.rank, worlds, out,
                               command)
        print(f"\nfull per-rank report (every stage and rank count, GiB):\n{path}")
        return 0
    path = report(name, model_config, args.gpu, args.seq_len, args.micro_batch, args.rank, out)
    print(f"\nfull report (every memory component per method, GiB, stacked-bar PNGs):\n{path}")
    if args.measure:
        measure_scaled(model_config, max(args.seq_len), args.rank)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
