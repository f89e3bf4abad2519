"""Language-model data: tokenise passages, pack them into fixed-length blocks per topic.

Blocks never mix topics, so a sampler that picks blocks picks topics: the community-traversal
sampler and the uniform baseline see exactly the same blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from retrieval.chunking import embedding_text


@dataclass
class Blocks:
    """Packed training data: tokens (n, block_size), loss mask (n, block_size), topic per block."""

    tokens: torch.Tensor
    mask: torch.Tensor
    topics: np.ndarray

    def __len__(self) -> int:
        return len(self.topics)

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum())


def passage_texts(corpus, rows: list[int]) -> list[str]:
    """What the LM reads for each passage: its title line, then its text (as embedded)."""
    sub = corpus.select(rows)
    return [embedding_text(t, x) for t, x in zip(sub["title"], sub["text"])]


def tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids per text, each ending with EOS so passages stay apart once packed."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [x + [tokenizer.eos_token_id] for x in ids]


def pack_by_topic(token_lists: list[list[int]], topics: list[int], block_size: int,
                  pad_id: int) -> Blocks:
    """Concatenate each topic's passages (in order) and cut into blocks; the tail is padded."""
    by_topic: dict[int, list[int]] = {}
    for ids, topic in zip(token_lists, topics):
        by_topic.setdefault(int(topic), []).extend(ids)
    blocks, masks, block_topics = [], [], []
    for topic in sorted(by_topic):
        stream = np.asarray(by_topic[topic], dtype=np.int64)
        n = -(-len(stream) // block_size)
        padded = np.full(n * block_size, pad_id, dtype=np.int64)
        padded[: len(stream)] = stream
        mask = np.zeros(n * block_size, dtype=bool)
        mask[: len(stream)] = True
        blocks.append(padded.reshape(n, block_size))
        masks.append(mask.reshape(n, block_size))
        block_topics.extend([topic] * n)
    return Blocks(torch.from_numpy(np.concatenate(blocks)), torch.from_numpy(np.concatenate(masks)),
                  np.asarray(block_topics, dtype=np.int64))


@dataclass
class EvalSet:
    """Held-out passages, one sequence each (truncated to block_size), with their topics."""

    sequences: list[list[int]]
    topics: np.ndarray


def make_eval_set(tokenizer, corpus, rows: list[int], topics: list[int], block_size: int) -> EvalSet:
    ids = tokenize(tokenizer, passage_texts(corpus, rows))
    # Prepend EOS as a BOS so the first real token is predicted too.
    seqs = [([tokenizer.eos_token_id] + x)[:block_size] for x in ids]
    return EvalSet(seqs, np.asarray(topics, dtype=np.int64))


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of right-padded sequences, both (len(seqs), longest) long tensors."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask
