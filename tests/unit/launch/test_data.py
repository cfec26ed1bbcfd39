"""launch.data: sources, malformed input, loss masks, packing, the cache, the split and the batch sampler.

The tokenizer is a real `transformers` fast tokenizer: a byte-level BPE trained here on a few sentences (decoding is
exact, so masks can be checked by decoding), with EOS/pad/chat special tokens and a ChatML-style template."""
import glob
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from launch import data as D

EOS, PAD, START, END = "<|endoftext|>", "<pad>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = ("{% for m in messages %}" + START + "{{ m['role'] }}\n{{ m['content'] }}" + END + "\n{% endfor %}"
                 "{% if add_generation_prompt %}" + START + "assistant\n{% endif %}")
# The same format, with the assistant turns marked for return_assistant_tokens_mask.
GENERATION_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}" + START + "assistant\n{% generation %}"
    "{{ m['content'] }}" + END + "\n{% endgeneration %}{% else %}" + START + "{{ m['role'] }}\n{{ m['content'] }}"
    + END + "\n{% endif %}{% endfor %}{% if add_generation_prompt %}" + START + "assistant\n{% endif %}")
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.", "Python is a programming language that lets you work quickly.",
    "What is two plus two? The answer is four.", "You are a helpful assistant. Hello, how are you today?",
    "Lists, tuples and dictionaries are built-in data structures.", "Training data is split into sequences.",
]


def _make_tokenizer(template=CHAT_TEMPLATE, extra_tokens=()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOS, PAD, START, END, *extra_tokens],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(SENTENCES * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=PAD, name_or_path="test-bpe")
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def tok():
    return _make_tokenizer()


@dataclass(frozen=True)
class Cfg:  # duck-typed stand-in for launch.config.DataConfig
    path: str | None = None
    format: str = "auto"
    text_field: str = "text"
    eval_fraction: float = 0.05
    eval_max_sequences: int = 64
    skip_bad_lines: bool = False
    pack: bool = True
    cache_dir: str | None = None
    follow_symlinks: bool = False


def _jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _decode_loss_tokens(tok, labels: torch.Tensor) -> str:
    return tok.decode([int(t) for t in labels if t != D.IGNORE_INDEX], skip_special_tokens=False)


# ---- sources ------------------------------------------------------------------------------------------------------

def test_text_jsonl_and_custom_field(tmp_path):
    f = _jsonl(tmp_path / "a.jsonl", [{"text": "first"}, "", {"text": "second", "id": 3}])
    docs = D.load_documents(str(f), Cfg())
    assert [(d.kind, d.text, d.source) for d in docs] == [("text", "first", f"{f}:1"), ("text", "second", f"{f}:3")]
    g = _jsonl(tmp_path / "b.jsonl", [{"body": "x"}])
    assert [d.text for d in D.load_documents(str(g), Cfg(text_field="body"))] == ["x"]


def test_plain_text_file_is_one_document_and_format_override(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("line one\nline two\n")
    assert [(d.kind, d.text) for d in D.load_documents(str(f), Cfg())] == [("text", "line one\nline two\n")]
    j = _jsonl(tmp_path / "data.log", [{"text": "hi"}])
    assert [d.text for d in D.load_documents(str(j), Cfg(format="jsonl"))] == ["hi"]


def test_directory_is_recursive_sorted_and_filtered(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    _jsonl(tmp_path / "b.jsonl", [{"text": "from b1"}, {"text": "from b2"}])
    (tmp_path / "a.md").write_text("from a")
    (tmp_path / "sub" / "c.rst.txt").write_text("from c")
    (tmp_path / "sub" / "d.txt").write_text("from d")
    (tmp_path / "ignored.csv").write_text("x,y")
    (tmp_path / ".hidden" / "e.txt").write_text("hidden")
    stats = {}
    docs = D.load_documents(str(tmp_path), Cfg(), stats=stats)
    assert [d.text for d in docs] == ["from a", "from b1", "from b2", "from c", "from d"]
    assert stats["files"] == 4 and stats["documents"] == 5


def test_missing_path_and_no_examples(tmp_path):
    with pytest.raises(D.DataError, match="nope.jsonl.*does not exist"):
        D.load_documents(str(tmp_path / "nope.jsonl"), Cfg())
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(D.DataError, match="no training examples in"):
        D.load_documents(str(tmp_path), Cfg())


_HAS_PYTHON_DOCS = bool(glob.glob(D.PYTHON_DOCS_GLOB))


@pytest.mark.skipif(not _HAS_PYTHON_DOCS, reason="python3-doc not installed (apt-get install python3-doc)")
def test_default_data_set_is_the_python_docs(tok):
    files = D.default_text_files()
    assert files == sorted(files) and len(files) > 20
    assert {f.relative_to(f.parents[1]).parts[0] for f in files} <= set(D.DEFAULT_DOC_FOLDERS)
    assert {f.parent.name for f in files} >= {"tutorial", "howto", "faq", "whatsnew"}
    assert all(f.name.endswith(".rst.txt") for f in files)
    assert 1e6 < sum(f.stat().st_size for f in files) < 10e6
    docs = D.load_documents(None, Cfg())
    assert len(docs) == len(files) and all(d.kind == "text" for d in docs)
    assert sum("Python" in d.text for d in docs) > len(docs) // 2
    ids, labels = D.tokenize_and_pack(docs[:2], tok, seq_len=128, pack=True)
    assert ids.shape[0] > 10 and torch.equal(ids, labels)


def test_default_data_set_missing_says_how_to_install(tmp_path):
    with pytest.raises(D.DataError) as e:
        D.default_text_files(str(tmp_path / "python3*" / "html" / "_sources"))
    assert "apt-get install python3-doc" in str(e.value) and "data.path" in str(e.value)


# ---- malformed input ----------------------------------------------------------------------------------------------

BAD_LINES = [
    ('{"text": "a",}', "invalid JSON"),
    ("[1, 2]", "not an object"),
    ('"just a string"', "is a JSON string, not an object"),
    ('{"body": "x"}', "no known field"),
    ('{"text": 5}', "'text' is a number; expected a string"),
    ('{"text": "   "}', "'text' is empty"),
    ('{"messages": "hi"}', "'messages' is not a non-empty list"),
    ('{"messages": [{"role": "user"}]}', r"messages\[0\]"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no message has role 'assistant'"),
    ('{"prompt": "q"}', "'completion' is missing"),
    ('{"prompt": 1, "completion": "a"}', "'prompt' is a number; expected a string"),
]


@pytest.mark.parametrize("line,problem", BAD_LINES)
def test_bad_line_names_file_line_and_problem(tmp_path, line, problem):
    f = _jsonl(tmp_path / "train.jsonl", [{"text": "ok"}, "", line, {"text": "ok"}])
    with pytest.raises(D.DataError, match=problem) as e:
        D.load_documents(str(f), Cfg())
    assert f"{f}:3: " in str(e.value) and "skip_bad_lines" in str(e.value)


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.txt"])
@pytest.mark.parametrize("skip_bad_lines", [False, True])
def test_empty_file(tmp_path, name, skip_bad_lines):
    """The only data file empty: skipping it cannot help, so the message says to fill it or point elsewhere; one
    empty file among others: remove it or skip it."""
    (tmp_path / name).write_text("\n  \n")
    with pytest.raises(D.DataError, match=f"{name}: the file is empty .*, and it is the only data file; put "
                                          "training data in it, or point data.path at another") as e:
        D.load_documents(str(tmp_path / name), Cfg(skip_bad_lines=skip_bad_lines))
    assert "skip_bad_lines" not in str(e.value)
    (tmp_path / "other.txt").write_text("some text")
    if skip_bad_lines:
        assert [d.text for d in D.load_documents(str(tmp_path), Cfg(skip_bad_lines=True))] == ["some text"]
    else:
        with pytest.raises(D.DataError, match=f"{name}:1: the file is empty .* remove it from .*, or set "
                                              "data.skip_bad_lines=true"):
            D.load_documents(str(tmp_path), Cfg())


def test_not_utf8(tmp_path):
    f = tmp_path / "latin.txt"
    f.write_bytes(b"ok\nsecond line caf\xe9\n")
    with pytest.raises(D.DataError, match=f"{f}:2: not valid UTF-8"):
        D.load_documents(str(f), Cfg())


def test_skip_bad_lines_counts(tmp_path):
    f = _jsonl(tmp_path / "a.jsonl", [{"text": "good 1"}] + [line for line, _ in BAD_LINES] + [{"text": "good 2"}])
    (tmp_path / "empty.txt").write_text("")
    stats = {}
    docs = D.load_documents(str(tmp_path), Cfg(skip_bad_lines=True), stats=stats)
    assert [d.text for d in docs] == ["good 1", "good 2"]
    assert stats["bad_lines_skipped"] == len(BAD_LINES) and stats["empty_files_skipped"] == 1
    only_bad = _jsonl(tmp_path / "bad.jsonl", ["{"])
    with pytest.raises(D.DataError, match="no training examples.*1 bad line"):
        D.load_documents(str(only_bad), Cfg(skip_bad_lines=True))


# ---- loss masks ---------------------------------------------------------------------------------------------------

CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "The answer is four."},
        {"role": "user", "content": "And the fox?"},
        {"role": "assistant", "content": "It jumps over the lazy dog."}]


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, GENERATION_TEMPLATE], ids=["prefix", "generation_block"])
def test_chat_loss_only_on_assistant_turns(tmp_path, template):
    tok = _make_tokenizer(template)
    f = _jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    docs = D.load_documents(str(f), Cfg())
    ids, labels = D.tokenize_and_pack(docs, tok, seq_len=256, pack=False)
    full = "".join(f"{START}{m['role']}\n{m['content']}{END}\n" for m in CHAT)
    row = [int(t) for t in ids[0] if t != tok.pad_token_id]
    assert tok.decode(row, skip_special_tokens=False) == full + EOS  # the rendering, then the separating EOS
    expected = "".join(m["content"] + END + "\n" for m in CHAT if m["role"] == "assistant")
    assert _decode_loss_tokens(tok, labels[0]) == expected
    loss = labels[0] != D.IGNORE_INDEX
    assert torch.equal(labels[0][loss], ids[0][loss])


def test_chat_without_template_is_an_error(tmp_path):
    tok = _make_tokenizer(template=None)
    docs = D.load_documents(str(_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])), Cfg())
    with pytest.raises(D.DataError, match="c.jsonl:1: .*no chat template"):
        D.tokenize_and_pack(docs, tok, seq_len=64, pack=False)


class _SlowView:
    """The fast tokenizer seen as one without offsets, to drive the prefix-length fallback."""
    is_fast = False

    def __init__(self, tok):
        self._tok = tok
        self.eos_token_id, self.pad_token_id = tok.eos_token_id, tok.pad_token_id

    def __call__(self, text, add_special_tokens=True, verbose=True):
        return {"input_ids": self._tok(text, add_special_tokens=add_special_tokens)["input_ids"]}


@pytest.mark.parametrize("slow", [False, True], ids=["offsets", "prefix_lengths"])
def test_prompt_completion_loss_only_on_completion(tmp_path, tok, slow):
    records = [{"prompt": "Question: what is two plus two? Answer:", "completion": " four."},
               {"prompt": "", "completion": "The quick brown fox."}]
    docs = D.load_documents(str(_jsonl(tmp_path / "pc.jsonl", records)), Cfg())
    assert [d.kind for d in docs] == ["prompt_completion"] * 2
    ids, labels = D.tokenize_and_pack(docs, _SlowView(tok) if slow else tok, seq_len=64, pack=False)
    for row, record in enumerate(records):
        assert _decode_loss_tokens(tok, labels[row]) == record["completion"] + EOS
        n_prompt = len(tok(record["prompt"])["input_ids"])
        assert (labels[row, :n_prompt] == D.IGNORE_INDEX).all()


# ---- packing ------------------------------------------------------------------------------------------------------

def _text_docs(n):
    return [D.Document(kind="text", source=f"t:{i}", text=SENTENCES[i % len(SENTENCES)] * (1 + i % 3))
            for i in range(n)]


@pytest.mark.parametrize("seq_len", [7, 16, 33])
def test_packing_matches_reference(tok, seq_len):
    docs = _text_docs(9)
    ids, labels = D.tokenize_and_pack(docs, tok, seq_len=seq_len, pack=True)
    stream = [t for d in docs for t in tok(d.text)["input_ids"] + [tok.eos_token_id]]  # reference twin
    n = len(stream) // seq_len
    assert ids.dtype == labels.dtype == torch.int64 and ids.shape == (n, seq_len)
    assert ids.flatten().tolist() == stream[:n * seq_len] and torch.equal(labels, ids)
    assert int((ids == tok.eos_token_id).sum()) == sum(t == tok.eos_token_id for t in stream[:n * seq_len])


def test_padding_mode_truncates_and_masks_padding(tok):
    docs = _text_docs(5)
    seq_len = 12
    ids, labels = D.tokenize_and_pack(docs, tok, seq_len=seq_len, pack=False)
    assert ids.shape == (len(docs), seq_len)
    for row, d in enumerate(docs):
        ref = (tok(d.text)["input_ids"] + [tok.eos_token_id])[:seq_len]
        pad = seq_len - len(ref)
        assert ids[row].tolist() == ref + [tok.pad_token_id] * pad
        assert labels[row].tolist() == ref + [D.IGNORE_INDEX] * pad
    without_eos, _ = D.tokenize_and_pack(docs[:1], tok, seq_len=64, pack=False, eos=False)
    assert tok.eos_token_id not in without_eos[0].tolist()


def test_too_little_data_for_one_sequence(tok):
    with pytest.raises(D.DataError, match="fewer than one sequence of seq_len=4096"):
        D.tokenize_and_pack(_text_docs(1), tok, seq_len=4096, pack=True)


# ---- build_data: cache and split ----------------------------------------------------------------------------------

def _write_corpus(tmp_path, n=60):
    f = tmp_path / "data" / "train.jsonl"
    f.parent.mkdir(exist_ok=True)
    return _jsonl(f, [{"text": SENTENCES[i % len(SENTENCES)] + f" Item {i}."} for i in range(n)])


def test_cache_hit_and_invalidation(tmp_path, tok):
    f = _write_corpus(tmp_path)
    cfg, cache = Cfg(path=str(f)), tmp_path / "cache"
    first = D.build_data(cfg, tok, seq_len=16, seed=0, cache_dir=cache)
    second = D.build_data(cfg, tok, seq_len=16, seed=0, cache_dir=cache)
    assert not first.stats["cache_hit"] and second.stats["cache_hit"]
    for name in ("train", "train_labels", "eval", "eval_labels"):
        a, b = getattr(first, name), getattr(second, name)
        assert a.dtype == b.dtype == torch.int64 and torch.equal(a, b)
    assert second.stats["tokens"] == first.stats["tokens"] and second.stats["sequences"] == first.stats["sequences"]
    assert len(list(cache.glob("*.safetensors"))) == 1 and not list(cache.glob("*.tmp"))

    with f.open("a") as fh:  # changed contents -> new key
        fh.write(json.dumps({"text": "one more line"}) + "\n")
    assert not D.build_data(cfg, tok, seq_len=16, seed=0, cache_dir=cache).stats["cache_hit"]
    assert not D.build_data(cfg, tok, seq_len=17, seed=0, cache_dir=cache).stats["cache_hit"]
    assert not D.build_data(Cfg(path=str(f), pack=False), tok, seq_len=16, seed=0, cache_dir=cache).stats["cache_hit"]
    other_tok = _make_tokenizer(extra_tokens=("<extra>",))
    assert not D.build_data(cfg, other_tok, seq_len=16, seed=0, cache_dir=cache).stats["cache_hit"]
    assert D.build_data(cfg, tok, seq_len=16, seed=5, cache_dir=cache).stats["cache_hit"]  # split is not cached
    assert len(list(cache.glob("*.safetensors"))) == 5

    hit = D.build_data(cfg, tok, seq_len=16, seed=0, cache_dir=cache)
    Path(hit.stats["cache_file"]).write_bytes(b"garbage")  # a damaged cache is rebuilt, with a warning
    with pytest.warns(UserWarning, match="unreadable"):
        rebuilt = D.build_data(cfg, tok, seq_len=16, seed=0, cache_dir=cache)
    assert not rebuilt.stats["cache_hit"] and torch.equal(rebuilt.train, hit.train)
    assert D.build_data(cfg, tok, seq_len=16, seed=0, cache_dir=cache).stats["cache_hit"]


def test_split_is_deterministic_disjoint_and_bounded(tmp_path, tok):
    f = _write_corpus(tmp_path, n=80)
    ids, labels = D.tokenize_and_pack(D.load_documents(str(f), Cfg()), tok, seq_len=8, pack=True)
    n = ids.shape[0]
    cfg = Cfg(path=str(f), eval_fraction=0.1, eval_max_sequences=1000)
    a = D.build_data(cfg, tok, seq_len=8, seed=1, cache_dir=None)
    assert a.eval.shape[0] == max(1, int(n * 0.1)) and a.train.shape[0] == n - a.eval.shape[0]
    rows = sorted(map(tuple, torch.cat([a.train, a.eval]).tolist()))
    assert rows == sorted(map(tuple, ids.tolist()))
    b = D.build_data(cfg, tok, seq_len=8, seed=1, cache_dir=None)
    c = D.build_data(cfg, tok, seq_len=8, seed=2, cache_dir=None)
    assert torch.equal(a.eval, b.eval) and not torch.equal(a.eval, c.eval)
    capped = D.build_data(Cfg(path=str(f), eval_fraction=0.5, eval_max_sequences=3), tok, seq_len=8, seed=1,
                          cache_dir=None)
    assert capped.eval.shape[0] == 3 and capped.stats["eval_sequences"] == 3


# ---- batch sampler ------------------------------------------------------------------------------------------------

def test_batch_sampler_epochs_are_permutations_and_reshuffle():
    n, bs, epochs = 10, 3, 6
    sampler = D.BatchSampler(n, bs, seed=7)
    stream = torch.cat([sampler.next_batch() for _ in range(n * epochs // bs)])
    assert stream.dtype == torch.int64 and stream.numel() == n * epochs
    chunks = stream.view(epochs, n)
    for epoch in chunks:
        assert sorted(epoch.tolist()) == list(range(n))
    assert len({tuple(c.tolist()) for c in chunks}) == epochs  # a fresh order each epoch
    again = D.BatchSampler(n, bs, seed=7)
    assert torch.equal(torch.cat([again.next_batch() for _ in range(n * epochs // bs)]), stream)
    other = D.BatchSampler(n, bs, seed=8)
    assert not torch.equal(torch.cat([other.next_batch() for _ in range(n * epochs // bs)]), stream)
    tiny = D.BatchSampler(2, 5, seed=0)  # batches larger than the data span several epochs
    assert sorted(tiny.next_batch().tolist()[:4]) == [0, 0, 1, 1]


@pytest.mark.parametrize("k", [0, 2, 3, 4, 7])
def test_batch_sampler_exact_resume(k):
    original = D.BatchSampler(11, 4, seed=3)
    for _ in range(k):
        original.next_batch()
    state = json.loads(json.dumps(original.state_dict()))  # survives the JSON sidecar
    assert set(state) == {"epoch", "position", "seed", "num_sequences"}
    resumed = D.BatchSampler(11, 4, seed=99)
    resumed.load_state_dict(state)
    for _ in range(8):
        assert torch.equal(resumed.next_batch(), original.next_batch())


def test_batch_sampler_rejects_changed_data():
    state = D.BatchSampler(11, 4, seed=3).state_dict()
    with pytest.raises(D.DataError, match="11 training sequences.*now gives 12"):
        D.BatchSampler(12, 4, seed=3).load_state_dict(state)
    with pytest.raises(D.DataError, match="lacks integer"):
        D.BatchSampler(11, 4, seed=3).load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="batch_size"):
        D.BatchSampler(11, 0, seed=3)
