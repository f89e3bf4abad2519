"""Held-out evaluation: one pass over the fixed held-out passages gives every perplexity.

Returns a flat `dict[str, float]` with prefixed names, token-weighted:
`heldout/loss`, `heldout/ppl` (natural mixture), `topic/<t>/ppl`, `nb/<id>/ppl` for the
neighbourhoods asked for, and `nucleus/ppl` (forgetting) when the nucleus is given. On a run
with a question set (a `nucleus synth` corpus), `question_accuracy` adds `qa/...` metrics.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.lm_data import EvalSet, pad_batch


def _next_token_logprobs(model: nn.Module, sequences: list[list[int]], batch_size: int, device: torch.device,
                         pad_id: int, autocast_dtype: torch.dtype | None):
    """Per batch of `sequences` (in eval mode, no gradients): (start, log-probabilities of the
    next token (batch, width-1, vocab), targets (batch, width-1), target mask (batch, width-1))."""
    was_training = model.training
    model.eval()
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    try:
        for start in range(0, len(sequences), batch_size):
            ids, mask = (t.to(device) for t in pad_batch(sequences[start:start + batch_size], pad_id))
            with torch.no_grad(), ctx:
                logits = model(input_ids=ids, attention_mask=mask).logits  # (batch, width, vocab)
            yield start, torch.log_softmax(logits[:, :-1].float(), dim=-1), ids[:, 1:], mask[:, 1:].bool()
    finally:
        model.train(was_training)


def passage_nll(model: nn.Module, eval_set: EvalSet, batch_size: int, device: torch.device,
                pad_id: int, autocast_dtype: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(summed NLL in nats, predicted tokens) per held-out passage."""
    nll = np.zeros(len(eval_set.sequences))
    count = np.zeros(len(eval_set.sequences))
    for start, logp, target, mask in _next_token_logprobs(model, eval_set.sequences, batch_size, device, pad_id,
                                                          autocast_dtype):
        tok_nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1) * mask  # (batch, width-1)
        nll[start:start + len(target)] = tok_nll.sum(1).cpu().numpy()
        count[start:start + len(target)] = mask.sum(1).cpu().numpy()
    return nll, count


def _ppl(nll: float, count: float) -> float:
    return float(math.exp(min(nll / max(count, 1.0), 50.0)))


def evaluate(model: nn.Module, eval_set: EvalSet, batch_size: int, device: torch.device, pad_id: int,
             neighborhoods: dict[str, list[int]] | None = None, nucleus_topics: list[int] | None = None,
             autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Flat metrics over the held-out split (see module docstring)."""
    nll, count = passage_nll(model, eval_set, batch_size, device, pad_id, autocast_dtype)
    out = {"heldout/loss": float(nll.sum() / max(count.sum(), 1.0)), "heldout/ppl": _ppl(nll.sum(), count.sum())}
    topics = eval_set.topics
    for t in np.unique(topics):
        sel = topics == t
        out[f"topic/{int(t)}/ppl"] = _ppl(nll[sel].sum(), count[sel].sum())
    groups = dict(neighborhoods or {})
    if nucleus_topics is not None:
        groups["__nucleus__"] = nucleus_topics
    for name, nb_topics in groups.items():
        sel = np.isin(topics, nb_topics)
        if not sel.any():
            continue
        key = "nucleus" if name == "__nucleus__" else f"nb/{name}"
        out[f"{key}/loss"] = float(nll[sel].sum() / max(count[sel].sum(), 1.0))
        out[f"{key}/ppl"] = _ppl(nll[sel].sum(), count[sel].sum())
    return out


# ------------------------------------------------------------------ question accuracy


@dataclass
class QuestionBatch:
    """Tokenised questions: one sequence per (question, candidate), prompt then candidate."""

    sequences: list[list[int]]
    answer_start: list[int]  # index of each sequence's first candidate token
    question: np.ndarray  # (n_sequences,) which question a sequence belongs to
    is_answer: np.ndarray  # (n_sequences,) the true candidate
    groups: dict[str, np.ndarray]  # metric suffix -> mask over questions


def tokenize_questions(tokenizer, questions: list[dict]) -> QuestionBatch:
    """Each candidate is scored as `" " + candidate` after the prompt, all candidates of a
    question tokenised the same way, so their log-likelihoods compare."""
    sequences, starts, owner, truth = [], [], [], []
    for qi, q in enumerate(questions):
        prompt = [tokenizer.eos_token_id] + tokenizer(q["prompt"], add_special_tokens=False)["input_ids"]
        for cand in q["candidates"]:
            ids = tokenizer(" " + cand, add_special_tokens=False)["input_ids"]
            sequences.append(prompt + ids)
            starts.append(len(prompt))
            owner.append(qi)
            truth.append(cand == q["answer"])
    groups = {"": np.ones(len(questions), bool)}
    for key, field, value in (("_1hop", "hops", 1), ("_2hop", "hops", 2), ("_nucleus", "distance", "nucleus"),
                              ("_near", "distance", "near"), ("_far", "distance", "far")):
        mask = np.array([q.get(field) == value for q in questions])
        if mask.any():
            groups[key] = mask
    return QuestionBatch(sequences, starts, np.asarray(owner), np.asarray(truth), groups)


@dataclass
class QuestionScores:
    """Per question: whether the true answer ranks first (`correct`), whether greedy decoding
    reproduces it (`exact`), and the true answer's summed NLL and token count."""

    correct: np.ndarray
    exact: np.ndarray
    answer_nll: np.ndarray
    answer_tokens: np.ndarray


def question_scores(model: nn.Module, batch: QuestionBatch, batch_size: int, device: torch.device, pad_id: int,
                    autocast_dtype: torch.dtype | None = None) -> QuestionScores:
    """Score every question of `batch` (see `question_accuracy`). Deterministic: no sampling."""
    n = len(batch.sequences)
    score, greedy_ok = np.zeros(n), np.zeros(n, bool)
    nll, count = np.zeros(n), np.zeros(n)
    for start, logp, target, mask in _next_token_logprobs(model, batch.sequences, batch_size, device, pad_id,
                                                          autocast_dtype):
        end = start + len(target)
        tok = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (batch, width-1)
        pos = torch.arange(target.shape[1], device=device)
        begin = torch.tensor(batch.answer_start[start:end], device=device) - 1
        cand = (pos[None] >= begin[:, None]) & mask  # predictions of candidate tokens
        hit = (logp.argmax(-1) == target) | ~cand
        score[start:end] = (tok * cand).sum(1).cpu().numpy()
        greedy_ok[start:end] = hit.all(1).cpu().numpy()
        nll[start:end] = (-tok * cand).sum(1).cpu().numpy()
        count[start:end] = cand.sum(1).cpu().numpy()
    n_q = int(batch.question.max()) + 1 if n else 0
    best = np.full(n_q, -np.inf)
    np.maximum.at(best, batch.question, score)
    true_score = np.full(n_q, -np.inf)
    true_score[batch.question[batch.is_answer]] = score[batch.is_answer]
    # ties count against the answer: a model that scores everything alike knows nothing
    ties = np.bincount(batch.question, weights=(score >= true_score[batch.question]) & ~batch.is_answer,
                       minlength=n_q)
    correct = (true_score >= best) & (ties == 0)
    em = np.zeros(n_q, bool)
    em[batch.question[batch.is_answer]] = greedy_ok[batch.is_answer]
    ans_nll, ans_count = np.zeros(n_q), np.zeros(n_q)
    ans_nll[batch.question[batch.is_answer]] = nll[batch.is_answer]
    ans_count[batch.question[batch.is_answer]] = count[batch.is_answer]
    return QuestionScores(correct, em, ans_nll, ans_count)


def question_accuracy(model: nn.Module, batch: QuestionBatch, batch_size: int, device: torch.device, pad_id: int,
                      autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """`qa/acc` (the true answer has the highest log-likelihood among the candidates), `qa/em`
    (greedy decoding from the prompt reproduces the answer's tokens), per hop count and distance
    from the nucleus (`qa/acc_2hop`, `qa/acc_far`, ...), and `qa/answer_ppl` (perplexity of the
    true answers). Deterministic: no sampling."""
    sc = question_scores(model, batch, batch_size, device, pad_id, autocast_dtype)
    n_q = len(sc.correct)
    out = {}
    for key, sel in batch.groups.items():
        out[f"qa/acc{key}"] = float(sc.correct[sel].mean())
    out["qa/em"] = float(sc.exact.mean()) if n_q else float("nan")
    out["qa/answer_ppl"] = _ppl(sc.answer_nll.sum(), sc.answer_tokens.sum())
    out["qa/chance"] = float(np.mean(1.0 / np.bincount(batch.question))) if n_q else float("nan")
    return out
