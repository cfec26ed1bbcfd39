"""One rank of the data-parallel device-wait audit: `torchrun --nproc_per_node 2 device_wait_worker.py OUT SCENARIO`.

Trains the shared tiny model (tiny_run.py) for STEPS steps at the scenario's ZeRO stage, every step (forward,
backward, step()) under lowmem.diagnostics.DeviceWaitAuditor, and writes OUT/waits-{SCENARIO}-rank{R}.json: per
step the refreshed weights' count, whether it was skipped, the unexpected waits and the allowed ones as
{"op at where": count}.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_run import GLOBAL_BATCH, batch_for_step, lowmem_config, make_model  # noqa: E402

STEPS = 4
# scenario -> (ZeRO stage, config changes)
SCENARIOS = {"0": (0, {}), "1": (1, {}), "2": (2, {}), "3": (3, {}),
             "accum": (2, {"grad_accum_steps": 2, "clip_mode": "two_pass"}),
             "none": (1, {"clip_mode": "none"})}


def allowed_waits():
    from lowmem.diagnostics import AllowedWait
    return (AllowedWait("tolist", "hooks/runtime.py:_host_values"),          # step(): the step's one read
            AllowedWait("tolist", "hooks/runtime.py:_agree_on_stats"),       # step(): the agreed statistics
            AllowedWait("_local_scalar_dense", "lowmem/distributed.py:total_over_owners"),   # two_pass's norm
            AllowedWait("_local_scalar_dense", "lowmem/optim/rsvd.py:subspace_similarity"),  # two_pass refresh
            AllowedWait("tolist", "lowmem/optim/rsvd.py:resolve_subspaces"),  # refresh: fallback decision
            AllowedWait("_linalg_svd", "lowmem/optim/rsvd.py:_top_right"),    # refresh: small SVD
            AllowedWait("_linalg_svd", "lowmem/optim/lowrank.py:_settle_projection"))   # Rayleigh-Ritz


def main() -> None:
    out, scenario = Path(sys.argv[1]), sys.argv[2]
    from hooks.runtime import prepare
    from lowmem.diagnostics import DeviceWaitAuditor
    from lowmem.distributed import DataParallel, init_distributed, shutdown
    from lowmem.optim.lowrank import HOST_STATE_KEYS
    comm = init_distributed(device=torch.device("cpu"), timeout_s=600)
    rank, world = comm.rank, comm.world_size
    rows = GLOBAL_BATCH // world
    stage, changes = SCENARIOS[scenario]
    model = make_model()
    # every weight refreshes at steps 0 and 2 (no stagger), so steps 1 and 3 are ordinary; residual indices are
    # chosen at step 2 (tiny_run: residual_warmup_steps=2)
    cfg = lowmem_config().replace(stagger=False, **changes)
    runtime = prepare(model, cfg, data_parallel=DataParallel(comm, stage))
    accum = cfg.grad_accum_steps
    record = []
    for step in range(STEPS):
        host = [t for state in runtime.states.values() for k, t in state.items() if k in HOST_STATE_KEYS]
        audit = DeviceWaitAuditor(host, allowed=allowed_waits())
        with audit:
            for k in range(accum):
                ids = batch_for_step(step * accum + k)[rank * rows:(rank + 1) * rows]
                with runtime.micro_batch():
                    runtime.backward(model(input_ids=ids, labels=ids).loss / accum)
            stats = runtime.step()

        def tally(waits):
            counts: dict[str, int] = {}
            for wait in waits:
                key = f"{wait.op} at {wait.where}" + (f" via {wait.via}" if wait.via else "")
                counts[key] = counts.get(key, 0) + 1
            return counts
        record.append({"refreshed": len(stats["refreshed"]), "skipped": stats["skipped"],
                       "layers_written": stats["layers_written"], "hits": tally(audit.hits),
                       "allowed": tally(audit.allowed_hits)})
    (out / f"waits-{scenario}-rank{rank}.json").write_text(json.dumps(record, indent=1))
    comm.barrier()
    shutdown(comm, clean=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
