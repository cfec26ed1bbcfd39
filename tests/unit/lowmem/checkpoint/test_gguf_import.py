"""lowmem.checkpoint.gguf_import against transformers' own GGUF loader, on the shipped SmolLM2 GGUF: the same fp32
tensors, config, generation config and tokenizer, written shard by shard (the host never holds the whole model)."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from launch.models import embedded_gguf_path
from lowmem.checkpoint.gguf_import import convert_gguf


@pytest.fixture(scope="module")
def gguf():
    try:
        return embedded_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))


def test_streamed_conversion_equals_transformers_gguf_loader(gguf, tmp_path):
    out = convert_gguf(gguf, tmp_path / "converted", shard_bytes=32 * 2**20, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 4                      # written shard by shard: none holds the model
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    mine = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    theirs, ours = reference.state_dict(), mine.state_dict()
    assert theirs.keys() == ours.keys()
    assert [k for k in theirs if not torch.equal(theirs[k], ours[k])] == []
    assert mine.config.architectures == ["LlamaForCausalLM"] and not hasattr(mine.config, "quantization_config")
    assert mine.generation_config.to_dict() == reference.generation_config.to_dict()
    tok_ref = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(out)
    text = "def f(x):\n    return x ** 2  # 12345, héllo"
    assert tok(text).input_ids == tok_ref(text).input_ids
    assert tok.chat_template == tok_ref.chat_template


def test_a_failed_conversion_leaves_no_directory(gguf, tmp_path, monkeypatch):
    import lowmem.checkpoint.gguf_import as gi

    def fail(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(gi, "_write_shard", fail)
    with pytest.raises(OSError, match="disk full"):
        convert_gguf(gguf, tmp_path / "converted", progress=False)
    assert list(tmp_path.iterdir()) == []
