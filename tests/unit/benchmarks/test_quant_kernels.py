"""benchmarks.quant_kernels end to end on a tiny matrix: every row is timed and printed, compiled and eager."""
import torch

from benchmarks import quant_kernels


def test_every_row_runs(capsys):
    threads = torch.get_num_threads()
    try:
        quant_kernels.main(["--rows", "3", "--cols", "300", "--repeats", "1", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)   # the option sets the process's thread count; later tests keep theirs
    out = capsys.readouterr().out
    for row in ("x.clone() (baseline)", "sr_update_int8_ (keep flag) [compiled]", "sr_update_int8_ (keep flag) [eager]",
                "8-bit AdamW step, bf16 param (SR) [compiled]", "8-bit AdamW step, fp32 param [eager]",
                "low-rank 8-bit Adam step (3 x 128) [compiled]", "dequantize_moment8 signed"):
        assert row in out, row
    assert "compile time of the hot kernels" in out
