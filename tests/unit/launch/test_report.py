"""launch.report: the summary's predicted peaks (the load phase and the step) and the report files."""
from launch.report import GIB, predicted_peaks, write_report


def test_predicted_peaks_names_the_load_and_the_step():
    text = predicted_peaks(int(9.25 * GIB), load_bytes=int(8.9 * GIB), step_bytes=int(9.25 * GIB))
    assert text == "predicted peak 9.25 GiB of live tensors (memory preflight: load 8.9 GiB, step 9.25 GiB)"
    assert predicted_peaks(2 * GIB) == "predicted peak 2 GiB of live tensors (memory preflight)"
    assert predicted_peaks(None) == ""


def test_report_shows_both_peaks(tmp_path):
    records = [{"kind": "train", "step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-3, "grad_norm": 1.0,
                "tokens_per_s": 100.0, "peak_memory_bytes": GIB} for s in range(1, 4)]
    summary = {"peak memory": "1 GiB peak RSS (measured); "
               + predicted_peaks(2 * GIB, load_bytes=int(1.5 * GIB), step_bytes=2 * GIB)}
    path = write_report(tmp_path, config_yaml="seq_len: 8\n", records=records, summary=summary,
                        predicted_peak_bytes=2 * GIB, memory_kind="peak RSS", predicted_load_bytes=int(1.5 * GIB))
    text = path.read_text()
    assert "load 1.5 GiB, step 2 GiB" in text
    assert (tmp_path / "memory.png").stat().st_size > 0 and (tmp_path / "loss.png").stat().st_size > 0
