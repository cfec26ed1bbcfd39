"""One rank of the data-parallel runtime test: `torchrun --nproc_per_node 2 runtime_worker.py OUT_DIR STAGES`.

For each ZeRO stage it trains the shared tiny model (tiny_run.py) for STEPS steps on its half of every global batch
and writes, from every rank, OUT_DIR/stage{K}-rank{R}.json (losses, bytes moved, state and weight bytes) and, from
rank 0, OUT_DIR/stage{K}-weights.safetensors (the whole model's dequantised weights after training).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_run import (GLOBAL_BATCH, SCENARIOS, STEPS, ZERO3_SCENARIOS, batch_for_step, lowmem_config,  # noqa: E402
                      make_model, weights_of)


def main() -> None:
    out = Path(sys.argv[1])
    from hooks.runtime import prepare
    from lowmem.distributed import DataParallel, init_distributed, shutdown
    # A collective waits this long for the other rank (which may still be importing torch on a busy machine).
    comm = init_distributed(device=torch.device("cpu"), timeout_s=600)
    rank, world = comm.rank, comm.world_size
    rows = GLOBAL_BATCH // world
    # "0".."3": ZeRO stages with lowmem_config(); the names in tiny_run.SCENARIOS: that change of it ("bytes" at
    # ZeRO 1, the others at ZeRO 2); the names in tiny_run.ZERO3_SCENARIOS: that change at ZeRO 3
    scenarios = sys.argv[2].split(",")
    for stage in scenarios:
        model = make_model()
        if stage in ZERO3_SCENARIOS:
            changes = dict(ZERO3_SCENARIOS[stage])
            if changes.pop("gradient_checkpointing", False):
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            zero_stage, cfg = 3, lowmem_config().replace(**changes)
        elif stage in SCENARIOS:
            zero_stage, cfg = (1 if stage == "bytes" else 2), lowmem_config().replace(**SCENARIOS[stage])
        else:
            zero_stage, cfg = int(stage), lowmem_config()
        dp = DataParallel(comm, zero_stage, debug=stage != "bytes")
        runtime = prepare(model, cfg, data_parallel=dp)
        accum = cfg.grad_accum_steps
        record = {"losses": [], "comm_bytes": [], "wire_bytes": [], "refreshed": [], "grad_norms": []}
        for step in range(STEPS):
            if runtime.partition is not None:
                counts_before = (runtime.partition.gathers, runtime.partition.prefetch_discards)
            wire_before = comm.wire_bytes
            kinds_before = dict(comm.bytes_by_kind)
            for k in range(accum):
                ids = batch_for_step(step * accum + k)[rank * rows:(rank + 1) * rows]
                with runtime.micro_batch():
                    loss = model(input_ids=ids, labels=ids).loss / accum
                    if stage == "nan_loss" and step == 2 and rank == 1:
                        loss = loss * float("nan")      # one rank's loss only: both must skip together
                    runtime.backward(loss)
            stats = runtime.step()
            record["losses"].append(stats["loss"])
            record["grad_norms"].append(stats["grad_norm"])
            record["comm_bytes"].append(stats["comm_bytes"])
            record["wire_bytes"].append(comm.wire_bytes - wire_before)
            record["refreshed"].append(len(stats["refreshed"]))
            record.setdefault("skipped", []).append(stats["skipped"])
            if runtime.partition is not None:
                record.setdefault("gathers_per_micro_batch", []).append(
                    (runtime.partition.gathers - counts_before[0]) / accum)
                record.setdefault("prefetch_discards", []).append(
                    runtime.partition.prefetch_discards - counts_before[1])
            record.setdefault("bytes_by_kind", []).append(
                {k: v - kinds_before.get(k, 0) for k, v in comm.bytes_by_kind.items()})
        record["state_bytes"] = sum(t.numel() * t.element_size() for st in runtime.states.values()
                                    for t in st.values())
        record["weight_bytes"] = sum(item.module.weight_q.numel() + 4 * item.module.weight_scales.numel()
                                     for item in runtime.trainables if item.kind == "lowrank_int8")
        record["owned"] = sorted(i for i in dp.owners if dp.owns(i)) if dp.partitioned else None
        if runtime.partition is not None:
            record["prefetch_hits"] = runtime.partition.prefetch_hits
            record["gathers"] = runtime.partition.gathers
        runtime.detach()   # ZeRO 3: gathers every weight onto every rank
        if rank == 0:
            save_file(weights_of(model), str(out / f"stage{stage}-weights.safetensors"))
        (out / f"stage{stage}-rank{rank}.json").write_text(json.dumps(record))
        comm.barrier()
    shutdown(comm, clean=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
