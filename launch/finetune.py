"""`python -m launch.finetune`: full-parameter fine-tuning with lowmem, from one YAML and key=value overrides.

    python -m launch.finetune                                   # the embedded default (launch/configs/demo.yaml)
    python -m launch.finetune CONFIG.yaml optim.rank=128 max_steps=500
    python -m launch.finetune CONFIG.yaml --print-config        # the resolved configuration, then exit
    python -m launch.finetune --help-config                     # every key with its default and help
    python -m launch.finetune export CHECKPOINT_DIR OUT_DIR     # bf16 Hugging Face model from any checkpoint
    python -m launch.finetune export CHECKPOINT_DIR OUT.gguf --format gguf --gguf-type q8_0   # GGUF for llama.cpp

Several processes (launch.parallel): `deepspeed --num_gpus N --module launch.finetune ... deepspeed=ds.json` or
`torchrun --nproc_per_node N -m launch.finetune ...`.

The run, top to bottom: resolve the config (and the DeepSpeed JSON); open the process group when there are several
processes; check output_dir is writable and take its run lock (rank 0; launch.run_dir); choose the checkpoint to
resume from (hashes verified, damaged ones passed over with a line saying why) and check its settings match this
run's, before anything is written; memory preflight (refuses a run that will not fit unless force=true; from
the model config alone, before any weight is loaded); load model and tokenizer; tokenize and pack the data (cached
on disk); prepare the lowmem runtime (INT8 linears, optimizer state, backward hooks); load the checkpoint and cut
train_log.jsonl back to its step; train with a progress bar, a JSONL log line per step (plus TensorBoard / W&B with
log_to: launch.loggers), held-out evaluation every eval_every steps and checkpoints every save_every steps (and on
Ctrl-C / SIGTERM; none while steps are being skipped for NaN/Inf, and max_skipped_steps skipped in a row stop the
run as diverged); at the end save, export a bf16 Hugging Face model with its model card (README.md) (and
model.gguf with export_gguf) and write
report.md with loss and memory curves. Until the first step each set-up phase prints a line with its duration
(launch.report.Phases).

(Over 450 lines on purpose: the run's set-up and loop read top to bottom in one function, which is what a user
debugging a run follows; the pieces that stand alone live in launch.report, launch.run_dir, launch.loggers and
launch.parallel.)
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch

from launch.config import ConfigError, TrainConfig
from launch.config_loader import config_help, config_to_yaml, load_train_config

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A problem the user fixes (bad input, missing file, unwritable directory): printed as one paragraph."""


# ---- set-up --------------------------------------------------------------------------------------------------------

def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("device=cuda but no CUDA device is available (torch "
                         f"{torch.__version__}); use device=cpu or install a CUDA build of torch")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def resolve_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "bf16":
        return torch.bfloat16
    if cfg.dtype == "fp32":
        return torch.float32
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def check_output_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"output_dir {path} is not writable ({err.strerror or err}); choose another with "
                         "output_dir=PATH or fix its permissions") from None


def check_seq_len(cfg: TrainConfig, model_config) -> None:
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and cfg.seq_len > limit:
        raise UsageError(f"seq_len={cfg.seq_len} is longer than the model's context ({limit} positions, "
                         f"max_position_embeddings); use seq_len={limit} or less")


class StopFlag:
    """SIGINT / SIGTERM ask the loop to save and stop after the current step (a second Ctrl-C stops at once)."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


# ---- training --------------------------------------------------------------------------------------------------

def model_loss(model, ids: torch.Tensor, labels: torch.Tensor, fused: bool) -> torch.Tensor:
    """The causal-LM loss of one batch: lowmem's fused linear + cross-entropy (no (tokens, vocab) fp32 logits) or
    the model's own loss."""
    if fused:
        from lowmem.model.fused_loss import causal_lm_loss
        return causal_lm_loss(model, ids, labels)
    return model(input_ids=ids, labels=labels).loss


def evaluate(model, eval_ids: torch.Tensor, eval_labels: torch.Tensor, batch_size: int,
             device: torch.device, par=None, fused: bool = False, progress: bool = False) -> float:
    """Token-weighted mean loss over the held-out sequences. Several processes: each rank evaluates every
    world_size-th batch (all ranks run the same number of forwards, which ZeRO 3's weight gathers need) and the
    sums are added over the ranks."""
    if eval_ids.numel() == 0:
        return float("nan")
    rank, world = (0, 1) if par is None else (par.rank, par.world_size)
    starts = list(range(0, eval_ids.shape[0], batch_size))
    rounds = math.ceil(len(starts) / world)
    model.eval()
    total_loss, total_tokens = 0.0, 0
    from tqdm.auto import tqdm
    with torch.no_grad():   # progress: a bar on a terminal (the first evaluation can take minutes on a busy CPU)
        for round_index in tqdm(range(rounds), desc="evaluating", unit="batch", leave=False,
                                disable=None if progress and rank == 0 else True):
            slot = round_index * world + rank
            start = starts[slot] if slot < len(starts) else starts[0]   # a spare forward keeps the ranks in step
            ids = eval_ids[start:start + batch_size].to(device)
            labels = eval_labels[start:start + batch_size].to(device)
            tokens = int((labels[:, 1:] != -100).sum())
            if tokens == 0 and world == 1:
                continue
            loss = float(model_loss(model, ids, labels, fused)) if tokens else 0.0
            if slot < len(starts) and tokens:
                total_loss += loss * tokens
                total_tokens += tokens
    model.train()
    if par is not None:
        total_loss, total_tokens = par.sum_([total_loss, float(total_tokens)])
    return total_loss / max(total_tokens, 1)


def train(cfg: TrainConfig) -> dict:
    """Set up the process layout, run, and tear down (explicitly, also after a failure of another rank)."""
    from launch.parallel import describe_failure, is_comm_failure, setup
    from launch.run_dir import claim_output_dir, missing_dirs, remove_unused_dirs
    created = missing_dirs(Path(cfg.output_dir))
    par = setup(cfg, resolve_device)
    progress = {"step": None, "checkpoint": None}
    lock = None
    try:
        lock = claim_output_dir(par, check_output_dir)
        result = _train(par, progress)
    except Exception as err:
        if par.is_main:
            remove_unused_dirs(created)
        if par.distributed and is_comm_failure(err):
            print(f"error: {describe_failure(par, err, step=progress['step'], checkpoint=progress['checkpoint'])}",
                  file=sys.stderr, flush=True)
            # The peers are gone: no barrier, no destroy (either could wait forever); leave at once.
            os._exit(EXIT_ERROR)
        par.shutdown(clean=False)
        raise
    finally:
        if lock is not None:
            lock.release()
    par.shutdown(clean=True)
    return result


def _train(par, progress: dict) -> dict:
    from tqdm.auto import tqdm

    from hooks.load import complete_deferred_int8, partitions_weights
    from hooks.runtime import prepare
    from launch.data import BatchSampler, build_data
    from launch.models import cache_root, load_int8_model, load_model_config
    from launch.preflight import check as preflight
    from launch.loggers import RunLogger
    from launch.preflight import fit_automatically
    from launch.report import (GIB, Phases, format_gib, format_seconds, memory_label, predicted_peaks, read_log,
                               write_report)
    from launch.run_dir import SkipStreak, check_compatible, choose_checkpoint, load_resumed_state, truncate_log
    from lowmem.checkpoint.store import python_random_state, save_checkpoint, set_python_random_state
    from lowmem.checkpoint.distributed import load_any_checkpoint, save_distributed_checkpoint

    cfg = par.cfg
    main = par.is_main
    say = print if main else (lambda *a, **k: None)
    run_started = time.perf_counter()
    phase = Phases(say)
    out = Path(cfg.output_dir)    # writable and locked by this run (claim_output_dir)
    ckpt_root = out / "checkpoints"
    resume_from = choose_checkpoint(par, ckpt_root)
    if resume_from is not None:
        check_compatible(cfg, resume_from)
    device = par.device
    dtype = resolve_dtype(cfg, device)
    torch.manual_seed(cfg.seed)

    # Preflight from the config alone: a run that will not fit is refused before any weight is loaded.
    with phase(f"reading the model config of {cfg.model}", short="model config"):
        model_config = load_model_config(cfg.model)   # converts a GGUF once (cached): minutes on a slow machine
    check_seq_len(cfg, model_config)
    if cfg.export_gguf:
        check_gguf_exportable(model_config)
    verdict = preflight(cfg, model_config, device, zero_stage=par.zero_stage, world_size=par.world_size)
    mem_kind = memory_label(device.type)
    say(verdict.detail + ("; the prediction counts the tensors the run keeps live, while the per-step figure on CPU "
                          "is the process's peak resident memory (RSS: also Python, torch and library code), so "
                          "expect that one higher" if device.type == "cpu" else ""), flush=True)
    fit_line = None
    if verdict.fits is False and cfg.fit == "auto":
        cfg, fit_line = fit_automatically(cfg, model_config, device, zero_stage=par.zero_stage,
                                          world_size=par.world_size)
        say(fit_line, flush=True)
        verdict = preflight(cfg, model_config, device, zero_stage=par.zero_stage, world_size=par.world_size)
    if verdict.fits is False and not cfg.force:
        raise UsageError(f"{verdict.detail}. Apply the fix as an override, or run anyway with force=true.")
    # Streamed into INT8 on the device, one tensor at a time (lowmem.model.loader): the float model never exists
    # whole. A resume reads no base weight: the checkpoint overwrites every tensor.
    with phase("loading the model into INT8" + (" (weights from the checkpoint)" if resume_from else "")
               + " and the tokenizer", short="model"):
        loaded = load_int8_model(cfg.model, cfg.lowmem_config(), dtype=dtype, device=device,
                                 tokenizer=cfg.tokenizer, seed=cfg.seed, empty=resume_from is not None,
                                 defer_int8=partitions_weights(par.data_parallel))
    model, tokenizer = loaded.model, loaded.tokenizer
    if cfg.gradient_checkpointing and cfg.activation_offload and device.type == "cuda":
        from lowmem.model.offload import enable_offloaded_checkpointing
        enable_offloaded_checkpointing(model)
    elif cfg.gradient_checkpointing:
        if cfg.activation_offload:
            say(f"activation_offload: the device is the host ({device.type}); nothing to offload, left off")
            cfg = dataclasses.replace(cfg, activation_offload=False)    # the report records what ran
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if cfg.fused_loss:   # a model whose logits the fused loss cannot reproduce is refused before any step
        from lowmem.model.fused_loss import logit_factor
        try:
            logit_factor(model)
        except ValueError as err:
            raise UsageError(str(err)) from None

    def load_data():
        return build_data(cfg.data, tokenizer, seq_len=cfg.seq_len, seed=cfg.seed,
                          cache_dir=cfg.data.cache_dir or cache_root() / "tokenized")
    # Rank 0 tokenises (and fills the cache) first; the others then read the cache instead of racing to write it.
    with phase("tokenising the data", lambda: "from the cache" if data.stats.get("cache_hit") else
               f"{data.stats.get('tokens', 0):,} tokens, cached for the next run", short="data"):
        data = load_data() if main else None
        par.barrier()
        if not main:
            data = load_data()
    global_rows = cfg.micro_batch_size * par.world_size
    if data.train.shape[0] < global_rows:
        raise UsageError(f"the data gives {data.train.shape[0]} training sequences of {cfg.seq_len} tokens, fewer "
                         f"than micro_batch_size x processes = {global_rows}; add data, lower seq_len or "
                         "micro_batch_size")
    with phase("preparing the lowmem runtime (INT8 weights, optimizer state, backward hooks)", short="runtime"):
        runtime = prepare(model, cfg.lowmem_config(), data_parallel=par.data_parallel)
        if partitions_weights(par.data_parallel):   # ZeRO-3: this rank reads the INT8 weights it owns, no others
            complete_deferred_int8(runtime, "empty" if resume_from is not None else loaded.weights_dir,
                                   device=device, dtype=dtype)
    sampler = BatchSampler(data.train.shape[0], global_rows, cfg.seed)
    if resume_from is not None:
        with phase(f"loading checkpoint {resume_from}", short="checkpoint"):
            model_state, runtime_state, meta = load_any_checkpoint(resume_from, rank=par.rank,
                                                                   verify=False)   # verified by choose_checkpoint
            load_resumed_state(runtime, model_state, runtime_state, resume_from)
        sampler.load_state_dict(meta["meta"]["data"])
        set_python_random_state(meta["meta"]["python_random"])
        progress["checkpoint"] = str(resume_from)
        say(f"resumed from {resume_from} at step {runtime.global_step}", flush=True)
        saved_world = meta.get("distributed", {}).get("world_size", 1)
        saved_rows = meta["meta"]["config"]["micro_batch_size"] * saved_world
        if saved_world != par.world_size or saved_rows != global_rows:
            say(f"note: the checkpoint was written by {saved_world} process(es) with {saved_rows} sequences per "
                f"micro-batch step; this run uses {par.world_size} with {global_rows}: the optimizer state was "
                "redistributed and the data order continues, but the global batch changed", flush=True)

    if main and resume_from is not None:
        truncate_log(out / "train_log.jsonl", runtime.global_step)   # steps after it are replayed and logged again
    log = RunLogger(out, cfg.log_to, append=resume_from is not None, config=cfg.to_dict(), say=say) if main else None
    config_yaml = config_to_yaml(cfg)
    if main:
        (out / "config.yaml").write_text(config_yaml, encoding="utf-8")
    tokens_per_step = global_rows * cfg.grad_accum_steps * cfg.seq_len

    def save(step_count: int) -> Path:
        meta = {"config": cfg.to_dict(), "data": sampler.state_dict(), "python_random": python_random_state(),
                "model_source": loaded.source}
        if par.distributed:
            path = save_distributed_checkpoint(ckpt_root, step=step_count, model_state=runtime.model_state(),
                                               runtime_state=runtime.state_dict(), meta=meta, comm=par.comm,
                                               zero_stage=par.zero_stage, keep_last=cfg.keep_last)
        else:
            path = save_checkpoint(ckpt_root, step=step_count, model=model, runtime_state=runtime.state_dict(),
                                   meta=meta, keep_last=cfg.keep_last)
        progress["checkpoint"] = str(path)
        return path

    def run_eval(step_count: int) -> float:
        loss = evaluate(model, data.eval, data.eval_labels, cfg.micro_batch_size, device,
                        par if par.distributed else None, fused=cfg.fused_loss, progress=step_count == 0)
        if main:
            log.write({"kind": "eval", "step": step_count, "eval_loss": loss, "perplexity": math.exp(min(loss, 50))})
        return loss

    start_step = runtime.global_step
    last_eval = None
    interrupted = None
    streak = SkipStreak(cfg.max_skipped_steps, cfg.lr)
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="training", unit="step", dynamic_ncols=True,
               disable=None if main else True)
    if cfg.eval_every and start_step == 0:
        with phase(f"evaluating the held-out loss before training ({data.eval.shape[0]} sequences)",
                   short="first evaluation"):
            first_eval = run_eval(0)
        if main:
            bar.write(f"step 0: eval loss {first_eval:.4f} (perplexity {math.exp(min(first_eval, 50)):.2f})")
    setup_seconds = time.perf_counter() - run_started
    if main and start_step == 0 < cfg.max_steps:   # a resumed run has its projectors from the checkpoint
        bar.write("[setup] first step: it also computes the first projectors (a randomized SVD per weight "
                  "matrix), so it takes longer than the rest")
    with StopFlag() as stop:
        for step in range(start_step, cfg.max_steps):
            progress["step"] = step
            started = time.perf_counter()
            for _ in range(cfg.grad_accum_steps):
                index = par.my_rows(sampler.next_batch())
                ids, labels = data.train[index].to(device), data.train_labels[index].to(device)
                with runtime.micro_batch():
                    runtime.backward(model_loss(model, ids, labels, cfg.fused_loss) / cfg.grad_accum_steps)
            stats = runtime.step()
            seconds = time.perf_counter() - started
            loss = stats["loss"] * cfg.grad_accum_steps if stats["loss"] is not None else float("nan")
            record = {"kind": "train", "step": step + 1, "loss": loss, "lr": stats["lr"],
                      "grad_norm": stats["grad_norm"], "skipped": stats["skipped"], "seconds": seconds,
                      "tokens_per_s": tokens_per_step / seconds, "peak_memory_bytes": stats["peak_memory_bytes"],
                      "refreshed": len(stats["refreshed"])}
            if stats.get("comm_bytes") is not None:
                record["comm_bytes"] = stats["comm_bytes"]
            if stats.get("compile_s"):  # first steps: torch.compile of the INT8 kernels (or a load from its cache)
                record["compile_s"] = stats["compile_s"]
                if main:
                    bar.write(f"step {step + 1}: compiled the INT8 kernels in {stats['compile_s']:.1f} s (included "
                              "in this step's time; cached on disk for later runs; optim.compile=false or "
                              "LOWMEM_COMPILE=0 skips it)")
            if main and ((step + 1) % cfg.log_every == 0 or stats["skipped"]):
                log.write(record)
            if main and stats["refreshed"]:
                log.write({"kind": "refresh", "step": step + 1, "layers": list(stats["refreshed"])})
            bar.update(1)
            if main and bar.disable and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps):
                # No terminal (a log file, CI): one line per logged step instead of a bar.
                print(f"step {step + 1}/{cfg.max_steps} loss {loss:.4f} lr {stats['lr']:.2e} "
                      f"grad_norm {stats['grad_norm']:.3f} {record['tokens_per_s']:.0f} tok/s "
                      f"{mem_kind} {stats['peak_memory_bytes'] / GIB:.2f} GiB", flush=True)
            memory_key = "rss" if device.type == "cpu" else "cuda_peak"
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", lr=f"{stats['lr']:.2e}",
                            gnorm=f"{stats['grad_norm']:.2f}",
                            **{memory_key: f"{stats['peak_memory_bytes'] / GIB:.2f}G"})
            if step == start_step == 0 and main:
                bar.write(f"[setup] first step: {format_seconds(seconds)}")
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                last_eval = run_eval(step + 1)
                if main:
                    bar.write(f"step {step + 1}: eval loss {last_eval:.4f} "
                              f"(perplexity {math.exp(min(last_eval, 50)):.2f})")
            if streak.update(stats, step + 1):
                break   # diverged: handled after the loop
            # No checkpoint while steps are being skipped: it could replace a good one with a diverging state.
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.max_steps and not streak.count:
                save(step + 1)
            # Every rank must stop after the same step (a signal reaches the ranks at different moments).
            if par.any(stop.signal_name is not None):
                interrupted = stop.signal_name or "SIGTERM"
                break
    bar.close()
    progress["step"] = None
    if streak.diverged:
        if main:
            log.close()
        streak.stop(par, ckpt_root)   # no final save; raises RunDirError
    steps_done = runtime.global_step
    final_ckpt = save(steps_done)
    if interrupted:
        if main:
            log.close()
        say(f"{interrupted}: saved checkpoint {final_ckpt} at step {steps_done}; run the same command again to "
            "resume", flush=True)
        return {"interrupted": interrupted, "checkpoint": str(final_ckpt), "step": steps_done}
    if last_eval is None or cfg.max_steps % max(cfg.eval_every, 1):
        last_eval = run_eval(steps_done)
    export_dir = runtime.export(out / "model", tokenizer=tokenizer) if cfg.export else None
    gguf_file = (runtime.export(out / "model.gguf", tokenizer=tokenizer, format="gguf", gguf_type=cfg.export_gguf)
                 if cfg.export_gguf else None)
    if main and export_dir is not None:
        write_card(export_dir, cfg, steps=steps_done, eval_loss=last_eval,
                   extra={"tokens per step": tokens_per_step, "sequence length": cfg.seq_len})
    if not main:
        return {"export": None, "checkpoint": str(final_ckpt), "eval_loss": last_eval, "step": steps_done,
                "report": None, "main": False}
    log.close()
    records = read_log(out / "train_log.jsonl")
    measured_peak = max((r.get("peak_memory_bytes") or 0 for r in records if r.get("kind") == "train"), default=0)
    total_seconds = time.perf_counter() - run_started
    predicted = verdict.predicted_peak_bytes
    summary = {"model": loaded.source, "steps": steps_done, "tokens per step": tokens_per_step,
               "run time": f"{format_seconds(total_seconds)} (set-up {format_seconds(setup_seconds)}: "
                           + ", ".join(f"{name} {format_seconds(sec)}" for name, sec in phase.durations) + ")",
               "peak memory": f"{format_gib(measured_peak)} {mem_kind} (measured)"
                              + (f"; {predicted_peaks(predicted, verdict.load_peak_bytes, verdict.step_peak_bytes)}"
                                 if predicted else ""),
               "final eval loss": f"{last_eval:.4f}", "final perplexity": f"{math.exp(min(last_eval, 50)):.2f}",
               "skipped steps": runtime.skipped_steps, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
               "processes": f"{par.world_size} (ZeRO stage {par.zero_stage})" if par.distributed else "1",
               "checkpoint": str(final_ckpt), "exported model": str(export_dir) if export_dir else "not exported",
               **({"GGUF": f"{gguf_file} ({cfg.export_gguf})"} if gguf_file else {}),
               "memory plan": fit_line or verdict.detail,
               "data": f"{data.stats.get('files', '?')} files, {data.train.shape[0]} train / "
                       f"{data.eval.shape[0]} eval sequences of {cfg.seq_len} tokens"}
    report = write_report(out, config_yaml=config_yaml, records=records, summary=summary,
                          predicted_peak_bytes=predicted, memory_kind=mem_kind,
                          predicted_load_bytes=verdict.load_peak_bytes)
    return {"report": str(report), "export": str(export_dir) if export_dir else None,
            "gguf": str(gguf_file) if gguf_file else None, "checkpoint": str(final_ckpt),
            "eval_loss": last_eval, "step": steps_done}


def write_card(export_dir: Path, cfg: TrainConfig, *, steps: int, eval_loss: float | None, extra: dict) -> Path:
    """README.md model card next to the exported weights (lowmem.checkpoint.model_card): a Hub-ready directory."""
    from launch.models import EMBEDDED_HUB_ID, EMBEDDED_MODEL
    from lowmem.checkpoint.model_card import write_model_card
    base = EMBEDDED_HUB_ID if cfg.model == EMBEDDED_MODEL else cfg.model
    data = cfg.data.path if cfg.data.path is not None else "the Python documentation (python3-doc), lowmem's default"
    return write_model_card(export_dir, base_model=base, datasets=[data], steps=steps, method=cfg.lowmem_config(),
                            eval_loss=eval_loss, extra=extra)


def check_gguf_exportable(model_config) -> None:
    """Refuse export_gguf for an architecture GGUF export does not write, before any training."""
    from lowmem.checkpoint.gguf_export import gguf_architecture
    try:
        gguf_architecture(model_config)
    except ValueError as err:
        raise UsageError(f"export_gguf: {err}; or set export_gguf: null") from None


def export_checkpoint(checkpoint: str, out_dir: str, *, format: str = "hf", gguf_type: str = "q8_0") -> Path:
    """`launch.finetune export CHECKPOINT OUT [--format gguf]`: rebuild the run's model, load the checkpoint, write
    a bf16 Hugging Face directory with its model card, or one GGUF file (OUT itself when it ends in .gguf, else
    OUT/model.gguf) of gguf_type q8_0, bf16 or f16."""
    from hooks.runtime import prepare
    from launch.models import load_int8_model, load_model_config
    from lowmem.checkpoint.distributed import load_any_checkpoint

    path = Path(checkpoint)
    if not path.exists():
        raise UsageError(f"checkpoint {path} does not exist; checkpoints live in <output_dir>/checkpoints/step-N")
    model_state, runtime_state, meta = load_any_checkpoint(path)   # verifies every file's sha256 first
    cfg = config_from_dict(meta["meta"]["config"])
    if format == "gguf":
        check_gguf_exportable(load_model_config(cfg.model))
    # The checkpoint supplies every tensor: the model is built empty (no base weight is read) and filled from it.
    loaded = load_int8_model(cfg.model, cfg.lowmem_config(), dtype=torch.float32, device=torch.device("cpu"),
                             tokenizer=cfg.tokenizer, seed=cfg.seed, empty=True)
    runtime = prepare(loaded.model, cfg.lowmem_config())
    runtime.load_model_state(model_state)
    if format == "gguf":
        return runtime.export(out_dir, tokenizer=loaded.tokenizer, format="gguf", gguf_type=gguf_type)
    exported = runtime.export(out_dir, tokenizer=loaded.tokenizer)
    write_card(exported, cfg, steps=runtime_state["lowmem"]["global_step"], eval_loss=None,
               extra={"exported from": str(path)})
    return exported


def config_from_dict(config: dict) -> TrainConfig:
    """The TrainConfig a checkpoint recorded (through YAML, so it is validated like a config file)."""
    import tempfile

    import yaml
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(config, f)
    try:
        return load_train_config(f.name)
    finally:
        os.unlink(f.name)


# ---- command line ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launch.finetune", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python -m launch.finetune\n"
               "  python -m launch.finetune launch/configs/demo.yaml max_steps=60 optim.rank=32\n"
               "  python -m launch.finetune model=/path/to/hf-model data.path=train.jsonl output_dir=runs/a\n"
               "  python -m launch.finetune export outputs/finetune/checkpoints/step-00000030 out/model")
    parser.add_argument("args", nargs="*", help="[CONFIG.yaml] key=value ...   or   export CHECKPOINT OUT_DIR")
    parser.add_argument("--format", choices=("hf", "gguf"), default="hf",
                        help="export: 'hf' (bf16 Hugging Face directory, the default) or 'gguf' (one file, OUT itself "
                             "when it ends in .gguf, else OUT/model.gguf)")
    parser.add_argument("--gguf-type", choices=("q8_0", "bf16", "f16"), default="q8_0",
                        help="export --format gguf: tensor type of the matrices (default q8_0, from the INT8 weights)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    parser.add_argument("--help-config", action="store_true", help="list every configuration key and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.help_config:
            print(config_help())
            return 0
        if args.args[:1] == ["export"]:
            if len(args.args) != 3:
                raise UsageError("usage: python -m launch.finetune export CHECKPOINT_DIR OUT_DIR "
                                 "[--format gguf [--gguf-type q8_0|bf16|f16]]")
            try:
                out = export_checkpoint(args.args[1], args.args[2], format=args.format, gguf_type=args.gguf_type)
            except (PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError, ValueError) as err:
                # an unwritable or occupied OUT, a model the format cannot hold
                print(f"error: export to {args.args[2]} failed: {err}", file=sys.stderr)
                return EXIT_ERROR
            print(f"exported {args.gguf_type} GGUF to {out}" if args.format == "gguf"
                  else f"exported bf16 Hugging Face model to {out}")
            return 0
        if args.format != "hf" or args.gguf_type != "q8_0":
            raise UsageError("--format and --gguf-type belong to the export subcommand; for a run use "
                             "export_gguf=q8_0|bf16|f16")
        config_path = None
        overrides = list(args.args)
        if overrides and "=" not in overrides[0]:
            config_path = overrides.pop(0)
        notes: list[str] = []
        cfg = load_train_config(config_path, overrides, notes=notes)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        if args.print_config:
            print(config_to_yaml(cfg), end="")
            return 0
        result = train(cfg)
    except (UsageError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as err:  # noqa: BLE001 - known failure kinds get one paragraph, not a traceback
        from launch.data import DataError
        from launch.models import ModelNotFoundError
        from launch.run_dir import RunDirError
        from lowmem.checkpoint.hf_files import WeightFileError
        from lowmem.checkpoint.store import CheckpointError
        from lowmem.model.loader import LoadError
        if isinstance(err, (DataError, ModelNotFoundError, CheckpointError, RunDirError, LoadError,
                            WeightFileError)):
            print(f"error: {err}", file=sys.stderr)
            return EXIT_ERROR
        raise
    if result.get("interrupted"):
        return EXIT_INTERRUPTED
    if not result.get("main", True):
        return 0   # other ranks of a data-parallel run: rank 0 prints the summary
    print(f"\ndone: {result['step']} steps, final eval loss {result['eval_loss']:.4f}")
    print(f"report:         {result['report']}")
    if result["export"]:
        print(f"exported model: {result['export']}  (AutoModelForCausalLM.from_pretrained loads it)")
    if result.get("gguf"):
        print(f"GGUF:           {result['gguf']}  (llama-cli -m; Ollama: FROM {result['gguf']})")
    print(f"checkpoint:     {result['checkpoint']}")
    print("your own model and data: python -m launch.finetune model=/path/to/hf-model data.path=train.jsonl "
          "output_dir=runs/mine   (see launch/configs/ for 7B/8B/13B examples)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
