from retrieval.chunking import _split_points, chunk_document, chunk_documents
from retrieval.corpus import split_wikitext_articles


def test_passages_never_cut_words_and_respect_the_budget(wikitext_dir, embedder):
    title, body = split_wikitext_articles((wikitext_dir / "valid.txt").read_text())[0]
    passages = list(chunk_document(title, body, embedder.tokenizer, max_tokens=128, min_tokens=24))
    assert len(passages) > 5
    # Rejoining the passages gives back exactly the document's words: no cuts, no losses.
    assert " ".join(p for p, _ in passages).split() == body.split()
    for text, n_tokens in passages[:-1]:
        real = len(embedder.tokenizer(f"{title}\n{text}")["input_ids"])  # with [CLS], [SEP]
        assert real <= 128, (real, text)
        assert n_tokens >= 24


def test_title_counts_against_the_budget(embedder):
    body = " ".join(f"word{i}" for i in range(400))
    short = list(chunk_document("", body, embedder.tokenizer, 64, 8))
    titled = list(chunk_document("A fairly long title about lobsters", body, embedder.tokenizer, 64, 8))
    assert len(titled) > len(short)


def test_prefers_sentence_ends_and_merges_short_tail():
    lengths = [1] * 10
    ends = [False] * 10
    ends[6] = True  # a sentence ends after word 6, within the last 40% of a 9-token chunk
    assert _split_points(lengths, ends, budget=9, min_tokens=1) == [7, 10]
    assert _split_points([1] * 10, [False] * 10, budget=9, min_tokens=2) == [10]  # tail of 1 merged


def test_passage_ids_are_dense_and_docs_keep_their_titles(embedder):
    docs = [{"doc_id": "a", "title": "A", "text": "x " * 300}, {"doc_id": "b", "title": "B", "text": "y z"}]
    out = list(chunk_documents(docs, embedder.tokenizer, 64, 8))
    assert [p["passage_id"] for p in out] == list(range(len(out)))
    assert out[-1] == {"passage_id": len(out) - 1, "doc_id": "b", "title": "B", "text": "y z",
                       "n_tokens": 2 + 2}
