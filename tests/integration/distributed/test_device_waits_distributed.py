"""No op that waits for the device in data-parallel steps (2 CPU processes over gloo): ZeRO 0-3, clip modes
per_tensor / none / two_pass, accumulation 1 and 2; every step (forward, backward, step()) runs under
lowmem.diagnostics.DeviceWaitAuditor (device_wait_worker.py).

Ordinary steps: no hit; the allowed waits are step()'s reads: the step's one read of its statistics (losses, norms,
flags) and the agreed statistics after their all-reduce (two_pass adds the global norm's agreement). A refresh
step adds the range finder's fallback decision and small SVDs (as in one process) and, with two_pass (whose
commits run in step(), without the deferred bookkeeping), the old-versus-new projector similarity per weight. The skip decision of each
layer travels as data (the owner's flag in the broadcast update), so no rank reads it inside the backward.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from test_data_parallel import SCENARIO_TIMEOUT_S, torchrun  # noqa: E402

pytestmark = [pytest.mark.multi_gpu, pytest.mark.timeout(2 * SCENARIO_TIMEOUT_S + 600)]

STEP_READS = {"tolist at hooks/runtime.py:_host_values", "tolist at hooks/runtime.py:_agree_on_stats",
              "_local_scalar_dense at lowmem/distributed.py:total_over_owners"}
REFRESH_READS = {"tolist at lowmem/optim/rsvd.py:resolve_subspaces", "_linalg_svd at lowmem/optim/rsvd.py:_top_right",
                 "_linalg_svd at lowmem/optim/lowrank.py:_settle_projection",
                 # two_pass commits in step(), unguarded: the lazy policy's similarity is read per refreshed weight
                 "_local_scalar_dense at lowmem/optim/rsvd.py:subspace_similarity"}


@pytest.mark.parametrize("scenario", ["0", "1", "2", "3", "accum", "none"])
def test_data_parallel_steps_do_not_wait_for_the_device(tmp_path, scenario):
    proc = torchrun([str(HERE / "device_wait_worker.py"), str(tmp_path), scenario],
                    what=f"the 2-rank device-wait audit of scenario {scenario!r}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        steps = json.loads((tmp_path / f"waits-{scenario}-rank{rank}.json").read_text())
        assert [s["refreshed"] > 0 for s in steps] == [True, False, True, False], steps   # refresh every 2 steps
        for index, step in enumerate(steps):
            assert step["hits"] == {}, (rank, index, step["hits"])
            assert not step["skipped"]
            allowed = set(step["allowed"])
            if step["refreshed"]:
                assert allowed <= STEP_READS | REFRESH_READS, (rank, index, step["allowed"])
            else:
                assert allowed <= STEP_READS, (rank, index, step["allowed"])
                assert step["allowed"].get("tolist at hooks/runtime.py:_host_values", 0) <= 1
                assert step["allowed"]["tolist at hooks/runtime.py:_agree_on_stats"] == 1
