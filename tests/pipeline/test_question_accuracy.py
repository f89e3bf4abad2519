"""Question accuracy against a brute-force oracle: each candidate scored alone, greedy decoding."""

import numpy as np
import torch

from pipeline.evaluate import question_accuracy, tokenize_questions
from pipeline.model import build_scratch_model, train_tokenizer
from pipeline.question_set import nmi

QUESTIONS = [
    {"prompt": "Q: Where was Ana Toll born?\nA:", "answer": "Varnholm", "candidates": ["Kelby", "Varnholm", "Osk"],
     "hops": 1, "distance": "nucleus"},
    {"prompt": "Q: Who employs Ana Toll?\nA:", "answer": "Keltrin Institute",
     "candidates": ["Keltrin Institute", "Moss Works"], "hops": 1, "distance": "near"},
    {"prompt": "Q: Where was the mentor of Ana Toll born?\nA:", "answer": "Osk",
     "candidates": ["Osk", "Kelby", "Varnholm", "Dunmere"], "hops": 2, "distance": "far"},
]


def _oracle(model, tok, q):
    """Summed log-probability of each candidate, one unpadded sequence at a time."""
    prompt = [tok.eos_token_id] + tok(q["prompt"], add_special_tokens=False)["input_ids"]
    scores, greedy = [], None
    for cand in q["candidates"]:
        ids = tok(" " + cand, add_special_tokens=False)["input_ids"]
        x = torch.tensor([prompt + ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
        scores.append(sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(ids)))
        if cand == q["answer"]:
            out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                                 max_new_tokens=len(ids), do_sample=False, pad_token_id=tok.pad_token_id)
            greedy = out[0, len(prompt):].tolist() == ids
    return scores, greedy


def _taught(tok, seed: int, steps: int):
    """A tiny model that has read the answers of the first `steps // 20` questions' worth of text."""
    model = build_scratch_model(tok, "tiny", seed=seed)
    texts = [q["prompt"] + " " + q["answer"] for q in QUESTIONS]
    ids = [torch.tensor([[tok.eos_token_id] + tok(t, add_special_tokens=False)["input_ids"]]) for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        x = ids[step % len(ids)]
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_accuracy_and_exact_match_equal_the_oracle():
    tok = train_tokenizer([q["prompt"] + " " + " ".join(q["candidates"]) for q in QUESTIONS] * 20, 320)
    accuracies = []
    for seed, steps in ((0, 0), (1, 30), (2, 150)):  # untrained, half taught, taught
        model = _taught(tok, seed, steps)
        batch = tokenize_questions(tok, QUESTIONS)
        got = question_accuracy(model, batch, batch_size=4, device=torch.device("cpu"), pad_id=tok.pad_token_id)
        right, em = [], []
        for q in QUESTIONS:
            scores, greedy = _oracle(model, tok, q)
            truth = q["candidates"].index(q["answer"])
            right.append(all(s < scores[truth] for i, s in enumerate(scores) if i != truth))
            em.append(greedy)
        assert got["qa/acc"] == np.mean(right)
        assert got["qa/em"] == np.mean(em)
        assert got["qa/acc_2hop"] == float(right[2]) and got["qa/acc_1hop"] == np.mean(right[:2])
        assert got["qa/acc_far"] == float(right[2]) and got["qa/acc_nucleus"] == float(right[0])
        assert got["qa/chance"] == np.mean([1 / 3, 1 / 2, 1 / 4])
        accuracies.append((got["qa/acc"], got["qa/em"]))
    assert accuracies[-1] == (1.0, 1.0)  # a model that read the answers knows them, greedily too


def test_nmi_bounds():
    assert nmi([0, 0, 1, 1], [5, 5, 7, 7]) == 1.0  # the same partition, other names
    assert abs(nmi([0, 1, 0, 1], [0, 0, 1, 1])) < 1e-12  # independent
    assert 0 < nmi([0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 1, 1]) < 1
