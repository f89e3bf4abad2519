"""WikiText-2 articles and section headings for the benchmarks, as `nucleus index` reads them.

Imports nothing heavy: `retrieval.corpus` loads `datasets` only when a table format needs it,
so this also runs on the GPU image, which has no `datasets`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "wikitext-2"  # the shared/ beside the checkout

# A benchmark run from a plain checkout (the GPU machine: nothing installed) must still find
# `retrieval` and `pipeline`.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from retrieval.corpus import split_wikitext_articles  # noqa: E402 (needs the sys.path line above)

# Same patterns as retrieval.corpus: ` = Title = ` (not ` = = Section = = `), and sections.
_TITLE = re.compile(r"^ = ([^=].*) = $")
_SECTION = re.compile(r"^ = = ([^=].*) = = $")
SPLITTER = "retrieval.corpus.split_wikitext_articles"


def resolve_split(name_or_path: str, data_dir: Path = DEFAULT_DATA_DIR) -> Path:
    """`train`/`valid`/`test` -> the file in `data_dir`; anything else is a path."""
    if name_or_path in ("train", "valid", "test"):
        return data_dir / f"{name_or_path}.txt"
    return Path(name_or_path)


def wikitext_documents(files: list[Path]) -> list[dict]:
    """Documents (doc_id, title, text) as `nucleus index` reads WikiText files."""
    docs: list[dict] = []
    for path in files:
        for i, (title, body) in enumerate(split_wikitext_articles(path.read_text(encoding="utf-8"))):
            docs.append({"doc_id": f"{path.stem}/{i:05d}", "title": title, "text": body})
    return docs


def section_headings(files: list[Path]) -> list[str]:
    """`Article title Section` strings for every ` = = Section = = ` line: short, query-like texts."""
    out: list[str] = []
    for path in files:
        title = ""
        lines = path.read_text(encoding="utf-8").split("\n")
        for i, line in enumerate(lines):
            # A title only between blank lines, as in split_wikitext_articles: some table rows
            # inside articles also look like ` = ... = `.
            between_blanks = (i == 0 or not lines[i - 1].strip()) and (i + 1 >= len(lines) or not lines[i + 1].strip())
            if (m := _TITLE.match(line)) and between_blanks:
                title = m.group(1).strip()
            elif (m := _SECTION.match(line)) and title:
                out.append(f"{title} {m.group(1).strip()}")
    return out
