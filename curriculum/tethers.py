"""Tethers: per-layer LoRA deltas, their compatibility, and merging compatible adapters.

The research note (tethers-dtnn) gives every model per-layer tether tensors; models whose
tethers are compatible merge, the others drift apart. Here a neighbourhood adapter's tether at
layer l is its LoRA delta at that layer, ΔW = B·A·scale for every targeted module of the layer.
Compatibility of two adapters at layer l is the cosine similarity of their layer-l deltas (all
of the layer's modules flattened into one vector); their compatibility is the mean over layers.

Merges go through peft's `add_weighted_adapter`; the result is a stock peft adapter.

Reads adapters straight from their files (safetensors + adapter_config.json): no model is
loaded to compute compatibility, and nothing here imports pydantic, faiss or datasets.
"""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import UserError, reading, unknown_choice
from pipeline.module_spec import Param, module

if TYPE_CHECKING:
    import torch

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
_LAYER = re.compile(r"\.(\d+)\.")


# ------------------------------------------------------------------------ adapter files


@dataclass
class LoraFactors:
    """One adapter's LoRA factors per module: A (r, in), B (out, r), and its scale (alpha / r)."""

    name: str
    rank: int
    scale: float
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def delta(self, module: str) -> torch.Tensor:
        """ΔW = B·A·scale, (out, in)."""
        a, b = self.modules[module]
        return (b @ a) * self.scale

    def layers(self) -> dict[str, list[str]]:
        """Layer label ('0', '1', ... or 'other') -> its modules, in order."""
        out: dict[str, list[str]] = {}
        for m in sorted(self.modules, key=_module_order):
            out.setdefault(layer_label(m), []).append(m)
        return out


def layer_label(module: str) -> str:
    """The layer a module name belongs to: its first number ('0', '1', ...), or 'other'."""
    match = _LAYER.search(f".{module}.")
    return match.group(1) if match else "other"


def _module_order(m: str):
    layer = layer_label(m)
    return (int(layer) if layer != "other" else 1 << 30, m)


def read_adapter_config(path: Path) -> dict:
    """adapter_config.json of an adapter directory, checked to be a plain LoRA adapter."""
    cfg_file = Path(path) / CONFIG
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"adapter '{path}': no {CONFIG}; an adapter directory holds {CONFIG} and {WEIGHTS} "
                        f"(peft save_pretrained).") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"adapter '{path}': {CONFIG} is not valid JSON ({e}).") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        got = cfg.get("peft_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise UserError(f"adapter '{path}': only LoRA adapters are supported (peft_type LORA), got {got!r}.")
    return cfg


def read_lora(path: Path, name: str | None = None) -> LoraFactors:
    """The LoRA factors of the adapter saved in `path`; a UserError for unreadable or odd files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg = read_adapter_config(path)
    if cfg.get("use_dora") or cfg.get("use_rslora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise UserError(f"adapter '{path}': only plain LoRA with one rank is supported (no DoRA, rsLoRA, "
                        f"rank_pattern or alpha_pattern), since only then are deltas and merges exact.")
    try:
        tensors = load_file(str(path / WEIGHTS))
    except FileNotFoundError:
        raise UserError(f"adapter '{path}': no {WEIGHTS}.") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"adapter '{path}': {WEIGHTS} is not a readable safetensors file ({e}). "
                        f"Retrain it (`nucleus train -n {path.name} --force`) or remove the directory.") from None
    rank = int(cfg["r"])
    alpha = float(cfg.get("lora_alpha", rank))
    factors = LoraFactors(name or path.name, rank, alpha / rank)
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight").removeprefix("base_model.model.")
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise UserError(f"adapter '{path}': {WEIGHTS} has a malformed LoRA pair for '{module}' "
                            f"(rank {rank} in {CONFIG}).")
        factors.modules[module] = (a.float(), b.float())
    if not factors.modules:
        raise UserError(f"adapter '{path}': {WEIGHTS} holds no LoRA weights.")
    return factors


def check_same_shape(adapters: list[LoraFactors], what: str) -> None:
    """One rank and one set of target modules for all, else a UserError naming the difference."""
    first = adapters[0]
    for other in adapters[1:]:
        if other.rank != first.rank:
            raise UserError(f"{what}: adapters '{first.name}' (rank {first.rank}) and '{other.name}' "
                            f"(rank {other.rank}) have different LoRA ranks; Nucleus merges only adapters of "
                            f"one rank (lora.rank), since only then are merges exact.")
        if set(other.modules) != set(first.modules):
            only_a = sorted(set(first.modules) - set(other.modules))[:3]
            only_b = sorted(set(other.modules) - set(first.modules))[:3]
            raise UserError(f"{what}: adapters '{first.name}' and '{other.name}' target different modules "
                            f"(only in '{first.name}': {only_a}; only in '{other.name}': {only_b}); "
                            f"train them with the same lora.target_modules.")
        for m, (a, b) in first.modules.items():
            a2, b2 = other.modules[m]
            if a.shape != a2.shape or b.shape != b2.shape:
                raise UserError(f"{what}: adapters '{first.name}' and '{other.name}' have different shapes at "
                                f"'{m}' ({tuple(b.shape[:1]) + tuple(a.shape[1:])} vs "
                                f"{tuple(b2.shape[:1]) + tuple(a2.shape[1:])}): they were trained on different bases.")


# ------------------------------------------------------------------------ compatibility


def factor_inner(ax, bx, ay, by) -> float:
    """<B_x A_x, B_y A_y>_F without forming either product: sum((B_x^T B_y) * (A_x A_y^T)) (r x r work)."""
    return float(((bx.T @ by) * (ax @ ay.T)).sum())


def delta_cosine(xs: list[tuple], ys: list[tuple]) -> float:
    """Cosine of two layers' deltas, each given as its modules' (A, B, scale), in the same order:
    all of a layer's modules flattened into one vector."""
    def inner(us, vs):
        return sum(factor_inner(a, b, c, d) * s * t for (a, b, s), (c, d, t) in zip(us, vs))

    return inner(xs, ys) / max((inner(xs, xs) * inner(ys, ys)) ** 0.5, 1e-30)


def compatibility(x: LoraFactors, y: LoraFactors) -> dict[str, float]:
    """Per-layer cosine similarity of the two adapters' deltas, plus `mean` over layers."""
    check_same_shape([x, y], "compat")
    out: dict[str, float] = {}
    for layer, modules in x.layers().items():
        out[layer] = delta_cosine([(*x.modules[m], x.scale) for m in modules],
                                  [(*y.modules[m], y.scale) for m in modules])
    out["mean"] = float(np.mean(list(out.values())))
    return out


def compat_matrix(adapters: list[LoraFactors]) -> tuple[np.ndarray, dict[tuple[str, str], dict[str, float]]]:
    """(n, n) mean compatibility, and the per-layer values of each pair."""
    n = len(adapters)
    mean = np.eye(n)
    per_pair: dict[tuple[str, str], dict[str, float]] = {}
    for i in range(n):
        for j in range(i + 1, n):
            c = compatibility(adapters[i], adapters[j])
            per_pair[(adapters[i].name, adapters[j].name)] = c
            mean[i, j] = mean[j, i] = c["mean"]
    return mean, per_pair


def merge_groups(names: list[str], matrix: np.ndarray, threshold: float) -> list[list[str]]:
    """Groups of two or more adapters whose every pair is at least `threshold` compatible.

    Complete linkage, most compatible pairs first: a group never chains two adapters that
    disagree through a third one they both resemble.
    """
    group_of = {i: {i} for i in range(len(names))}
    pairs = sorted(((matrix[i, j], i, j) for i in range(len(names)) for j in range(i + 1, len(names))),
                   reverse=True)
    for value, i, j in pairs:
        if value < threshold:
            break
        gi, gj = group_of[i], group_of[j]
        if gi is gj or any(matrix[a, b] < threshold for a in gi for b in gj):
            continue
        gi |= gj
        for k in gj:
            group_of[k] = gi
    groups = {id(g): g for g in group_of.values() if len(g) > 1}
    return sorted(([names[i] for i in sorted(g)] for g in groups.values()), key=lambda g: g[0])


# ------------------------------------------------------------------------------ merging


@dataclass(frozen=True)
class MergeMethod:
    """How a registry name maps onto peft's `add_weighted_adapter`."""

    combination_type: str
    uses_density: bool
    doc: str


# `linear` is the weighted sum of the deltas, Σ w_i·ΔW_i, exactly. peft's own "linear" combines
# the A and the B factors separately, (Σ √(w_i s_i) B_i)(Σ √(w_i s_i) A_i), which adds cross terms
# B_i·A_j (peft's docstring calls it "a very rough approximation"); peft's "cat" stacks the factors
# along the rank instead, which is the exact sum. So `linear` and `cat` give the same delta, at
# rank Σ r_i; `ties` and `dare_ties` keep the one rank r and act on A and B separately, as in peft.
MERGE_METHODS: dict[str, MergeMethod] = {
    "linear": MergeMethod("cat", False, "Σ w_i·ΔW_i exactly (peft 'cat' factors, rank Σ r_i)"),
    "cat": MergeMethod("cat", False, "peft 'cat': the factors stacked along the rank; same delta as linear"),
    "ties": MergeMethod("ties", True, "peft 'ties': trim to `density`, elect signs, average; rank r"),
    "dare_ties": MergeMethod("dare_ties", True, "peft 'dare_ties': random drop to `density`, rescale, ties; rank r"),
}

MERGE_MODULES = (
    module("merge", "linear", "the exact weighted sum of the adapters' deltas (rank: the sum of theirs)"),
    module("merge", "cat", "peft 'cat': factors stacked along the rank; the same delta as linear"),
    module("merge", "ties", "peft 'ties': trim, elect signs, average (rank r)",
           (Param("adapters.merge_density", "float", 0.5, 0.1, 1.0),)),
    module("merge", "dare_ties", "peft 'dare_ties': random drop, rescale, ties (rank r)",
           (Param("adapters.merge_density", "float", 0.5, 0.1, 1.0),)),
)


def merge_method(name: str) -> MergeMethod:
    if name not in MERGE_METHODS:
        raise unknown_choice("merge method", name, MERGE_METHODS)
    return MERGE_METHODS[name]


def add_merged_adapter(peft_model, members: list[str], weights: list[float], new_name: str, method: str,
                       density: float = 0.5, seed: int = 0) -> None:
    """Add `new_name` to a PeftModel in which every member adapter is loaded."""
    import torch

    spec = merge_method(method)
    if len(members) != len(weights):
        raise ValueError("one weight per member adapter")
    torch.manual_seed(seed)  # dare_ties drops at random
    kwargs = {"density": density} if spec.uses_density else {}
    try:
        peft_model.add_weighted_adapter(members, weights, new_name, combination_type=spec.combination_type, **kwargs)
    except ValueError as e:  # peft's own checks: ranks, target-module types, ...
        raise UserError(f"merge of {members} with {method}: {e}") from None


def merge_id(members: list[str], method: str) -> str:
    """A stable, safe id for a merge: `merge-<6 hex>` from the sorted members and the method."""
    import hashlib

    digest = hashlib.sha256(json.dumps([sorted(members), method]).encode()).hexdigest()[:8]
    return f"merge-{digest}"


# --------------------------------------------------------------------------- the ledger

MERGES_SCHEMA = """
CREATE TABLE IF NOT EXISTS merges (
    merge_id TEXT PRIMARY KEY,
    members TEXT NOT NULL,           -- JSON list of neighbourhood ids folded into this adapter
    method TEXT NOT NULL,            -- adapters.merge_method
    weights TEXT NOT NULL,           -- JSON list, one per member
    threshold REAL NOT NULL,         -- adapters.merge_threshold when it was merged
    compat_min REAL NOT NULL,        -- smallest mean compatibility of a pair in the group
    compat TEXT NOT NULL,            -- JSON {"a|b": {layer: cosine, ..., "mean": m}}
    path TEXT NOT NULL,              -- adapters/<merge_id>, relative to the run directory
    created TEXT NOT NULL
);
"""


def record_merge(ledger: Path, merge_id_: str, members: list[str], method: str, weights: list[float],
                 threshold: float, compat: dict[str, dict[str, float]], path: str, created: str) -> None:
    """Add (or replace) a merge in the run's ledger.sqlite, in its own `merges` table."""
    compat_min = min(c["mean"] for c in compat.values()) if compat else 1.0
    with sqlite3.connect(ledger, timeout=30) as db:
        db.executescript(MERGES_SCHEMA)
        db.execute("INSERT OR REPLACE INTO merges VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (merge_id_, json.dumps(members), method, json.dumps(weights), threshold, compat_min,
                    json.dumps(compat), path, created))


def read_merges(ledger: Path) -> list[dict]:
    if not Path(ledger).is_file():
        return []
    with reading(ledger, "SQLite ledger"), sqlite3.connect(ledger, timeout=30) as db:  # reads only
        db.row_factory = sqlite3.Row
        if not db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='merges'").fetchone():
            return []
        rows = [dict(r) for r in db.execute("SELECT * FROM merges ORDER BY created, merge_id")]
    for r in rows:
        r["members"], r["weights"], r["compat"] = (json.loads(r["members"]), json.loads(r["weights"]),
                                                   json.loads(r["compat"]))
    return rows
