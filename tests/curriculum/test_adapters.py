"""The adapter set and tethers on real tiny adapters: merges against their oracles (the adapter
itself, the base plus the weighted sum of deltas), compatibility against flattened deltas,
routing of held-out passages, mixtures, the LRU, and bad adapters."""

import json
import shutil

import numpy as np
import pytest
import torch

from curriculum.adapters import AdapterSet, Router, Target, check_fits_base
from curriculum.tethers import (MERGE_METHODS, add_merged_adapter, check_same_shape, compat_matrix, compatibility,
                                merge_groups, read_lora)
from pipeline.errors import UserError
from pipeline.lm_data import passage_texts
from pipeline.train import RunData
from pipeline.workspace import Workspace

TEXT = "The storm made landfall near the coast and the album reached number one on the chart ."


def _base(run_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run_dir / "model" / "base").eval()


def _tokenizer(run_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(run_dir / "model" / "base")


def _input(run_dir) -> torch.Tensor:
    return torch.tensor([_tokenizer(run_dir)(TEXT)["input_ids"]])


def _peft(run_dir, ids):
    from peft import PeftModel

    model = PeftModel.from_pretrained(_base(run_dir), run_dir / "adapters" / ids[0], adapter_name=ids[0])
    for nb in ids[1:]:
        model.load_adapter(run_dir / "adapters" / nb, adapter_name=nb)
    return model.eval()


@torch.no_grad()
def _logits(model, x, adapter=None) -> torch.Tensor:
    if adapter is not None:
        model.set_adapter(adapter)
    return model(input_ids=x).logits


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_merge_of_one_adapter_at_weight_one_reproduces_it(adapters_run, method):
    run_dir, ids = adapters_run
    model, x = _peft(run_dir, ids[:1]), _input(run_dir)
    ref = _logits(model, x, ids[0])
    with model.disable_adapter():
        base = _logits(model, x)
    add_merged_adapter(model, [ids[0]], [1.0], "merged", method)
    got = _logits(model, x, "merged")
    assert (got - ref).abs().max().item() < 1e-4
    assert (ref - base).abs().max().item() > 1e-2  # the adapter does change the model


def test_linear_merge_of_two_is_the_base_plus_the_weighted_sum_of_their_deltas(adapters_run):
    run_dir, ids = adapters_run
    weights = [0.7, 0.3]
    model, x = _peft(run_dir, ids), _input(run_dir)
    add_merged_adapter(model, ids, weights, "merged", "linear")
    got = _logits(model, x, "merged")
    # Oracle, no peft: W + Σ w_i B_i A_i s_i written into a plain copy of the base.
    plain = _base(run_dir)
    factors = [read_lora(run_dir / "adapters" / nb) for nb in ids]
    with torch.no_grad():
        for module in factors[0].modules:
            plain.get_submodule(module).weight += sum(w * f.delta(module) for w, f in zip(weights, factors))
    want = _logits(plain, x)
    assert (got - want).abs().max().item() < 1e-4
    # The merged adapter is stock peft: rank = sum of ranks, scale 1, and its delta is the sum.
    assert model.peft_config["merged"].r == 2 * factors[0].rank
    # peft's own "linear" mixes the A and the B factors separately (cross terms B_i A_j): not the sum.
    model.add_weighted_adapter(ids, weights, "peft-linear", combination_type="linear")
    assert (_logits(model, x, "peft-linear") - want).abs().max().item() > 1e-3


def test_compat_is_the_per_layer_cosine_of_the_deltas(adapters_run):
    run_dir, ids = adapters_run
    a, b = (read_lora(run_dir / "adapters" / nb, nb) for nb in ids)
    c = compatibility(a, b)
    layers = a.layers()
    assert sorted(k for k in c if k != "mean") == sorted(layers) == ["0", "1"]  # the tiny model's 2 layers
    for layer, modules in layers.items():
        va = torch.cat([a.delta(m).flatten() for m in modules])
        vb = torch.cat([b.delta(m).flatten() for m in modules])
        assert c[layer] == pytest.approx(torch.nn.functional.cosine_similarity(va, vb, dim=0).item(), abs=1e-5)
    assert c["mean"] == pytest.approx(np.mean([c[k] for k in layers]))
    assert compatibility(a, a)["mean"] == pytest.approx(1.0, abs=1e-6)
    matrix, pairs = compat_matrix([a, b])
    assert matrix.shape == (2, 2) and np.allclose(np.diag(matrix), 1) and matrix[0, 1] == matrix[1, 0] == c["mean"]
    assert list(pairs) == [(ids[0], ids[1])]


def test_merge_groups_are_complete_linkage():
    names = ["a", "b", "c", "d"]
    m = np.array([[1, .9, .6, .1], [.9, 1, .8, .1], [.6, .8, 1, .1], [.1, .1, .1, 1]])
    # a~b and b~c, but a and c disagree: only the best pair merges, c and d stay apart.
    assert merge_groups(names, m, 0.7) == [["a", "b"]]
    assert merge_groups(names, m, 0.5) == [["a", "b", "c"]]
    assert merge_groups(names, m, 0.95) == []
    assert merge_groups(names, m, -1.0) == [names]


def _targets(run_dir, ids) -> tuple[list[Target], RunData]:
    """Routing targets as `nucleus adapters` makes them: mean embedding of the training passages."""
    ws = Workspace(run_dir)
    data = RunData.load(ws)
    vectors = np.load(run_dir / "index" / "embeddings.npy")
    out = []
    for nb in [*ids, "nucleus"]:
        topics = json.loads((run_dir / "neighborhoods" / f"{nb}.json").read_text())["topics"]
        path = run_dir / "adapters" / nb if nb != "nucleus" else None
        out.append(Target(nb, path, vectors[data.train_rows(topics)].mean(0)))
    return out, data


def test_route_sends_held_out_passages_and_topic_keywords_to_their_own_neighbourhood(adapters_run, embedder):
    run_dir, ids = adapters_run
    targets, data = _targets(run_dir, ids)
    router = Router([t.id for t in targets], np.stack([t.centroid for t in targets]))
    topic_of = {nb: json.loads((run_dir / "neighborhoods" / f"{nb}.json").read_text())["topics"][0] for nb in ids}
    rows = [r for r in data.heldout_rows() if data.topic_of[r] in topic_of.values()]
    want = [next(nb for nb, t in topic_of.items() if t == data.topic_of[r]) for r in rows]
    routes = router.route(embedder.encode(passage_texts(data.corpus, rows)))
    got = [r[0][0] for r in routes]
    assert len(rows) >= 4 and np.mean([g == w for g, w in zip(got, want)]) >= 0.75, list(zip(got, want))
    # What a human would pick: a topic's own keywords go to that topic's adapter.
    topics = {t["id"]: t["keywords"] for t in json.loads((run_dir / "topics" / "topics.json").read_text())["topics"]}
    queries = [" ".join(topics[topic_of[nb]]) for nb in ids]
    assert [r[0][0] for r in router.route(embedder.encode(queries))] == ids
    # Soft top-k: k targets, nearest first, weights softmax(-d / T) summing to 1.
    soft = router.route(embedder.encode(queries), top_k=2, temperature=0.05)
    d = router.distances(embedder.encode(queries))
    for row, dist in zip(soft, d):
        w = np.exp(-np.sort(dist)[:2] / 0.05)
        assert [x for _, x in row] == pytest.approx(list(w / w.sum()), abs=1e-5)


def test_scores_match_training_mixture_and_lru(adapters_run):
    run_dir, ids = adapters_run
    targets, data = _targets(run_dir, ids)
    aset = AdapterSet(_base(run_dir), _tokenizer(run_dir), targets, embed=None, lru_size=1, block_size=64)
    # The own adapter's held-out loss is the one training reported for the neighbourhood.
    info = json.loads((run_dir / "adapters" / ids[0] / "neighborhood.json").read_text())
    rows = [r for r in data.heldout_rows() if data.topic_of[r] in info["topics"]]
    seqs = aset.sequences(passage_texts(data.corpus, rows))
    own = aset.token_logprobs(ids[0], seqs)
    assert -sum(x.sum() for x in own) / sum(x.size for x in own) == pytest.approx(
        info["metrics"][f"nb/{ids[0]}/loss"], abs=1e-4)
    # A top-2 mixture is log Σ w_k p_k(token), each adapter run once on its texts.
    other = aset.token_logprobs(ids[1], seqs)
    scored = aset.score_routed(seqs, [[(ids[0], 0.75), (ids[1], 0.25)]] * len(seqs))
    for s, a, b in zip(scored, own, other):
        assert s.nll == pytest.approx(-np.logaddexp(np.log(0.75) + a, np.log(0.25) + b).sum(), rel=1e-6)
        assert s.tokens == a.size
    # The base (the nucleus's target on a scratch run) runs with no adapter.
    base = aset.token_logprobs("nucleus", seqs)
    assert sum(x.sum() for x in base) < sum(x.sum() for x in own)  # the adapter beats the base on its own topic
    # LRU of one: every switch reloads, one adapter resident, same numbers as before.
    loads = aset.loads
    again = aset.token_logprobs(ids[0], seqs)
    assert aset.loads == loads + 1 and list(aset.resident) == [ids[0]]
    assert all(np.allclose(x, y) for x, y in zip(again, own))


def test_generate_is_what_plain_peft_generates_with_the_routed_adapter(adapters_run):
    run_dir, ids = adapters_run
    targets, _ = _targets(run_dir, ids)
    aset = AdapterSet(_base(run_dir), _tokenizer(run_dir), targets, embed=None)
    prompt = "The album was released"
    text, target = aset.generate(prompt, max_new_tokens=12, target_id=ids[1])
    tok = _tokenizer(run_dir)
    model = _peft(run_dir, [ids[1]])
    x = torch.tensor([[tok.eos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    assert target == ids[1] and text == tok.decode(out[0, x.shape[1]:], skip_special_tokens=True) and text


def test_bad_adapters_are_clear_errors(adapters_run, tmp_path):
    from peft import LoraConfig, get_peft_model

    from pipeline.model import build_scratch_model

    run_dir, ids = adapters_run
    good = read_lora(run_dir / "adapters" / ids[0])
    # A corrupted weights file.
    broken = tmp_path / "broken"
    shutil.copytree(run_dir / "adapters" / ids[0], broken)
    data = (broken / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="adapter_model.safetensors is not a readable safetensors file"):
        read_lora(broken)
    # Another base: the `small` preset's layers are wider than the run's `tiny` base.
    other = build_scratch_model(_tokenizer(run_dir), "small")
    with pytest.raises(UserError, match=r"trained on another base: module 'model.layers.0.mlp.down_proj' is \(384, 1024\) in this "
                                         r"run's base but \(64, 192\) in the adapter"):
        check_fits_base(good, other, run_dir / "adapters" / ids[0])
    check_fits_base(good, _base(run_dir), run_dir / "adapters" / ids[0])  # its own base fits
    # Other ranks, other target modules (stock peft adapters on the run's base).
    for name, kwargs in {"rank4": {"r": 4, "target_modules": "all-linear"},
                         "qv": {"r": good.rank, "target_modules": ["q_proj", "v_proj"]}}.items():
        get_peft_model(_base(run_dir), LoraConfig(init_lora_weights=False, **kwargs)).save_pretrained(tmp_path / name)
    with pytest.raises(UserError, match=r"different LoRA ranks"):
        check_same_shape([good, read_lora(tmp_path / "rank4", "rank4")], "merge")
    with pytest.raises(UserError, match=r"target different modules .*only in '.*': \[\]"):
        check_same_shape([good, read_lora(tmp_path / "qv", "qv")], "merge")
