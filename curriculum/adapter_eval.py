"""How well the adapter set specialises and routes, on held-out passages of its neighbourhoods.

- `routing_accuracy`: the fraction of held-out passages of the explored neighbourhoods that
  top-1 routing sends to their own neighbourhood's adapter.
- `diagonal_fraction`: the fraction of explored neighbourhoods whose own adapter gives the
  lowest perplexity, among the explored adapters, on their held-out passages.
- the specialisation matrix: perplexity of every adapter (and the base) on every
  neighbourhood's held-out passages, as `spec/<adapter>/<nb>/ppl`.
- perplexity over all those passages under the base, top-1 routing, a top-k mixture, each
  passage's own adapter, routing among merged adapters, and one adapter merged from all.

Returns a flat `dict[str, float]` (house style); each adapter runs once over the passages.
"""

from __future__ import annotations

import numpy as np

from curriculum.adapters import AdapterSet

BASE = "(base)"  # not a valid neighbourhood id, so it never names an adapter


def _ppl(nll: float, tokens: float) -> float:
    return float(np.exp(min(nll / max(tokens, 1.0), 50.0)))


class _Cache:
    """log p(token) per passage under each target, computed once per target."""

    def __init__(self, aset: AdapterSet, seqs: list[list[int]]):
        self.aset, self.seqs, self.logp = aset, seqs, {}

    def __call__(self, target: str) -> list[np.ndarray]:
        if target not in self.logp:
            self.logp[target] = self.aset.token_logprobs(target, self.seqs)
        return self.logp[target]

    def nll(self, target: str, rows) -> tuple[float, float]:
        lp = self(target)
        return float(-sum(lp[i].sum() for i in rows)), float(sum(lp[i].size for i in rows))


def _routed_ppl(cache: _Cache, routes: list[list[tuple[str, float]]], rows: list[int]) -> float:
    nll, tokens = 0.0, 0
    for i in rows:
        stacked = np.stack([np.log(w) + cache(t)[i] for t, w in routes[i]])  # (k, tokens)
        mixed = np.logaddexp.reduce(stacked, axis=0)
        nll, tokens = nll - float(mixed.sum()), tokens + mixed.size
    return _ppl(nll, tokens)


def evaluate_adapters(aset: AdapterSet, seqs: list[list[int]], vectors: np.ndarray, topics: np.ndarray,
                      neighborhoods: dict[str, list[int]], explored: list[str], mixture_k: int = 2,
                      temperature: float = 0.1, merged_targets: list[str] | None = None,
                      merged_all: str | None = None) -> dict[str, float]:
    """Metrics of the module docstring.

    seqs/vectors/topics: the held-out passages (token ids, embeddings (n, dim), topic ids);
    neighborhoods: {target id: topics} of every routing target the set knows (incl. the nucleus);
    explored: the neighbourhood adapters under test; merged_targets: the routing targets with
    merges folded in (None = no merge); merged_all: an adapter id merged from all of `explored`.
    """
    cache = _Cache(aset, seqs)
    rows_of = {nb: np.flatnonzero(np.isin(topics, ts)).tolist() for nb, ts in neighborhoods.items()}
    evaluated = sorted({i for nb in explored for i in rows_of[nb]})
    out: dict[str, float] = {"passages": float(len(evaluated)), "neighborhoods": float(len(explored))}
    if not evaluated:
        return out
    # Specialisation matrix and its diagonal.
    spec = {a: {nb: _ppl(*cache.nll(a, rows_of[nb])) for nb in neighborhoods if rows_of[nb]}
            for a in [BASE, *explored]}
    for a, cols in spec.items():
        for nb, ppl in cols.items():
            out[f"spec/{a}/{nb}/ppl"] = ppl
    scored = [nb for nb in explored if rows_of[nb]]
    wins = [min(explored, key=lambda a: spec[a][nb]) == nb for nb in scored]
    out["diagonal_fraction"] = float(np.mean(wins)) if wins else 0.0
    # Routing: top-1 and a top-k mixture among the set's routing targets.
    top1 = aset.router.route(vectors, 1, temperature)
    owners = [{nb for nb in explored if topics[i] in neighborhoods[nb]} for i in range(len(seqs))]
    out["routing_accuracy"] = float(np.mean([top1[i][0][0] in owners[i] for i in evaluated]))
    out["ppl/base"] = _ppl(*cache.nll(BASE, evaluated))
    out["ppl/routed"] = _routed_ppl(cache, top1, evaluated)
    mixture = aset.router.route(vectors, mixture_k, temperature)
    out["ppl/mixture"] = _routed_ppl(cache, mixture, evaluated)
    own = [[(sorted(owners[i])[0], 1.0)] if owners[i] else [] for i in range(len(seqs))]
    out["ppl/own"] = _routed_ppl(cache, own, evaluated)
    # Merges: routing among merged adapters (members replaced), and everything merged into one.
    if merged_targets is not None:
        routing_targets = aset.router.ids
        aset.set_targets(merged_targets)
        out["ppl/merged"] = _routed_ppl(cache, aset.router.route(vectors, 1, temperature), evaluated)
        aset.set_targets(routing_targets)
    if merged_all is not None:
        out["ppl/merged_all"] = _ppl(*cache.nll(merged_all, evaluated))
    return out
