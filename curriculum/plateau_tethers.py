"""Tethers that act during training (the tethers note, `tethers-dtnn`): when an adapter training
plateaus, its per-layer tethers are compared with the other adapters', the layers that are
compatible merge, the others stay apart, and training goes on from the merged state.

- **Plateau**: `PlateauDetector` reads the losses `fit` logs every `log_every` (10) steps (their mean
  over the interval, so already smoothed, and no extra host synchronisation): a plateau is a
  relative change under `loss_delta` between the two halves of the last `window` of them, or a
  gradient norm under `grad_norm`, as the note has it. After it fires it waits a whole window.
- **Tether and compatibility**: an adapter's tether at layer l is its LoRA delta there, and two
  adapters' compatibility at l the cosine of those deltas: the definition `nucleus adapters
  compat` uses (curriculum/tethers.py), so `tethers.threshold` means what
  `adapters.merge_threshold` means.
- **A layer merge** replaces LoRA factors by a formula of `MERGE_FORMULAS`; both keep the rank,
  so training continues on the same parameters and the result is still a stock peft adapter:
    svd      the best rank-r approximation (Eckart-Young) of the weighted mean of the deltas,
             from the stacked factors (QR of each side, SVD of a small core): exact whenever
             the mean has rank <= r. The default.
    factors  the weighted mean of the A factors and of the B factors: the note's average of
             the tethers, applied to the factors. Not the mean of the deltas (it adds the cross
             terms B_i A_j), which is why it is not the default.
  The merged factors start a fresh Adam state (moments zero, step 0): their old moments belong
  to factors that no longer exist (ReLoRA prunes them for the same reason).
- **Two settings**:
    JointTethers  `train --joint`: the experts of one model. A merge ties the two groups of
                  neighbourhoods at that layer: from then on they share one expert's factors
                  there (the other's go idle). Neighbourhoods tied at every layer export the
                  same adapter, so one serves them all.
    ApartTethers  a neighbourhood trained alone (`explore`, `train -n`): the others are
                  finished adapters in `adapters/` (the note's `tether_other_model`); a merge
                  sets the training adapter's layer to its mean with the most compatible one,
                  which is left as it was.
- **Scope**: `layer` (the note's rule, the default) merges each layer on its own, so the ties
  can differ from layer to layer and every neighbourhood may keep an adapter of its own;
  `adapter` merges two groups at every layer at once, and only when every layer passes the
  threshold (the smallest compatibility over the layers), agglomeratively (complete linkage, most
  compatible first) down to `keep_at_least` served adapters: a neighbourhood-level tie, which is
  what serving fewer adapters needs. The cap counts layer merges in the first scope and adapters
  merged away in the second.
- **Records**: every check is a list of events (step, layer, pair, compatibility, decision:
  merge | apart | capped), kept in the controller's state (so in the checkpoint) and written
  to the ledger's `tether_checks` table when the training ends. Merges are capped per epoch.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from curriculum.tethers import LoraFactors, delta_cosine, layer_label, merge_groups

# ------------------------------------------------------------------------------ plateau


@dataclass(frozen=True)
class TetherSettings:
    """Plain settings (from the `tethers` config section)."""

    window: int = 6
    loss_delta: float = 0.01
    grad_norm: float = 0.0
    threshold: float = 0.5
    max_merges_per_epoch: int = 8
    formula: str = "svd"
    compare: str = "adapter"  # joint: "adapter" (shared + expert, as served) or "expert" (the expert alone)
    scope: str = "layer"  # "layer" (each layer on its own) or "adapter" (every layer at once)
    keep_at_least: int = 1  # joint, scope "adapter": merging stops at this many served adapters
    max_group: int = 0  # joint, scope "adapter": the most neighbourhoods one group may hold (0 = no limit)


class PlateauDetector:
    """Fires when the logged loss stops changing, or the gradient norm falls under a floor."""

    def __init__(self, window: int, loss_delta: float, grad_norm: float = 0.0) -> None:
        if window < 2:
            raise ValueError("a plateau window needs at least 2 logged losses")
        self.window, self.loss_delta, self.grad_norm = window, loss_delta, grad_norm
        self.losses: list[float] = []

    def update(self, loss: float, grad_norm: float = float("inf")) -> bool:
        self.losses = [*self.losses, float(loss)][-self.window:]
        if len(self.losses) < self.window:
            return False
        half = self.window // 2
        before, after = np.mean(self.losses[:half]), np.mean(self.losses[-half:])
        flat = abs(before - after) / max(abs(before), 1e-12) < self.loss_delta
        if flat or grad_norm < self.grad_norm:
            self.losses = []  # a fresh window before the next check
            return True
        return False

    def state_dict(self) -> dict:
        return {"losses": self.losses}

    def load_state_dict(self, state: dict) -> None:
        self.losses = list(state["losses"])


# ------------------------------------------------------------------------------ formulas

Factors = tuple[torch.Tensor, torch.Tensor]  # (A (r, in), B (out, r)) of one module


def merge_svd(parts: list[Factors], weights: list[float]) -> Factors:
    """The rank-r factors closest (Frobenius) to sum_i w_i B_i A_i; r = the parts' rank."""
    rank = parts[0][0].shape[0]
    a = torch.cat([p[0].float() * w ** 0.5 for p, w in zip(parts, weights)], dim=0)  # (k r, in)
    b = torch.cat([p[1].float() * w ** 0.5 for p, w in zip(parts, weights)], dim=1)  # (out, k r)
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)  # the k r x k r core: b @ a = qb (rb ra^T) qa^T
    t = min(rank, s.numel())
    root = s[:t].sqrt()
    new_b = torch.zeros(b.shape[0], rank, dtype=torch.float32, device=b.device)
    new_a = torch.zeros(rank, a.shape[1], dtype=torch.float32, device=a.device)
    new_b[:, :t] = (qb @ u[:, :t]) * root
    new_a[:t] = root[:, None] * (vh[:t] @ qa.T)
    return new_a, new_b


def merge_factors(parts: list[Factors], weights: list[float]) -> Factors:
    """The weighted mean of the A factors and of the B factors."""
    return (sum(p[0].float() * w for p, w in zip(parts, weights)),
            sum(p[1].float() * w for p, w in zip(parts, weights)))


MERGE_FORMULAS: dict[str, Callable[[list[Factors], list[float]], Factors]] = {
    "svd": merge_svd,
    "factors": merge_factors,
}


# ------------------------------------------------------------------------- live adapters


def lora_modules(peft_model) -> dict[str, torch.nn.Module]:
    """Module name (as in adapter files, without peft's prefix) -> its LoRA layer, in model order."""
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix("base_model.model."): m for name, m in peft_model.named_modules()
            if isinstance(m, LoraLayer)}


def by_layer(modules: dict[str, torch.nn.Module]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name in modules:
        out.setdefault(layer_label(name), []).append(name)
    return out


def factors(module, adapter: str) -> Factors:
    return module.lora_A[adapter].weight, module.lora_B[adapter].weight


@torch.no_grad()
def assign(module, adapter: str, new: Factors) -> None:
    a, b = factors(module, adapter)
    a.copy_(new[0].to(a.dtype))
    b.copy_(new[1].to(b.dtype))


def reset_adam(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    """A fresh Adam state for `params`: zero moments and step, so no stale moment moves them."""
    for p in params:
        for value in opt.state.get(p, {}).values():
            if torch.is_tensor(value):
                value.zero_()


class _Tethers:
    """What both settings share: the plateau detector, the per-epoch cap, the records, and the two
    tracked parameters of the note's 3-D trajectory plot."""

    def __init__(self, settings: TetherSettings, steps_per_epoch: int, modules: dict[str, torch.nn.Module]) -> None:
        if settings.formula not in MERGE_FORMULAS:
            raise ValueError(f"unknown merge formula {settings.formula!r}")
        if settings.compare not in ("adapter", "expert"):
            raise ValueError(f"compare must be 'adapter' or 'expert', got {settings.compare!r}")
        if settings.scope not in ("layer", "adapter"):
            raise ValueError(f"scope must be 'layer' or 'adapter', got {settings.scope!r}")
        if settings.keep_at_least < 1:
            raise ValueError(f"keep_at_least must be at least 1, got {settings.keep_at_least}")
        if settings.max_group < 0 or settings.max_group == 1:
            raise ValueError(f"max_group must be 0 (no limit) or at least 2, got {settings.max_group}")
        self.s = settings
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.detector = PlateauDetector(settings.window, settings.loss_delta, settings.grad_norm)
        self.modules = modules
        self.layers = by_layer(modules)
        self.merge = MERGE_FORMULAS[settings.formula]
        self.events: list[dict] = []
        self.merges_by_epoch: dict[str, int] = {}
        self.checks = 0
        labels = list(self.layers)
        # the note's two tracked parameters: an entry of the first and of the last layer
        self.tracked = (self.layers[labels[0]][0], self.layers[labels[-1]][-1])

    def epoch(self, step: int) -> int:
        return (step - 1) // self.steps_per_epoch

    def merges_left(self, step: int) -> int:
        return self.s.max_merges_per_epoch - self.merges_by_epoch.get(str(self.epoch(step)), 0)

    def count_merge(self, step: int) -> None:
        key = str(self.epoch(step))
        self.merges_by_epoch[key] = self.merges_by_epoch.get(key, 0) + 1

    def event(self, step: int, layer: str, a: str, b: str, compat: float, decision: str) -> None:
        self.events.append({"step": step, "layer": layer, "a": a, "b": b, "compat": round(float(compat), 6),
                            "decision": decision})

    def on_log(self, step: int, loss: float, grad_norm: float, opt: torch.optim.Optimizer,
               final: bool = False) -> dict:
        """Called by `fit` at every logged step (on every rank: all make the same decisions). No
        check at the `final` step: a merge there would go untrained (that is merging after)."""
        if self.detector.update(loss, grad_norm) and not final:
            self.checks += 1
            self.check(step, opt)
        p1, p2 = (float(self.tracked_value(m).detach()) for m in self.tracked)
        return {"tether/p1": p1, "tether/p2": p2, "tether/merges": sum(self.merges_by_epoch.values()),
                "tether/checks": self.checks, "tether/epoch": self.epoch(step)}

    def check(self, step: int, opt) -> None:
        raise NotImplementedError

    def tracked_value(self, module: str) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"detector": self.detector.state_dict(), "events": self.events,
                "merges_by_epoch": self.merges_by_epoch, "checks": self.checks}

    def load_state_dict(self, state: dict) -> None:
        self.detector.load_state_dict(state["detector"])
        self.events = list(state["events"])
        self.merges_by_epoch = dict(state["merges_by_epoch"])
        self.checks = int(state["checks"])


# ---------------------------------------------------------------------- joint training


class JointTethers(_Tethers):
    """Tethers among the experts of `train --joint` (curriculum/joint.py), one per neighbourhood.

    `owner[layer][k]` is the expert whose factors neighbourhood k uses at that layer; merges
    tie groups of neighbourhoods by pointing them at one expert. `weights[k]` is neighbourhood
    k's share of the training blocks: a merge weighs each group by its members' shares."""

    def __init__(self, peft_model, names: list[str], experts: list[str], weights: list[float],
                 settings: TetherSettings, steps_per_epoch: int, shared: str = "shared") -> None:
        super().__init__(settings, steps_per_epoch, lora_modules(peft_model))
        self.names, self.experts, self.shared = names, experts, shared
        self.weights = [float(w) for w in weights]
        self.owner: dict[str, list[int]] = {layer: list(range(len(experts))) for layer in self.layers}
        self._active: int | None = None

    def activate(self, k: int) -> None:
        """Make neighbourhood k's adapter active: at each layer, the shared adapter and the expert
        that owns k there (the others get no gradient this step)."""
        for layer, modules in self.layers.items():
            active = [self.shared, self.experts[self.owner[layer][k]]]
            for name in modules:
                self.modules[name].set_adapter(active)
        self._active = k

    def groups(self, layer: str) -> dict[int, list[int]]:
        """Owner expert -> the neighbourhoods it serves at `layer`."""
        out: dict[int, list[int]] = {}
        for k, e in enumerate(self.owner[layer]):
            out.setdefault(e, []).append(k)
        return out

    def label(self, members: list[int]) -> str:
        return "+".join(self.names[k] for k in members)

    def served(self) -> list[list[str]]:
        """Neighbourhoods whose adapters are the same at every layer, grouped: one adapter each."""
        same: dict[tuple, list[str]] = {}
        for k, name in enumerate(self.names):
            same.setdefault(tuple(self.owner[layer][k] for layer in self.layers), []).append(name)
        return list(same.values())

    def _tether(self, layer: str, expert: int) -> list[tuple]:
        """A group's delta at `layer` as (A, B, scale) per module: shared + its expert (what is
        served), or with `compare: expert` the expert alone (the shared part is common to all,
        so it lifts every compatibility towards 1)."""
        out = []
        parts = (self.experts[expert],) if self.s.compare == "expert" else (self.shared, self.experts[expert])
        for name in self.layers[layer]:
            m = self.modules[name]
            for adapter in parts:
                a, b = factors(m, adapter)
                out.append((a.detach().float(), b.detach().float(), float(m.scaling[adapter])))
        return out

    def _compat(self, layer: str) -> dict[tuple[int, int], float]:
        owners = sorted(self.groups(layer))
        tethers = {e: self._tether(layer, e) for e in owners}
        return {(e, f): delta_cosine(tethers[e], tethers[f]) for i, e in enumerate(owners) for f in owners[i + 1:]}

    @torch.no_grad()
    def check(self, step: int, opt) -> None:
        """At each layer, the groups whose every pair is at least `threshold` compatible (complete
        linkage on the compatibilities at the start of the check, as `adapters merge` groups)
        merge, most compatible first, as long as the epoch's cap allows all of a group's merges.
        With `scope: adapter`, `_check_adapters` decides for all layers at once."""
        compat = {layer: self._compat(layer) for layer in self.layers}
        if self.s.scope == "adapter":
            self._check_adapters(step, opt, compat)
            return
        labels = {(layer, e): self.label(members) for layer in self.layers for e, members in self.groups(layer).items()}
        candidates = []
        for layer, pairs in compat.items():
            owners = sorted(self.groups(layer))
            matrix = np.eye(len(owners))
            for (e, f), c in pairs.items():
                matrix[owners.index(e), owners.index(f)] = matrix[owners.index(f), owners.index(e)] = c
            for group in merge_groups([str(e) for e in owners], matrix, self.s.threshold):
                members = [int(e) for e in group]
                worst = min(pairs[(e, f)] for i, e in enumerate(members) for f in members[i + 1:])
                candidates.append((worst, layer, members))
        group_of: dict[tuple[str, int], tuple[int, str]] = {}  # (layer, expert) -> (its group, merge | capped)
        for i, (_, layer, members) in enumerate(sorted(candidates, key=lambda c: (-c[0], c[1], c[2]))):
            merge = self.merges_left(step) >= len(members) - 1  # all of a group's merges, or none
            if merge:
                self._merge(layer, members, opt)
                for _ in members[1:]:
                    self.count_merge(step)
            for e in members:
                group_of[(layer, e)] = (i, "merge" if merge else "capped")
        for layer, pairs in compat.items():
            for (e, f), c in pairs.items():
                same = group_of.get((layer, e)) is not None and group_of.get((layer, e)) == group_of.get((layer, f))
                decision = group_of[(layer, e)][1] if same else "apart"
                self.event(step, layer, labels[(layer, e)], labels[(layer, f)], c, decision)

    def _check_adapters(self, step: int, opt, compat: dict[str, dict[tuple[int, int], float]]) -> None:
        """`scope: adapter`: two groups join when every layer of every pair across them is at least
        `threshold` compatible (complete linkage on each pair's smallest compatibility over the
        layers), the most compatible first, one join at a time, while the epoch's cap and
        `keep_at_least` allow and the joined group holds at most `max_group` neighbourhoods; then
        each joined group merges at every layer. Groups are the same at every layer in this
        scope, so tied neighbourhoods are served by one adapter."""
        first = next(iter(self.layers))
        groups = self.groups(first)
        labels = {e: self.label(members) for e, members in groups.items()}
        worst = {pair: min(compat[layer][pair] for layer in self.layers) for pair in compat[first]}
        joined: list[list[int]] = [[e] for e in sorted(groups)]
        budget = min(self.merges_left(step), len(joined) - self.s.keep_at_least)

        def linkage(g: list[int], h: list[int]) -> float:
            return min(worst[(min(e, f), max(e, f))] for e in g for f in h)

        def size(g: list[int]) -> int:  # neighbourhoods, not experts: a group may hold tied ones already
            return sum(len(groups[e]) for e in g)

        limit = self.s.max_group or len(self.names)
        while budget > 0 and len(joined) > 1:
            candidates = [(linkage(g, h), i, j) for i, g in enumerate(joined) for j, h in enumerate(joined)
                          if i < j and size(g) + size(h) <= limit]
            if not candidates:
                break
            value, i, j = max(candidates)
            if value < self.s.threshold:
                break
            joined[i] = sorted(joined[i] + joined.pop(j))
            budget -= 1
        group_of = {e: i for i, g in enumerate(joined) for e in g}
        for members in joined:
            if len(members) > 1:
                for layer in self.layers:
                    self._merge(layer, members, opt)
                for _ in members[1:]:
                    self.count_merge(step)
        for layer, pairs in compat.items():
            for (e, f), c in pairs.items():
                decision = ("merge" if group_of[e] == group_of[f]
                            else "capped" if worst[(e, f)] >= self.s.threshold else "apart")
                self.event(step, layer, labels[e], labels[f], c, decision)

    def _merge(self, layer: str, members: list[int], opt) -> None:
        """Tie the groups of experts `members` at `layer` to the first of them: its factors become
        the formula over all of theirs, each weighted by its group's share of the blocks."""
        groups = self.groups(layer)
        keep = members[0]
        w = np.array([sum(self.weights[k] for k in groups[e]) for e in members], dtype=np.float64)
        w = (w / w.sum()).tolist()
        params = []
        for name in self.layers[layer]:
            m = self.modules[name]
            assign(m, self.experts[keep], self.merge([factors(m, self.experts[e]) for e in members], w))
            params.extend(factors(m, self.experts[keep]))
        reset_adam(opt, params)
        self.owner[layer] = [keep if e in members else e for e in self.owner[layer]]
        if self._active is not None:
            self.activate(self._active)  # the active neighbourhood may have changed experts

    def tracked_value(self, module: str) -> torch.Tensor:
        m = self.modules[module]
        return factors(m, self.experts[self.owner[layer_label(module)][0]])[1][0, 0]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "owner": self.owner}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.owner = {layer: list(v) for layer, v in state["owner"].items()}


# --------------------------------------------------------------------- trained apart


class ApartTethers(_Tethers):
    """Tethers of one adapter (`adapter`, training) against finished ones (their factors, read
    from their files with `curriculum.tethers.read_lora`)."""

    def __init__(self, peft_model, others: list[LoraFactors], settings: TetherSettings, steps_per_epoch: int,
                 adapter: str = "default") -> None:
        super().__init__(settings, steps_per_epoch, lora_modules(peft_model))
        self.adapter = adapter
        self.others = others
        self.merged_with: dict[str, list[str]] = {}  # layer -> the finished adapters it merged with, in order

    def _tether(self, layer: str) -> list[tuple]:
        out = []
        for name in self.layers[layer]:
            a, b = factors(self.modules[name], self.adapter)
            out.append((a.detach().float(), b.detach().float(), float(self.modules[name].scaling[self.adapter])))
        return out

    def _other(self, other: LoraFactors, layer: str, device) -> list[tuple]:
        return [(other.modules[n][0].to(device), other.modules[n][1].to(device), other.scale)
                for n in self.layers[layer]]

    def _compat(self, layer: str) -> list[float]:
        """The training adapter's compatibility at `layer` with each finished one, in order."""
        mine = self._tether(layer)
        device = mine[0][0].device
        return [delta_cosine(mine, self._other(o, layer, device)) for o in self.others]

    @torch.no_grad()
    def check(self, step: int, opt) -> None:
        if self.s.scope == "adapter":
            self._check_adapter(step, opt)
            return
        for layer in self.layers:
            scored = list(zip(self._compat(layer), self.others))
            best = max(scored, key=lambda t: t[0]) if scored else None
            for c, o in scored:
                decision = "apart"
                if o is best[1] and c >= self.s.threshold:
                    decision = "merge" if self.merges_left(step) > 0 else "capped"
                if decision == "merge":
                    self._merge(layer, o, opt)
                    self.count_merge(step)
                self.event(step, layer, self.adapter, o.name, c, decision)

    def _check_adapter(self, step: int, opt) -> None:
        """`scope: adapter`: merge every layer with the finished adapter whose smallest
        compatibility over the layers is the highest, if that passes the threshold (one merge)."""
        scores = {layer: self._compat(layer) for layer in self.layers}
        worst = [min(scores[layer][i] for layer in self.layers) for i in range(len(self.others))]
        best = int(np.argmax(worst)) if worst else None
        decision = "apart"
        if best is not None and worst[best] >= self.s.threshold:
            decision = "merge" if self.merges_left(step) > 0 else "capped"
        if decision == "merge":
            for layer in self.layers:
                self._merge(layer, self.others[best], opt)
            self.count_merge(step)
        for layer in self.layers:
            for i, o in enumerate(self.others):
                self.event(step, layer, self.adapter, o.name, scores[layer][i], decision if i == best else "apart")

    def _merge(self, layer: str, other: LoraFactors, opt) -> None:
        params = []
        for name in self.layers[layer]:
            m = self.modules[name]
            a, b = factors(m, self.adapter)
            theirs = (other.modules[name][0].to(a.device), other.modules[name][1].to(a.device))
            assign(m, self.adapter, self.merge([(a, b), theirs], [0.5, 0.5]))
            params.extend(factors(m, self.adapter))
        reset_adam(opt, params)
        self.merged_with.setdefault(layer, []).append(other.name)

    def tracked_value(self, module: str) -> torch.Tensor:
        return factors(self.modules[module], self.adapter)[1][0, 0]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "merged_with": self.merged_with, "others": [o.name for o in self.others]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.merged_with = {k: list(v) for k, v in state["merged_with"].items()}


def compatible_others(others: list[LoraFactors], modules: dict[str, torch.nn.Module], rank: int,
                      scale: float) -> tuple[list[LoraFactors], list[str]]:
    """The finished adapters a training can be tethered to (same rank, scale and modules), and
    the names of those it cannot (trained with another rank or on other modules: a joint export)."""
    fit_, skipped = [], []
    for o in others:
        ok = o.rank == rank and abs(o.scale - scale) < 1e-9 and set(o.modules) == set(modules)
        ok = ok and all(o.modules[n][0].shape == modules[n].lora_A["default"].weight.shape for n in modules)
        if ok:
            fit_.append(o)
        else:
            skipped.append(o.name)
    return fit_, skipped


# ---------------------------------------------------------------------------- the ledger

CHECKS_SCHEMA = """
CREATE TABLE IF NOT EXISTS tether_checks (
    training TEXT NOT NULL,          -- the neighbourhood trained alone, or `_joint`
    step INTEGER NOT NULL,
    layer TEXT NOT NULL,
    a TEXT NOT NULL,                 -- one side: an adapter, or a group of neighbourhoods joined by '+'
    b TEXT NOT NULL,                 -- the other side ('' for a merge of a group formed during the check)
    compat REAL NOT NULL,            -- cosine of the two sides' deltas at the layer
    decision TEXT NOT NULL,          -- merge | apart | capped
    created TEXT NOT NULL,
    PRIMARY KEY (training, step, layer, a, b)
);
"""


def record_checks(ledger: Path, training: str, events: list[dict], created: str) -> None:
    """The training's checks in `ledger.sqlite`; a re-run replaces its own rows, never adds twice."""
    with sqlite3.connect(ledger, timeout=30) as db:
        db.executescript(CHECKS_SCHEMA)
        db.execute("DELETE FROM tether_checks WHERE training = ?", (training,))
        db.executemany("INSERT OR REPLACE INTO tether_checks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       [(training, e["step"], e["layer"], e["a"], e["b"], e["compat"], e["decision"], created)
                        for e in events])


def read_checks(ledger: Path) -> list[dict]:
    from pipeline.errors import reading

    if not Path(ledger).is_file():
        return []
    with reading(ledger, "SQLite ledger"), sqlite3.connect(ledger, timeout=30) as db:
        db.row_factory = sqlite3.Row
        if not db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='tether_checks'").fetchone():
            return []
        return [dict(r) for r in db.execute("SELECT * FROM tether_checks ORDER BY training, step, layer, a, b")]


def summary(controller: _Tethers) -> dict:
    """What a training records in its adapter's neighborhood.json."""
    out = {"checks": controller.checks, "merges": sum(controller.merges_by_epoch.values()),
           "merges_by_epoch": dict(controller.merges_by_epoch),
           "formula": controller.s.formula, "threshold": controller.s.threshold}
    if isinstance(controller, JointTethers):
        out["owner"] = {layer: [controller.names[e] for e in owners] for layer, owners in controller.owner.items()}
        out["served"] = controller.served()
    else:
        out["merged_with"] = {layer: list(v) for layer, v in controller.merged_with.items()}
    return out
