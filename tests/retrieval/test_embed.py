"""The embedder's own batching (token budget, background tokenisation, one copy back) gives the
vectors `SentenceTransformer.encode` gives, on real WikiText-2 passages of every length."""

import os
import signal
import time

import numpy as np

from retrieval.corpus import split_wikitext_articles
from retrieval.embed import _token_budget_batches


def test_encode_equals_sentence_transformers_on_real_passages(wikitext_dir, embedder):
    texts = []
    for title, body in split_wikitext_articles((wikitext_dir / "valid.txt").read_text(encoding="utf-8"))[:8]:
        texts += [f"{title}\n{p.strip()[:400]}" for p in body.split("\n") if p.strip()]
    texts = texts[:150] + ["", "  padded  ", "word " * 600]  # empty, stripped, and over max_seq_length
    ours = embedder.encode_pipelined(texts, batch_size=16)  # the GPU path, run here on the CPU
    bare = embedder.model.encode(texts, batch_size=16, convert_to_numpy=True, normalize_embeddings=True,
                                 show_progress_bar=False)
    assert ours.shape == (len(texts), 384) and ours.dtype == np.float32
    assert float((ours * bare).sum(1).min()) >= 0.9999  # per passage, in the caller's order
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=1e-5)
    assert embedder.encode_pipelined([]).shape == (0, 384)


def test_process_and_thread_pools_give_the_same_vectors(wikitext_dir, embedder):
    """The tokeniser's threads in this process (the default on a CPU) and worker processes (on a
    GPU) are two ways of running the same features: the vectors are bit-equal, and the process
    pool really is one (its workers are other processes, kept between calls). A call of one
    batch (a query) starts no pool: it has nothing to overlap."""
    from concurrent.futures import ProcessPoolExecutor

    from retrieval.embed import Embedder

    texts = [f"{t}\n{b[:600]}" for t, b in split_wikitext_articles(
        (wikitext_dir / "valid.txt").read_text(encoding="utf-8"))[:30]] + ["", "word " * 600]
    procs = Embedder(embedder.path, device="cpu", tokenize_pool="process")
    try:
        one = procs.encode_pipelined(texts[:3], batch_size=4)  # one batch: tokenised inline, no pool
        assert procs._pool is None
        np.testing.assert_array_equal(one, embedder.encode_pipelined(texts[:3], batch_size=4))
        by_process = procs.encode_pipelined(texts, batch_size=4)
        assert isinstance(procs._pool, ProcessPoolExecutor)
        pool = procs._pool
        assert procs.encode_pipelined(texts[:5], batch_size=4).shape == (5, 384) and procs._pool is pool
        np.testing.assert_array_equal(embedder.encode_pipelined(texts, batch_size=4), by_process)
        assert embedder.tokenize_pool == "thread" and not isinstance(embedder._pool, ProcessPoolExecutor)
        # a tokeniser worker killed between calls: the next call starts a fresh pool and loses nothing
        os.kill(next(iter(pool._processes)), signal.SIGKILL)
        time.sleep(0.5)
        np.testing.assert_array_equal(procs.encode_pipelined(texts, batch_size=4), by_process)
        assert procs._pool is not pool and isinstance(procs._pool, ProcessPoolExecutor)
    finally:
        procs.close()


def test_worker_processes_that_cannot_start_fall_back_to_threads_and_lose_nothing(wikitext_dir, embedder, caplog):
    """A real fault: workers whose start fails every time (here the tokeniser they are handed
    cannot be read, as when a user's script without a `__main__` guard is re-run by each spawned
    worker). The call retries once with a fresh pool, then tokenises in threads, says so, and
    returns the same vectors; later calls stay on threads."""
    import logging
    from concurrent.futures import ThreadPoolExecutor

    from retrieval.embed import Embedder

    texts = [f"{t}\n{b[:600]}" for t, b in split_wikitext_articles(
        (wikitext_dir / "valid.txt").read_text(encoding="utf-8"))[:12]]
    procs = Embedder(embedder.path, device="cpu", tokenize_pool="process")
    try:
        procs._prepare = procs._features_fn(texts[:4])
        _, fields, extra = procs._prepare.worker_spec
        procs._prepare.worker_spec = ("not a tokenizer", fields, extra)  # every worker's start fails
        with caplog.at_level(logging.WARNING, logger="nucleus.embed"):
            out = procs.encode_pipelined(texts, batch_size=4)
        assert "failed twice" in caplog.text and procs.tokenize_pool == "thread"
        assert isinstance(procs._pool, ThreadPoolExecutor)
        np.testing.assert_array_equal(out, embedder.encode_pipelined(texts, batch_size=4))
    finally:
        procs.close()


def test_batches_hold_a_token_budget_longest_first():
    texts = ["x" * 400, "y" * 40, "z" * 4000, "w" * 4, "v" * 400]
    batches = _token_budget_batches(texts, budget=300)
    assert np.concatenate(batches).tolist() == [2, 0, 4, 1, 3]  # longest first, every text once
    assert [len(b) for b in batches] == [1, 2, 2]  # 1002 tokens alone; 2 x 102; 2 x 12 <= 300


def test_fast_tokenisation_gives_the_models_own_features(wikitext_dir, embedder):
    """The pipelined path tokenises with the Rust tokeniser directly; its features must be the
    ones sentence-transformers builds, for every kind of text (empty, padded, over-long)."""
    import torch

    texts = [f"{t}\n{b[:700]}" for t, b in split_wikitext_articles(
        (wikitext_dir / "valid.txt").read_text(encoding="utf-8"))[:40]]
    texts += ["", "  padded  ", "word " * 600, "Ünïcödé — ½ café\tTAB", "\n\nnewlines\n"]
    fast = embedder._features_fn(texts[:8])
    prepare = getattr(embedder.model, "preprocess", None) or embedder.model.tokenize
    assert fast is not prepare  # the all-MiniLM tokeniser takes the fast path
    ours, theirs = fast(texts), prepare(texts)
    tensors = [k for k, v in theirs.items() if isinstance(v, torch.Tensor)]
    assert tensors and all(torch.equal(torch.from_numpy(ours[k]), theirs[k].long()) for k in tensors)
    assert {k: v for k, v in ours.items() if k not in tensors} == {k: v for k, v in theirs.items() if k not in tensors}
