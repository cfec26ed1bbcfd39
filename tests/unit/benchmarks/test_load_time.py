"""benchmarks.load_time on a tiny checkpoint: both paths load the same model and the report says what it measured."""
from pathlib import Path

import pytest

from benchmarks import load_time


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    params = load_time.build(path, hidden=64, layers=2, vocab=500)
    assert params > 0 and list(path.glob("*.safetensors"))
    return path


def test_both_paths_measure_the_same_model_and_the_report_says_so(tiny_dir):
    runs = {path: [load_time.run_path(path, tiny_dir, "cpu", rank=8)] for path in ("today", "streamed")}
    for path, (run,) in runs.items():
        assert run["path"] == path and run["seconds"] > 0
        assert run["rss_anon_peak_bytes"] >= run["rss_anon_before_bytes"] > 0
        assert run["max_rss_bytes"] >= run["rss_anon_peak_bytes"] // 2
    assert runs["today"][0]["trained"] == runs["streamed"][0]["trained"] > 0
    lines = load_time.summarise(runs, params=123_000, config=load_time.model_config(64, 2, 500), device="cpu",
                                rank=8, machine="CPU test", command="python -m benchmarks.load_time --hidden 64")
    ratio = runs["streamed"][0]["seconds"] / runs["today"][0]["seconds"]
    assert lines[0] == "CPU test" and f"streamed / today: time {ratio:.2f}x" in "\n".join(lines)
    assert any(line.startswith("today ") for line in lines) and any(line.startswith("streamed ") for line in lines)


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        load_time.main(["--repeats", "0"])
