"""`nucleus adapters` as a user meets it: every action on a real tiny run, merges that load
with plain peft, the ledger, and bad adapters answered with exit 2 and a clear message."""

import json
import sqlite3

import pytest
import torch
from typer.testing import CliRunner

from pipeline import report, train
from pipeline.cli import app
from pipeline.config import resolve_config
from pipeline.workspace import Workspace, now
from tests.conftest import nucleus


def _cli(*args: str):
    """The real typer app in this process (the embedder loads once for all calls)."""
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, (args, result.output)
    return json.loads(result.stdout) if "--json" in args else result.stdout


def _bad(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    for needle in needles:
        assert needle in r.stderr, (needle, r.stderr)


def test_every_action_on_a_real_run(adapters_run_copy):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from curriculum.tethers import read_lora

    run_dir, ids = adapters_run_copy
    rd = ["--run-dir", str(run_dir)]
    listed = _cli("adapters", "list", *rd, "--json")
    assert [e["id"] for e in listed] == sorted(ids) and all(e["rank"] == 8 and e["passages"] == 0 for e in listed)
    assert all(e["ppl_after"] < e["ppl_before"] for e in listed)

    topics = {t["id"]: t["keywords"] for t in json.loads((run_dir / "topics" / "topics.json").read_text())["topics"]}
    own = {nb: json.loads((run_dir / "adapters" / nb / "neighborhood.json").read_text())["topics"][0] for nb in ids}
    queries = [" ".join(topics[own[nb]]) for nb in ids]
    routed = _cli("adapters", "route", *rd, *queries, "--set", "adapters.top_k=2", "--json")
    assert [r["routes"][0]["adapter"] for r in routed] == ids
    assert all(len(r["routes"]) == 2 and sum(x["weight"] for x in r["routes"]) == pytest.approx(1, abs=1e-5)
               for r in routed)

    scored = _cli("adapters", "score", *rd, *queries, "--json")
    assert [t["routes"][0]["adapter"] for t in scored["texts"]] == ids and scored["tokens"] > 0
    generated = _cli("adapters", "generate", "The album", *rd, "--json", "--set", "adapters.max_new_tokens=8")
    assert generated["adapter"] in [*ids, "nucleus"] and generated["text"]

    compat = _cli("adapters", "compat", *rd, "--json")
    assert compat["adapters"] == sorted(ids) and compat["matrix"][0][0] == pytest.approx(1.0)
    assert set(compat["pairs"][0]["layers"]) == {"0", "1"}

    ev = _cli("adapters", "eval", *rd, "--json")
    for key in ("routing_accuracy", "diagonal_fraction", "ppl/base", "ppl/routed", "ppl/merged", "ppl/merged_all"):
        assert key in ev
    assert 0 <= ev["routing_accuracy"] <= 1 and ev["diagonal_fraction"] in (0.0, 0.5, 1.0)
    spec = ev["specialisation"]
    assert spec["adapters"] == ["base", *sorted(ids)] and spec["neighborhoods"][:2] == sorted(ids)
    assert ev["ppl/routed"] < ev["ppl/base"] and ev["merges"] == 0 and ev["ppl/merged"] == ev["ppl/routed"]
    assert (run_dir / "reports" / "adapters_eval.json").is_file()

    # Merge everything (threshold -1): one stock peft adapter, recorded in the ledger; again = no-op.
    merged = _cli("adapters", "merge", *rd, "--set", "adapters.merge_threshold=-1", "--json")
    (m,) = merged["merges"]
    assert m["members"] == sorted(ids) and m["weights"] == [0.5, 0.5] and not m["skipped"] and merged["apart"] == []
    rows = sqlite3.connect(run_dir / "ledger.sqlite").execute("SELECT merge_id, members, method FROM merges").fetchall()
    assert rows == [(m["id"], json.dumps(sorted(ids)), "linear")]
    assert _cli("adapters", "merge", *rd, "--set", "adapters.merge_threshold=-1", "--json")["merges"][0]["skipped"]
    # Loaded with no Nucleus code, the merge is the base plus the average of the deltas.
    base_dir = run_dir / "model" / "base"
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), run_dir / "adapters" / m["id"])
    plain = AutoModelForCausalLM.from_pretrained(base_dir)
    factors = [read_lora(run_dir / "adapters" / nb) for nb in sorted(ids)]
    with torch.no_grad():
        for module in factors[0].modules:
            plain.get_submodule(module).weight += sum(0.5 * f.delta(module) for f in factors)
        x = torch.tensor([AutoTokenizer.from_pretrained(base_dir)(queries[0])["input_ids"]])
        assert (peft_model(input_ids=x).logits - plain(input_ids=x).logits).abs().max().item() < 1e-4
    ev = _cli("adapters", "eval", *rd, "--json")
    assert ev["merges"] == 1 and ev["ppl/merged"] == pytest.approx(ev["ppl/merged_all"], rel=1e-6)
    assert m["id"] in [e["id"] for e in _cli("adapters", "list", *rd, "--json")]
    # The report still builds with a merge among the adapters, and marks it on the adapters' curves.
    ws = Workspace(run_dir)
    assert "adapters.png" in report.run(resolve_config(ws.stored_config(), None, None), ws).plots


def _alien_adapter(run_dir, tmp_path, nb: str) -> None:
    """A real adapter trained (a few steps) on another base of the same shape: another run's
    scratch model, saved where that run keeps it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from pipeline.model import build_scratch_model, save_base

    tok = AutoTokenizer.from_pretrained(run_dir / "model" / "base")
    other = tmp_path / "other-run" / "model" / "base"
    save_base(build_scratch_model(tok, "tiny", seed=1), tok, other)
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(other), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.tensor([tok("The storm made landfall near the coast .")["input_ids"]])
    for _ in range(3):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    out = run_dir / "adapters" / "alien"
    model.save_pretrained(out)
    info = json.loads((run_dir / "adapters" / nb / "neighborhood.json").read_text())
    (out / "neighborhood.json").write_text(json.dumps({**info, "finished": now()}))


@pytest.mark.slow  # ~25 s: six CLI processes and two tiny trainings
def test_bad_adapters_exit_2_with_a_clear_message(adapters_run_copy, trained_run, tmp_path):
    run_dir, ids = adapters_run_copy
    rd = ["--run-dir", str(run_dir)]
    _bad(nucleus("adapters", "eval", "--run-dir", str(trained_run)), "holds no neighbourhood adapter yet")
    _bad(nucleus("adapters", "merge", *rd, "--set", "adapters.merge_method=tie"),
         "adapters.merge_method", "Did you mean 'ties'?")

    # An adapter trained on another base (same shapes: only its recorded base tells).
    _alien_adapter(run_dir, tmp_path, ids[0])
    _bad(nucleus("adapters", "list", *rd), "adapters/alien' was trained on another base", "other-run/model/base")
    import shutil

    shutil.rmtree(run_dir / "adapters" / "alien")

    # A corrupted weights file.
    weights = run_dir / "adapters" / ids[0] / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 3])
    _bad(nucleus("adapters", "score", *rd, "a storm"),
         f"adapters/{ids[0]}': adapter_model.safetensors is not a readable safetensors file")
    weights.write_bytes(good)

    # Merging adapters of different ranks, then of different target modules.
    ws = Workspace(run_dir)
    taken = {json.loads((run_dir / "adapters" / nb / "neighborhood.json").read_text())["topics"][0] for nb in ids}
    nucleus_topics = json.loads((run_dir / "neighborhoods" / "nucleus.json").read_text())["topics"]
    spare = [t for t in range(6) if t not in taken and t not in nucleus_topics]
    merge_all = ["adapters", "merge", *rd, "--set", "adapters.merge_threshold=-1"]
    train.run(resolve_config(ws.stored_config(), None, ["lora.rank=4", "lora.steps=5"]), ws, f"topic-{spare[0]}")
    _bad(nucleus(*merge_all), "different LoRA ranks", "(rank 4)", "(rank 8)")
    shutil.rmtree(run_dir / "adapters" / f"topic-{spare[0]}")
    train.run(resolve_config(ws.stored_config(), None, ["lora.target_modules=[q_proj,v_proj]", "lora.steps=5"]),
              ws, f"topic-{spare[1]}")
    _bad(nucleus(*merge_all), "target different modules", "lora.target_modules")
    assert not list((run_dir / "adapters").glob("merge-*"))  # nothing half-merged was left behind
