"""`log_to`: JSONL always; TensorBoard event files read back with tensorboard's EventAccumulator hold the same
scalars; W&B asked for without the package gives one line and the run goes on."""
import importlib.util
import json

import pytest

pytest.importorskip("tensorboard", reason="tensorboard is in the test extra (pip install -e .[test])")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from launch.finetune import main  # noqa: E402


def scalars(directory) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_finetune_log_to_tensorboard_and_missing_wandb(tiny_args, tmp_path, capsys):
    argv = tiny_args + ["max_steps=4", "eval_every=2", "export=false", "log_to=[tensorboard,wandb]"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    if importlib.util.find_spec("wandb") is None:
        assert "log_to: wandb asked for but the wandb package is not installed" in out
    else:
        assert (tmp_path / "run" / "wandb").is_dir()
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    refresh = [r for r in records if r["kind"] == "refresh"]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and refresh and all(r["layers"] for r in refresh)
    got = scalars(run / "tensorboard")
    for r in train:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_bytes"):
            assert got[f"train/{key}"][r["step"]] == pytest.approx(r[key], rel=1e-6)
    assert set(got["eval/eval_loss"]) == {r["step"] for r in records if r["kind"] == "eval"} == {0, 2, 4}
    assert set(got["refresh/layers_refreshed"]) == {r["step"] for r in refresh}
