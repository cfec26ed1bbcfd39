"""bf16 Hugging Face export of INT8 models: names, layouts and values against a reference twin, loading with
from_pretrained, logits, generation, sharding, streaming, atomicity and errors. Tiny random models, seeded."""
import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import lowmem.checkpoint.export as export_module
from lowmem.model.adapters import find_adapter
from lowmem.checkpoint.export import LazyTensor, export_hf, hf_state_dict, lazy_hf_state_dict
from lowmem.model.int8_linear import Int8Linear

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS = 97, 64, 2, 4, 2
BLOCK = 48  # 64 = 48 + a padded tail of 16; 128 = 2 * 48 + 32: several blocks per row, partial last block

# bf16 rounds each weight to nearest with relative error <= u = 2**-9. A logit depends on ~21 rounded factors
# (embedding, norms, 7 linears per layer x 2 layers, final norm, lm_head); first-order errors add, mostly with random
# signs, so the logit error is a few u times the logit scale (measured: 1-2 u of max|logits|). We allow 8 u of
# max|logits| (2**-6, ~1.6%): 4x the worst measured, and far below what a mapping error causes (a transposed or
# swapped q/k/v weight changes logits by about max|logits| itself).
LOGIT_TOL_OF_MAX = 8 * 2.0**-9


def _llama(tied=False):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval()


def _qwen2():
    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS)
    return Qwen2ForCausalLM(config).eval()


def _gpt2():
    torch.manual_seed(2)
    config = GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=32,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


BUILDERS = {"llama": _llama, "llama_tied": lambda: _llama(tied=True), "qwen2": _qwen2, "gpt2": _gpt2}


def _to_int8(model):
    """Split fused layers (GPT-2), then every target linear -> Int8Linear (round to nearest), as prepare() does."""
    adapter = find_adapter(model)
    adapter.split_fused(model)
    for spec in adapter.linear_specs(model):
        parent, _, child = spec.name.rpartition(".")
        linear = model.get_submodule(spec.name)
        setattr(model.get_submodule(parent), child, Int8Linear.from_linear(linear, block_size=BLOCK))
    return model


def _ids(rows=2, cols=11, seed=5):
    return torch.randint(0, VOCAB, (rows, cols), generator=torch.Generator().manual_seed(seed))


def _saved_keys(model, directory):
    """The keys HF's own save_pretrained writes for the original (float) model."""
    model.save_pretrained(directory)
    with safe_open(os.path.join(directory, "model.safetensors"), "pt") as f:
        return set(f.keys())


# ---- reference twin: the HF tensors written out by hand from the INT8 model ----

def _ref_dequant(module):
    """q * s with the scale of each block of BLOCK input features repeated over the block (fp32)."""
    scales = module.weight_scales.repeat_interleave(module.block_size, dim=1)[:, : module.in_features]
    return module.weight_q.float() * scales


def _ref_linear_weight(model, name):
    module = model.get_submodule(name)
    return _ref_dequant(module) if isinstance(module, Int8Linear) else module.weight.detach().float()


def _reference(model, keys, dtype=torch.bfloat16):
    gpt2 = model.config.model_type == "gpt2"
    plain = model.state_dict()
    out = {}
    for key in keys:
        prefix, _, leaf = key.rpartition(".")
        last = prefix.split(".")[-1]
        if gpt2 and last == "c_attn":
            parts = [f"{prefix}.{p}" for p in ("q_proj", "k_proj", "v_proj")]
            if leaf == "weight":  # Conv1D (in, 3 * hidden) = [Wq; Wk; Wv]ᵀ
                value = torch.cat([_ref_linear_weight(model, p) for p in parts]).T
            else:
                value = torch.cat([model.get_submodule(p).bias.detach() for p in parts])
        elif gpt2 and last in ("c_proj", "c_fc") and leaf == "weight":  # Conv1D layout (in, out)
            value = _ref_linear_weight(model, prefix).T
        elif leaf == "weight" and isinstance(model.get_submodule(prefix), Int8Linear):
            value = _ref_dequant(model.get_submodule(prefix))
        else:
            value = plain[key]
        out[key] = value.to(dtype)
    return out


# ---- end to end per architecture ----

@pytest.mark.parametrize("arch", list(BUILDERS))
def test_export_loads_and_matches_int8_model(arch, tmp_path):
    model = BUILDERS[arch]()
    tied = bool(model.config.tie_word_embeddings)
    original_keys = set(model.state_dict())
    hf_keys = _saved_keys(model, tmp_path / "original")
    # HF's in-memory state_dict also lists the tied alias; what it saves (and what we export) does not.
    assert original_keys - hf_keys == ({"lm_head.weight"} if tied else set())

    _to_int8(model)
    exported = hf_state_dict(model)
    assert set(exported) == hf_keys
    reference = _reference(model, hf_keys)
    for key, value in exported.items():
        assert value.dtype == torch.bfloat16 and value.device.type == "cpu", key
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0, msg=key)

    out_dir = export_hf(model, tmp_path / "export")
    assert out_dir == (tmp_path / "export").absolute()
    assert sorted(os.listdir(tmp_path)) == ["export", "original"]  # no temporary siblings left
    assert sorted(os.listdir(out_dir)) == ["config.json", "generation_config.json", "model.safetensors"]
    config = json.loads((out_dir / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert config["architectures"] == [type(model).__name__]
    assert config["tie_word_embeddings"] == tied
    with safe_open(str(out_dir / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == hf_keys and f.metadata() == {"format": "pt"}
        for key in f.keys():
            torch.testing.assert_close(f.get_tensor(key), reference[key], rtol=0, atol=0, msg=key)

    loaded, info = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, output_loading_info=True)
    assert type(loaded) is type(model)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not info["error_msgs"]
    if tied:
        assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    ids = _ids()
    with torch.no_grad():
        int8_logits = model(ids).logits
        logits = loaded.eval()(ids).logits
    assert logits.dtype == int8_logits.dtype == torch.float32
    tol = LOGIT_TOL_OF_MAX * int8_logits.abs().max().item()
    torch.testing.assert_close(logits, int8_logits, rtol=0, atol=tol)

    prompt = ids[:1, :6]
    generated = loaded.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 11)
    assert torch.equal(generated[:, :6], prompt)
    assert int(generated.min()) >= 0 and int(generated.max()) < VOCAB


def test_gpt2_mapping_is_exact_in_fp32():
    """Without quantization the adapter mapping must give back HF's own state dict exactly (fp32, no rounding)."""
    model = _gpt2()
    expected = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied alias
    untouched = hf_state_dict(model, dtype=torch.float32)  # still Conv1D: passes through
    find_adapter(model).split_fused(model)
    split = hf_state_dict(model, dtype=torch.float32)
    for exported in (untouched, split):
        assert list(exported) == list(expected)  # HF's order too
        for key, value in expected.items():
            torch.testing.assert_close(exported[key], value, rtol=0, atol=0, msg=key)


def test_lazy_entries_describe_what_load_returns():
    model = _to_int8(_gpt2())
    for name, entry in lazy_hf_state_dict(model).items():
        assert isinstance(entry, LazyTensor)
        tensor = entry.load()
        assert (tuple(tensor.shape), tensor.dtype) == (entry.shape, entry.dtype), name
        assert entry.nbytes == tensor.numel() * tensor.element_size()


def test_parameters_viewing_one_flat_buffer_export(tmp_path):
    """Float parameters that are disjoint views into one flat buffer (as a flat parameter store makes them) export
    as separate, correct tensors, and none of them is mistaken for a tied alias and dropped."""
    model = _to_int8(_llama()).to(torch.bfloat16)
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    flat = torch.cat([m.weight.detach().flatten() for m in norms]).normal_()
    offset = 0
    for m in norms:
        m.weight = torch.nn.Parameter(flat[offset:offset + HIDDEN])
        offset += HIDDEN
    out_dir = export_hf(model, tmp_path / "flat")
    loaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.bfloat16)
    for name, module in loaded.named_modules():
        if type(module).__name__ == "LlamaRMSNorm":
            assert torch.equal(module.weight, model.get_submodule(name).weight.detach()), name


# ---- sharding and streaming ----

def test_sharded_export_loads_like_single_file(tmp_path):
    model = _to_int8(_llama())
    max_shard_bytes = 24_000  # largest tensor: embed/lm_head 97 x 64 bf16 = 12_416 bytes
    single = export_hf(model, tmp_path / "single")
    sharded = export_hf(model, tmp_path / "sharded", max_shard_bytes=max_shard_bytes)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) > 2
    count = len(shard_files)
    assert shard_files == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert sorted(os.listdir(sharded)) == sorted(
        ["config.json", "generation_config.json", "model.safetensors.index.json", *shard_files])
    reference = hf_state_dict(model)
    assert set(index["weight_map"]) == set(reference)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in reference.values())
    for shard in shard_files:
        with safe_open(str(sharded / shard), "pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        assert all(index["weight_map"][key] == shard for key in tensors)
        shard_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        assert shard_bytes <= max_shard_bytes or len(tensors) == 1
        for key, value in tensors.items():
            torch.testing.assert_close(value, reference[key], rtol=0, atol=0, msg=key)

    loaded, info = AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    single_model = AutoModelForCausalLM.from_pretrained(single, dtype=torch.float32)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, single_model(ids).logits, rtol=0, atol=0)


def test_export_materialises_one_shard_at_a_time(tmp_path, monkeypatch):
    """Each Int8Linear is dequantized only when its own shard is assembled, never ahead of it."""
    model = _to_int8(_gpt2())
    dequantized = []
    real_dequantize = export_module._dequantize_int8_linear

    def counting_dequantize(module, dtype):
        dequantized.append(module)
        return real_dequantize(module, dtype)

    writes = []
    real_save = safetensors.torch.save_file

    def recording_save(tensors, filename, metadata=None):
        writes.append((len(dequantized), set(tensors)))
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(export_module, "_dequantize_int8_linear", counting_dequantize)
    monkeypatch.setattr(safetensors.torch, "save_file", recording_save)
    export_hf(model, tmp_path / "out", max_shard_bytes=20_000)

    int8_per_shard = []
    for _, names in writes:
        # c_attn fuses 3 Int8Linear parts; c_proj / c_fc are one each.
        int8_per_shard.append(sum(3 if n.endswith("c_attn.weight") else int(n.endswith(("c_proj.weight",
                                                                                          "c_fc.weight")))
                                  for n in names))
    assert len(writes) > 2 and sum(int8_per_shard) == len(dequantized) == 4 * LAYERS + 2 * LAYERS
    done = 0
    for (seen, _), count in zip(writes, int8_per_shard):
        done += count
        assert seen == done  # dequantizations so far == those of the shards written so far, this one included


# ---- atomicity ----

def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _failing_writer(fail_at_call):
    calls = []
    real_save = safetensors.torch.save_file

    def writer(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == fail_at_call:
            Path(filename).write_bytes(b"partial")  # a half-written file must not survive either
            raise OSError("injected failure while writing a shard")
        return real_save(tensors, filename, metadata=metadata)

    return writer


def test_failure_mid_write_leaves_no_out_dir(tmp_path, monkeypatch):
    model = _to_int8(_llama())
    parent = tmp_path / "exports"
    parent.mkdir()
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_writer(fail_at_call=2))
    with pytest.raises(OSError, match="injected failure"):
        export_hf(model, parent / "model", max_shard_bytes=24_000)
    assert list(parent.iterdir()) == []


def test_failure_keeps_existing_export_and_success_replaces_it(tmp_path, monkeypatch):
    first = _to_int8(_llama())
    out_dir = export_hf(first, tmp_path / "model", max_shard_bytes=24_000)  # sharded
    before = _snapshot(out_dir)

    second = _to_int8(_qwen2())
    with monkeypatch.context() as patch:
        patch.setattr(safetensors.torch, "save_file", _failing_writer(fail_at_call=1))
        with pytest.raises(OSError, match="injected failure"):
            export_hf(second, out_dir)
    assert _snapshot(out_dir) == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]

    export_hf(second, out_dir)  # single file now: no stale shards of the first export may remain
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert sorted(os.listdir(out_dir)) == ["config.json", "generation_config.json", "model.safetensors"]
    loaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    assert loaded.config.model_type == "qwen2"
    with safe_open(str(out_dir / "model.safetensors"), "pt") as f:
        reference = hf_state_dict(second)
        for key in f.keys():
            torch.testing.assert_close(f.get_tensor(key), reference[key], rtol=0, atol=0, msg=key)


# ---- tokenizer, config and errors ----

def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(VOCAB - 1)}
    vocab["[UNK]"] = VOCAB - 1
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def test_tokenizer_is_saved_and_model_config_untouched(tmp_path):
    model = _to_int8(_llama())
    dtype_before = model.config.dtype
    out_dir = export_hf(model, tmp_path / "with_tok", tokenizer=_tokenizer())
    assert model.config.dtype == dtype_before  # the export's config is a copy
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    assert tokenizer("t1 t5 zz").input_ids == [1, 5, VOCAB - 1]
    generation = json.loads((out_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == model.generation_config.eos_token_id


def test_unwritable_parent_is_a_clear_error(tmp_path, monkeypatch):
    model = _to_int8(_llama())
    parent = tmp_path / "readonly"
    parent.mkdir()
    real_access = os.access
    # Permission bits do not stop root (tests may run as root), so the check is driven through os.access.
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == parent else real_access(p, mode, **kw))
    with pytest.raises(PermissionError, match="not writable"):
        export_hf(model, parent / "model")
    assert list(parent.iterdir()) == []


def test_parent_that_refuses_the_temporary_directory(tmp_path, monkeypatch):
    import tempfile

    def refuse(**kwargs):
        raise PermissionError(13, "Permission denied", kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(PermissionError, match="not writable"):
        export_hf(_to_int8(_llama()), tmp_path / "model")


def test_parent_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        export_hf(_to_int8(_llama()), tmp_path / "file" / "model")


def test_refuses_to_replace_a_directory_that_is_not_an_export(tmp_path):
    out_dir = tmp_path / "precious"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a previous export"):
        export_hf(_to_int8(_llama()), out_dir)
    assert (out_dir / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["precious"]
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        export_hf(_to_int8(_llama()), tmp_path / "a_file")


def test_bad_arguments(tmp_path):
    model = _to_int8(_llama())
    with pytest.raises(TypeError, match="floating torch.dtype"):
        export_hf(model, tmp_path / "m", dtype=torch.int8)
    with pytest.raises(TypeError, match="floating torch.dtype"):
        hf_state_dict(model, dtype="bf16")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_shard_bytes"):
            export_hf(model, tmp_path / "m", max_shard_bytes=bad)
    with pytest.raises(TypeError, match="model_type"):   # not a Hugging Face model: refused before the disk
        export_hf(torch.nn.Linear(2, 2), tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_tied_config_with_untied_weights_is_refused(tmp_path):
    model = _llama(tied=True)
    model.lm_head = Int8Linear.from_linear(model.lm_head, block_size=BLOCK)  # no longer the embedding's weight
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        hf_state_dict(model)
    model.config.tie_word_embeddings = False  # the user's way out: export both
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(hf_state_dict(model))


@pytest.mark.gpu
def test_cuda_model_exports_the_same_cpu_tensors():
    """Weights on the GPU dequantize there and come back to the CPU; the product q * s is one fp32 multiply and the
    rounding to bf16 is round-to-nearest-even on either device, so the export is bit-identical to the CPU one."""
    model = _to_int8(_gpt2())
    on_cpu = hf_state_dict(model)
    on_gpu = hf_state_dict(model.cuda())
    assert list(on_gpu) == list(on_cpu)
    for key, value in on_gpu.items():
        assert value.device.type == "cpu", key
        torch.testing.assert_close(value, on_cpu[key], rtol=0, atol=0, msg=key)
