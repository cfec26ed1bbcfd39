"""GGUF tokenizer metadata: pre-tokenizer names readers split text by, token types, refusals; read back by
transformers' GGUF tokenizer builder where it implements the named pre-tokenizer."""
import pytest
from tokenizers import Regex, pre_tokenizers
from transformers import AutoTokenizer
from gguf import GGUFWriter, TokenType

from lowmem.checkpoint.gguf_vocab import add_tokenizer_metadata, tokenizer_metadata
from tests.unit.lowmem.checkpoint.tiny_tokenizers import TEXT, byte_level_tokenizer, sentencepiece_tokenizer

LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def _split(pattern):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _write(meta, path):
    writer = GGUFWriter(path, "llama")
    add_tokenizer_metadata(writer, meta)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()


@pytest.mark.parametrize("pattern, name", [(LLAMA3, "llama-bpe"), (QWEN2, "qwen2")])
def test_split_pre_tokenizers_are_named_and_read_back(pattern, name, tmp_path):
    tokenizer = byte_level_tokenizer(_split(pattern))
    meta = tokenizer_metadata(tokenizer, len(tokenizer) + 5)
    assert meta.pre == name and meta.model == "gpt2"
    assert meta.tokens[-5:] == [f"[PAD{i}]" for i in range(len(tokenizer), len(tokenizer) + 5)]
    assert meta.token_types[-1] == TokenType.UNUSED
    assert meta.token_types[:3] == [TokenType.CONTROL] * 3   # <unk>, <s>, </s>: control in a byte-level vocabulary
    _write(meta, tmp_path / "t.gguf")
    rebuilt = AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    text = TEXT + " 12345 don't\n\n  x"
    assert rebuilt(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_smollm2_digits_pre_tokenizer_is_named():
    digits = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                      pre_tokenizers.ByteLevel(add_prefix_space=False)])
    assert tokenizer_metadata(byte_level_tokenizer(digits), 300).pre == "smollm"


def test_unknown_tokenizers_are_refused_with_what_is_known():
    with pytest.raises(ValueError, match="cannot name this tokenizer's pre-tokenizer.*known: the Llama 3"):
        tokenizer_metadata(byte_level_tokenizer(pre_tokenizers.Whitespace()), 300)
    assert tokenizer_metadata(byte_level_tokenizer(pre_tokenizers.Whitespace()), 300, pre="gpt-2").pre == "gpt-2"
    with pytest.raises(ValueError, match="300 tokens .* but the model's embedding has 200 rows"):
        tokenizer_metadata(byte_level_tokenizer(), 200)


def test_sentencepiece_types_scores_and_space_prefix():
    tokenizer = sentencepiece_tokenizer()
    meta = tokenizer_metadata(tokenizer, len(tokenizer))
    assert meta.model == "llama" and meta.pre is None and meta.add_space_prefix
    assert meta.token_types[:4] == [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL, TokenType.BYTE]
    normal = [i for i, t in enumerate(meta.token_types) if t == TokenType.NORMAL]
    assert normal and all(meta.scores[i] == -i for i in normal)   # merge order: earlier pieces score higher


def test_space_prefix_from_a_prepend_normalizer_or_metaspace():
    from tokenizers import normalizers

    tokenizer = sentencepiece_tokenizer()
    backend = tokenizer.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    assert not tokenizer_metadata(tokenizer, len(tokenizer)).add_space_prefix
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    backend.pre_tokenizer = None
    assert tokenizer_metadata(tokenizer, len(tokenizer)).add_space_prefix
