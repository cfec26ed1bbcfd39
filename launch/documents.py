"""Training documents from files: the embedded default set, one file, or a directory of them.

Sources (`load_documents`): the embedded default data set (English prose from the Python documentation, shipped by
the Debian package `python3-doc`), one file, or a directory of *.jsonl / *.txt / *.md / *.rst / *.parquet files, or a
local Hugging Face data set (a `save_to_disk` directory, .parquet / .arrow files: launch.hf_datasets, whose rows
follow the same mapping, errors naming file:row). A JSONL line is one of
    {"text": "..."}                                         plain text (the key is `data.text_field`), loss on all of it
    {"messages": [{"role": ..., "content": ...}, ...]}      chat, rendered by the tokenizer's chat template, loss only
                                                            on assistant turns
    {"prompt": "...", "completion": "..."}                  loss only on the completion
and a plain-text file is one document. Bad input stops with a `DataError` naming file:line and the fix, or is
skipped and counted with `data.skip_bad_lines`. Turning documents into token ids is `launch.data`.
"""
from __future__ import annotations

import glob
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch.hf_datasets import hf_disk_files, iter_rows, table_kind

__all__ = ["DEFAULT_DOC_FOLDERS", "DataError", "Document", "PYTHON_DOCS_GLOB", "data_files", "default_text_files",
           "listed_files", "load_documents"]

PYTHON_DOCS_GLOB = "/usr/share/doc/python3*/html/_sources"
DEFAULT_DOC_FOLDERS = ("tutorial", "howto", "faq", "whatsnew")
_DIR_SUFFIXES = (".jsonl", ".txt", ".md", ".rst", ".parquet")
_JSONL_SUFFIXES = (".jsonl", ".json")
_SKIP_HINT = "fix the line, or set data.skip_bad_lines=true to skip (and count) such lines"


class DataError(ValueError):
    """Bad or missing training data; the message names the file (and line) and says how to fix it."""


@dataclass(frozen=True)
class Document:
    """One training example. kind "text": loss on `text`; "chat": loss on the assistant turns of `messages`;
    "prompt_completion": loss on `completion` only. `source` is "file" or "file:line" for messages."""

    kind: str
    source: str
    text: str = ""
    messages: tuple = ()
    prompt: str = ""
    completion: str = ""


# ---- sources ------------------------------------------------------------------------------------------------------

def _version_key(path: str) -> tuple:
    return tuple(int(n) for n in re.findall(r"\d+", path))


def default_text_files(docs_glob: str = PYTHON_DOCS_GLOB) -> list[Path]:
    """Sorted *.rst.txt files of the tutorial/howto/faq/whatsnew folders of the newest installed Python docs."""
    roots = sorted({Path(p).resolve() for p in glob.glob(docs_glob) if Path(p).is_dir()},
                   key=lambda p: (_version_key(str(p)), str(p)))
    files = sorted(f for sub in DEFAULT_DOC_FOLDERS for f in (roots[-1] / sub).rglob("*.rst.txt")) if roots else []
    if not files:
        raise DataError(
            f"the embedded default data set (the Python documentation sources, {docs_glob}/"
            f"{{{','.join(DEFAULT_DOC_FOLDERS)}}}/*.rst.txt) is not installed. On Debian/Ubuntu install it with "
            "`apt-get install python3-doc` (as root, or with sudo), or point data.path at your own data instead: "
            "a .jsonl file (one {\"text\": ...} object per line), a plain-text file, or a directory of them, e.g. "
            "`python -m launch.finetune data.path=my_data.jsonl`.")
    return files


def _walk(root: Path, follow_symlinks: bool, skipped: list[Path]) -> list[Path]:
    """Data files under the directory `root` (suffixes _DIR_SUFFIXES, no hidden parts), sorted. A symbolic link
    (file or directory) whose target lies outside `root` is followed only with follow_symlinks, else listed in
    `skipped`; links inside `root` are read as what they point to."""
    inside = root.resolve()
    files, seen_dirs = [], set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        here = Path(folder)
        real = here.resolve()
        if real in seen_dirs:   # a link loop, or a folder reached twice through links
            dirs[:] = []
            continue
        seen_dirs.add(real)
        kept = []
        for name in sorted(dirs):
            sub = here / name
            if name.startswith("."):
                continue
            if sub.is_symlink() and not follow_symlinks and not sub.resolve().is_relative_to(inside):
                skipped.append(sub)
                continue
            kept.append(name)
        dirs[:] = kept
        for name in names:
            file = here / name
            if name.startswith(".") or not name.lower().endswith(_DIR_SUFFIXES) or not file.is_file():
                continue
            if file.is_symlink() and not follow_symlinks and not file.resolve().is_relative_to(inside):
                skipped.append(file)
                continue
            files.append(file)
    return sorted(files)


def data_files(path: str | os.PathLike | None, fmt: str, *, follow_symlinks: bool = False,
               skipped: list[Path] | None = None) -> list[tuple[Path, str]]:
    """(file, "jsonl" | "text") for every file the source names; fmt "auto" decides by extension. In a directory,
    symbolic links that lead outside it are skipped (appended to `skipped`) unless follow_symlinks; a path named
    directly is always read."""
    if path is None:
        return [(f, "text") for f in default_text_files()]
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"data.path {str(path)!r} does not exist (resolved to {root.resolve()}); give an existing "
                        "file or directory, or data.path=null for the embedded default data set.")
    saved = hf_disk_files(root) if root.is_dir() else None   # a `datasets.save_to_disk` directory
    if saved is not None:
        return [(f, "arrow") for f in saved]
    if root.is_dir():
        files = _walk(root, follow_symlinks, skipped if skipped is not None else [])
    else:
        files = [root]
    if fmt not in ("auto", "jsonl", "text"):
        raise DataError(f"data.format must be 'auto', 'jsonl' or 'text', got {fmt!r}")
    return [(f, fmt if fmt != "auto" else table_kind(f) or ("jsonl" if f.name.lower().endswith(_JSONL_SUFFIXES)
                                                              else "text")) for f in files]


def follow_symlinks(cfg: Any) -> bool:
    return bool(getattr(cfg, "follow_symlinks", False))


def _read_text(file: Path) -> str:
    raw = file.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{file}:{line}: not valid UTF-8 (byte {e.start}: {e.reason}); training data must be UTF-8 "
                        "text; re-encode the file (e.g. `iconv -f latin1 -t utf-8`).") from None


def _json_type(value: Any) -> str:
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _parse_record(obj: Any, text_field: str) -> tuple[str, dict] | str:
    """(kind, fields) for a valid JSONL record, else the problem as "<what is wrong>; <what is expected>"."""
    expected = (f"expected a JSON object with {text_field!r} (data.text_field), 'messages', or 'prompt' and "
                "'completion'")
    if not isinstance(obj, dict):
        hint = " (a JSON array is not JSON Lines: write one object per line)" if isinstance(obj, list) else ""
        return f"line is a JSON {_json_type(obj)}, not an object{hint}; {expected}"
    if text_field in obj:
        text = obj[text_field]
        if not isinstance(text, str):
            return f"field {text_field!r} is a {_json_type(text)}; expected a string"
        return ("text", {"text": text}) if text.strip() else f"field {text_field!r} is empty; expected some text"
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            return "field 'messages' is not a non-empty list; expected [{\"role\": ..., \"content\": ...}, ...]"
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return (f"messages[{i}] is {json.dumps(m)[:80]}; expected an object with string 'role' and "
                        "'content'")
        if not any(m["role"] == "assistant" for m in messages):
            return "no message has role 'assistant'; expected at least one assistant turn (the loss is on those)"
        return "chat", {"messages": tuple(messages)}
    if "prompt" in obj or "completion" in obj:
        for key in ("prompt", "completion"):
            if not isinstance(obj.get(key), str):
                return (f"field {key!r} is {'missing' if key not in obj else 'a ' + _json_type(obj[key])}; "
                        "expected a string")
        if not obj["completion"]:
            return "field 'completion' is empty; expected the text the loss is computed on"
        return "prompt_completion", {"prompt": obj["prompt"], "completion": obj["completion"]}
    return f"no known field (keys: {sorted(obj)[:8]}); {expected}"


def _json_line(line: str, text_field: str) -> tuple[str, dict] | str:
    """_parse_record of one JSONL line, or the problem; never raises on any input."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return f"invalid JSON ({e.msg} at column {e.colno}); expected one JSON object per line"
    except RecursionError:
        return ("JSON nested deeper than the reader allows (about a thousand levels); expected one flat JSON "
                "object per line")
    except ValueError as e:   # int("9" * 5000): Python refuses to convert integers of more than 4300 digits
        if "integer string conversion" in str(e):
            return "a number has more than 4300 digits; expected one JSON object per line of ordinary values"
        return f"invalid JSON ({str(e)[:200]}); expected one JSON object per line"
    try:
        return _parse_record(obj, text_field)
    except RecursionError:
        return "a value is nested too deeply to read; expected one flat JSON object per line"


def _load_jsonl(file: Path, text_field: str, skip_bad: bool, stats: dict) -> list[Document]:
    docs = []
    # JSON Lines are separated by "\n" alone: str.splitlines() would also split inside a JSON string at U+2028,
    # U+2029 or U+0085, which JSON allows raw in a string (a "\r\n" ending leaves "\r", which JSON reads as space).
    for number, line in enumerate(_read_text(file).split("\n"), start=1):
        if not line.strip():
            continue
        parsed = _json_line(line, text_field)
        if isinstance(parsed, str):
            if not skip_bad:
                raise DataError(f"{file}:{number}: {parsed}; {_SKIP_HINT}.")
            stats["bad_lines_skipped"] += 1
            continue
        docs.append(Document(kind=parsed[0], source=f"{file}:{number}", **parsed[1]))
    return docs


def _load_table(file: Path, kind: str, text_field: str, skip_bad: bool, stats: dict) -> list[Document]:
    """Rows of a parquet / arrow file (launch.hf_datasets) through the JSONL field mapping; errors name file:row."""
    docs = []
    for number, row in iter_rows(file, kind):
        parsed = _parse_record(row, text_field)
        if isinstance(parsed, str):
            if not skip_bad:
                raise DataError(f"{file}:{number}: {parsed}; fix the row, or set "
                                "data.skip_bad_lines=true to skip (and count) such rows.")
            stats["bad_lines_skipped"] += 1
            continue
        docs.append(Document(kind=parsed[0], source=f"{file}:{number}", **parsed[1]))
    return docs


def listed_files(path: str | os.PathLike | None, cfg: Any) -> list[tuple[Path, str]]:
    """data_files with cfg's format and follow_symlinks; skipped links are named on stderr in one line."""
    skipped: list[Path] = []
    files = data_files(path, getattr(cfg, "format", "auto"), follow_symlinks=follow_symlinks(cfg), skipped=skipped)
    if skipped:
        shown = ", ".join(str(p) for p in skipped[:10]) + (f" and {len(skipped) - 10} more" if len(skipped) > 10
                                                             else "")
        print(f"note: skipped {len(skipped)} symbolic link(s) in {path} that lead outside it: {shown} (set "
              "data.follow_symlinks=true to read them)", file=sys.stderr, flush=True)
    return files


def load_documents(path: str | os.PathLike | None, cfg: Any, *, stats: dict | None = None,
                   files: list[tuple[Path, str]] | None = None) -> list[Document]:
    """Documents of `path` (None: the embedded default set) read with cfg.format / text_field / skip_bad_lines /
    follow_symlinks; `files`, when given, is `listed_files(path, cfg)` already computed.

    `stats`, when given, receives files, documents, bad_lines_skipped, empty_files_skipped and per-kind counts."""
    counts = {"files": 0, "documents": 0, "bad_lines_skipped": 0, "empty_files_skipped": 0}
    skip_bad = bool(getattr(cfg, "skip_bad_lines", False))
    docs: list[Document] = []
    if files is None:
        files = listed_files(path, cfg)
    for file, fmt in files:
        counts["files"] += 1
        bad_before = counts["bad_lines_skipped"]
        if fmt == "jsonl":
            found = _load_jsonl(file, getattr(cfg, "text_field", "text"), skip_bad, counts)
        elif fmt in ("parquet", "arrow"):
            found = _load_table(file, fmt, getattr(cfg, "text_field", "text"), skip_bad, counts)
        else:
            text = _read_text(file)
            found = [Document(kind="text", source=str(file), text=text)] if text.strip() else []
        if not found and counts["bad_lines_skipped"] == bad_before:
            what = {"jsonl": "JSON lines", "parquet": "rows", "arrow": "rows"}.get(fmt, "text")
            if len(files) == 1:
                raise DataError(f"{file}: the file is empty (no {what}), and it is the only data file; put training "
                                "data in it, or point data.path at another file or directory (data.path=null uses "
                                "the embedded default data set).")
            if not skip_bad:
                raise DataError(f"{file}:1: the file is empty (no {what}); expected training data; remove it from "
                                f"{path}, or set data.skip_bad_lines=true to skip it.")
            counts["empty_files_skipped"] += 1
        docs.extend(found)
    if not docs:
        where = path if path is not None else "the embedded default data set"
        raise DataError(f"no training examples in {where} ({len(files)} file(s) read, "
                        f"{counts['bad_lines_skipped']} bad line(s) skipped); give data.path a file or directory "
                        "with *.jsonl / *.txt / *.md / *.rst files that hold text.")
    counts["documents"] = len(docs)
    for kind in ("text", "chat", "prompt_completion"):
        counts[f"{kind}_documents"] = sum(d.kind == kind for d in docs)
    if stats is not None:
        stats.update(counts)
    return docs
