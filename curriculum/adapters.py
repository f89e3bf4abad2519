"""The adapter set: the base model with every neighbourhood adapter of a run, routed per text.

`route` picks, for each text, the neighbourhood whose centroid is nearest the text's embedding
(top-1), or the `top_k` nearest with weights softmax(-distance / temperature) (c-BTM);
`score` gives perplexity under that routing (a top-k mixture mixes the adapters' next-token
probabilities); `generate` continues a prompt with its routed adapter. Texts are grouped by
adapter, never sent to peft as mixed-adapter batches (those cost time linear in the number of
distinct adapters). At most `lru_size` adapters stay loaded; the least recently used is
dropped first (peft slows as more adapters are resident).

A routing target with no adapter (`path=None`) is the base model itself: the nucleus of a
scratch run, whose training made the base.

Library code: plain arguments, no config objects; imports no pydantic, faiss or datasets.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from curriculum.tethers import LoraFactors, read_lora
from pipeline.errors import UserError, reading
from pipeline.lm_data import pad_batch


@dataclass
class Target:
    """A routing target: a neighbourhood and its adapter directory (None = the base model)."""

    id: str
    path: Path | None
    centroid: np.ndarray  # (dim,), unit length


class Router:
    """Nearest-centroid routing in the embedder's space (cosine distance)."""

    def __init__(self, ids: list[str], centroids: np.ndarray):
        if len(ids) != len(centroids) or not ids:
            raise ValueError("one centroid per routing target, at least one target")
        self.ids = list(ids)
        c = np.asarray(centroids, dtype=np.float32)
        self.centroids = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)  # (targets, dim)

    def distances(self, vectors: np.ndarray) -> np.ndarray:
        """(texts, targets) cosine distance 1 - cos."""
        v = np.asarray(vectors, dtype=np.float32)
        v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        return 1.0 - v @ self.centroids.T

    def route(self, vectors: np.ndarray, top_k: int = 1, temperature: float = 0.1) -> list[list[tuple[str, float]]]:
        """Per text: [(target id, weight), ...] for the `top_k` nearest, weights softmax(-d / T)."""
        d = self.distances(vectors)
        k = min(top_k, len(self.ids))
        order = np.argsort(d, axis=1, kind="stable")[:, :k]
        out = []
        for row, idx in zip(d, order):
            logits = -row[idx] / temperature
            w = np.exp(logits - logits.max())
            w /= w.sum()
            out.append([(self.ids[i], float(x)) for i, x in zip(idx, w)])
        return out


def check_fits_base(factors: LoraFactors, base: nn.Module, path: Path) -> None:
    """A UserError when the adapter's modules or shapes do not exist in `base` (another base)."""
    for module, (a, b) in factors.modules.items():
        try:
            layer = base.get_submodule(module)
        except AttributeError:
            raise UserError(f"adapter '{path}' was trained on another base: it adapts module '{module}', "
                            f"which this run's base model does not have.") from None
        weight = getattr(layer, "weight", None)
        if weight is None or weight.ndim != 2 or tuple(weight.shape) != (b.shape[0], a.shape[1]):
            got = tuple(weight.shape) if weight is not None else None
            raise UserError(f"adapter '{path}' was trained on another base: module '{module}' is "
                            f"{got} in this run's base but {(b.shape[0], a.shape[1])} in the adapter.")


@dataclass
class Scored:
    """One text's score: summed NLL (nats) over `tokens` predicted tokens, and its routing."""

    nll: float
    tokens: int
    route: list[tuple[str, float]] = field(default_factory=list)

    @property
    def ppl(self) -> float:
        return float(np.exp(min(self.nll / max(self.tokens, 1), 50.0)))


class AdapterSet:
    """The base model plus the run's adapters, with an LRU of resident adapters."""

    def __init__(self, base_model: nn.Module, tokenizer, targets: list[Target],
                 embed: Callable[[list[str]], np.ndarray] | None, lru_size: int = 16,
                 device: torch.device | str = "cpu", block_size: int = 128, batch_size: int = 16,
                 autocast_dtype: torch.dtype | None = None):
        self.base = base_model.to(device).eval()
        self.tokenizer = tokenizer
        self.targets = {t.id: t for t in targets}
        self.router = Router([t.id for t in targets], np.stack([t.centroid for t in targets]))
        self.embed = embed
        self.lru_size = max(1, lru_size)
        self.device = torch.device(device)
        self.block_size = block_size
        self.batch_size = batch_size
        self.autocast_dtype = autocast_dtype
        self.model = None  # the PeftModel, made when the first adapter loads
        self.resident: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.pinned: set[str] = set()  # adapters made in memory (merges): never evicted
        self.loads = 0  # adapter loads so far (an LRU with room for all loads each adapter once)

    # ------------------------------------------------------------------ adapters

    def check(self, target_id: str) -> LoraFactors | None:
        """Read the target's adapter files and check they fit the base (UserError if not)."""
        path = self.targets[target_id].path
        if path is None:
            return None
        factors = read_lora(path, target_id)
        check_fits_base(factors, self.base, path)
        return factors

    def _activate(self, target_id: str) -> nn.Module:
        """The model to run for a target: its adapter loaded (LRU) and active, or the bare base."""
        path = self.targets[target_id].path if target_id in self.targets else None
        if path is None and target_id not in self.pinned:
            return self.base if self.model is None else self.model
        if target_id not in self.resident:
            self.check(target_id)
            from peft import PeftModel

            with reading(path, "peft adapter"):
                if self.model is None:
                    self.model = PeftModel.from_pretrained(self.base, str(path), adapter_name=target_id,
                                                           is_trainable=False)
                else:
                    self.model.load_adapter(str(path), adapter_name=target_id, is_trainable=False)
            self.model.to(self.device).eval()
            self.loads += 1
            self.resident[target_id] = None
        self.resident.move_to_end(target_id)
        self.model.set_adapter(target_id)
        evictable = [a for a in self.resident if a != target_id and a not in self.pinned]
        while len(self.resident) > self.lru_size and evictable:
            victim = evictable.pop(0)
            self.model.delete_adapter(victim)
            del self.resident[victim]
        return self.model

    def _context(self, target_id: str):
        """Run the base with no adapter for a target without one."""
        path = self.targets[target_id].path if target_id in self.targets else None
        if path is None and target_id not in self.pinned and self.model is not None:
            return self.model.disable_adapter()
        return nullcontext()

    @contextlib.contextmanager
    def using(self, target_id: str) -> Iterator[nn.Module]:
        """The model with a target's adapter active (or the bare base), for evaluators that run
        the model themselves."""
        model = self._activate(target_id)
        with self._context(target_id):
            yield model

    def add_merged(self, new_id: str, members: list[str], weights: list[float], method: str,
                   density: float = 0.5, centroid: np.ndarray | None = None) -> None:
        """Fold loaded members into a new in-memory adapter (pinned) and make it a routing target."""
        from curriculum.tethers import add_merged_adapter

        pinned = set(self.pinned)
        for m in members:  # all members resident at once while peft merges them
            self._activate(m)
            self.pinned.add(m)
        add_merged_adapter(self.model, members, weights, new_id, method, density)
        self.pinned = pinned | {new_id}
        self.resident[new_id] = None
        if centroid is not None:
            self.add_target(Target(new_id, None, centroid))

    def add_target(self, target: Target) -> None:
        self.targets[target.id] = target
        ids = list(self.targets)
        self.router = Router(ids, np.stack([self.targets[i].centroid for i in ids]))

    def set_targets(self, ids: list[str]) -> None:
        """Route among these targets only (e.g. merged adapters in place of their members)."""
        self.router = Router(ids, np.stack([self.targets[i].centroid for i in ids]))

    # ------------------------------------------------------------------- routing

    def route(self, texts: list[str], top_k: int = 1, temperature: float = 0.1,
              vectors: np.ndarray | None = None) -> list[list[tuple[str, float]]]:
        """Per text, the chosen targets and weights (see Router.route); `vectors` skips embedding."""
        if vectors is None:
            if self.embed is None:
                raise ValueError("AdapterSet has no embedder: pass the texts' vectors")
            vectors = self.embed(texts)
        return self.router.route(vectors, top_k, temperature)

    # ------------------------------------------------------------------- scoring

    def sequences(self, texts: list[str]) -> list[list[int]]:
        """Token ids as the held-out evaluation reads a passage: EOS as BOS, the text, EOS;
        at most `block_size` tokens (longer texts are cut)."""
        eos = self.tokenizer.eos_token_id
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [([eos] + x + [eos])[: self.block_size] for x in ids]

    @torch.no_grad()
    def token_logprobs(self, target_id: str, seqs: list[list[int]]) -> list[np.ndarray]:
        """log p(token) of every predicted token of every sequence (len(seq) - 1 each) under a target."""
        model = self._activate(target_id)
        pad = self.tokenizer.pad_token_id
        out: list[np.ndarray] = []
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else nullcontext())
        with self._context(target_id), autocast:
            for start in range(0, len(seqs), self.batch_size):
                batch = seqs[start:start + self.batch_size]
                ids, mask = (t.to(self.device) for t in pad_batch(batch, pad))
                logits = model(input_ids=ids, attention_mask=mask).logits  # (batch, width, vocab)
                logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                logp = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).cpu().numpy()  # (batch, width-1)
                out.extend(logp[i, : len(s) - 1] for i, s in enumerate(batch))
        return out

    def score_routed(self, seqs: list[list[int]], routes: list[list[tuple[str, float]]]) -> list[Scored]:
        """NLL of each sequence under its routing: one adapter, or a mixture of next-token
        probabilities log Σ_k w_k p_k(token). Each adapter runs once, on the texts routed to it."""
        by_target: dict[str, list[int]] = {}
        for i, route in enumerate(routes):
            for target_id, _ in route:
                by_target.setdefault(target_id, []).append(i)
        logps: dict[tuple[str, int], np.ndarray] = {}
        for target_id, rows in by_target.items():
            for i, lp in zip(rows, self.token_logprobs(target_id, [seqs[i] for i in rows])):
                logps[(target_id, i)] = lp
        out = []
        for i, route in enumerate(routes):
            stacked = np.stack([np.log(w) + logps[(t, i)] for t, w in route])  # (k, tokens)
            mixed = np.logaddexp.reduce(stacked, axis=0)
            out.append(Scored(float(-mixed.sum()), int(mixed.size), route))
        return out

    def score(self, texts: list[str], top_k: int = 1, temperature: float = 0.1) -> list[Scored]:
        """Perplexity of each text under its routing."""
        return self.score_routed(self.sequences(texts), self.route(texts, top_k, temperature))

    # ----------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                 target_id: str | None = None, seed: int = 0) -> tuple[str, str]:
        """(continuation, target id): the prompt continued by its routed adapter (greedy at T = 0)."""
        target_id = target_id or self.route([prompt])[0][0][0]
        model = self._activate(target_id)
        ids = self.sequences([prompt])[0][:-1]  # no closing EOS: the text goes on
        input_ids = torch.tensor([ids], device=self.device)
        torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        with self._context(target_id):
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                                 eos_token_id=self.tokenizer.eos_token_id, **sampling)
        return self.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True), target_id
