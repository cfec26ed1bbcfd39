"""GGUF export through `python -m launch.finetune`: the run option, the export subcommand, its errors, and the round
trip of the shipped SmolLM2 GGUF -> fine-tune -> GGUF -> fine-tune again and transformers."""
import json
import os
from pathlib import Path

import gguf
import pytest
import torch

from launch.finetune import main
from lowmem.checkpoint.store import list_checkpoints


def _field(path, key):
    return gguf.GGUFReader(path).fields[key].contents()


def _load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_run_option_and_export_subcommand(tiny_args, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(tiny_args + ["max_steps=2", "eval_every=0", "export=false", "export_gguf=q8_0"]) == 0
    written = run / "model.gguf"
    assert _field(written, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert "model.gguf (q8_0)" in (run / "report.md").read_text()
    model, tokenizer = _load(written)
    ids = tokenizer("the quick brown fox", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4

    ckpt = list_checkpoints(run / "checkpoints")[-1]
    out = tmp_path / "exported.gguf"
    assert main(["export", str(ckpt), str(out), "--format", "gguf", "--gguf-type", "bf16"]) == 0
    assert "exported bf16 GGUF" in capsys.readouterr().out
    assert _field(out, "general.file_type") == gguf.LlamaFileType.MOSTLY_BF16
    assert main(["export", str(ckpt), str(tmp_path / "outdir"), "--format", "gguf"]) == 0
    assert _field(tmp_path / "outdir" / "model.gguf", "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0


def test_errors_name_the_problem(tiny_args, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(tiny_args + ["max_steps=1", "eval_every=0", "export=false"]) == 0
    ckpt = list_checkpoints(run / "checkpoints")[-1]
    capsys.readouterr()

    parent = tmp_path / "readonly"
    parent.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == parent else real_access(p, mode, **kw))
    assert main(["export", str(ckpt), str(parent / "m.gguf"), "--format", "gguf"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: export to") and "not writable" in err
    assert list(parent.iterdir()) == []

    assert main(tiny_args + ["--gguf-type", "bf16"]) == 2
    assert "belong to the export subcommand" in capsys.readouterr().err

    gpt2 = tmp_path / "gpt2.json"
    gpt2.write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 1, "n_head": 4, "n_positions": 64,
                                "vocab_size": 300}))
    args = [a if not a.startswith("model=") else f"model={gpt2}" for a in tiny_args]
    assert main(args + ["output_dir=" + str(tmp_path / "run2"), "export_gguf=q8_0"]) == 2
    err = capsys.readouterr().err
    assert "export_gguf: GGUF export does not support model_type 'gpt2'; supported: llama, mistral" in err
    assert not list_checkpoints(tmp_path / "run2" / "checkpoints")


# The first run converts the shipped GGUF (minutes on a busy 2-core machine, cached after), the second converts the
# exported one; the limit is a hang guard, not a speed requirement.
@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_smollm2_round_trip(tiny_data, tmp_path, monkeypatch):
    common = [f"data.path={tiny_data}", f"data.cache_dir={tmp_path / 'cache'}", "seq_len=16", "micro_batch_size=2",
              "eval_every=0", "data.eval_max_sequences=2", "optim.rank=8"]
    first = tmp_path / "first"
    assert main(common + ["max_steps=2", f"output_dir={first}", "export_gguf=q8_0"]) == 0
    exported = first / "model.gguf"
    assert _field(exported, "general.architecture") == "llama"
    assert _field(exported, "tokenizer.ggml.model") == "gpt2"

    # transformers reads it: the tokenizer is the one the run trained with, and the model generates
    from launch.models import load_model
    original = load_model("smollm2-135m").tokenizer
    model, tokenizer = _load(exported)
    text = "def add(a, b):\n    return a + b  # Python 3.12"
    assert tokenizer(text)["input_ids"] == original(text)["input_ids"]
    messages = [{"role": "user", "content": "What is a list?"}]
    assert tokenizer.apply_chat_template(messages, tokenize=True) == original.apply_chat_template(messages,
                                                                                                  tokenize=True)
    ids = tokenizer("Python is", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4
    # the same weights as the bf16 HF export of the same run, up to Q8_0 rounding: the loss on a text moves by
    # ~0.01 nats for that (a wrong tensor name or q/k order costs whole nats)
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(first / "model", dtype=torch.float32)
    ids = tokenizer(text + " Lists hold items in order; dicts map keys to values.", return_tensors="pt").input_ids
    with torch.no_grad():
        loss_gguf, loss_hf = (m(ids, labels=ids).loss.item() for m in (model, hf))
    print(f"\nloss on a text: GGUF q8_0 {loss_gguf:.4f}, HF bf16 {loss_hf:.4f}")
    assert abs(loss_gguf - loss_hf) < 0.05
    del model, hf

    # and lowmem trains it again, from the GGUF it wrote (converted into a cache of this test's own)
    monkeypatch.setenv("LOWMEM_CACHE", str(tmp_path / "lowmem-cache"))
    second = tmp_path / "second"
    assert main(common + ["max_steps=1", f"model={exported}", f"output_dir={second}", "export=false"]) == 0
    log = [json.loads(line) for line in (second / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "train"] == [1]
