"""Tethers during training: the plateau detector, the two merge formulas, a layer merge among
jointly trained experts and against a finished adapter (that layer as the formula says, the
others untouched), and a tethered training killed and resumed ending where an uninterrupted one
does."""

import numpy as np
import pytest
import torch

from curriculum.joint import SHARED, GroupBatches, add_joint_lora
from curriculum.plateau_tethers import (ApartTethers, JointTethers, PlateauDetector, TetherSettings, factors,
                                        merge_factors, merge_svd)
from curriculum.tethers import LoraFactors, delta_cosine
from pipeline.lm_data import Blocks
from pipeline.trainer import FitSettings, fit

EXPERTS = ["e0", "e1", "e2"]


def _tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=16))


def _joint(seed: int = 0):
    model = add_joint_lora(_tiny_lm(), EXPERTS, shared_rank=2, expert_rank=2, scale=2.0, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # moved adapters (B = 0 at init would make every delta 0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _moved_adapter():
    """A peft model with one moved rank-2 adapter, and its LoRA layers by module name."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_tiny_lm(), LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model, {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "lora_A")}


def _all_alike():
    """A joint model whose three experts equal e0 at every layer (every pair compatible), and its optimizer."""
    model = _joint()
    with torch.no_grad():
        for m in (m for n, m in model.named_modules() if hasattr(m, "lora_A")):
            for e in ("e1", "e2"):
                m.lora_A[e].weight.copy_(m.lora_A["e0"].weight)
                m.lora_B[e].weight.copy_(m.lora_B["e0"].weight)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_the_detector_fires_on_a_flat_loss_and_not_on_a_falling_one():
    flat = PlateauDetector(window=6, loss_delta=0.01)
    fired = [flat.update(3.0 + 0.001 * (-1) ** i) for i in range(12)]
    assert fired.index(True) == 5 and fired[11]  # a full window, then a fresh window before the next
    assert sum(fired) == 2
    falling = PlateauDetector(window=6, loss_delta=0.01)
    assert not any(falling.update(5.0 * 0.97 ** i) for i in range(40))  # 3% per logged step
    by_gradient = PlateauDetector(window=4, loss_delta=0.0, grad_norm=0.5)
    assert [by_gradient.update(5.0 - i, g) for i, g in enumerate([1.0, 1.0, 1.0, 0.1])] == [False] * 3 + [True]


def test_the_svd_formula_is_the_mean_delta_when_it_fits_the_rank_and_the_best_approximation_otherwise():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 20, generator=gen)
    b1, b2 = torch.randn(30, 4, generator=gen), torch.randn(30, 4, generator=gen)
    new_a, new_b = merge_svd([(a, b1), (a, b2)], [0.25, 0.75])  # one A: the mean has rank 4
    assert float((new_b @ new_a - (0.25 * b1 + 0.75 * b2) @ a).abs().max()) < 1e-5
    a2 = torch.randn(4, 20, generator=gen)  # two subspaces: rank 8, truncated to the top 4
    new_a, new_b = merge_svd([(a, b1), (a2, b2)], [0.5, 0.5])
    u, s, vh = torch.linalg.svd(0.5 * (b1 @ a + b2 @ a2))
    best = (u[:, :4] * s[:4]) @ vh[:4]
    assert float((new_b @ new_a - best).abs().max() / best.abs().max()) < 1e-5  # float32, entries up to ~5
    fa, fb = merge_factors([(a, b1), (a2, b2)], [0.5, 0.5])
    assert torch.allclose(fa, (a + a2) / 2) and torch.allclose(fb, (b1 + b2) / 2)


@pytest.mark.parametrize("formula", ["svd", "factors"])
def test_a_joint_merge_ties_one_layer_as_the_formula_says_and_leaves_the_others(formula):
    model = _joint()
    before = _snapshot(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    tethers = JointTethers(model, ["nb-a", "nb-b", "nb-c"], EXPERTS, [0.5, 0.25, 0.25],
                           TetherSettings(threshold=-1.0, max_merges_per_epoch=2, formula=formula), steps_per_epoch=10)
    tethers.check(step=1, opt=opt)  # threshold -1: each layer's three form one group; the cap allows one group
    merged = {e["layer"] for e in tethers.events if e["decision"] == "merge"}
    assert len(merged) == 1 and sum(e["decision"] == "merge" for e in tethers.events) == 3  # its 3 pairs
    assert sum(e["decision"] == "capped" for e in tethers.events) == 3  # the other layer's, over the cap
    layer = merged.pop()
    assert tethers.owner[layer] == [0, 0, 0] and tethers.served() == [["nb-a"], ["nb-b"], ["nb-c"]]
    after = _snapshot(model)
    for name in before:
        in_layer = f"layers.{layer}." in name
        if in_layer and name.endswith("lora_A.e0.weight"):
            module = name.removesuffix(".lora_A.e0.weight")
            parts = [(before[f"{module}.lora_A.{e}.weight"], before[f"{module}.lora_B.{e}.weight"]) for e in EXPERTS]
            # weighted by the groups' shares of the blocks
            expected = (merge_svd if formula == "svd" else merge_factors)(parts, [0.5, 0.25, 0.25])
            assert float((after[name] - expected[0]).abs().max()) < 1e-5
            assert float((after[f"{module}.lora_B.e0.weight"] - expected[1]).abs().max()) < 1e-5
        elif not (in_layer and ".e0." in name):
            assert torch.equal(after[name], before[name]), name  # other layers, other experts, shared: untouched


def test_tied_neighbourhoods_train_one_expert_and_are_served_as_one():
    model = _joint()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    tethers = JointTethers(model, ["nb-a", "nb-b", "nb-c"], EXPERTS, [1 / 3] * 3,
                           TetherSettings(threshold=-1.0, max_merges_per_epoch=100), steps_per_epoch=10)
    tethers.check(step=1, opt=opt)  # no cap: every layer ties everything into one group
    assert all(owners == [0, 0, 0] for owners in tethers.owner.values())
    assert tethers.served() == [["nb-a", "nb-b", "nb-c"]]
    tethers.activate(2)  # neighbourhood 2 now trains expert e0 everywhere, e2 is idle
    module = next(iter(tethers.modules.values()))
    assert module.active_adapters == [SHARED, "e0"]
    assert all(p.requires_grad == (".e2." not in n) for n, p in model.named_parameters() if ".lora_" in n
               and (".e2." in n or ".e0." in n))


def test_a_merge_against_a_finished_adapter_averages_that_layer_only():
    model, mine = _moved_adapter()
    other = LoraFactors("nb-old", 2, 2.0)
    for name, m in mine.items():  # the finished adapter: layer 0 equal to ours, layer 1 opposite
        a, b = (t.detach().clone() for t in factors(m, "default"))
        other.modules[name] = (a, b if "layers.0." in name else -b)
    before = _snapshot(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    tethers = ApartTethers(model, [other], TetherSettings(threshold=0.9), steps_per_epoch=10)
    tethers.check(step=3, opt=opt)
    decisions = {e["layer"]: e["decision"] for e in tethers.events}
    assert decisions == {"0": "merge", "1": "apart"}
    assert {e["layer"]: round(e["compat"], 4) for e in tethers.events} == {"0": 1.0, "1": -1.0}
    after = _snapshot(model)
    for name in before:
        if "layers.1." in name:
            assert torch.equal(after[name], before[name])
    # layer 0: the mean of two equal deltas is the same delta (in new factors)
    for name, m in mine.items():
        if "layers.0." in name:
            a, b = factors(m, "default")
            assert float((b @ a - other.modules[name][1] @ other.modules[name][0]).abs().max()) < 1e-5
    assert tethers.merged_with == {"0": ["nb-old"]}


def test_a_tethered_joint_training_killed_and_resumed_ends_where_an_uninterrupted_one_does(tmp_path):
    tokens = torch.randint(0, 32, (48, 8), generator=torch.Generator().manual_seed(2))
    blocks = Blocks(tokens, torch.ones(48, 8, dtype=torch.bool), np.repeat(np.arange(3), 16))
    settings = FitSettings(steps=40, lr=1e-2, batch_size=4, checkpoint_every=25, log_every=2)
    tether_settings = TetherSettings(window=2, loss_delta=0.5, threshold=0.0, max_merges_per_epoch=2)

    def train(checkpoint_dir=None, resume=False):
        model = _joint()
        tethers = JointTethers(model, ["a", "b", "c"], EXPERTS, [1 / 3] * 3, tether_settings, steps_per_epoch=12)
        result = fit(model, blocks, lambda: GroupBatches(blocks.topics, 4, seed=0), settings, torch.device("cpu"),
                     on_batch=lambda idx: tethers.activate(int(blocks.topics[idx[0]])), tethers=tethers,
                     checkpoint_dir=checkpoint_dir, resume=resume)
        return model, tethers, result

    whole, whole_t, _ = train()
    assert any(e["decision"] == "merge" for e in whole_t.events)  # the test exercises merges
    train(checkpoint_dir=tmp_path)  # leaves its checkpoint at step 25
    resumed, resumed_t, result = train(checkpoint_dir=tmp_path, resume=True)
    assert result.resumed_from == 25
    assert resumed_t.events == whole_t.events and resumed_t.owner == whole_t.owner
    a, b = _snapshot(whole), _snapshot(resumed)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)


def test_a_plateau_at_the_final_step_merges_nothing():
    model = _joint()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    tethers = JointTethers(model, ["a", "b", "c"], EXPERTS, [1 / 3] * 3,
                           TetherSettings(window=2, loss_delta=0.5, threshold=-1.0), steps_per_epoch=10)
    tethers.on_log(10, 3.0, 1.0, opt)
    row = tethers.on_log(20, 3.0, 1.0, opt, final=True)  # a plateau, but nothing would train the merge
    assert tethers.checks == 0 and not tethers.events and row["tether/merges"] == 0
    tethers.on_log(30, 3.0, 1.0, opt)
    tethers.on_log(40, 3.0, 1.0, opt)  # the same plateau mid-training is checked
    assert tethers.checks == 1 and any(e["decision"] == "merge" for e in tethers.events)


def test_comparing_experts_alone_leaves_out_the_shared_part_every_adapter_has():
    model = _joint()
    with torch.no_grad():  # a large shared delta, experts pointing apart: whole adapters look alike
        for name, p in model.named_parameters():
            if "lora_B.shared" in name:
                p.mul_(50.0)
    compat = {}
    for compare in ("adapter", "expert"):
        tethers = JointTethers(model, ["a", "b", "c"], EXPERTS, [1 / 3] * 3, TetherSettings(compare=compare),
                               steps_per_epoch=10)
        compat[compare] = [c for pairs in (tethers._compat(layer) for layer in tethers.layers) for c in pairs.values()]
    assert min(compat["adapter"]) > 0.9 > max(abs(c) for c in compat["expert"])
    with pytest.raises(ValueError, match="compare"):
        JointTethers(model, ["a", "b", "c"], EXPERTS, [1 / 3] * 3, TetherSettings(compare="shared"), 10)


def test_adapter_scope_ties_whole_neighbourhoods_most_compatible_first_down_to_keep_at_least():
    model = _joint()
    modules = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "lora_A")}
    with torch.no_grad():  # e1 is e0 scaled at every layer (cosine 1); e2 points away at layer 1 only
        for name, m in modules.items():
            m.lora_A["e1"].weight.copy_(m.lora_A["e0"].weight)
            m.lora_B["e1"].weight.copy_(2.0 * m.lora_B["e0"].weight)
            m.lora_A["e2"].weight.copy_(m.lora_A["e0"].weight)
            sign = -1.0 if "layers.1." in name else 1.0
            m.lora_B["e2"].weight.copy_(sign * m.lora_B["e0"].weight)
    before = _snapshot(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    settings = TetherSettings(threshold=0.9, compare="expert", scope="adapter")
    tethers = JointTethers(model, ["a", "b", "c"], EXPERTS, [0.5, 0.25, 0.25], settings, steps_per_epoch=10)
    tethers.check(step=1, opt=opt)
    # a and b tie at every layer (one adapter serves them); c passes at layer 0 but not at layer 1: apart
    assert all(owners == [0, 0, 2] for owners in tethers.owner.values())
    assert tethers.served() == [["a", "b"], ["c"]]
    assert sum(tethers.merges_by_epoch.values()) == 1  # one adapter merged away
    decisions = {(e["layer"], e["a"], e["b"]): e["decision"] for e in tethers.events}
    assert decisions[("0", "a", "b")] == decisions[("1", "a", "b")] == "merge"
    assert decisions[("0", "a", "c")] == decisions[("1", "a", "c")] == "apart"
    after = _snapshot(model)
    for name in before:  # e0 is the weighted mean of e0 and 2 e0 (weights 2/3, 1/3): 4/3 e0 as a delta
        if name.endswith("lora_A.e0.weight"):
            module = name.removesuffix(".lora_A.e0.weight")
            delta = after[f"{module}.lora_B.e0.weight"] @ after[name]
            expected = (4 / 3) * before[f"{module}.lora_B.e0.weight"] @ before[name]
            assert float((delta - expected).abs().max()) < 1e-5
        elif ".e0." not in name:
            assert torch.equal(after[name], before[name]), name

    # the same adapters with every pair compatible: the floor stops the joins at 2 served adapters
    model, opt = _all_alike()
    floor = JointTethers(model, ["a", "b", "c"], EXPERTS, [1 / 3] * 3,
                         TetherSettings(threshold=0.9, compare="expert", scope="adapter", keep_at_least=2), 10)
    floor.check(step=1, opt=opt)
    assert len(floor.served()) == 2
    assert sorted(e["decision"] for e in floor.events if e["layer"] == "0") == ["capped", "capped", "merge"]
    with pytest.raises(ValueError, match="scope"):
        JointTethers(model, ["a", "b", "c"], EXPERTS, [1 / 3] * 3, TetherSettings(scope="model"), 10)


def test_max_group_makes_pairs_where_the_joins_would_grow_one_group():
    """Every pair compatible: without a limit the joins tie all three neighbourhoods into one
    adapter; with `max_group: 2` a pair ties and the third stays alone, whatever the floor."""
    served = {}
    for limit in (0, 2):
        model, opt = _all_alike()
        tethers = JointTethers(model, ["a", "b", "c"], EXPERTS, [1 / 3] * 3,
                               TetherSettings(threshold=0.9, compare="expert", scope="adapter", max_group=limit), 10)
        tethers.check(step=1, opt=opt)
        served[limit] = sorted(len(g) for g in tethers.served())
        if limit:
            tethers.check(step=2, opt=opt)  # a later check cannot grow the pair either
            assert sorted(len(g) for g in tethers.served()) == [1, 2]
    assert served == {0: [3], 2: [1, 2]}
    with pytest.raises(ValueError, match="max_group"):
        JointTethers(model, ["a", "b", "c"], EXPERTS, [1 / 3] * 3, TetherSettings(scope="adapter", max_group=1), 10)


def test_adapter_scope_against_finished_adapters_merges_every_layer_or_none():
    model, mine = _moved_adapter()
    half = LoraFactors("nb-half", 2, 2.0)  # layer 0 equal to ours, layer 1 opposite: fails at layer 1
    same = LoraFactors("nb-same", 2, 2.0)  # equal at every layer
    for name, m in mine.items():
        a, b = (t.detach().clone() for t in factors(m, "default"))
        half.modules[name] = (a, b if "layers.0." in name else -b)
        same.modules[name] = (a.clone(), b.clone())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    alone = ApartTethers(model, [half], TetherSettings(threshold=0.9, scope="adapter"), steps_per_epoch=10)
    before = _snapshot(model)
    alone.check(step=3, opt=opt)
    assert {e["decision"] for e in alone.events} == {"apart"} and alone.merged_with == {}
    assert all(torch.equal(v, _snapshot(model)[k]) for k, v in before.items())
    both = ApartTethers(model, [half, same], TetherSettings(threshold=0.9, scope="adapter"), steps_per_epoch=10)
    both.check(step=3, opt=opt)
    assert both.merged_with == {"0": ["nb-same"], "1": ["nb-same"]}
    assert {(e["layer"], e["b"]): e["decision"] for e in both.events} == {
        ("0", "nb-half"): "apart", ("1", "nb-half"): "apart", ("0", "nb-same"): "merge", ("1", "nb-same"): "merge"}
