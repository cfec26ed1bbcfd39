"""Memory planner (DESIGN §5): predict a run's peak from the model config, measure it, and decide whether it fits.

    b = estimate(LlamaConfig(...), method="lowmem", seq_len=256, micro_batch_size=1, gradient_checkpointing=False)
    print(format_breakdown(b))
    peak_bytes = measure(lambda: train_step(), device=torch.device("cpu"), baseline_tensors=(t for t in state))
    verdict = preflight(cfg, model_config, torch.device("cuda"))   # launch.preflight.check calls this

Modules: `cost_model` (estimate: bytes per component from the model's shapes), `live_bytes` (measure: the CUDA
allocator's peak, or on CPU a live-tensor-bytes counter), `fit` (format_breakdown, preflight, the GPU table).
"""
from lowmem.memory.cost_model import COMPONENTS, GIB, METHODS, MemoryBreakdown, ModelShape, estimate
from lowmem.memory.fit import GPUS, FitPlan, Preflight, auto_fit, format_breakdown, preflight
from lowmem.memory.live_bytes import measure

__all__ = ["COMPONENTS", "GIB", "GPUS", "METHODS", "FitPlan", "MemoryBreakdown", "ModelShape", "Preflight",
           "auto_fit", "estimate", "format_breakdown", "measure", "preflight"]
