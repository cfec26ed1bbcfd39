"""benchmarks.step_time end to end on a tiny model: every row is printed, the bf16 lowmem row runs on a bf16 model."""
from benchmarks import step_time


def test_step_time_prints_a_row_per_method_including_bf16_lowmem(capsys):
    assert step_time.main(["--device", "cpu", "--hidden", "64", "--layers", "1", "--vocab", "128", "--seq-len", "16",
                           "--batch", "1", "--rank", "8", "--steps", "1",
                           "--methods", "adamw_fp32,adamw_bf16,lowmem,lowmem_bf16"]) == 0
    rows = {line.split("|")[1].strip(): line for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith("| method") and not line.startswith("| ---")}
    assert set(rows) == {"adamw_fp32", "adamw_bf16", "lowmem", "lowmem_bf16"}
    # the bf16 model holds half the float bytes of the fp32 one: its measured peak is lower
    peak = {name: float(row.split("|")[7]) for name, row in rows.items()}
    assert peak["lowmem_bf16"] < peak["lowmem"] and peak["adamw_bf16"] < peak["adamw_fp32"]
