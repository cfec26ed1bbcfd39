"""Memory planner (DESIGN §5): predict a run's peak from the model config, measure it, and decide whether it fits.

    b = estimate(LlamaConfig(...), method="lowmem", seq_len=256, micro_batch_size=1, gradient_checkpointing=False)
    print(format_breakdown(b))
    load = estimate_load(LlamaConfig(...), LowMemConfig(), dtype=torch.bfloat16, device_type="cuda")
    print(format_load_breakdown(load))          # the load phase: streamed checkpoint + prepare, device and host
    peak_bytes = measure(lambda: train_step(), device=torch.device("cpu"), baseline_tensors=(t for t in state))
    verdict = preflight(cfg, model_config, torch.device("cuda"))   # launch.preflight.check calls this

Modules: `cost_model` (estimate: bytes per component of a training step from the model's shapes), `load_cost`
(estimate_load: the load phase, streamed checkpoint + prepare), `live_bytes` (measure: the CUDA allocator's peak,
or on CPU a live-tensor-bytes counter; `tensor_sources` makes it see tensors read from files), `fit`
(format_breakdown, preflight on the larger of load and step, the GPU table).
"""
from lowmem.memory.cost_model import COMPONENTS, GIB, METHODS, MemoryBreakdown, ModelShape, estimate
from lowmem.memory.fit import GPUS, FitPlan, Preflight, auto_fit, format_breakdown, preflight
from lowmem.memory.live_bytes import measure
from lowmem.memory.load_cost import LOAD_COMPONENTS, LoadBreakdown, estimate_load, format_load_breakdown

__all__ = ["COMPONENTS", "GIB", "GPUS", "LOAD_COMPONENTS", "METHODS", "FitPlan", "LoadBreakdown", "MemoryBreakdown",
           "ModelShape", "Preflight", "auto_fit", "estimate", "estimate_load", "format_breakdown",
           "format_load_breakdown", "measure", "preflight"]
