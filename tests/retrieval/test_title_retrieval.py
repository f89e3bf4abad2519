"""Slow tier: on WikiText-2 valid, an article's title retrieves a passage of that article."""

import pytest

from pipeline import index
from pipeline.config import resolve_config
from pipeline.workspace import Workspace
from retrieval.embed import get_embedder
from retrieval.search import Retriever


@pytest.mark.slow
def test_title_query_finds_its_article_in_the_top_5(wikitext_dir, tmp_path):
    ws = Workspace(tmp_path / "wt2-valid")
    cfg = resolve_config(None, None, [f"corpus.paths=[{wikitext_dir / 'valid.txt'}]"])
    ws.begin_command(cfg, "index", force=False)
    result = index.run(cfg, ws)
    assert result.documents == 60

    retriever = Retriever(ws.index_dir, ws.topics_dir, ws.corpus_dir, get_embedder())
    titles = dict(zip(retriever.corpus["doc_id"], retriever.corpus["title"]))
    found = [doc_id in {h["doc_id"] for h in retriever.search(title, k=5)}
             for doc_id, title in titles.items()]
    accuracy = sum(found) / len(found)
    print(f"\ntitle -> own article in top 5: {sum(found)}/{len(found)} = {accuracy:.3f} "
          f"({result.passages} passages)")
    assert accuracy >= 0.8
