"""launch.loggers.RunLogger: JSONL gets every record; TensorBoard event files (read back with tensorboard's
EventAccumulator) and W&B get every numeric field as a scalar."""
import json

import pytest

pytest.importorskip("tensorboard", reason="tensorboard is in the test extra (pip install -e .[test])")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from launch.loggers import RunLogger  # noqa: E402


def scalars(directory) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_run_logger_writes_every_numeric_field(tmp_path):
    log = RunLogger(tmp_path, ("jsonl", "tensorboard"), append=False)
    records = [{"kind": "train", "step": s, "loss": 3.0 - s / 4, "lr": 1e-3 * s, "grad_norm": 0.5 + s,
                "skipped": False, "peak_memory_bytes": s * 2**30, "refreshed": s % 2} for s in (1, 2, 3)]
    records += [{"kind": "eval", "step": 3, "eval_loss": 2.5, "perplexity": 12.18},
                {"kind": "refresh", "step": 2, "layers": ["model.layers.0.self_attn.q_proj"]}]
    for record in records:
        log.write(record)
    log.close()
    assert [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()] == records
    got = scalars(tmp_path / "tensorboard")
    for record in records[:3]:
        s = record["step"]
        for key in ("loss", "lr", "grad_norm", "refreshed"):
            assert got[f"train/{key}"][s] == pytest.approx(record[key], rel=1e-6)   # stored as float32
        assert got["train/skipped"][s] == 0.0 and got["train/peak_memory_gib"][s] == pytest.approx(s)
    assert got["eval/eval_loss"] == {3: 2.5}
    assert got["refresh/layers_refreshed"] == {2: 1.0}


def test_wandb_sink_runs_offline_with_the_same_scalars(tmp_path, monkeypatch):
    """The W&B sink against a recording stand-in of the `wandb` module's API (init / run.log / run.finish): wandb is
    not installed here, so this checks what lowmem calls, not W&B itself."""
    import sys
    import types

    calls = {}

    class Run:
        def __init__(self):
            calls["logged"] = []

        def log(self, values, step):
            calls["logged"].append((step, dict(values)))

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    log = RunLogger(tmp_path, ("jsonl", "wandb"), append=False, config={"lr": 1e-3})
    log.write({"kind": "train", "step": 1, "loss": 2.0, "lr": 1e-3, "grad_norm": 0.7, "skipped": False,
               "peak_memory_bytes": 2**31})
    log.write({"kind": "refresh", "step": 1, "layers": ["a", "b"]})
    log.close()
    assert calls["init"]["mode"] == "offline" and calls["init"]["dir"] == str(tmp_path / "wandb")
    assert calls["init"]["config"] == {"lr": 1e-3} and calls["finished"]
    assert calls["logged"][0] == (1, {"train/loss": 2.0, "train/lr": 1e-3, "train/grad_norm": 0.7,
                                      "train/skipped": 0.0, "train/peak_memory_bytes": float(2**31),
                                      "train/peak_memory_gib": 2.0})
    assert calls["logged"][1] == (1, {"refresh/layers_refreshed": 2})
