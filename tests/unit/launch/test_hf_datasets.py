"""Local Hugging Face data sets as training data: save_to_disk directories, parquet and arrow files, with the JSONL
field mapping and file:row errors."""
import pytest

pa = pytest.importorskip("pyarrow", reason="pyarrow is in the hf and test extras")
import pyarrow.parquet as pq  # noqa: E402

from launch.config import DataConfig  # noqa: E402
from launch.documents import DataError, data_files, load_documents  # noqa: E402

ROWS = [
    {"text": "the quick brown fox"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {"prompt": "two plus two is", "completion": " four"},
]


def expected_docs(docs):
    return [(d.kind, d.text, d.messages, d.prompt, d.completion) for d in docs]


WANT = [("text", "the quick brown fox", (), "", ""),
        ("chat", "", ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}), "", ""),
        ("prompt_completion", "", (), "two plus two is", " four")]


def columns(rows):
    """{field: values} over the union of the rows' fields (null where a row lacks one), as a table holds them."""
    names = list(dict.fromkeys(k for r in rows for k in r))
    return {k: [r.get(k) for r in rows] for k in names}


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pydict(columns(rows)), path)
    return path


def test_parquet_rows_map_like_jsonl(tmp_path):
    file = write_parquet(tmp_path / "train.parquet", ROWS)
    stats = {}
    docs = load_documents(file, DataConfig(), stats=stats)
    assert expected_docs(docs) == WANT
    assert [d.source for d in docs] == [f"{file}:{i}" for i in (1, 2, 3)]
    assert stats["chat_documents"] == 1 and stats["files"] == 1
    # A directory of parquet files is read too (sorted by name).
    write_parquet(tmp_path / "more.parquet", ROWS[:1])
    assert [f.name for f, kind in data_files(tmp_path, "auto")] == ["more.parquet", "train.parquet"]
    assert all(kind == "parquet" for _, kind in data_files(tmp_path, "auto"))


def test_parquet_malformed_row_names_file_and_row(tmp_path):
    file = write_parquet(tmp_path / "bad.parquet", ROWS[:2] + [{"text": "   "}, {"prompt": "no completion"}])
    with pytest.raises(DataError) as err:
        load_documents(file, DataConfig())
    assert str(err.value).startswith(f"{file}:3: field 'text' is empty") and "skip_bad_lines" in str(err.value)
    stats = {}
    docs = load_documents(file, DataConfig(skip_bad_lines=True), stats=stats)
    assert len(docs) == 2 and stats["bad_lines_skipped"] == 2


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets", reason="datasets is in the hf and test extras")
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict(columns(ROWS)).save_to_disk(str(saved))
    files = data_files(saved, "auto")
    assert files and all(kind == "arrow" and f.suffix == ".arrow" for f, kind in files)
    assert expected_docs(load_documents(saved, DataConfig())) == WANT

    both = tmp_path / "dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(columns(ROWS[:2])),
                          "test": datasets.Dataset.from_dict(columns(ROWS[2:]))}).save_to_disk(str(both))
    assert expected_docs(load_documents(both, DataConfig())) == WANT[:2]   # the train split

    other = tmp_path / "splits"
    one = datasets.Dataset.from_dict(columns(ROWS))
    datasets.DatasetDict({"a": one, "b": one}).save_to_disk(str(other))
    with pytest.raises(DataError, match="none is named 'train'"):
        load_documents(other, DataConfig())


def test_save_to_disk_malformed_row(tmp_path):
    datasets = pytest.importorskip("datasets", reason="datasets is in the hf and test extras")
    saved = tmp_path / "saved"
    rows = ROWS + [{"messages": [{"role": "user", "content": "no answer"}]}]
    datasets.Dataset.from_dict(columns(rows)).save_to_disk(str(saved))
    arrow = data_files(saved, "auto")[0][0]
    with pytest.raises(DataError) as err:
        load_documents(saved, DataConfig())
    assert str(err.value).startswith(f"{arrow}:4: no message has role 'assistant'")
    assert len(load_documents(saved, DataConfig(skip_bad_lines=True))) == 3


def test_unreadable_table_is_a_data_error(tmp_path):
    file = tmp_path / "broken.parquet"
    file.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"broken.parquet: cannot be read as parquet"):
        load_documents(file, DataConfig())


def test_build_data_from_save_to_disk_equals_the_same_rows_as_jsonl(tmp_path):
    """Tokens, labels and the held-out split do not depend on the container; the cache key covers arrow files."""
    import json

    import torch

    from launch.data import build_data
    from tests.unit.launch.test_data import _make_tokenizer

    datasets = pytest.importorskip("datasets", reason="datasets is in the hf and test extras")
    tok = _make_tokenizer()
    rows = [ROWS[i % 3] for i in range(12)]
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict(columns(rows)).save_to_disk(str(saved))
    jsonl = tmp_path / "same.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a = build_data(DataConfig(path=str(saved)), tok, seq_len=16, seed=0, cache_dir=tmp_path / "cache")
    b = build_data(DataConfig(path=str(jsonl)), tok, seq_len=16, seed=0, cache_dir=tmp_path / "cache")
    again = build_data(DataConfig(path=str(saved)), tok, seq_len=16, seed=0, cache_dir=tmp_path / "cache")
    assert torch.equal(a.train, b.train) and torch.equal(a.train_labels, b.train_labels)
    assert torch.equal(a.eval, b.eval) and again.stats["cache_hit"] and torch.equal(again.train, a.train)
