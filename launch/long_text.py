"""Token ids of a very long text, computed in bounded pieces: a 50 MB single-line document needed 9.8 GB in one
tokenizer call (the tokenizer keeps offsets and token strings for every token while it works). `text_ids` cuts the
text at word boundaries whose seam tokenises the same cut or whole, so the ids equal the one-call ids.
"""
from __future__ import annotations

from typing import Any

__all__ = ["LONG_TEXT_CHARS", "text_ids"]

LONG_TEXT_CHARS = 100_000   # a text document longer than this is tokenised piece by piece
_SEAM_CHARS = 48            # context on either side of a cut that must tokenise the same cut or whole
_SEAM_TRIES = 64            # candidate cuts tried per piece before cutting hard


def _plain_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _special_wrap(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds before and after a text (BOS, EOS, ...), found by tokenising a probe with and
    without special tokens."""
    bare = _plain_ids(tokenizer, "probe")
    full = list(tokenizer("probe", add_special_tokens=True, verbose=False)["input_ids"])
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[:start], full[start + len(bare):]
    return [], []


def _seam_holds(tokenizer: Any, text: str, cut: int) -> bool:
    """True when the text around `cut` tokenises to the same ids in two pieces as in one: then cutting there
    changes no token (tokenizers look only a few characters across a word boundary)."""
    left, right = text[max(0, cut - _SEAM_CHARS):cut], text[cut:cut + _SEAM_CHARS]
    return _plain_ids(tokenizer, left + right) == _plain_ids(tokenizer, left) + _plain_ids(tokenizer, right)


def _cut_near(tokenizer: Any, text: str, target: int, floor: int) -> tuple[int, bool]:
    """A cut position in (floor, target], preferring the start of a whitespace run after a non-space character
    (a word boundary) whose seam holds; (target, False) when none is found."""
    pos, tries = target, 0
    while pos > floor and tries < _SEAM_TRIES:
        pos = max(text.rfind(" ", floor + 1, pos), text.rfind("\n", floor + 1, pos))
        if pos <= floor:
            break
        if not text[pos - 1].isspace():
            tries += 1
            if _seam_holds(tokenizer, text, pos):
                return pos, True
    return target, False


def text_ids(tokenizer: Any, text: str, *, piece_chars: int | None = None, info: dict | None = None) -> list[int]:
    """Token ids of `text` with the tokenizer's special tokens, as `tokenizer(text)` gives them, computed in pieces of
    at most piece_chars characters so the tokenizer's working memory stays bounded (a 50 MB line needed 9.8 GB
    whole). Pieces are cut at word boundaries whose seam tokenises the same either way, so the ids equal the whole
    text's; where no such boundary exists within a piece (one 100,000-character word) the cut is made anyway and
    counted in info["hard_cuts"]. piece_chars defaults to LONG_TEXT_CHARS."""
    piece_chars = LONG_TEXT_CHARS if piece_chars is None else piece_chars
    if len(text) <= piece_chars:
        return list(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])
    from tqdm.auto import tqdm

    prefix, suffix = _special_wrap(tokenizer)
    ids, start = list(prefix), 0
    # Minutes for tens of MB: a bar on a terminal (none in a log file or for a few pieces).
    with tqdm(total=len(text), unit="char", unit_scale=True, desc="tokenising a long document", leave=False,
              disable=None if len(text) > 20 * piece_chars else True) as bar:
        while start < len(text):
            end, clean = len(text), True
            if len(text) - start > piece_chars:
                end, clean = _cut_near(tokenizer, text, start + piece_chars, start + piece_chars // 2)
            if not clean and info is not None:
                info["hard_cuts"] = info.get("hard_cuts", 0) + 1
            ids += _plain_ids(tokenizer, text[start:end])
            bar.update(end - start)
            start = end
    return ids + suffix
