"""Run methods on one workload and measure them the same way (the measurement half of `python -m benchmarks.compare`).

Per method: a fresh model from `workload.make_model()` (same initial weights), the same micro-batches in the same
order, `settings.steps` optimizer steps, evaluations at a few points. Measured:
- step time: wall seconds of each `train_step` (forward, backward, update, projector refreshes; CUDA synchronized),
  evaluation excluded. Ratios use the mean over all steps, so refresh steps count as they do end to end.
- refresh time and SVD-equivalents from the Trainer (its CallTimer), refresh count where the Trainer has one.
- peak memory: on CUDA torch.cuda.max_memory_allocated over the training steps of the timed run (the model, optimizer
  state, gradients, activations). On CPU one extra, untimed step after training and the final evaluation (step
  `steps`, then the model is discarded) runs under lowmem.memory.live_bytes.LiveTensorBytes, which slows every op and so
  never runs during timed steps: the bytes of every tensor alive when the step starts (a census of the garbage
  collector's tensors, minus those that existed before the method's model was made: workload data, templates)
  plus the peak of the tensors the step allocates.
A method that is unavailable is reported with the reason; one that raises is reported with the error line (and the
traceback logged); neither stops the comparison.
"""
from __future__ import annotations

import dataclasses
import gc
import math
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from benchmarks.compare.api import Batch, MethodSettings, MethodSpec, Workload
from benchmarks.compare.methods import resolved_config, unavailable_reason
from lowmem.memory.live_bytes import LiveTensorBytes, charged_bytes

if TYPE_CHECKING:   # the ledger reads MethodResult from this module
    from benchmarks.compare.ledger import RunStore

BASELINE_FP32 = "adamw-fp32"
BASELINE_BF16 = "adamw-bf16"


@dataclass
class MethodResult:
    """Everything measured for one method on one workload (plain data; `to_dict()` for JSON)."""
    name: str
    group: str
    family: str
    description: str
    status: str = "ok"   # "ok" | "not installed (...)" | "needs a GPU" | "failed: ..." | "diverged ..."
    lr: float | None = None
    tokens_per_step: int = 0
    train_losses: list[float] = field(default_factory=list)       # per optimizer step
    step_seconds: list[float] = field(default_factory=list)       # per optimizer step
    eval_points: list[tuple[int, dict]] = field(default_factory=list)   # (optimizer steps done, evaluate() output)
    refresh_seconds: float | None = None
    svd_equivalents: float | None = None
    refresh_count: int | None = None
    peak_bytes: int | None = None
    memory_note: str = ""
    ratio_fp32: float | None = None       # mean step time / adamw-fp32's, same run
    ratio_bf16: float | None = None       # mean step time / adamw-bf16's, same run
    # a learning-rate sweep (run_comparison's lr_factors): (lr, final eval loss or None, status) per value tried,
    # in the order run; this result is the run the sweep chose
    lr_sweep: list[tuple[float, float | None, str]] = field(default_factory=list)
    finished_at: str = ""   # UTC time the run ended (ISO 8601, seconds): which process timed it, when reused

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def train_seconds(self) -> float:
        return float(sum(self.step_seconds))

    @property
    def mean_step_seconds(self) -> float | None:
        return self.train_seconds / len(self.step_seconds) if self.step_seconds else None

    @property
    def tokens_per_second(self) -> float | None:
        seconds = self.train_seconds
        return self.tokens_per_step * len(self.step_seconds) / seconds if seconds > 0 else None

    @property
    def refresh_share(self) -> float | None:
        """Projector refresh seconds / total train seconds."""
        if self.refresh_seconds is None or self.train_seconds <= 0:
            return None
        return self.refresh_seconds / self.train_seconds

    @property
    def final_eval(self) -> dict:
        """The last evaluation, if it was taken after training ran (not just the shared step-0 point)."""
        if self.eval_points and self.eval_points[-1][0] > 0:
            return self.eval_points[-1][1]
        return {}

    def metric(self, key: str) -> float | None:
        value = self.final_eval.get(key)
        return None if value is None else float(value)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(train_seconds=self.train_seconds, mean_step_seconds=self.mean_step_seconds,
                   tokens_per_second=self.tokens_per_second, refresh_share=self.refresh_share)
        return out


def eval_steps(steps: int, points: int) -> list[int]:
    """`points` evaluation steps spread evenly over the run, the last one at `steps` (e.g. 60, 3 -> [20, 40, 60])."""
    if steps < 1 or points < 1:
        raise ValueError(f"steps and eval points must be >= 1, got steps={steps}, points={points}")
    return sorted({max(1, round(steps * i / points)) for i in range(1, points + 1)})


def settings_for(spec: MethodSpec, workload: Workload, base: MethodSettings,
                 lr_factor: float = 1.0) -> MethodSettings:
    """`base` with the learning rate of the method's family on this workload, times lr_factor (a sweep's value)."""
    return dataclasses.replace(base, lr=float(workload.lr_for(spec.family)) * lr_factor)


def to_device(batches: list[Batch], device: torch.device) -> list[Batch]:
    return [{k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()} for batch in batches]


def evaluate(workload: Workload, model: torch.nn.Module) -> dict:
    """workload.evaluate in eval mode without autograd; values as floats."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = workload.evaluate(model)
    finally:
        model.train(was_training)
    return {key: float(value) for key, value in out.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fresh_model(workload: Workload, settings: MethodSettings) -> torch.nn.Module:
    torch.manual_seed(settings.seed)
    return workload.make_model().to(device=settings.device, dtype=settings.dtype)


def live_storage_bytes() -> dict[int, int]:
    """{storage id: bytes} of every storage behind a tensor the garbage collector can see (all tensors held from
    Python: parameters, optimizer state, caches). Wrapper subclasses are skipped: their inner tensors are listed."""
    found: dict[int, int] = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), Tensor) and not is_traceable_wrapper_subclass(obj) and obj.layout == torch.strided:
            try:
                storage = obj.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            found[storage._cdata] = charged_bytes(storage)
    return found


def measure_step_peak_bytes(trainer, batches: list[Batch], foreign: set[int]) -> int:
    """Peak bytes of one train step: tensors alive at its start (not in `foreign`) + the step's own peak."""
    gc.collect()
    alive = sum(size for key, size in live_storage_bytes().items() if key not in foreign)
    meter = LiveTensorBytes()
    with meter:
        trainer.train_step(batches)
    return alive + meter.peak_bytes


def _train(spec: MethodSpec, workload: Workload, settings: MethodSettings, result: MethodResult,
           eval_at: list[int], measure_memory: bool, log: Callable[[str], None],
           on_step: Callable[[int], None] | None = None) -> None:
    """The timed run: fills train_losses, step_seconds, eval_points, refresh figures and peak_bytes."""
    device = settings.device
    gc.collect()
    foreign = set(live_storage_bytes()) if measure_memory and device.type != "cuda" else set()
    trainer = spec.build(_fresh_model(workload, settings), settings)
    try:
        torch.manual_seed(settings.seed)
        cuda_peak = 0
        for step in range(settings.steps):
            batches = to_device(workload.train_batches(step), device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            start = time.perf_counter()
            loss = trainer.train_step(batches)
            _sync(device)
            result.step_seconds.append(time.perf_counter() - start)
            result.train_losses.append(float(loss))
            if device.type == "cuda":
                cuda_peak = max(cuda_peak, torch.cuda.max_memory_allocated(device))
            if not math.isfinite(loss):
                result.status = f"diverged (train loss {loss} at step {step})"
                break
            if step + 1 in eval_at:
                result.eval_points.append((step + 1, evaluate(workload, trainer.eval_model())))
            if on_step is not None:
                on_step(step + 1)
        result.refresh_seconds = trainer.refresh_seconds()
        result.svd_equivalents = trainer.svd_equivalents()
        count = getattr(trainer, "refresh_count", None)
        result.refresh_count = count() if callable(count) else None
        if not measure_memory or not result.ok:
            return
        if device.type == "cuda":
            result.peak_bytes = int(cuda_peak)
            result.memory_note = "torch.cuda.max_memory_allocated over the training steps"
            return
        if spec.no_cpu_memory:
            result.memory_note = f"not measured: {spec.no_cpu_memory}"
            return
        try:
            batches = to_device(workload.train_batches(settings.steps), device)
            result.peak_bytes = measure_step_peak_bytes(trainer, batches, foreign)
            result.memory_note = (f"live tensors at the start of an extra step {settings.steps} after training + "
                                  "that step's LiveTensorBytes peak")
        except Exception as err:   # the timed results stand; only the memory figure is missing
            line = (str(err).strip().splitlines() or [""])[0]
            result.memory_note = f"not measured: {type(err).__name__}: {line}"[:300]
            log(f"{spec.name}: memory step raised\n{traceback.format_exc()}")
    finally:
        trainer.close()


def _new_result(spec: MethodSpec, workload: Workload) -> MethodResult:
    return MethodResult(spec.name, spec.group, spec.family, spec.description,
                        tokens_per_step=int(workload.tokens_per_step))


def run_method(spec: MethodSpec, workload: Workload, base: MethodSettings, *, eval_at: list[int],
               initial_eval: dict | None = None, measure_memory: bool = True,
               log: Callable[[str], None] = print, on_step: Callable[[int], None] | None = None,
               lr_factor: float = 1.0) -> MethodResult:
    """Train and measure one method at its family's learning rate times lr_factor; never raises for a method's own
    failure (see MethodResult.status). `on_step(steps_done)` is called after every optimizer step (progress bars)."""
    result = _new_result(spec, workload)
    reason = unavailable_reason(spec, base.device)
    if reason is not None:
        result.status = reason
        return result
    if initial_eval is not None:
        result.eval_points.append((0, dict(initial_eval)))
    try:
        settings = settings_for(spec, workload, base, lr_factor)
        result.lr = settings.lr
        _train(spec, workload, settings, result, eval_at, measure_memory, log, on_step)
    except Exception as err:   # one method's failure must not end the comparison
        line = (str(err).strip().splitlines() or [""])[0]
        result.status = f"failed: {type(err).__name__}: {line}"[:300]
        log(f"{spec.name}: raised\n{traceback.format_exc()}")
    finally:
        gc.collect()
        if base.device.type == "cuda":
            torch.cuda.empty_cache()
    result.finished_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return result


PENDING = "pending: not run yet"   # a --report-only row whose run is not in the store


def run_or_reuse(spec: MethodSpec, workload: Workload, base: MethodSettings, *, lr_factor: float,
                 store: "RunStore | None", report_only: bool = False, **kwargs) -> MethodResult:
    """`run_method`, unless `store` holds a finished run of `spec` at `lr_factor` with these settings (then that
    run, logged as reused); a new run is stored if it is worth keeping (`RunStore.save`). report_only: never run;
    a run that is not stored comes back with status PENDING (and its learning rate, when the method can run here)."""
    if store is None:
        return run_method(spec, workload, base, lr_factor=lr_factor, **kwargs)
    settings = settings_for(spec, workload, base, lr_factor)
    config = resolved_config(spec, settings)
    stored = store.load(spec.name, lr_factor, config)
    if stored is not None:
        kwargs.get("log", print)(f"  {spec.name} lr x{lr_factor:.3g}: reused the run finished "
                                 f"{stored.finished_at or '(time not kept)'} ({store.path(spec.name, lr_factor)})")
        return stored
    if report_only:
        result = _new_result(spec, workload)
        reason = unavailable_reason(spec, base.device)
        result.status = reason or PENDING
        result.lr = None if reason else settings.lr
        return result
    result = run_method(spec, workload, base, lr_factor=lr_factor, **kwargs)
    store.save(spec.name, lr_factor, result, config)
    return result


def attach_ratios(results: list[MethodResult]) -> None:
    """Step-time ratios to adamw-fp32 and adamw-bf16 of the same run (None where a baseline has no timing)."""
    means = {r.name: r.mean_step_seconds for r in results if r.mean_step_seconds}
    for r in results:
        mean = r.mean_step_seconds
        r.ratio_fp32 = mean / means[BASELINE_FP32] if mean and BASELINE_FP32 in means else None
        r.ratio_bf16 = mean / means[BASELINE_BF16] if mean and BASELINE_BF16 in means else None


def _warm_up(device: torch.device) -> None:
    """The first SVD / QR / matmul of a process pays library start-up (seconds on CPU); pay it before any timing."""
    matrix = torch.randn(96, 64, generator=torch.Generator().manual_seed(0)).to(device)
    torch.linalg.svd(matrix, full_matrices=False)
    torch.linalg.qr(matrix)
    torch.linalg.eigh(matrix.T @ matrix)
    _sync(device)


def choose_from_sweep(runs: list[MethodResult]) -> MethodResult:
    """The run of a learning-rate sweep with the lowest final eval loss among those that finished ("ok" with a
    finite loss); if none did, the first run (its status says why). Ties go to the earlier run."""
    finished = [r for r in runs if r.ok and r.metric("eval_loss") is not None
                and math.isfinite(r.metric("eval_loss"))]
    return min(finished, key=lambda r: r.metric("eval_loss")) if finished else runs[0]


def _sweep(spec: MethodSpec, workload: Workload, base: MethodSettings, lr_factors: tuple[float, ...], *,
           eval_at: list[int], initial_eval: dict, measure_memory: bool,
           log: Callable[[str], None], store: "RunStore | None" = None, report_only: bool = False) -> MethodResult:
    """Run `spec` once per factor of its family's learning rate; the chosen run, carrying the whole sweep."""
    runs = []
    for factor in lr_factors:
        run = run_or_reuse(spec, workload, base, eval_at=eval_at, initial_eval=initial_eval,
                           measure_memory=measure_memory, log=log, lr_factor=factor, store=store,
                           report_only=report_only)
        runs.append(run)
        if not run.step_seconds and run.status != PENDING:
            break   # unavailable, or failed before a step: every other value would fail alike
        loss = run.metric("eval_loss")
        log(f"  {spec.name} lr {run.lr:.3g}: {run.status}" + (f", eval loss {loss:.4f}" if loss is not None else ""))
    chosen = choose_from_sweep(runs)
    # a method that could not run here (not installed, needs a GPU) has no learning rate: nothing was swept
    chosen.lr_sweep = [(r.lr, r.metric("eval_loss"), r.status) for r in runs if r.lr is not None]
    return chosen


def run_comparison(specs: list[MethodSpec], workload: Workload, base: MethodSettings, *, eval_points: int = 3,
                   measure_memory: bool = True, log: Callable[[str], None] = print,
                   lr_factors: tuple[float, ...] | None = None,
                   store: "RunStore | None" = None, report_only: bool = False) -> list[MethodResult]:
    """Run every spec on `workload` in order; results in the same order, with ratios attached.

    store: finished runs to reuse and to keep (`benchmarks.compare.ledger.RunStore`), so an interrupted
    comparison continues; reused runs were timed by the process that ran them. report_only (with a store): run
    nothing; the stored runs, and PENDING rows for the others.

    lr_factors: a learning-rate sweep. Each method runs once per factor of its family's learning rate, and its row
    is the run with the lowest final eval loss (`choose_from_sweep`); MethodResult.lr_sweep records every value
    tried. The choice uses the same held-out set the report shows, so every method's figure is the best of its
    own few tries: fair between methods, optimistic for all of them."""
    eval_at = eval_steps(base.steps, eval_points)
    initial_eval = None
    if not report_only:
        _warm_up(base.device)
        initial_eval = evaluate(workload, _fresh_model(workload, base))
        log(f"initial eval: {initial_eval}")
    results = []
    for index, spec in enumerate(specs, 1):
        start = time.perf_counter()
        if lr_factors:
            result = _sweep(spec, workload, base, tuple(lr_factors), eval_at=eval_at, initial_eval=initial_eval,
                            measure_memory=measure_memory, log=log, store=store, report_only=report_only)
        else:
            result = run_or_reuse(spec, workload, base, eval_at=eval_at, initial_eval=initial_eval,
                                  measure_memory=measure_memory, log=log, lr_factor=1.0, store=store,
                                  report_only=report_only)
        results.append(result)
        summary = result.status
        if result.step_seconds:
            loss = result.metric("eval_loss")
            summary += (f"; eval loss {loss:.4f}" if loss is not None else "") + \
                f"; {result.mean_step_seconds:.3f} s/step"
        log(f"[{index}/{len(specs)}] {spec.name}: {summary} ({time.perf_counter() - start:.1f} s)")
    attach_ratios(results)
    return results
