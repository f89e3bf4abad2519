"""Chunk documents into passages of about `max_tokens` embedder tokens.

Passages never cut a word, prefer to end at a sentence or paragraph end, and carry their
document's title, which counts against the token budget because it is embedded with them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

SENTENCE_END = {".", "!", "?", "\u3002"}


def _word_lengths(tokenizer, words: list[str], cache: dict[str, int] | None = None) -> list[int]:
    """Embedder tokens per word. A word's length does not depend on its neighbours (the text is
    split on whitespace first), so each distinct word is tokenised once: in one batched call,
    and, with `cache`, once per corpus rather than once per document."""
    if not words:
        return []
    cache = {} if cache is None else cache
    new = list(dict.fromkeys(w for w in words if w not in cache))
    if new:
        ids = tokenizer(new, add_special_tokens=False)["input_ids"]
        cache.update((w, max(1, len(x))) for w, x in zip(new, ids))
    return [cache[w] for w in words]


def _split_points(lengths: list[int], ends: list[bool], budget: int, min_tokens: int) -> list[int]:
    """Greedy cut indices (exclusive ends) so each chunk sums to <= budget tokens.

    When a chunk fills up, it is cut after the last sentence end in its final 40%, if any.
    A last chunk shorter than `min_tokens` is merged into the one before it.
    """
    cuts: list[int] = []
    start, total, last_end = 0, 0, -1
    i = 0
    while i < len(lengths):
        if total + lengths[i] > budget and i > start:
            cut = last_end + 1 if last_end >= start and (last_end + 1 - start) >= 0.6 * (i - start) else i
            cuts.append(cut)
            start, total, last_end = cut, sum(lengths[cut:i]), -1
            for j in range(cut, i):
                if ends[j]:
                    last_end = j
            continue
        total += lengths[i]
        if ends[i]:
            last_end = i
        i += 1
    cuts.append(len(lengths))
    if len(cuts) > 1 and sum(lengths[cuts[-2]:cuts[-1]]) < min_tokens:
        cuts.pop(-2)
    return cuts


def chunk_document(title: str, text: str, tokenizer, max_tokens: int = 128,
                   min_tokens: int = 24, cache: dict[str, int] | None = None) -> Iterator[tuple[str, int]]:
    """Yield (passage_text, n_tokens) for one document; n_tokens includes the title. `cache`
    (word -> tokens) carries word lengths from one document to the next."""
    title_tokens = len(tokenizer(title, add_special_tokens=False)["input_ids"]) + 1 if title else 0
    budget = max(8, max_tokens - title_tokens - 2)  # 2 = the model's [CLS] and [SEP]
    words: list[str] = []
    ends: list[bool] = []  # True where a sentence or paragraph ends after this word
    para_end: list[bool] = []
    for para in text.split("\n"):
        para_words = para.split()
        if not para_words:
            continue
        words.extend(para_words)
        ends.extend(w in SENTENCE_END or w[-1:] in SENTENCE_END for w in para_words)
        para_end.extend([False] * (len(para_words) - 1) + [True])
        ends[-1] = True
    lengths = _word_lengths(tokenizer, words, cache)
    start = 0
    for cut in _split_points(lengths, ends, budget, min_tokens):
        if cut <= start:
            continue
        pieces, line = [], []
        for j in range(start, cut):
            line.append(words[j])
            if para_end[j]:
                pieces.append(" ".join(line))
                line = []
        if line:
            pieces.append(" ".join(line))
        yield "\n".join(pieces), sum(lengths[start:cut]) + title_tokens
        start = cut


def chunk_documents(docs: Iterable[dict], tokenizer, max_tokens: int = 128,
                    min_tokens: int = 24) -> Iterator[dict]:
    """Documents (doc_id, title, text) -> passages (passage_id, doc_id, title, text, n_tokens)."""
    passage_id, cache = 0, {}  # word lengths, shared by the documents (a corpus repeats its words)
    for doc in docs:
        for text, n_tokens in chunk_document(doc["title"], doc["text"], tokenizer, max_tokens, min_tokens, cache):
            yield {"passage_id": passage_id, "doc_id": doc["doc_id"], "title": doc["title"],
                   "text": text, "n_tokens": n_tokens}
            passage_id += 1


def embedding_text(title: str, text: str) -> str:
    """What is embedded for a passage: its title, then its text."""
    return f"{title}\n{text}" if title else text
