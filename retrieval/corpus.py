"""Load a corpus into a Hugging Face `datasets.Dataset` of documents (doc_id, title, text).

Text files are split into WikiText articles when they use WikiText's ` = Title = ` headings
and are one document each otherwise; jsonl, csv and parquet files are one document per row;
a saved `datasets` directory is loaded as it is. Every text-based file is checked to decode in
the configured encoding first, so a bad byte is reported with its file and offset instead of a
traceback deep inside a loader.
"""

from __future__ import annotations

import codecs
import glob
import re
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
            path = BUILTIN_DIR / f"{name}.txt"
            if not path.is_file():
                known = sorted(p.stem for p in BUILTIN_DIR.glob("*.txt"))
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
        out.extend(Path(m) for m in matches)
    return out


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


def _text_documents(path: Path, spec: CorpusSpec) -> Iterator[dict]:
    text = path.read_text(encoding=spec.encoding, errors=spec.errors)
    articles = split_wikitext_articles(text)
    if articles:
        for i, (title, body) in enumerate(articles):
            yield {"doc_id": f"{path.stem}/{i:05d}", "title": title, "text": body}
    elif text.strip():
        yield {"doc_id": path.stem, "title": path.stem, "text": text.strip()}


def _table_documents(path: Path, fmt: str, spec: CorpusSpec, cache_dir: Path | None) -> datasets.Dataset:
    import datasets

    if fmt == "datasets":
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        return ds
    builder = {"jsonl": "json", "csv": "csv", "parquet": "parquet"}[fmt]
    kwargs = {}
    if fmt == "jsonl":
        kwargs = {"encoding": spec.encoding, "encoding_errors": spec.errors}
    elif fmt == "csv":
        kwargs = {"encoding": spec.encoding, "encoding_errors": spec.errors}
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train",
                                     cache_dir=str(cache_dir) if cache_dir else None, **kwargs)
    except Exception as e:  # the loaders raise many types; all mean "this file is not valid <fmt>"
        raise UserError(f"corpus: '{path}' could not be read as {fmt}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")) from None


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


def load_documents(spec: CorpusSpec, cache_dir: Path | None = None) -> datasets.Dataset:
    """All documents of the corpus as one Dataset with columns doc_id, title, text."""
    import datasets

    docs: list[dict] = []
    for path in resolve_paths(spec.paths):
        fmt = detect_format(path, spec.format)
        if fmt in ("text", "jsonl", "csv") and spec.errors == "strict":
            check_encoding(path, spec.encoding)
        if fmt == "text":
            docs.extend(_text_documents(path, spec))
        else:
            docs.extend(_rows_to_documents(_table_documents(path, fmt, spec, cache_dir), path, spec))
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
