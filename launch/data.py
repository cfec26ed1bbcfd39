"""The data pipeline of `python -m launch.finetune`: files -> documents -> token ids and labels -> batches.

Documents (`load_documents`, `DataError`, the embedded default set) come from `launch.documents` and are
re-exported here, so `launch.data` is the one name for the whole pipeline.

Tokens (`tokenize_and_pack`; a text longer than LONG_TEXT_CHARS goes through `launch.long_text.text_ids`, in
bounded pieces with the same ids): ids and labels (-100 where there is no loss) of shape (sequences, seq_len), either
packed (documents joined by EOS and cut into full windows) or one padded/truncated document per row.
`build_data` adds an on-disk cache keyed by everything that changes the tokens, and a seeded held-out split;
`BatchSampler` hands out resumable, seeded batches of row indices.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from launch.documents import (DEFAULT_DOC_FOLDERS, PYTHON_DOCS_GLOB, DataError, Document,
                              default_text_files, listed_files, load_documents)
from launch.long_text import LONG_TEXT_CHARS, text_ids

__all__ = ["BatchSampler", "DEFAULT_DOC_FOLDERS", "DataError", "Document", "LONG_TEXT_CHARS", "PYTHON_DOCS_GLOB",
           "TokenizedData", "build_data", "default_text_files", "load_documents", "text_ids", "tokenize_and_pack"]

IGNORE_INDEX = -100
_CACHE_VERSION = 2   # 2: JSONL split on "\n" only; long texts tokenised in pieces


@dataclass
class TokenizedData:
    """train/eval: int64 (N, seq_len) input ids; *_labels: int64 (N, seq_len), -100 where there is no loss."""

    train: Tensor
    train_labels: Tensor
    eval: Tensor
    eval_labels: Tensor
    stats: dict = field(default_factory=dict)


# ---- tokens -------------------------------------------------------------------------------------------------------

_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _render(tokenizer: Any, messages: tuple, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def _chat_spans(tokenizer: Any, doc: Document) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans [start, end) of its assistant turns.

    A turn spans from the end of the history rendered with the generation prompt to the end of the history including
    the turn (so its end-of-turn marker carries loss too). Templates that rewrite earlier turns break that prefix
    property; then the span is the message content found in the rendering."""
    messages = doc.messages
    full = _render(tokenizer, messages, False)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], True) if i else ""
        upto = _render(tokenizer, messages[:i + 1], False)
        if full.startswith(upto) and upto.startswith(prefix) and len(prefix) >= cursor:
            spans.append((len(prefix), len(upto)))
        else:
            start = full.find(message["content"], cursor)
            if start < 0:
                raise DataError(f"{doc.source}: the tokenizer's chat template does not reproduce assistant message "
                                f"{i} verbatim, so its loss mask cannot be located; expected a template that renders "
                                "message content unchanged (or convert the data to prompt/completion).")
            spans.append((start, start + len(message["content"])))
        cursor = spans[-1][1]
    return full, spans


def _ids_with_mask(tokenizer: Any, text: str, spans: list[tuple[int, int]],
                   add_special_tokens: bool) -> tuple[list[int], list[bool]]:
    """Token ids of `text` and, per token, whether it overlaps one of the character spans (the loss spans)."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True, verbose=False)
        mask = [any(lo < span_end and hi > span_start for span_start, span_end in spans)
                for lo, hi in enc["offset_mapping"]]
        return list(enc["input_ids"]), mask
    # No offsets (slow tokenizer): a span's tokens are those between the token counts of the text up to its ends.
    ids = tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]
    mask = [False] * len(ids)
    for start, end in spans:
        lo, hi = (len(tokenizer(text[:c], add_special_tokens=add_special_tokens, verbose=False)["input_ids"])
                  for c in (start, end))
        mask[lo:hi] = [True] * (hi - lo)
    return list(ids), mask


def _chat_ids(tokenizer: Any, doc: Document) -> tuple[list[int], list[bool]]:
    try:
        template = tokenizer.get_chat_template()
    except (ValueError, AttributeError):
        raise DataError(f"{doc.source}: a chat example ('messages'), but tokenizer "
                        f"{getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; use a model that has one "
                        "(an instruct/chat checkpoint), set tokenizer.chat_template, or write the data as "
                        "prompt/completion or text.") from None
    if _GENERATION_BLOCK.search(template):
        out = tokenizer.apply_chat_template(list(doc.messages), tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        mask = [bool(m) for m in out["assistant_masks"]]
        if any(mask):
            return list(out["input_ids"]), mask
    text, spans = _chat_spans(tokenizer, doc)
    return _ids_with_mask(tokenizer, text, spans, add_special_tokens=False)  # the template wrote its own BOS


def _tokenize_documents(documents: list[Document], tokenizer: Any,
                        info: dict | None = None) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) per document; labels are the ids where there is loss, else -100."""
    texts = [d.text for d in documents if d.kind == "text" and len(d.text) <= LONG_TEXT_CHARS]
    text_ids_ = iter(tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"] if texts else [])
    out = []
    for doc in documents:
        if doc.kind == "text":
            ids = (list(next(text_ids_)) if len(doc.text) <= LONG_TEXT_CHARS
                   else text_ids(tokenizer, doc.text, piece_chars=LONG_TEXT_CHARS, info=info))
            out.append((ids, list(ids)))
            continue
        if doc.kind == "chat":
            ids, mask = _chat_ids(tokenizer, doc)
        elif doc.kind == "prompt_completion":
            text = doc.prompt + doc.completion
            ids, mask = _ids_with_mask(tokenizer, text, [(len(doc.prompt), len(text))], add_special_tokens=True)
        else:
            raise ValueError(f"unknown document kind {doc.kind!r} ({doc.source}); expected text, chat or "
                             "prompt_completion")
        out.append((ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]))
    return out


def _tokens(documents: list[Document], tokenizer: Any, seq_len: int, pack: bool,
            eos: bool) -> tuple[Tensor, Tensor, dict]:
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    eos_id = tokenizer.eos_token_id
    if eos and eos_id is None:
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no eos_token, which separates "
                        "documents; set tokenizer.eos_token, or pass eos=False.")
    pad_id = next((t for t in (tokenizer.pad_token_id, eos_id) if t is not None), 0)
    rows_ids, rows_labels, flat_ids, flat_labels = [], [], [], []
    info = {"tokens": 0, "truncated_documents": 0, "dropped_tail_tokens": 0}
    for doc, (ids, labels) in zip(documents, _tokenize_documents(documents, tokenizer, info)):
        if eos and (not ids or ids[-1] != eos_id):
            # The model learns to stop after text and completions; a chat template already ends each turn itself,
            # so there the EOS only separates documents.
            learn = doc.kind != "chat" and bool(labels) and labels[-1] != IGNORE_INDEX
            ids, labels = ids + [eos_id], labels + [eos_id if learn else IGNORE_INDEX]
        info["tokens"] += len(ids)
        if pack:
            flat_ids += ids
            flat_labels += labels
            continue
        info["truncated_documents"] += len(ids) > seq_len
        pad = max(0, seq_len - len(ids))
        rows_ids.append(ids[:seq_len] + [pad_id] * pad)
        rows_labels.append(labels[:seq_len] + [IGNORE_INDEX] * pad)
    if pack:
        n = len(flat_ids) // seq_len
        if n == 0:
            raise DataError(f"the data holds {len(flat_ids)} tokens, fewer than one sequence of seq_len={seq_len}; "
                            "add data, lower seq_len, or set data.pack=false (one padded document per sequence).")
        info["dropped_tail_tokens"] = len(flat_ids) - n * seq_len
        ids_t = torch.tensor(flat_ids[:n * seq_len], dtype=torch.int64).view(n, seq_len)
        labels_t = torch.tensor(flat_labels[:n * seq_len], dtype=torch.int64).view(n, seq_len)
    else:
        ids_t = torch.tensor(rows_ids, dtype=torch.int64).view(-1, seq_len)
        labels_t = torch.tensor(rows_labels, dtype=torch.int64).view(-1, seq_len)
    return ids_t, labels_t, info


def tokenize_and_pack(documents: list[Document], tokenizer: Any, *, seq_len: int, pack: bool,
                      eos: bool = True) -> tuple[Tensor, Tensor]:
    """ids, labels: int64 (N, seq_len); labels -100 on padding and where there is no loss (prompts, non-assistant
    turns). pack=True: documents joined, each followed by EOS, cut into N = tokens // seq_len windows (ragged tail
    dropped); pack=False: one document (+ EOS) per row, truncated or right-padded with pad_token_id (else EOS)."""
    ids, labels, _ = _tokens(documents, tokenizer, seq_len, pack, eos)
    return ids, labels


# ---- cache and split ----------------------------------------------------------------------------------------------

def _tokenizer_identity(tokenizer: Any) -> dict:
    """What decides the token ids: name, size, special tokens, chat template and a hash of the full vocabulary
    (for fast tokenizers the whole serialized pipeline: normalizer, merges, post-processor)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        blob = json.dumps(json.loads(backend.to_str()), sort_keys=True)
    else:
        blob = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {"name_or_path": str(getattr(tokenizer, "name_or_path", "")), "class": type(tokenizer).__name__,
            "size": len(tokenizer), "special": json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
            "chat_template": str(getattr(tokenizer, "chat_template", None)),
            "vocab_sha256": hashlib.sha256(blob.encode()).hexdigest()}


def _cache_key(tokenizer: Any, files: list[tuple[Path, str]], cfg: Any, seq_len: int, pack: bool) -> str:
    key = {"version": _CACHE_VERSION, "tokenizer": _tokenizer_identity(tokenizer), "seq_len": seq_len, "pack": pack,
           "text_field": getattr(cfg, "text_field", "text"), "skip_bad_lines": bool(getattr(cfg, "skip_bad_lines",
                                                                                            False)),
           "files": [(fmt, hashlib.sha256(f.read_bytes()).hexdigest()) for f, fmt in files]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _read_cache(file: Path) -> tuple[Tensor, Tensor, dict] | None:
    if not file.is_file():
        return None
    from safetensors import safe_open
    try:
        with safe_open(str(file), framework="pt") as f:
            stats = json.loads(f.metadata()["stats"])
            return f.get_tensor("ids").long(), f.get_tensor("labels").long(), stats
    except Exception as e:  # a damaged cache is rebuilt, never trusted
        warnings.warn(f"ignoring unreadable tokenized-data cache {file} ({e}); rebuilding it")
        return None


def _write_cache(file: Path, ids: Tensor, labels: Tensor, stats: dict) -> None:
    """Atomic: a temp file in the same directory, fsynced, then renamed over the target."""
    from safetensors.torch import save_file
    tmp = None
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=file.stem[:16], suffix=".tmp")
        os.close(fd)
        save_file({"ids": ids.to(torch.int32).contiguous(), "labels": labels.to(torch.int32).contiguous()}, tmp,
                  metadata={"stats": json.dumps(stats)})  # int32 halves the file; vocabularies are far below 2**31
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except OSError as e:
        warnings.warn(f"could not write the tokenized-data cache {file} ({e}); continuing without it")
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def build_data(cfg: Any, tokenizer: Any, *, seq_len: int, seed: int,
               cache_dir: str | os.PathLike | None) -> TokenizedData:
    """Load, tokenize and pack cfg.path (cached under cache_dir when given), drop sequences without loss tokens,
    and hold out min(eval_max_sequences, max(1, floor(eval_fraction * N))) sequences (none when N < 2) chosen by
    torch.Generator(seed); both parts keep the file order."""
    path, pack = getattr(cfg, "path", None), bool(getattr(cfg, "pack", True))
    files = listed_files(path, cfg)
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir).expanduser() / f"{_cache_key(tokenizer, files, cfg, seq_len, pack)}.safetensors"
    cached = _read_cache(cache_file) if cache_file is not None else None
    if cached is not None:
        ids, labels, stats = cached
    else:
        stats = {}
        documents = load_documents(path, cfg, stats=stats, files=files)
        ids, labels, info = _tokens(documents, tokenizer, seq_len, pack, eos=True)
        has_loss = (labels != IGNORE_INDEX).any(dim=1)
        ids, labels = ids[has_loss], labels[has_loss]
        stats.update(info, sequences=int(ids.shape[0]), sequences_without_loss_dropped=int((~has_loss).sum()),
                     loss_tokens=int((labels != IGNORE_INDEX).sum()), seq_len=seq_len, pack=pack)
        if ids.shape[0] == 0:
            raise DataError(f"no sequence of {path or 'the embedded default data set'} has a loss token at "
                            f"seq_len={seq_len} (prompts longer than seq_len?); raise seq_len or shorten prompts.")
        if cache_file is not None:
            _write_cache(cache_file, ids, labels, stats)
    stats = dict(stats, cache_hit=cached is not None, cache_file=str(cache_file) if cache_file else None)

    n = ids.shape[0]
    fraction = float(getattr(cfg, "eval_fraction", 0.05))
    n_eval = 0 if n < 2 or fraction <= 0 else min(max(1, int(n * fraction)),
                                                   int(getattr(cfg, "eval_max_sequences", 64)), n - 1)
    held_out = torch.zeros(n, dtype=torch.bool)
    held_out[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_eval]] = True
    stats.update(train_sequences=n - n_eval, eval_sequences=n_eval)
    return TokenizedData(train=ids[~held_out], train_labels=labels[~held_out], eval=ids[held_out],
                         eval_labels=labels[held_out], stats=stats)


# ---- batches ------------------------------------------------------------------------------------------------------

def _epoch_seed(seed: int, epoch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"lowmem-batches:{seed}:{epoch}".encode()).digest()[:8], "little") >> 1


class BatchSampler:
    """Batches of row indices, int64 (batch_size,): epoch e walks a permutation of range(num_sequences) drawn from
    (seed, e); a batch that reaches the end of an epoch is completed from the next one. The whole position is
    (epoch, position), so `state_dict()` saved after k batches and loaded into a new sampler continues with batch
    k + 1 exactly. Loading adopts the saved seed (the checkpoint decides the order)."""

    def __init__(self, num_sequences: int, batch_size: int, seed: int):
        for name, value in (("num_sequences", num_sequences), ("batch_size", batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.num_sequences, self.batch_size, self.seed = num_sequences, batch_size, int(seed)
        self.epoch = self.position = 0
        self._perm, self._perm_key = None, None

    def _permutation(self) -> Tensor:
        if self._perm_key != (self.seed, self.epoch):
            gen = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
            self._perm, self._perm_key = torch.randperm(self.num_sequences, generator=gen), (self.seed, self.epoch)
        return self._perm

    def next_batch(self) -> Tensor:
        parts, need = [], self.batch_size
        while need:
            if self.position == self.num_sequences:
                self.epoch, self.position = self.epoch + 1, 0
            take = min(need, self.num_sequences - self.position)
            parts.append(self._permutation()[self.position:self.position + take])
            self.position += take
            need -= take
        return torch.cat(parts)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_sequences": self.num_sequences}

    def load_state_dict(self, state: dict) -> None:
        missing = [k for k in ("epoch", "position", "seed", "num_sequences") if not isinstance(state.get(k), int)]
        if missing:
            raise DataError(f"data sampler state {state!r} lacks integer {missing}; expected the dict written by "
                            "BatchSampler.state_dict()")
        if state["num_sequences"] != self.num_sequences:
            raise DataError(f"the checkpoint's data position is for {state['num_sequences']} training sequences, but "
                            f"the data now gives {self.num_sequences}: the data files, seq_len, data.pack or the "
                            "tokenizer changed since it was saved; restore them to resume, or start a new run.")
        if not (0 <= state["position"] <= self.num_sequences and state["epoch"] >= 0):
            raise DataError(f"data sampler state {state!r} is out of range; expected 0 <= position <= "
                            f"{self.num_sequences} and epoch >= 0")
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]
