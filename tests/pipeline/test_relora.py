"""ReLoRA: a merge leaves the model's outputs as they were, the schedule re-warms after each
merge, the merged model is a plain Hugging Face model, and a training killed mid-cycle resumes
to exactly where an uninterrupted one ends."""

import numpy as np
import pytest
import torch

from curriculum.samplers import UniformSampler
from pipeline import relora
from pipeline.lm_data import Blocks
from pipeline.trainer import FitSettings, fit, lr_lambda


def _tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=16))


BLOCKS = Blocks(torch.randint(0, 16, (32, 8), generator=torch.Generator().manual_seed(2)),
                torch.ones(32, 8, dtype=torch.bool), np.zeros(32, dtype=np.int64))


def _settings(**kw):
    return FitSettings(**{"steps": 30, "lr": 1e-2, "batch_size": 8, "checkpoint_every": 10, "log_every": 5,
                          "relora_every": 8, "relora_warmup": 3, **kw})


def _fit(model, settings, **kw):
    return fit(model, BLOCKS, lambda: iter(UniformSampler(BLOCKS.topics, 8, seed=0)), settings,
               torch.device("cpu"), **kw)


def test_a_merge_leaves_the_outputs_unchanged_and_starts_a_fresh_adapter():
    model = relora.wrap(_tiny_lm(), rank=4, seed=0)
    _fit(model, _settings(relora_every=None, steps=5))  # the adapter has moved (B != 0)
    layers = relora.lora_layers(model)
    assert layers and any(float(m.lora_B["default"].weight.abs().sum()) > 0 for m in layers)
    ids = BLOCKS.tokens[:4]
    before = model(input_ids=ids).logits
    base_before = layers[0].base_layer.weight.clone()
    relora.merge_and_reset(model)
    after = model(input_ids=ids).logits
    assert float((after - before).abs().max()) < 1e-4
    assert all(float(m.lora_B["default"].weight.abs().sum()) == 0 for m in layers)  # a fresh adapter
    assert not torch.equal(layers[0].base_layer.weight, base_before)  # its update is in the base now
    plain = relora.unwrap(model)
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert float((plain(input_ids=ids).logits - after).abs().max()) < 1e-4


def test_the_schedule_rewarms_after_each_merge():
    assert [relora.jagged(s, 8, 3) for s in (0, 7, 8, 9, 10, 15, 16)] == [1.0, 1.0, 1 / 3, 2 / 3, 1.0, 1.0, 1 / 3]
    rows = []
    _fit(relora.wrap(_tiny_lm(), rank=4, seed=0), _settings(log_every=1), log=rows.append)
    lrs = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert lrs[9] == pytest.approx(1e-2 * lr_lambda(9, 0, 30, 0.1) * 2 / 3)  # re-warming after the merge at 8
    assert lrs[12] == pytest.approx(1e-2 * lr_lambda(12, 0, 30, 0.1))


def test_pruning_keeps_the_largest_optimizer_moments():
    model = relora.wrap(_tiny_lm(), rank=4, seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    loss = model(input_ids=BLOCKS.tokens[:4], labels=BLOCKS.tokens[:4]).loss
    loss.backward()
    opt.step()
    b = relora.lora_layers(model)[0].lora_B["default"].weight  # A's gradient is 0 while B = 0
    moments = opt.state[b]["exp_avg_sq"].clone()
    relora.prune_optimizer_state(opt, model, 0.9)
    kept = opt.state[b]["exp_avg_sq"] != 0
    assert int(kept.sum()) == round(0.1 * b.numel())
    assert float(moments[kept].min()) >= float(moments[~kept].max())  # the largest ones stay


def test_a_training_killed_mid_cycle_resumes_to_where_an_uninterrupted_one_ends(tmp_path):
    whole = relora.wrap(_tiny_lm(), rank=4, seed=0)
    _fit(whole, _settings())
    # the same training with checkpoints; its checkpoint at step 20 (merges at 8 and 16, the next at 24)
    _fit(relora.wrap(_tiny_lm(), rank=4, seed=0), _settings(), checkpoint_dir=tmp_path)
    resumed = relora.wrap(_tiny_lm(), rank=4, seed=0)
    result = _fit(resumed, _settings(), checkpoint_dir=tmp_path, resume=True)
    assert result.resumed_from == 20
    a, b = dict(whole.named_parameters()), dict(resumed.named_parameters())
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)


def test_a_warm_start_trains_every_weight_then_freezes_the_wrapped_ones_and_drops_their_state(tmp_path):
    assert [relora.jagged(s, 8, 3, start=10) for s in (0, 9, 10, 11, 12, 17, 18, 19)] == \
        [1.0, 1.0, 1 / 3, 2 / 3, 1.0, 1.0, 1 / 3, 2 / 3]  # the cycles start at the warm start's end
    assert [s for s in range(1, 31) if relora.merges_at(s, 8, 10)] == [10, 18, 26]
    model = relora.wrap(_tiny_lm(), rank=4, seed=0, warm_start=True)
    base = relora.lora_layers(model)[0].base_layer.weight
    before = base.detach().clone()
    seen = {}

    def watch(row):  # at step 5, inside the warm start: the wrapped weight itself has moved
        if row["step"] == 5:
            seen["moved"] = not torch.equal(base.detach(), before)

    _fit(model, _settings(relora_warm_start=10, steps=9, log_every=5), log=watch)
    assert seen["moved"] and base.requires_grad  # still warm at step 9
    whole = relora.wrap(_tiny_lm(), rank=4, seed=0, warm_start=True)
    settings = _settings(relora_warm_start=10)
    _fit(whole, settings)
    assert not any(m.base_layer.weight.requires_grad for m in relora.lora_layers(whole))
    # a kill after the warm start resumes to the same end (frozen again, no state for them)
    _fit(relora.wrap(_tiny_lm(), rank=4, seed=0, warm_start=True), settings, checkpoint_dir=tmp_path)
    resumed = relora.wrap(_tiny_lm(), rank=4, seed=0, warm_start=True)
    result = _fit(resumed, settings, checkpoint_dir=tmp_path, resume=True)
    assert result.resumed_from == 20
    saved = torch.load(tmp_path / "latest" / "optim.pt", weights_only=True)["optimizer"]["state"]
    assert len(saved) == sum(p.requires_grad for p in resumed.parameters())  # none for the frozen weights
    a, b = dict(whole.named_parameters()), dict(resumed.named_parameters())
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_nucleus_train_with_relora_saves_a_plain_model(small_run_copy):
    from transformers import AutoModelForCausalLM

    from tests.conftest import TRAIN_SETS, nucleus

    assert nucleus("nucleate", "--run-dir", str(small_run_copy)).returncode == 0
    sets = [x for s in [*TRAIN_SETS, "train.relora_every=10", "train.relora_rank=4"] for x in ("--set", s)]
    r = nucleus("train", "--run-dir", str(small_run_copy), "--json", *sets)
    assert r.returncode == 0, r.stderr
    base = AutoModelForCausalLM.from_pretrained(str(small_run_copy / "model" / "base"), local_files_only=True)
    assert type(base).__name__ == "LlamaForCausalLM" and not any("lora" in n for n, _ in base.named_parameters())
    import json

    out = json.loads(r.stdout)
    assert out["metrics"]["heldout/ppl"] < out["metrics_before"]["heldout/ppl"]  # it learned


def test_relora_trains_a_pretrained_base_in_full_and_saves_a_plain_model(small_run_copy, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from pipeline import nucleate, train
    from pipeline.config import resolve_config
    from pipeline.model import train_tokenizer
    from pipeline.workspace import Workspace
    from tests.conftest import TRAIN_SETS

    base = tmp_path / "hf-base"
    tok = train_tokenizer(["a small corpus of words to learn merges from"] * 50, 300)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=128)).save_pretrained(base)
    tok.save_pretrained(base)
    ws = Workspace(small_run_copy)
    cfg = resolve_config(ws.stored_config(), None, [*TRAIN_SETS, f"model.base={base}", "train.nucleus_steps=12",
                                                    "train.relora_every=5", "train.relora_rank=2"])
    nucleate.run(cfg, ws)
    result = train.run(cfg, ws)
    assert result.kind == "full" and not (small_run_copy / "adapters" / "nucleus").exists()
    trained = AutoModelForCausalLM.from_pretrained(small_run_copy / "model" / "base", local_files_only=True)
    original = AutoModelForCausalLM.from_pretrained(base, local_files_only=True)
    assert type(trained).__name__ == "LlamaForCausalLM" and not any("lora" in n for n, _ in trained.named_parameters())
    w, w0 = dict(trained.named_parameters()), dict(original.named_parameters())
    # the merges moved the linear layers' own weights (full rank through low-rank cycles)
    assert not torch.equal(w["model.layers.0.mlp.up_proj.weight"], w0["model.layers.0.mlp.up_proj.weight"])
