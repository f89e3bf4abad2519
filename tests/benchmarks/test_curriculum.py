"""The curriculum benchmark's script stays working: its arithmetic, its fairness check, and a
tiny end-to-end run (slow tier) of every arm through the real prepare and run commands."""

import json
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import curriculum as bench
from benchmarks import curriculum_report as report
from tests.conftest import REPO, SMALL_SETS


def _curve(points):
    return [{"step": i * 10, "tokens": t, "ppl": p, "macro_ppl": p, "worst_ppl": p, "lr": 0.001 * i}
            for i, (t, p) in enumerate(points)]


def test_tokens_to_target_interpolates_between_evaluation_points():
    curve = _curve([(0, 100.0), (1000, 50.0), (2000, 30.0)])
    assert report.tokens_to_target(curve, "ppl", 50.0) == 1000
    assert report.tokens_to_target(curve, "ppl", 40.0) == pytest.approx(1500)
    assert report.tokens_to_target(curve, "ppl", 29.0) is None


def test_ratio_is_uniform_tokens_over_arm_tokens_to_uniforms_final_perplexity():
    rows = [{"seed": 0, "arm": "uniform", "curve": _curve([(0, 100.0), (1000, 60.0), (2000, 40.0)])},
            {"seed": 0, "arm": "fast", "curve": _curve([(0, 100.0), (1000, 40.0), (2000, 35.0)])},
            {"seed": 0, "arm": "slow", "curve": _curve([(0, 100.0), (1000, 70.0), (2000, 45.0)])}]
    r = report.ratios(rows, "ppl")
    assert r[(0, "uniform")] == (1.0, True) and r[(0, "fast")] == (2.0, True)
    # `slow` never gets to 40: compared at its own final 45, which uniform reaches at 1750 tokens
    assert r[(0, "slow")] == (pytest.approx(1750 / 2000), False)
    for row in rows:
        row.update(train_s=1.0, overhead_s=0.0, prep_s=0.0)
    summary = report.summarise(rows)
    assert report.headline(summary, "fast") == "tokens-to-target ratio (fast vs uniform): 2.00"
    assert report.headline(summary, "slow").startswith("tokens-to-target ratio (slow vs uniform): 0.88 (it never")
    assert "0.88 ± 0.00 (at own final in 1/1)" in report.table(summary)


def test_unfair_arms_are_refused_loudly():
    def row(arm, **change):
        r = {"seed": 0, "arm": arm, "settings": {"steps": 2}, "steps": 2, "tokens": 2000,
             "curve": _curve([(0, 9.0), (1000, 8.0), (2000, 7.0)])}
        r.update(change)
        return r

    bench.check_fair([row("uniform"), row("odm")])
    with pytest.raises(SystemExit, match="'odm' differs from 'uniform' in tokens"):
        bench.check_fair([row("uniform"), row("odm", tokens=2100)])
    other_lr = _curve([(0, 9.0), (1000, 8.0), (2000, 7.0)])
    other_lr[1]["lr"] = 0.5
    with pytest.raises(SystemExit, match="learning rates"):
        bench.check_fair([row("uniform"), row("nucleus", curve=other_lr)])


def test_relora_arms_pass_the_fairness_check_through_their_re_warmed_schedule():
    from pipeline import relora

    def row(arm, growth, lrs):
        curve = [{"step": st, "tokens": st * 10, "ppl": 9.0, "macro_ppl": 9.0, "worst_ppl": 9.0, "lr": lr}
                 for st, lr in zip((0, 10, 20, 30), lrs)]
        return {"seed": 0, "arm": arm, "settings": {}, "steps": 30, "tokens": 300, "curve": curve, "growth": growth,
                "params": {"every": 20} if growth == "relora" else {}}

    base = [0.0, 1e-3, 8e-4, 5e-4]
    jagged = [lr * relora.jagged(st, 20, bench.RELORA_WARMUP) for st, lr in zip((0, 10, 20, 30), base)]
    assert jagged[2] < base[2]  # step 20 re-warms
    bench.check_fair([row("uniform", "full", base), row("uniform:growth=relora", "relora", jagged)])
    with pytest.raises(SystemExit, match="learning rates"):  # a full-rank arm with that schedule is unfair
        bench.check_fair([row("uniform", "full", base), row("odm", "full", jagged)])
    with pytest.raises(SystemExit, match="growth must be one of"):
        bench.parse_arm("uniform:growth=dora")
    # an arm's own lr= factor scales its whole schedule: fair when named, unfair when hidden
    scaled = row("uniform:growth=relora,lr=2", "relora", [2 * lr for lr in jagged])
    scaled["params"]["lr"] = 2.0
    bench.check_fair([row("uniform", "full", base), scaled])
    with pytest.raises(SystemExit, match="learning rates"):
        hidden = row("uniform:growth=relora", "relora", [2 * lr for lr in jagged])
        bench.check_fair([row("uniform", "full", base), hidden])
    assert bench.parse_arm("uniform:growth=relora,lr=4") == ("uniform", {"growth": "relora", "lr": 4})


def test_arm_specs_are_checked():
    assert bench.parse_arm("nucleus:replay=0.5,policy=nearest") == ("nucleus", {"replay": 0.5, "policy": "nearest"})
    with pytest.raises(SystemExit, match="unknown arm 'unifrom'"):
        bench.parse_arm("unifrom")
    with pytest.raises(SystemExit, match="unknown parameters"):
        bench.parse_arm("odm:replay=0.5")


def test_manifold_arm_parameters_reach_the_sampler_settings():
    """`manifold:` arm parameters become the product's ManifoldSettings (rebuild -> rebuild_every,
    layers=each -> every hidden layer of the model); an unknown one is refused."""
    from transformers import LlamaConfig, LlamaForCausalLM

    name, params = bench.parse_arm("manifold:space=learned,traversal=bandit,rebuild=25,prefix=32")
    ctx = bench.manifold_context(params, None, block_vectors=np.zeros((4, 3), np.float32))
    s = ctx["settings"]
    assert (name, s.space, s.traversal, s.rebuild_every, s.prefix_tokens, s.layers) == \
        ("manifold", "learned", "bandit", 25, 32, (-1,))
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                         num_attention_heads=2))
    assert bench.manifold_context({"layers": "each"}, model)["settings"].layers == (1, 2, 3)
    with pytest.raises(SystemExit, match="needs the blocks' embeddings"):
        bench.manifold_context({"space": "learned"}, model)
    with pytest.raises(SystemExit, match="unknown parameters"):
        bench.parse_arm("manifold:radius=2")


@pytest.mark.slow
def test_tiny_benchmark_runs_every_arm_with_equal_budgets(tmp_path):
    script = str(REPO / "benchmarks" / "curriculum.py")
    sets = [x for s in [*SMALL_SETS, "model.size=tiny", "train.block_size=64", "train.batch_size=8"]
            for x in ("--set", s)]
    bundle = tmp_path / "bundle"
    subprocess.run([sys.executable, script, "prepare", "--run-dir", str(tmp_path / "run"), "--bundle", str(bundle),
                    "--config", str(REPO / "configs" / "default.yaml"), *sets], check=True, cwd=REPO, timeout=600)
    info = json.loads((bundle / "bundle.json").read_text())
    assert info["prep_s"]["index"] > 0 and info["blocks"] > 100 and info["nucleus"]
    arms = [*bench.ARMS, "nucleus:replay=0.5,coverage=1", "uniform:growth=relora,rank=4,every=8",
            "nucleus:growth=lora,rank=4", "nucleus:weighting=manifold,clusters=4,rebuild=10",
            "uniform:growth=relora,rank=4,every=8,warm=10", "uniform:lr=2"]
    out = subprocess.run([sys.executable, script, "run", "--bundle", str(bundle), "--seeds", "0", "--steps", "30",
                          "--eval-every", "10", "--jobs", "2", "--work", str(tmp_path / "work"),
                          "--json-out", str(tmp_path / "out.json"), "--plot", str(tmp_path / "curves.png"),
                          "--arms", *arms], capture_output=True, text=True, cwd=REPO, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tokens-to-target ratio (nucleus vs uniform): " in out.stdout
    result = json.loads((tmp_path / "out.json").read_text())
    rows = {r["arm"]: r for r in result["rows"]}
    assert set(rows) == set(arms) and (tmp_path / "curves.png").stat().st_size > 10_000
    assert {r["tokens"] for r in rows.values()} == {30 * 8 * 64}  # full blocks: the same tokens exactly
    assert all([p["step"] for p in r["curve"]] == [0, 10, 20, 30] for r in rows.values())
    assert result["summary"]["uniform"]["R"][0] == 1.0 and result["summary"]["uniform"]["R_reached"] == "1/1"
    assert all(0 < e["R"][0] for e in result["summary"].values())
    phases = rows["nucleus"]["phases"]
    assert phases[0]["kind"] == "nucleus" and phases[0]["topics"] == info["nucleus"]
    assert rows["nucleus"]["overhead_s"] > 0 and rows["nucleus"]["prep_s"] >= rows["odm"]["prep_s"] > 0
    assert rows["uniform"]["prep_s"] == 0
    assert sum(rows["odm"]["mixture"]) == pytest.approx(1.0)
    # the nucleus curriculum ordered by the manifold: its phases as before, its rebuilds as overhead
    ordered = rows["nucleus:weighting=manifold,clusters=4,rebuild=10"]
    assert ordered["phases"][0]["kind"] == "nucleus" and ordered["phases"][0]["topics"] == info["nucleus"]
    assert ordered["overhead_s"] > 0
    # the ReLoRA and LoRA arms train fewer weights than full rank, and say so
    relora, full = rows["uniform:growth=relora,rank=4,every=8"], rows["uniform"]
    assert relora["growth"] == "relora" and relora["trainable_params"] < full["trainable_params"]
    assert relora["optimizer_state_mb"] < full["optimizer_state_mb"] and relora["tokens_per_s"] > 0
    warm = rows["uniform:growth=relora,rank=4,every=8,warm=10"]  # after its warm start, the adapter's state only
    assert warm["trainable_params"] == relora["trainable_params"] and warm["curve"][-1]["ppl"] != relora["curve"][-1]["ppl"]
    # an arm's lr= factor scales its whole schedule, and the fairness check let it through
    assert [p["lr"] for p in rows["uniform:lr=2"]["curve"]] == pytest.approx([2 * p["lr"] for p in full["curve"]])
    # the report reads the JSON on its own
    alone = subprocess.run([sys.executable, str(REPO / "benchmarks" / "curriculum_report.py"),
                            str(tmp_path / "out.json")], capture_output=True, text=True, timeout=120)
    assert alone.returncode == 0 and "| `community` |" in alone.stdout
