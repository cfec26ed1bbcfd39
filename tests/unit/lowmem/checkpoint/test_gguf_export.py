"""GGUF export of INT8 models, read back by implementations lowmem did not write: transformers' GGUF loader
(weights, config, tokenizer) and gguf-py's GGUFReader (metadata, tensor names, types, bytes). Tiny random models."""
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)

import lowmem.checkpoint.gguf_export as gguf_export
from lowmem.checkpoint.export import export_hf
from lowmem.checkpoint.gguf_export import export_gguf, gguf_path
from lowmem.memory.live_bytes import LiveTensorBytes
from lowmem.model.adapters import find_adapter
from lowmem.model.int8_linear import Int8Linear
from quant.int8 import dequantize_int8
from tests.unit.lowmem.checkpoint.tiny_tokenizers import TEXT, byte_level_tokenizer

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS = 300, 64, 2, 4, 2
ARCHS = ["llama", "llama_tied", "mistral", "qwen2", "qwen3"]


def _config(arch):
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                  bos_token_id=1, eos_token_id=2)
    if arch.startswith("llama"):
        return LlamaForCausalLM, LlamaConfig(tie_word_embeddings=arch == "llama_tied", **common)
    if arch == "mistral":
        return MistralForCausalLM, MistralConfig(sliding_window=None, tie_word_embeddings=False, **common)
    if arch == "qwen2":
        return Qwen2ForCausalLM, Qwen2Config(tie_word_embeddings=False, **common)
    # head_dim 128 as in every Qwen3 (not hidden / heads): transformers' GGUF reader takes Qwen3Config's default
    # head_dim, 128, whatever the file says, so only this size reads back
    return Qwen3ForCausalLM, Qwen3Config(tie_word_embeddings=False, head_dim=128, **common)


def _model(arch, block_size=64, seed=0):
    """A random model with every decoder linear as Int8Linear (as prepare() makes them). Float parameters (norms,
    biases, embeddings) are random and rounded to bf16 values: GGUF keeps 1-D tensors in F32 (llama.cpp's choice)
    while the HF export casts them to bf16, so only bf16-representable values let the two files hold the same
    numbers (the rounding of a norm is not what these tests look at)."""
    torch.manual_seed(seed)
    cls, config = _config(arch)
    model = cls(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.copy_(1 + 0.3 * torch.randn_like(param) if param.abs().max() == 1 else torch.randn_like(param) * 0.1)
            param.copy_(param.to(torch.bfloat16).float())
    for spec in find_adapter(model).linear_specs(model):
        parent, _, child = spec.name.rpartition(".")
        setattr(model.get_submodule(parent), child,
                Int8Linear.from_linear(model.get_submodule(spec.name), block_size=block_size))
    return model


def _ids():
    return torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(5))


def _load_gguf(path: Path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def _logits(model):
    with torch.no_grad():
        return model(_ids()).logits


def _llama_permute(w, heads):
    """llama.cpp's convert_hf_to_gguf LlamaModel.permute, written out: per head (2, d/2) -> (d/2, 2) rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_weights(model):
    """{HF name: fp32 tensor} of the INT8 model, dequantised exactly (the reference the GGUF must approximate)."""
    out = {}
    for name, tensor in model.state_dict().items():
        prefix, _, leaf = name.rpartition(".")
        if leaf == "weight_q":
            module = model.get_submodule(prefix)
            out[f"{prefix}.weight"] = dequantize_int8(module.weight_q, module.weight_scales,
                                                      block_size=module.block_size)
        elif leaf != "weight_scales":
            out[name] = tensor.float()
    return out


# ---- values: transformers' GGUF loader against the HF export ----

@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_logits_equal_the_hf_export(arch, tmp_path):
    model = _model(arch)
    tokenizer = byte_level_tokenizer()
    path = export_gguf(model, tmp_path / "model.gguf", tokenizer=tokenizer, gguf_type="bf16")
    export_hf(model, tmp_path / "hf", tokenizer=tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    from_gguf = _load_gguf(path)
    assert from_gguf.config.tie_word_embeddings == (arch == "llama_tied")
    assert torch.equal(_logits(from_gguf), _logits(hf))


@pytest.mark.parametrize("block_size", [64, 48])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_q8_0_weights_within_the_rounding_bound(arch, block_size, tmp_path):
    """Every tensor read back by gguf-py against the INT8 model's exact values, un-permuted with the written-out
    formula: INT8 weights with block 64 keep their codes (error |q| |s - fp16(s)|, at most 127 s 2**-11 <= 2**-11
    of the block's max), with block 48 and float matrices they are requantised (at most d/2 + 127 |d - fp16(d)|,
    d = the 32-block's max / 127: about 2**-8 of its max); 1-D tensors are F32, exact."""
    model = _model(arch, block_size=block_size)
    path = export_gguf(model, tmp_path / "model.gguf", gguf_type="q8_0")
    reader = gguf.GGUFReader(path)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2, LAYERS)
    read = {t.name: t for t in reader.tensors}
    reference = _hf_weights(model)
    assert len(read) == len(reference)
    for hf_name, exact in reference.items():
        tensor = read[names.get_name(hf_name, try_suffixes=(".weight", ".bias"))]
        values = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy()).reshape(exact.shape)
        if arch == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            exact = _llama_permute(exact, HEADS if ".q_proj." in hf_name else KV_HEADS)
        error = (values - exact).abs()
        if exact.dim() == 1:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32 and torch.equal(values, exact)
            continue
        assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0
        block_max = exact.abs().reshape(exact.shape[0], -1, 32).amax(-1).repeat_interleave(32, dim=1)
        module = model.get_submodule(hf_name.removesuffix(".weight"))
        if isinstance(module, Int8Linear) and block_size % 32 == 0:
            assert (error <= 2.0**-11 * block_max + 2.0**-22 * exact.abs()).all(), hf_name
        else:
            assert (error <= (2.0**-8 + 2.0**-11) * block_max).all(), hf_name
            assert error.max() > 0   # requantised, not copied


def test_q8_0_logits_close_to_the_int8_model(tmp_path):
    """Read by transformers (which undoes the q/k permutation itself). Weights move by at most 2**-8 of their
    32-block's max (see above); to first order a logit moves by a few such steps times its scale, so 2**-4 of
    max|logits| is a loose bound, and far below a mapping error (a swapped or unpermuted q/k changes logits by
    about max|logits|)."""
    model = _model("llama")
    path = export_gguf(model, tmp_path / "model.gguf")
    expected = _logits(model)
    got = _logits(_load_gguf(path))
    assert (got - expected).abs().max() <= 2.0**-4 * expected.abs().max()
    assert not torch.equal(got, expected)


def test_f16_and_the_f16_fallback_for_rows_not_a_multiple_of_32(tmp_path):
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=80, num_hidden_layers=1,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    path = export_gguf(model, tmp_path / "model.gguf", gguf_type="q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F16   # rows of 80
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q8_0
    path = export_gguf(model, tmp_path / "f16.gguf", gguf_type="f16")
    reader = gguf.GGUFReader(path)
    for tensor in reader.tensors:
        hf = model.state_dict()
        assert tensor.tensor_type == (gguf.GGMLQuantizationType.F32 if len(tensor.shape) == 1
                                      else gguf.GGMLQuantizationType.F16)
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert torch.equal(torch.from_numpy(np.array(embd.data)).reshape(VOCAB, HIDDEN),
                       hf["model.embed_tokens.weight"].half())


# ---- metadata: gguf-py's reader ----

def _field(reader, key):
    return reader.fields[key].contents()


def test_metadata_names_and_types(tmp_path):
    model = _model("qwen3")
    path = export_gguf(model, tmp_path / "model.gguf", tokenizer=byte_level_tokenizer())
    reader = gguf.GGUFReader(path)
    assert _field(reader, "general.architecture") == "qwen3"
    assert _field(reader, "qwen3.block_count") == LAYERS
    assert _field(reader, "qwen3.embedding_length") == HIDDEN
    assert _field(reader, "qwen3.feed_forward_length") == 128
    assert _field(reader, "qwen3.attention.head_count") == HEADS
    assert _field(reader, "qwen3.attention.head_count_kv") == KV_HEADS
    assert _field(reader, "qwen3.context_length") == 64
    assert _field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert len(_field(reader, "tokenizer.ggml.tokens")) == VOCAB
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.1.attn_q_norm.weight",
            "blk.1.attn_k_norm.weight", "blk.0.ffn_gate.weight"} <= names
    assert all(not n.startswith("model.") for n in names)


# ---- tokenizer: transformers rebuilds it from the GGUF ----

def _same_ids(original, path: Path):
    rebuilt = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = TEXT + " " + original.eos_token + " tail"
    assert rebuilt(text)["input_ids"] == original(text)["input_ids"]
    messages = [{"role": "user", "content": TEXT}, {"role": "assistant", "content": "the lazy dog"}]
    assert rebuilt.apply_chat_template(messages, tokenize=True) == original.apply_chat_template(messages, tokenize=True)
    assert (rebuilt.bos_token_id, rebuilt.eos_token_id) == (original.bos_token_id, original.eos_token_id)


def test_byte_level_bpe_tokenizer_round_trips(tmp_path):
    tokenizer = byte_level_tokenizer()
    path = export_gguf(_model("llama"), tmp_path / "model.gguf", tokenizer=tokenizer)
    _same_ids(tokenizer, path)


def test_sentencepiece_tokenizer_round_trips(tmp_path):
    from tests.unit.lowmem.checkpoint.tiny_tokenizers import sentencepiece_tokenizer
    tokenizer = sentencepiece_tokenizer()
    path = export_gguf(_model("llama"), tmp_path / "model.gguf", tokenizer=tokenizer)
    reader = gguf.GGUFReader(path)
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    assert _field(reader, "tokenizer.ggml.token_type")[3 + 0x41] == gguf.TokenType.BYTE   # <0x41>
    _same_ids(tokenizer, path)


# ---- streaming, atomicity, errors ----

def test_export_holds_one_chunk_beyond_the_model(tmp_path, monkeypatch):
    """Under the live-tensor meter with 1024-element chunks: the peak stays within six fp32 chunk buffers (measured: under five),
    well below one float copy of the largest matrix (the 300 x 64 embedding)."""
    chunk_elems = 1024
    monkeypatch.setattr(gguf_export, "_CHUNK_ELEMS", chunk_elems)
    model = _model("llama", block_size=48)   # the requantising path: the one with the most transient buffers
    for gguf_type in ("q8_0", "bf16"):
        with LiveTensorBytes() as meter:
            export_gguf(model, tmp_path / f"{gguf_type}.gguf", gguf_type=gguf_type)
        assert 0 < meter.peak_bytes <= 6 * 4 * chunk_elems, gguf_type
        assert meter.peak_bytes < 4 * VOCAB * HIDDEN


def test_failure_mid_write_keeps_the_previous_file(tmp_path, monkeypatch):
    model = _model("llama")
    path = export_gguf(model, tmp_path / "model.gguf")
    before = path.read_bytes()
    calls = []
    real = gguf_export.q8_0_from_int8

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("injected failure while writing")
        return real(*args, **kwargs)

    monkeypatch.setattr(gguf_export, "q8_0_from_int8", failing)
    with pytest.raises(OSError, match="injected"):
        export_gguf(_model("llama", seed=1), tmp_path / "model.gguf")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_unsupported_architecture_is_refused_before_writing(tmp_path):
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=1, n_head=HEADS, n_positions=32))
    with pytest.raises(ValueError, match="gpt2.*supported: llama, mistral, qwen2, qwen3"):
        export_gguf(model, tmp_path / "out" / "model.gguf")
    assert not (tmp_path / "out").exists()


def test_bad_arguments_and_unwritable_targets(tmp_path, monkeypatch):
    model = _model("llama")
    with pytest.raises(ValueError, match="gguf_type must be one of q8_0, bf16, f16"):
        export_gguf(model, tmp_path / "m.gguf", gguf_type="q4_0")
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        export_gguf(model, tmp_path / "dir.gguf")
    assert gguf_path(tmp_path / "out") == tmp_path / "out" / "model.gguf"
    parent = tmp_path / "readonly"
    parent.mkdir()
    real_access = os.access
    # Permission bits do not stop root (tests may run as root), so the check is driven through os.access.
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == parent else real_access(p, mode, **kw))
    with pytest.raises(PermissionError, match="not writable"):
        export_gguf(model, parent / "model.gguf")
    assert list(parent.iterdir()) == []


def test_f16_overflow_and_unsupported_rope_are_clear_errors(tmp_path):
    model = _model("llama")
    with torch.no_grad():
        model.lm_head.weight[0, 0] = 1e5
    with pytest.raises(ValueError, match="lm_head|output.weight.*65504"):
        export_gguf(model, tmp_path / "m.gguf", gguf_type="f16")
    model = _model("llama")
    model.config.rope_parameters = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match=r"rope_type 'default', 'linear' or \(llama\) 'llama3', not 'yarn'"):
        export_gguf(model, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_llama3_rope_scaling_writes_rope_freqs_as_transformers_scales_the_frequencies(tmp_path):
    """llama.cpp divides rotary frequency i by rope_freqs[i]; transformers' own llama3 rope init is the reference:
    its scaled inverse frequencies times the factors must give back the unscaled ones."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    model = _model("llama")
    model.config.max_position_embeddings = 16384
    model.config.rope_parameters = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                                    "rope_theta": 500000.0}
    path = export_gguf(model, tmp_path / "model.gguf")
    reader = gguf.GGUFReader(path)
    written = torch.from_numpy(np.array(next(t for t in reader.tensors if t.name == "rope_freqs.weight").data))
    head_dim = HIDDEN // HEADS
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    plain = 1.0 / 500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    assert written.shape == (head_dim // 2,)
    torch.testing.assert_close(plain / written, scaled, rtol=1e-6, atol=0)
    assert written.min() == 1 and written.max() == 8   # both ends of the blend occur at this head size
    assert _field(reader, "llama.rope.freq_base") == 500000.0


@pytest.mark.gpu
@pytest.mark.parametrize("gguf_type", ["q8_0", "bf16"])
def test_cuda_model_writes_the_same_file(gguf_type, tmp_path):
    """Codes and scales are copied or dequantised on the GPU chunk by chunk and come back to the CPU: q8_0 reuses
    the codes and rounds the scales to fp16 (exact on either device), bf16 rounds one fp32 product to nearest even
    (the same on either device), so the two files are byte for byte equal."""
    model = _model("qwen2")
    on_cpu = export_gguf(model, tmp_path / "cpu.gguf", tokenizer=byte_level_tokenizer(), gguf_type=gguf_type)
    on_gpu = export_gguf(model.cuda(), tmp_path / "gpu.gguf", tokenizer=byte_level_tokenizer(), gguf_type=gguf_type)
    assert on_gpu.read_bytes() == on_cpu.read_bytes()
