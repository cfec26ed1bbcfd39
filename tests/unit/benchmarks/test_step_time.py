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


def test_step_time_compile_model_times_compiled_models(capsys, monkeypatch):
    """--compile-model: every method's model forward goes through torch.compile (the row's step 0 includes its
    compile), and no CPU peak is claimed."""
    import torch

    compiled_forwards = []
    real_compile = torch.compile

    def spy(fn=None, *args, **kwargs):
        if getattr(fn, "__name__", "") == "forward":
            compiled_forwards.append(type(fn.__self__).__name__)
        return real_compile(fn, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    torch._dynamo.reset()
    assert step_time.main(["--device", "cpu", "--hidden", "64", "--layers", "1", "--vocab", "128", "--seq-len", "16",
                           "--batch", "1", "--rank", "8", "--steps", "1", "--methods", "adamw_fp32,lowmem",
                           "--compile-model"]) == 0
    out = capsys.readouterr().out
    assert "every model under torch.compile" in out
    assert compiled_forwards == ["LlamaForCausalLM", "LlamaForCausalLM"]
    rows = [line.split("|") for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| method") and not line.startswith("| ---")]
    assert [r[1].strip() for r in rows] == ["adamw_fp32", "lowmem"]
    assert all(float(r[2]) > 0 and r[7].strip() == "-" for r in rows)
