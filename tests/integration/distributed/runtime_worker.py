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
from tiny_run import GLOBAL_BATCH, STEPS, batch_for_step, lowmem_config, make_model, weights_of  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    scenarios = sys.argv[2].split(",")   # "0".."3": ZeRO stages; "bytes": ZeRO 1 without refreshes after step 0
    from hooks.runtime import prepare
    from lowmem.distributed import DataParallel, init_distributed, shutdown
    comm = init_distributed(device=torch.device("cpu"), timeout_s=120)
    rank, world = comm.rank, comm.world_size
    rows = GLOBAL_BATCH // world
    for stage in scenarios:
        model = make_model()
        dp = DataParallel(comm, 1 if stage == "bytes" else int(stage), debug=stage != "bytes")
        cfg = lowmem_config()
        if stage == "bytes":
            cfg = cfg.replace(refresh_interval_steps=1000, residual_warmup_steps=1000)
        runtime = prepare(model, cfg, data_parallel=dp)
        record = {"losses": [], "comm_bytes": [], "wire_bytes": [], "refreshed": [], "grad_norms": []}
        for step in range(STEPS):
            ids = batch_for_step(step)[rank * rows:(rank + 1) * rows]
            wire_before = comm.wire_bytes
            kinds_before = dict(comm.bytes_by_kind)
            with runtime.micro_batch():
                runtime.backward(model(input_ids=ids, labels=ids).loss)
            stats = runtime.step()
            record["losses"].append(stats["loss"])
            record["grad_norms"].append(stats["grad_norm"])
            record["comm_bytes"].append(stats["comm_bytes"])
            record["wire_bytes"].append(comm.wire_bytes - wire_before)
            record["refreshed"].append(len(stats["refreshed"]))
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
