"""Chunking speed: `retrieval.chunking.chunk_documents` against its former word-length path.

Chunking measures every word in embedder tokens. The former path tokenised every word of a
document in one batched call per document; the current one tokenises each distinct word once
per corpus (a word's length does not depend on its neighbours: text is split on whitespace
first). Both run here in one process on the same documents, alternating, and must give the
same passages (checked: their JSON hashes are equal).

    python benchmarks/chunk_throughput.py --data ../shared/data/wikitext-2/train.txt --repeats 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from retrieval import chunking  # noqa: E402
from retrieval.corpus import split_wikitext_articles  # noqa: E402
from retrieval.embed import resolve_model_path  # noqa: E402


def former_word_lengths(tokenizer, words: list[str], cache=None) -> list[int]:
    """The path before the cache: every word of the document, one batched call."""
    if not words:
        return []
    return [max(1, len(x)) for x in tokenizer(words, add_special_tokens=False)["input_ids"]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json-out", type=Path)
    a = p.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path("default"), local_files_only=True)
    docs = [{"doc_id": str(i), "title": t, "text": b}
            for i, (t, b) in enumerate(split_wikitext_articles(a.data.read_text(encoding="utf-8")))]

    def current() -> list[dict]:
        return list(chunking.chunk_documents(docs, tok))

    def former() -> list[dict]:
        with mock.patch.object(chunking, "_word_lengths", former_word_lengths):
            return list(chunking.chunk_documents(docs, tok))

    arms = {"former": former, "current": current}
    seconds: dict[str, list[float]] = {k: [] for k in arms}
    digest = {}
    for r in range(a.repeats):
        for name in (arms if r % 2 == 0 else reversed(list(arms))):
            t0 = time.perf_counter()
            out = arms[name]()
            seconds[name].append(time.perf_counter() - t0)
            digest[name] = hashlib.sha256(json.dumps(out).encode()).hexdigest()
            print(f"repeat {r} {name:<8} {seconds[name][-1]:7.2f} s  {len(out)} passages", flush=True)
    if digest["former"] != digest["current"]:
        sys.exit("the two paths gave different passages")
    med = {k: statistics.median(v) for k, v in seconds.items()}
    result = {"documents": len(docs), "passages": len(out), "seconds": seconds, "median_s": med,
              "speedup": med["former"] / med["current"], "same_passages": True}
    print(json.dumps(result, indent=2))
    if a.json_out:
        a.json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
