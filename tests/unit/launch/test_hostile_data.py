"""Hostile training data through the user's entry points (`load_documents`, `build_data`, `tokenize_and_pack`): raw
U+2028 inside a JSON string, 100,000-deep arrays and 5000-digit numbers on a JSONL line, long single-line documents,
symbolic links out of the data directory."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from launch import data as D
from launch.config_loader import config_help, load_train_config

from .test_data import SENTENCES, Cfg, _make_tokenizer




@pytest.fixture(scope="module")
def tok():
    return _make_tokenizer()


@pytest.fixture(scope="module")
def metaspace_tok():
    """A SentencePiece-style tokenizer (Metaspace: spaces become '▁', a '▁' is prepended to the first word), whose
    start-of-text rule makes naive cutting change tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    backend.train_from_iterator(SENTENCES * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


# ---- JSONL lines ----------------------------------------------------------------------------------------------------

def test_raw_line_separators_inside_a_json_string_stay_in_the_line(tmp_path):
    """U+2028, U+2029 and U+0085 are legal raw inside a JSON string; only "\\n" ends a JSON Lines record."""
    f = tmp_path / "a.jsonl"
    texts = ["one\u2028two", "three\u2029four\u0085five", "six"]
    f.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\r\n" for t in texts), encoding="utf-8")
    assert "\u2028" in f.read_text(encoding="utf-8")            # written raw, not as an escape
    docs = D.load_documents(str(f), Cfg())
    assert [d.text for d in docs] == texts
    assert [d.source for d in docs] == [f"{f}:1", f"{f}:2", f"{f}:3"]


HOSTILE_LINES = [
    ("[" * 100_000 + "]" * 100_000, "JSON nested deeper than the reader allows"),
    ('{"text": "a", "n": ' + "9" * 5000 + "}", "a number has more than 4300 digits"),
    ('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}", "JSON nested deeper than the reader allows"),
]


@pytest.mark.parametrize("line, problem", HOSTILE_LINES, ids=["deep-array", "huge-int", "deep-field"])
def test_deep_nesting_and_huge_numbers_are_bad_lines_with_file_and_line(tmp_path, line, problem):
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"text": "good"}) + "\n" + line + "\n" + json.dumps({"text": "also good"}) + "\n")
    with pytest.raises(D.DataError) as err:
        D.load_documents(str(f), Cfg())
    assert str(err.value).startswith(f"{f}:2: {problem}") and "skip_bad_lines" in str(err.value)
    assert len(str(err.value)) < 600
    stats = {}
    docs = D.load_documents(str(f), Cfg(skip_bad_lines=True), stats=stats)
    assert [d.text for d in docs] == ["good", "also good"] and stats["bad_lines_skipped"] == 1


# ---- long documents -------------------------------------------------------------------------------------------------

def _prose(n_sentences: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    parts = []
    for i in range(n_sentences):
        parts.append(rng.choice(SENTENCES))
        parts.append(rng.choice([" ", " ", "  ", "\n", "\n\n", " \n"]))
    return "".join(parts)


@pytest.mark.parametrize("which", ["byte_level_bpe", "metaspace"])
@pytest.mark.parametrize("piece_chars", [40, 97, 500])
def test_long_text_in_pieces_gives_the_whole_texts_tokens(tok, metaspace_tok, which, piece_chars):
    """Independent reference: the tokenizer called once on the whole text (what a short document gets)."""
    tokenizer = tok if which == "byte_level_bpe" else metaspace_tok
    text = _prose(400)
    info = {}
    assert D.text_ids(tokenizer, text, piece_chars=piece_chars, info=info) == \
        list(tokenizer(text, add_special_tokens=True)["input_ids"])
    assert info.get("hard_cuts", 0) == 0


def test_a_word_longer_than_a_piece_is_cut_hard_and_counted(tok):
    text = "x" * 1000 + " the end"
    info = {}
    ids = D.text_ids(tok, text, piece_chars=100, info=info)
    assert info["hard_cuts"] >= 9
    assert tok.decode(ids) == text                            # every character is still there, in order


def test_build_data_tokenises_a_long_single_line_in_pieces(tmp_path, tok, monkeypatch):
    """The same packed tensors whether the long line is tokenised whole or in pieces."""
    f = tmp_path / "long.jsonl"
    f.write_text(json.dumps({"text": _prose(2000, seed=1)}) + "\n" + json.dumps({"text": "short one"}) + "\n")
    whole = D.build_data(Cfg(path=str(f)), tok, seq_len=32, seed=0, cache_dir=None)
    calls = []
    original = D.text_ids
    monkeypatch.setattr(D, "LONG_TEXT_CHARS", 1000)
    monkeypatch.setattr(D, "text_ids", lambda *a, **k: calls.append(1) or original(*a, **k))
    pieces = D.build_data(Cfg(path=str(f)), tok, seq_len=32, seed=0, cache_dir=None)
    assert calls == [1]                                      # the long line, not the short one
    assert pieces.train.equal(whole.train) and pieces.eval.equal(whole.eval)
    assert pieces.train_labels.equal(whole.train_labels)


# ---- symbolic links -------------------------------------------------------------------------------------------------

@pytest.fixture
def linked_tree(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("outside text")
    (outside / "folder").mkdir()
    (outside / "folder" / "more.txt").write_text("outside folder text")
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("inside text")
    (data / "b.txt").symlink_to(data / "a.txt")              # a link inside the directory: read
    (data / "passwd.txt").symlink_to(outside / "secret.txt")
    (data / "linked").symlink_to(outside / "folder", target_is_directory=True)
    return data


def test_links_out_of_the_data_directory_are_skipped_and_named(linked_tree, capsys):
    docs = D.load_documents(str(linked_tree), Cfg())
    assert [d.text for d in docs] == ["inside text", "inside text"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "skipped 2 symbolic link(s)" in err
    assert str(linked_tree / "passwd.txt") in err and str(linked_tree / "linked") in err
    assert "data.follow_symlinks=true" in err


def test_follow_symlinks_reads_them(linked_tree, capsys):
    cfg = load_train_config(None, [f"data.path={linked_tree}", "data.follow_symlinks=true"]).data
    texts = sorted(d.text for d in D.load_documents(str(linked_tree), cfg))
    assert texts == ["inside text", "inside text", "outside folder text", "outside text"]
    assert "skipped" not in capsys.readouterr().err
    assert "data.follow_symlinks = false" in config_help()


def test_a_link_loop_is_walked_once(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "t.txt").write_text("text")
    (data / "sub" / "loop").symlink_to(data, target_is_directory=True)
    assert [d.text for d in D.load_documents(str(data), Cfg())] == ["text"]


def test_a_file_named_directly_is_read_even_through_a_link(tmp_path):
    (tmp_path / "real.txt").write_text("named")
    os.symlink(tmp_path / "real.txt", tmp_path / "link.txt")
    assert [d.text for d in D.load_documents(str(tmp_path / "link.txt"), Cfg())] == ["named"]
    assert Path(tmp_path / "link.txt").is_symlink()
