"""Rebuild the bundled corpus `retrieval/data/wikitext2-sample.txt` from WikiText-2.

    python docs/make_builtin_corpus.py ../shared/data/wikitext-2/train.txt

Picks every 4th article of the training split whose size lies between 3 and 12 kB, up to 80
articles: a spread of topics that embeds in about a minute on a laptop CPU.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from retrieval.corpus import split_wikitext_articles  # noqa: E402

src = Path(sys.argv[1])
articles = split_wikitext_articles(src.read_text(encoding="utf-8"))
picked = [a for a in articles if 3_000 <= len(a[1]) <= 12_000][::4][:80]
out = Path(__file__).resolve().parents[1] / "retrieval" / "data" / "wikitext2-sample.txt"
out.write_text("".join(f" \n = {title} = \n \n{body}\n" for title, body in picked), encoding="utf-8")
print(f"{len(picked)} articles, {out.stat().st_size} bytes -> {out}")
