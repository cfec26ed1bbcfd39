"""Local Hugging Face data sets as training documents: `datasets.save_to_disk` directories, .parquet and .arrow files.

    data.path=my_dataset/            # written by Dataset.save_to_disk (or DatasetDict: its "train" split)
    data.path=train.parquet          # or a directory holding *.parquet files
    data.path=data-00000-of-00001.arrow

Rows use the JSONL field mapping of launch.documents (`text` / data.text_field, `messages`, `prompt` + `completion`);
a column whose value is null in a row counts as absent there (a table holds the union of its rows' fields). A bad row
stops with a DataError naming `file:row` (1-based, within that file) or is skipped and counted with
data.skip_bad_lines, exactly like a bad JSONL line.

Everything is read with pyarrow (parquet through pyarrow.parquet, .arrow as the Arrow IPC stream that `datasets`
writes, or the IPC file format); the `datasets` package is not needed to read what it saved. Install pyarrow with
`pip install 'lowmem[hf]'`. A save_to_disk directory is recognised by its state.json (one data set) or
dataset_dict.json (splits); its data files are listed in state.json and read in that order.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

__all__ = ["TABLE_KINDS", "hf_disk_files", "iter_rows", "table_kind"]

TABLE_KINDS = {".parquet": "parquet", ".arrow": "arrow"}
_INSTALL = "install pyarrow (`pip install 'lowmem[hf]'`) to read parquet / arrow data"


def table_kind(file: Path) -> str | None:
    """"parquet" / "arrow" for a table file by its suffix, else None."""
    return TABLE_KINDS.get(file.suffix.lower())


def _split_dir(root: Path) -> Path:
    """The directory of the split to train on: root itself, or its "train" split (or its only split)."""
    from launch.documents import DataError

    if (root / "state.json").is_file():
        return root
    splits = json.loads((root / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
    if "train" in splits:
        return root / "train"
    if len(splits) == 1:
        return root / splits[0]
    raise DataError(f"{root} is a saved DatasetDict with splits {splits} and none is named 'train'; point "
                    f"data.path at one split's directory, e.g. data.path={root / (splits[0] if splits else 'SPLIT')}")


def hf_disk_files(root: Path) -> list[Path] | None:
    """The .arrow files of a `save_to_disk` directory in their state.json order; None when root is not one."""
    from launch.documents import DataError

    if not ((root / "state.json").is_file() or (root / "dataset_dict.json").is_file()):
        return None
    split = _split_dir(root)
    try:
        state = json.loads((split / "state.json").read_text(encoding="utf-8"))
        names = [entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{split / 'state.json'}: not a readable datasets state.json ({type(err).__name__}: {err}); "
                        "write the data set again with Dataset.save_to_disk") from None
    files = [split / name for name in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(f"{split}: state.json lists data files that are missing: {', '.join(missing)}")
    return files


def _batches(file: Path, kind: str):
    """pyarrow RecordBatches of a parquet or arrow file."""
    from launch.documents import DataError

    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{file}: {_INSTALL}") from None
    try:
        if kind == "parquet":
            yield from pq.ParquetFile(file).iter_batches(batch_size=1024)
            return
        try:
            reader = pa.ipc.open_stream(pa.memory_map(str(file)))   # what datasets writes
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(pa.memory_map(str(file)))
            yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
            return
        yield from reader
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{file}: cannot be read as {kind} ({type(err).__name__}: {err}); write it again "
                        "(Dataset.to_parquet / save_to_disk) or convert it to JSONL") from None


def iter_rows(file: Path, kind: str) -> Iterator[tuple[int, dict]]:
    """(1-based row number, {column: value} without null columns) for every row of a parquet / arrow file."""
    number = 0
    for batch in _batches(file, kind):
        for row in batch.to_pylist():
            number += 1
            yield number, {key: value for key, value in row.items() if value is not None}
