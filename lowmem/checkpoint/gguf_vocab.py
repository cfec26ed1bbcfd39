"""A Hugging Face tokenizer as GGUF tokenizer metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).

Two kinds of vocabulary are written, the ones llama.cpp and transformers' GGUF reader both rebuild:
  - byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM2: a `BPE` model without byte fallback, `ByteLevel` decoder):
    tokenizer.ggml.model "gpt2", tokens spelled in the byte alphabet as in tokenizer.json, merges "a b";
    tokenizer.ggml.pre names the pre-tokenizer (the text splitting before BPE), recognised from the tokenizer's own
    pre-tokenizer: the Llama 3 and Qwen2 split patterns, GPT-2's ByteLevel regex, and SmolLM2's digits-then-GPT-2.
    Readers split text by this name, so an unknown pre-tokenizer is refused (ValueError) rather than guessed;
  - SentencePiece BPE (Llama 2, Mistral: a `BPE` model with byte fallback and "▁" for spaces): tokenizer.ggml.model
    "llama", scores -id (a SentencePiece BPE vocabulary lists pieces in merge order, and llama.cpp merges the
    highest score first), `<0xNN>` pieces typed BYTE, plus the merges for readers that use them.
Token types (as llama.cpp's converter writes them): an added special token is CONTROL (in a SentencePiece
vocabulary the unk token is UNKNOWN), any other added token USER_DEFINED, ids the tokenizer does not use (the
embedding has more rows than the vocabulary) "[PADn]" UNUSED.
Special ids (bos, eos, unk, pad), whether encoding adds bos / eos (seen by encoding a word), and the chat template
(a string, or named templates) come from the tokenizer object.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from gguf import GGUFWriter, TokenType

# Split patterns of the pre-tokenizers readers know by name (the same strings as in the tokenizer.json files).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_NAMES = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class TokenizerMetadata:
    """What the GGUF file says about the tokenizer; lists are indexed by token id (len == vocab rows)."""

    model: str                       # "gpt2" (byte-level BPE) | "llama" (SentencePiece BPE)
    pre: str | None                  # pre-tokenizer name (byte-level BPE only)
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)   # bos / eos / unk / pad -> id
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | list[dict[str, str]] | None = None
    add_space_prefix: bool = True    # SentencePiece only: "▁" before the first word


def _backend_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"GGUF export needs a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}")
    return json.loads(backend.to_str())


def _pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a byte-level BPE pre-tokenizer (tokenizer.json's `pre_tokenizer`), or None."""
    if not pre:
        return None
    kind = pre.get("type")
    if kind == "ByteLevel":
        return "gpt-2" if pre.get("use_regex", True) else None
    if kind != "Sequence":
        return None
    steps = pre.get("pretokenizers") or []
    kinds = [step.get("type") for step in steps]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        return _SPLIT_NAMES.get((steps[0].get("pattern") or {}).get("Regex"))
    return None


def _merges(model: dict) -> list[str]:
    merges = model.get("merges") or []
    # tokenizers >= 0.20 writes pairs as lists; GGUF keeps "a b" with a space inside a part written as U+0120 + 256
    return [m if isinstance(m, str) else " ".join(p.replace(" ", chr(ord(" ") + 256)) for p in m) for m in merges]


def _adds_space_prefix(spec: dict) -> bool:
    """Whether a SentencePiece tokenizer puts "▁" before the text: a Metaspace pre-tokenizer that prepends, or a
    Prepend("▁") normalizer (older Llama 2 tokenizer.json files)."""
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    prepends = r'"type": "Prepend", "prepend": "\u2581"' in text   # json.dumps writes "▁" escaped
    metaspace = re.search(r'"type": "Metaspace"[^}]*"prepend_scheme": "(first|always)"', text)
    return bool(prepends or metaspace)


def _adds(tokenizer, token_id: int | None, first: bool) -> bool:
    if token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and (ids[0] if first else ids[-1]) == token_id


def tokenizer_metadata(tokenizer, vocab_rows: int, *, pre: str | None = None) -> TokenizerMetadata:
    """The GGUF tokenizer metadata of a Hugging Face fast tokenizer for a model with `vocab_rows` embedding rows.

    pre: the pre-tokenizer name to write (e.g. the one of the GGUF the model came from) instead of recognising it.
    Raises ValueError for a tokenizer that is not byte-level or SentencePiece BPE, an unrecognised byte-level
    pre-tokenizer (without `pre`), or a vocabulary larger than the embedding.
    """
    spec = _backend_json(tokenizer)
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"GGUF export writes BPE tokenizers (byte-level or SentencePiece), not a "
                         f"{model.get('type')!r} model")
    byte_fallback = bool(model.get("byte_fallback"))
    decoder = (spec.get("decoder") or {}).get("type")
    if not byte_fallback and decoder != "ByteLevel":
        raise ValueError(f"a BPE tokenizer without byte fallback must decode with ByteLevel to be written as GGUF "
                         f"'gpt2', got decoder {decoder!r}")
    kind = "llama" if byte_fallback else "gpt2"
    if kind == "gpt2" and pre is None:
        pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
        if pre is None:
            raise ValueError(
                f"cannot name this tokenizer's pre-tokenizer for GGUF ({json.dumps(spec.get('pre_tokenizer'))[:200]});"
                " known: the Llama 3 and Qwen2 split patterns, GPT-2's ByteLevel, SmolLM2's Digits + ByteLevel")
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_rows or max(vocab.values(), default=-1) >= vocab_rows:
        raise ValueError(f"the tokenizer has {len(vocab)} tokens (largest id {max(vocab.values())}) but the model's "
                         f"embedding has {vocab_rows} rows")
    by_id = {index: token for token, index in vocab.items()}
    added = dict(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    unk_id = getattr(tokenizer, "unk_token_id", None)
    tokens, types, scores = [], [], []
    for index in range(vocab_rows):
        token = by_id.get(index)
        score = 0.0
        if token is None:
            token, kind_id = f"[PAD{index}]", TokenType.UNUSED
        elif index == unk_id and kind == "llama":
            kind_id = TokenType.UNKNOWN
        elif index in added:
            kind_id = TokenType.CONTROL if added[index].special else TokenType.USER_DEFINED
        elif kind == "llama" and _BYTE_PIECE.fullmatch(token):
            kind_id = TokenType.BYTE
        else:
            kind_id, score = TokenType.NORMAL, -float(index)
        tokens.append(token)
        types.append(int(kind_id))
        scores.append(score)
    special_ids = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad")}
    special_ids = {name: index for name, index in special_ids.items() if index is not None}
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = [{"name": name, "template": text} for name, text in template.items()]
    return TokenizerMetadata(model=kind, pre=pre if kind == "gpt2" else None, tokens=tokens, token_types=types,
                             scores=scores if kind == "llama" else None, merges=_merges(model),
                             special_ids=special_ids, add_bos=_adds(tokenizer, special_ids.get("bos"), first=True),
                             add_eos=_adds(tokenizer, special_ids.get("eos"), first=False), chat_template=template,
                             add_space_prefix=_adds_space_prefix(spec))


def add_tokenizer_metadata(writer: GGUFWriter, meta: TokenizerMetadata) -> None:
    """Write `meta` into the writer's key-value section (before its header is written)."""
    writer.add_tokenizer_model(meta.model)
    if meta.pre is not None:
        writer.add_tokenizer_pre(meta.pre)
    writer.add_token_list(meta.tokens)
    writer.add_token_types(meta.token_types)
    if meta.scores is not None:
        writer.add_token_scores(meta.scores)
    if meta.merges:
        writer.add_token_merges(meta.merges)
    for name, index in meta.special_ids.items():
        getattr(writer, f"add_{name}_token_id")(index)
    writer.add_add_bos_token(meta.add_bos)
    writer.add_add_eos_token(meta.add_eos)
    if meta.model == "llama":
        writer.add_add_space_prefix(meta.add_space_prefix)
    if meta.chat_template:
        writer.add_chat_template(meta.chat_template)
