"""benchmarks.memory_budget: the 12 GB card and lowmem's breakdown before / after the memory levers."""
from transformers import LlamaConfig

from benchmarks.memory_budget import BUILTIN, lever_columns, lever_table
from lowmem.memory import GIB, GPUS


def test_llama3_8b_on_the_12gb_card_today_vs_new():
    assert GPUS["3060-12gb"] == 12 * GIB
    model = LlamaConfig(**BUILTIN["llama3-8b"])
    (_, today, _), (_, new, _), (_, int8_head, _), (_, fitted, chosen) = lever_columns(model, 256, 1, 256,
                                                                                        GPUS["3060-12gb"])
    for b in (today, new, int8_head, fitted):
        assert sum(b.components.values()) == b.peak_bytes
    assert today.peak_bytes > 0.95 * 12 * GIB >= fitted.peak_bytes
    assert int8_head.peak_bytes < new.peak_bytes < today.peak_bytes
    # the levers remove the float tables and their full-rank moments; the INT8 tables add V x h bytes each
    assert int8_head.components["float_params"] < new.components["float_params"] < today.components["float_params"]
    assert new.components["optimizer_moments"] < today.components["optimizer_moments"]
    assert "INT8 head" in chosen and "gradient_checkpointing=True" in chosen
    text = "\n".join(lever_table(model, 256, 1, 256, GPUS["3060-12gb"]))
    assert "today" in text and "fit: auto" in text and "| peak |" in text
