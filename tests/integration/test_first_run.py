"""The first run as a newcomer makes it, through `python -m launch.finetune`: set-up phases on screen, labelled memory
figures, report.md with run time and peak memory, and the first mistakes (a model that is not there, a one-step trial
of a long recipe, an empty or hostile data file) answered with a message and nothing left behind."""
from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib.figure
import pytest

from launch.finetune import main

CONFIGS = Path(__file__).resolve().parents[2] / "launch" / "configs"


def without(args: list[str], *prefixes: str) -> list[str]:
    return [a for a in args if not a.startswith(prefixes)]


def test_run_shows_its_phases_labels_memory_and_reports_time_and_peak(tiny_args, tmp_path, capsys, monkeypatch):
    ylims = {}
    real_savefig = matplotlib.figure.Figure.savefig

    def savefig(fig, path, *args, **kwargs):
        if Path(path).name == "memory.png":
            ax = fig.axes[0]
            ylims["bottom"] = ax.get_ylim()[0]
            ylims["lines"] = [line.get_label() for line in ax.get_lines()]
        return real_savefig(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    assert main(tiny_args + ["max_steps=4", "eval_every=2", "log_every=1"]) == 0
    out = capsys.readouterr().out
    for phase in ("reading the model config", "loading the model into INT8", "tokenising the data",
                  "preparing the lowmem runtime", "evaluating the held-out loss before training"):
        assert f"[setup] {phase}" in out, phase
        assert re.search(rf"\[setup\] {phase}[^\n]*: \d+\.\d s", out), phase   # its duration
    assert re.search(r"\[setup\] first step: \d+\.\d s", out)
    # The CPU step figure is named for what it is, and the preflight says it counts something else.
    assert "peak RSS" in out and "the prediction counts the tensors the run keeps live" in out

    report = (tmp_path / "run" / "report.md").read_text()
    assert re.search(r"- \*\*run time\*\*: \d+\.\d (s|min) \(set-up .*model config .*data .*runtime", report)
    assert re.search(r"- \*\*peak memory\*\*: [\d.]+ GiB peak RSS \(measured\); predicted peak [\d.e-]+ GiB of live "
                     r"tensors", report)
    assert ylims["bottom"] == 0
    assert ylims["lines"] == ["peak RSS (measured per step)", "predicted peak (live tensors, memory preflight)",
                              "predicted load peak (streamed checkpoint + optimizer state)"]


def test_model_not_found_names_hf_download_and_leaves_no_directory(tiny_args, tmp_path, capsys):
    out_dir = tmp_path / "outputs" / "finetune"
    code = main(without(tiny_args, "model=", "output_dir=") + ["model=someorg/not-downloaded",
                                                                  f"output_dir={out_dir}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "`hf download someorg/not-downloaded`" in err and "huggingface-cli" not in err
    assert "'someorg/not-downloaded' has not been downloaded on this machine" in err
    assert "HFValidationError" not in err and "Error:" not in err
    assert not (tmp_path / "outputs").exists()                 # neither outputs/finetune nor outputs/


def test_a_failed_run_keeps_a_directory_that_existed(tiny_args, tmp_path, capsys):
    out_dir = tmp_path / "mine"
    out_dir.mkdir()
    assert main(without(tiny_args, "model=", "output_dir=") + ["model=/no/such/model", f"output_dir={out_dir}"]) == 2
    assert out_dir.is_dir()


def test_one_step_trial_of_a_long_recipe_clamps_the_warm_up(tiny_args, tmp_path, capsys):
    assert main([str(CONFIGS / "llama2-7b-sft-12gb.yaml"), "max_steps=1", "--print-config"]) == 0
    captured = capsys.readouterr()
    assert "warmup_steps: 1\n" in captured.out
    assert "note: warmup_steps=100 is longer than the run (max_steps=1): the warm-up is cut to 1 step(s)" in \
        captured.err
    assert main(tiny_args + ["max_steps=2", "warmup_steps=100", "eval_every=0", "export=false"]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]


def test_the_only_data_file_empty_says_to_fill_it_or_point_elsewhere(tiny_args, tmp_path, capsys):
    empty = tmp_path / "train.jsonl"
    empty.write_text("\n")
    for extra in ([], ["data.skip_bad_lines=true"]):
        assert main(without(tiny_args, "data.path=") + [f"data.path={empty}"] + extra) == 2
        err = capsys.readouterr().err
        assert "it is the only data file; put training data in it, or point data.path at another" in err
        assert "skip_bad_lines" not in err


@pytest.mark.parametrize("line, problem", [
    ("[" * 100_000 + "]" * 100_000, "JSON nested deeper than the reader allows"),
    ('{"text": "x", "n": ' + "7" * 5000 + "}", "a number has more than 4300 digits"),
])
def test_hostile_jsonl_lines_stop_with_file_and_line_or_are_skipped(tiny_args, tiny_data, tmp_path, capsys, line,
                                                                     problem):
    data = tmp_path / "hostile.jsonl"
    lines = tiny_data.read_text().splitlines()
    data.write_text("\n".join(lines[:5] + [line] + lines[5:]) + "\n")
    args = without(tiny_args, "data.path=") + [f"data.path={data}", "max_steps=2", "eval_every=0", "export=false"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"error: {data}:6: {problem}" in err and "Traceback" not in err and len(err) < 1000
    assert main(args + ["data.skip_bad_lines=true", f"output_dir={tmp_path / 'skipped'}"]) == 0
