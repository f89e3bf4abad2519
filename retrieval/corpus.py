"""Load a corpus into a Hugging Face `datasets.Dataset` of documents (doc_id, title, text).

Text files are split into WikiText articles when they use WikiText's ` = Title = ` headings
and are one document each otherwise; jsonl, csv and parquet files are one document per row;
a saved `datasets` directory is loaded as it is. Every text-based file is checked to decode in
the configured encoding first, and every jsonl/json file to hold one JSON object per line (or one
JSON array of objects), so a bad byte or line is reported with its file and position instead of a
traceback deep inside a loader. A file that cannot be read (special file, permission, vanished) is
a UserError too.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import UserError

if TYPE_CHECKING:  # imported lazily: split_wikitext_articles must work without `datasets`
    import datasets

BUILTIN_PREFIX = "builtin:"
BUILTIN_DIR = Path(__file__).resolve().parent / "data"

TEXT_SUFFIXES = {".txt", ".tokens", ".raw", ".text", ".md"}
FORMAT_BY_SUFFIX = {**dict.fromkeys(TEXT_SUFFIXES, "text"), ".jsonl": "jsonl", ".json": "jsonl",
                    ".csv": "csv", ".parquet": "parquet"}

# A WikiText article title: ` = Title = ` between blank lines (section headings are ` = = X = = `,
# and some table rows inside articles look like titles but are not between blank lines).
_TITLE = re.compile(r"^ = ([^=].*) = $")

_JSON_TYPE = {dict: "object", list: "array", str: "string", int: "number", float: "number",
              bool: "boolean", type(None): "null"}
_JSONL_RULE = 'each line must be one JSON object, such as {"text": "..."}'
_JSON_ARRAY_TOO = " (a .json file may instead be one JSON array of objects)"


@dataclass(frozen=True)
class CorpusSpec:
    """Where the documents are and how to read them (the `corpus` config section)."""

    paths: list[str]
    format: str = "auto"
    text_field: str = "text"
    id_field: str | None = None
    title_field: str | None = "title"
    encoding: str = "utf-8"
    errors: str = "strict"
    max_documents: int | None = None


def split_wikitext_articles(text: str) -> list[tuple[str, str]]:
    """WikiText file text -> [(title, body)]; returns [] when the text has no article titles."""
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines)
              if _TITLE.match(line) and (i == 0 or not lines[i - 1].strip())
              and (i + 1 >= len(lines) or not lines[i + 1].strip())]
    articles = []
    for n, start in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        title = _TITLE.match(lines[start]).group(1).strip()
        body = "\n".join(line.strip() for line in lines[start + 1:end] if line.strip())
        if body:
            articles.append((title, body))
    return articles


def resolve_paths(patterns: list[str]) -> list[Path]:
    """Expand files, globs and `builtin:NAME` entries; every entry must match something."""
    out: list[Path] = []
    for pattern in patterns:
        if pattern.startswith(BUILTIN_PREFIX):
            name = pattern[len(BUILTIN_PREFIX):]
            # a text file, or a folder written by `nucleus synth` (its corpus.jsonl; the rest of
            # the folder is the corpus's known world: questions, true seed graph)
            path = BUILTIN_DIR / name / "corpus.jsonl" if (BUILTIN_DIR / name).is_dir() else BUILTIN_DIR / f"{name}.txt"
            if "/" in name or not path.is_file():
                known = sorted([p.stem for p in BUILTIN_DIR.glob("*.txt")]
                               + [p.parent.name for p in BUILTIN_DIR.glob("*/corpus.jsonl")])
                raise UserError(f"corpus.paths: unknown built-in corpus '{pattern}'; "
                                f"available: {', '.join(BUILTIN_PREFIX + k for k in known)}.")
            out.append(path)
            continue
        expanded = Path(pattern).expanduser()
        matches = sorted(glob.glob(str(expanded), recursive=True)) if glob.has_magic(pattern) else (
            [str(expanded)] if expanded.exists() else [])
        if not matches:
            what = "no file matches the glob" if glob.has_magic(pattern) else "file does not exist"
            raise UserError(f"corpus.paths: {what} '{pattern}'. Check the path (relative paths are "
                            f"read from the current directory, '{Path.cwd()}').")
        for m in matches:
            _check_regular(Path(m))
            out.append(Path(m))
    return out


def _unreadable(path: Path, e: OSError) -> UserError:
    return UserError(f"corpus.paths: cannot read '{path}': {e.strerror or e}. "
                     f"Check that the file exists and is readable.")


def _check_regular(path: Path) -> None:
    """Reject FIFOs, sockets and devices before anything opens them (opening a FIFO blocks)."""
    try:
        mode = path.stat().st_mode
    except OSError as e:  # a dangling symlink, a file removed since the glob, a closed directory
        raise _unreadable(path, e) from None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return
    kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file")
    raise UserError(f"corpus.paths: '{path}' is {kind}, not a regular file; corpus files must be "
                    f"regular files (reading it could block). Copy the data into a file and give that.")


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return "datasets"
        raise UserError(f"corpus.paths: '{path}' is a directory but not a saved `datasets` dataset "
                        f"(no state.json). Give files or a glob such as '{path}/*.txt'.")
    fmt = FORMAT_BY_SUFFIX.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"corpus.format: cannot tell the format of '{path}' from its extension "
                        f"'{path.suffix}'. Set corpus.format to one of text, jsonl, csv, parquet.")
    return fmt


def check_encoding(path: Path, encoding: str, chunk_size: int = 1 << 20) -> None:
    """Raise a UserError naming the file and byte offset of the first undecodable byte."""
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    offset = 0
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            nul = chunk.find(b"\x00")
            if nul >= 0 and "16" not in encoding and "32" not in encoding:
                raise UserError(f"corpus: '{path}' is not a text file: NUL byte at byte offset "
                                f"{offset + nul}.")
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                bad = offset - pending + e.start
                raise UserError(
                    f"corpus: '{path}' is not valid {encoding} text: byte 0x{e.object[e.start]:02x} at "
                    f"byte offset {bad} ({e.reason}). Set corpus.encoding to the file's encoding, or "
                    f"corpus.errors: replace to decode it lossily.") from None
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise UserError(f"corpus: '{path}' is not valid {encoding} text: it ends inside a "
                            f"multi-byte character (byte offset {offset}).") from None


def _echo(line: str) -> str:
    line = line.rstrip("\r\n")
    return repr(line[:60] + ("..." if len(line) > 60 else ""))


def _check_json_value(value: object, where: str, line: str, path: Path, spec: CorpusSpec) -> None:
    """One row must be an object whose text field, when present, is a string."""
    if not isinstance(value, dict):
        if where.startswith("line"):
            also = _JSON_ARRAY_TOO if path.suffix == ".json" else ""
            rule, fix = f"In a jsonl file {_JSONL_RULE}{also}", "Fix or remove that line"
        else:
            rule, fix = 'A JSON array of rows must hold objects, such as {"text": "..."}', "Fix that item"
        raise UserError(f"corpus: '{path}' {where} is a JSON {_JSON_TYPE.get(type(value), 'value')}, "
                        f"not an object: {_echo(line)}. {rule}. {fix}.")
    text = value.get(spec.text_field)
    if text is not None and not isinstance(text, str):
        raise UserError(f"corpus.text_field: field '{spec.text_field}' on {where} of '{path}' must be "
                        f"a string, got a JSON {_JSON_TYPE.get(type(text), 'value')}: {_echo(line)}. "
                        f"Make it a string on every line, or set corpus.text_field to the field "
                        f"that holds the text.")


def _check_json_rows(rows: list, path: Path, spec: CorpusSpec) -> None:
    """A file that is one JSON array must hold objects (or only strings, read as column 'text')."""
    if all(isinstance(r, str) for r in rows):
        return
    for i, row in enumerate(rows):
        _check_json_value(row, f"array item {i}", json.dumps(row), path, spec)


def _check_json_array(path: Path, spec: CorpusSpec) -> None:
    """A JSON array over several lines is parsed whole, as the datasets json loader does anyway."""
    with open(path, encoding=spec.encoding, errors=spec.errors) as f:
        doc = f.read().lstrip("\ufeff")
    try:
        rows = json.loads(doc)
    except json.JSONDecodeError as e:
        bad_line = doc.split("\n")[e.lineno - 1]
        raise UserError(f"corpus: '{path}' line {e.lineno} is not valid JSON ({e.msg}, column "
                        f"{e.colno}): {_echo(bad_line)}. A json file must be "
                        f"one JSON array of objects, or {_JSONL_RULE}. Fix that line.") from None
    if not isinstance(rows, list):  # e.g. one pretty-printed object
        raise UserError(f"corpus: '{path}' is one JSON {_JSON_TYPE.get(type(rows), 'value')}; a json "
                        f"file must be one JSON array of objects, or {_JSONL_RULE}.")
    _check_json_rows(rows, path, spec)


def check_json_lines(path: Path, spec: CorpusSpec) -> None:
    """Raise a UserError naming the file and 1-based line of the first line that is not one JSON
    object. Streams the file line by line; a file that is one JSON array is checked whole."""
    rows = 0  # non-blank lines so far
    one_line_array = None  # the first row, when it is an array: valid if it is the only row
    with open(path, encoding=spec.encoding, errors=spec.errors) as f:
        for n, line in enumerate(f, 1):
            if n == 1:
                line = line.lstrip("\ufeff")  # the loader skips a UTF-8 BOM; so do we
            if not line.strip():
                continue
            rows += 1
            line = line.rstrip("\r\n")
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                if rows == 1 and line.lstrip().startswith("["):
                    break  # a JSON array over several lines (a pretty-printed .json file)
                where = ", the end of the line" if e.pos >= len(line.rstrip()) else ""
                raise UserError(f"corpus: '{path}' line {n} is not valid JSON ({e.msg}, column "
                                f"{e.colno}{where}): {_echo(line)}. In a jsonl file {_JSONL_RULE}"
                                f"{_JSON_ARRAY_TOO if path.suffix == '.json' else ''}. "
                                f"Fix or remove that line.") from None
            if rows == 1 and isinstance(value, list):
                one_line_array = (n, line, value)
                continue
            if one_line_array:  # more rows follow, so that array was a row: raises
                _check_json_value(one_line_array[2], f"line {one_line_array[0]}", one_line_array[1],
                                  path, spec)
            _check_json_value(value, f"line {n}", line, path, spec)
        else:
            if one_line_array:
                _check_json_rows(one_line_array[2], path, spec)
            return
    _check_json_array(path, spec)


def _text_documents(path: Path, spec: CorpusSpec) -> Iterator[dict]:
    text = path.read_text(encoding=spec.encoding, errors=spec.errors)
    articles = split_wikitext_articles(text)
    if articles:
        for i, (title, body) in enumerate(articles):
            yield {"doc_id": f"{path.stem}/{i:05d}", "title": title, "text": body}
    elif text.strip():
        yield {"doc_id": path.stem, "title": path.stem, "text": text.strip()}


_LOADER_HINT = {
    "jsonl": "Check that no line repeats a key and that each field has the same JSON type on every "
             "line (e.g. 'text' always a string).",
    "csv": "Check that every row has as many fields as the header and that every quote is closed.",
    "parquet": "Check that it is a complete parquet file.",
    "datasets": "Check that it is a directory written by `Dataset.save_to_disk`.",
}


def _loader_error(path: Path, fmt: str, e: Exception) -> UserError:
    try:  # first: did the file vanish or lose its permissions since it was checked?
        os.listdir(path) if path.is_dir() else open(path, "rb").close()
    except OSError as oe:
        return _unreadable(path, oe)
    while e.__cause__ is not None:  # datasets wraps the real error in "An error occurred while ..."
        e = e.__cause__
    first = str(e).splitlines()[0].rstrip(". ") if str(e).strip() else ""
    return UserError(f"corpus: '{path}' could not be read as {fmt}: {type(e).__name__}"
                     f"{': ' + first if first else ''}. {_LOADER_HINT[fmt]}")


def _table_documents(path: Path, fmt: str, spec: CorpusSpec, cache_dir: Path | None) -> datasets.Dataset:
    import datasets

    try:  # the loaders raise many types; all mean "this file is not valid <fmt>"
        if fmt == "datasets":
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
            return ds
        builder = {"jsonl": "json", "csv": "csv", "parquet": "parquet"}[fmt]
        kwargs = {"encoding": spec.encoding, "encoding_errors": spec.errors} if fmt in ("jsonl", "csv") else {}
        return datasets.load_dataset(builder, data_files=str(path), split="train",
                                     cache_dir=str(cache_dir) if cache_dir else None, **kwargs)
    except Exception as e:
        raise _loader_error(path, fmt, e) from None


def _rows_to_documents(ds: datasets.Dataset, path: Path, spec: CorpusSpec) -> Iterator[dict]:
    cols = ds.column_names
    for field, name in (("corpus.text_field", spec.text_field), ("corpus.id_field", spec.id_field)):
        if name is not None and name not in cols:
            raise UserError(f"{field}: column '{name}' is not in '{path}'; its columns are: "
                            f"{', '.join(cols)}.")
    title_col = spec.title_field if spec.title_field in cols else None
    for i, row in enumerate(ds):
        text = row[spec.text_field]
        if not isinstance(text, str):
            raise UserError(f"corpus.text_field: column '{spec.text_field}' of '{path}' must hold "
                            f"text; row {i} has {type(text).__name__} {text!r:.60}.")
        if not text.strip():
            continue
        doc_id = str(row[spec.id_field]) if spec.id_field else f"{path.stem}/{i:06d}"
        title = str(row[title_col]) if title_col and row[title_col] is not None else ""
        yield {"doc_id": doc_id, "title": title, "text": text.strip()}


def _file_documents(path: Path, fmt: str, spec: CorpusSpec, cache_dir: Path | None) -> list[dict]:
    """One corpus file's documents, after checking its encoding and (jsonl) its lines."""
    try:
        if fmt in ("text", "jsonl", "csv") and spec.errors == "strict":
            check_encoding(path, spec.encoding)
        if fmt == "jsonl":
            check_json_lines(path, spec)
        if fmt == "text":
            return list(_text_documents(path, spec))
        table = _table_documents(path, fmt, spec, cache_dir)
    except OSError as e:  # permission denied, a directory given as a file, removed since listed
        raise _unreadable(path, e) from None
    return list(_rows_to_documents(table, path, spec))


def load_documents(spec: CorpusSpec, cache_dir: Path | None = None) -> datasets.Dataset:
    """All documents of the corpus as one Dataset with columns doc_id, title, text."""
    import datasets

    docs: list[dict] = []
    for path in resolve_paths(spec.paths):
        docs.extend(_file_documents(path, detect_format(path, spec.format), spec, cache_dir))
        if spec.max_documents and len(docs) >= spec.max_documents:
            docs = docs[: spec.max_documents]
            break
    if not docs:
        raise UserError(f"corpus: no document with text found in corpus.paths {spec.paths}. "
                        f"Empty files and rows whose '{spec.text_field}' is blank are skipped.")
    seen: set[str] = set()
    for d in docs:  # ids name passages' documents in artifacts: they must be unique
        if d["doc_id"] in seen:
            raise UserError(f"corpus.id_field: document id '{d['doc_id']}' occurs twice; ids must be unique.")
        seen.add(d["doc_id"])
    return datasets.Dataset.from_list(docs)
