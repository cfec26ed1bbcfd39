"""benchmarks.step_time end to end on a tiny model: every row is printed, the bf16 lowmem row runs on a bf16 model."""
import pytest

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


def test_call_overhead_counts_the_compiled_kernel_calls(capsys):
    """--call-overhead: a table of the lowmem row's compiled kernels (the SR write and the low-rank Adam step run
    once or more per low-rank weight per step), and the wrapped functions are restored afterwards."""
    from torch._inductor.output_code import CompiledFxGraph

    from quant import compiled
    real_call, real_graph_call = compiled.call, CompiledFxGraph.__call__
    assert step_time.main(["--device", "cpu", "--hidden", "64", "--layers", "1", "--vocab", "128", "--seq-len", "16",
                           "--batch", "1", "--rank", "8", "--steps", "1", "--methods", "adamw_fp32,lowmem",
                           "--call-overhead"]) == 0
    assert compiled.call is real_call and CompiledFxGraph.__call__ is real_graph_call
    out = capsys.readouterr().out
    assert compiled.failure() is None   # the suite runs with compilation on (a C++ compiler is part of the setup)
    assert "compiled kernels of lowmem" in out and "compiled kernels of adamw_fp32" not in out
    table = out.split("compiled kernels of lowmem")[1]
    calls = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in table.splitlines()
             if line.startswith("| ") and not line.startswith(("| kernel", "| ---"))}
    lowrank_weights = 7   # at least q, k, v, o, gate, up, down of the one layer
    assert calls["lowrank_adam8"] >= lowrank_weights and calls["sr_blocks_kept"] >= lowrank_weights
    assert calls["all"] == sum(v for k, v in calls.items() if k != "all")


def test_update_chunks_times_each_size_and_restores_the_default(capsys):
    """--update-chunks: one row per size, the current default marked and the ratio 1 for it, weight updates timed
    inside the steps (a positive share of them), and the default chunk and the wrapped apply_ methods restored."""
    from lowmem.optim import weights
    default, real_apply = weights.DEFAULT_CHUNK_ELEMENTS, weights.Int8Weight.apply_
    assert step_time.main(["--device", "cpu", "--hidden", "64", "--layers", "1", "--vocab", "128", "--seq-len", "16",
                           "--batch", "1", "--rank", "8", "--steps", "1",
                           "--update-chunks", f"64,{default}"]) == 0
    assert weights.DEFAULT_CHUNK_ELEMENTS == default and weights.Int8Weight.apply_ is real_apply
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith(("| update", "| ---"))]
    assert [r[1].strip() for r in rows] == ["64", f"{default} *"]
    assert float(rows[1][4]) == 1.0 and float(rows[1][6]) == 1.0
    assert all(0 < float(r[5]) < float(r[3]) for r in rows)   # the updates are part of the step


def test_update_chunks_rejects_a_bad_list(capsys):
    for bad in ("abc", "1024,0", ""):
        with pytest.raises(SystemExit) as exit_info:
            step_time.main(["--update-chunks", bad])
        assert exit_info.value.code == 2
        assert "positive integers separated by commas" in capsys.readouterr().err
