import json
import shutil

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import train
from pipeline.config import resolve_config
from pipeline.errors import UserError
from curriculum.samplers import UniformSampler
from pipeline.trainer import lr_lambda, sparsify_gradients
from pipeline.workspace import Workspace
from tests.conftest import TRAIN_SETS, kill_at_checkpoint, nucleus


def _cfg(ws, *sets):
    return resolve_config(ws.stored_config(), None, list(sets))


def test_scratch_base_loads_with_plain_transformers(trained_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(trained_run / "model" / "base")
    tok = AutoTokenizer.from_pretrained(trained_run / "model" / "base")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 2
    assert (trained_run / "model" / "base" / "model.safetensors").is_file()
    ids = tok("The storm made landfall", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tok))
    record = json.loads((trained_run / "model" / "nucleus.json").read_text())["result"]
    # full training on the nucleus lowered the nucleus's held-out perplexity
    assert record["metrics"]["nucleus/ppl"] < 0.5 * record["metrics_before"]["nucleus/ppl"]
    assert record["steps"] == 40 and record["kind"] == "full"


@pytest.fixture(scope="module")
def adapter_run(trained_run, tmp_path_factory):
    import shutil

    run_dir = tmp_path_factory.mktemp("adapter") / "run"
    shutil.copytree(trained_run, run_dir)
    ws = Workspace(run_dir)
    topic = next(t for t in range(6) if t not in json.loads(
        (run_dir / "neighborhoods" / "nucleus.json").read_text())["topics"])
    result = train.run(_cfg(ws), ws, f"topic-{topic}")
    return run_dir, result


def test_adapter_is_stock_peft_and_reproduces_the_reported_heldout_loss(adapter_run):
    """Loaded with no Nucleus code, the adapter gives the held-out loss Nucleus reported (1e-4)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, result = adapter_run
    nb = result.neighborhood
    adapter = run_dir / "adapters" / nb
    assert {"adapter_config.json", "adapter_model.safetensors", "neighborhood.json"} <= {p.name for p in adapter.iterdir()}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run_dir / "model" / "base"), adapter)
    tok = AutoTokenizer.from_pretrained(run_dir / "model" / "base")
    model.eval()
    info = json.loads((adapter / "neighborhood.json").read_text())
    corpus = datasets.load_from_disk(str(run_dir / "corpus"))
    topics = pq.read_table(run_dir / "topics" / "assignments.parquet").column("topic_id").to_pylist()
    nll, n = 0.0, 0
    with torch.no_grad():
        for row, topic in zip(corpus, topics):
            if row["split"] != "heldout" or topic not in info["topics"]:
                continue
            ids = [tok.eos_token_id] + tok(f"{row['title']}\n{row['text']}")["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor([ids[:64]])
            loss = model(input_ids=ids, labels=ids).loss.item()
            nll, n = nll + loss * (ids.shape[1] - 1), n + ids.shape[1] - 1
    assert abs(nll / n - info["metrics"][f"nb/{nb}/loss"]) < 1e-4


def test_adapter_lowers_its_neighbourhood_perplexity_below_the_base(adapter_run):
    _, result = adapter_run
    key = f"nb/{result.neighborhood}/ppl"
    assert result.metrics[key] < 0.85 * result.metrics_before[key]  # ~25% drop in 40 steps at tiny size
    assert result.kind == "lora" and result.trainable_params < 50_000
    info = json.loads((adapter_run[0] / "adapters" / result.neighborhood / "neighborhood.json").read_text())
    assert info["parent"] == "nucleus" and info["tokens_seen"] == result.tokens > 0 and info["config_hash"]


def test_training_again_is_a_no_op_and_names_the_output_where_it_is_now(adapter_run, tmp_path):
    run_dir, result = adapter_run
    ws = Workspace(run_dir)
    again = train.run(_cfg(ws), ws, result.neighborhood)
    assert again.skipped and again.metrics == result.metrics
    moved = Workspace(shutil.copytree(run_dir, tmp_path / "moved"))  # a run directory moved elsewhere
    for nb in (result.neighborhood, None):  # an adapter, and the nucleus (the base itself)
        there = train.run(_cfg(moved), moved, nb)
        assert there.skipped and there.output.startswith(str(moved.root)), there.output


def test_kill_then_resume_continues_with_the_same_steps(trained_run_copy, trained_run, tmp_path):
    args = ["train", "--run-dir", str(trained_run_copy), "-n", "topic-0", "--set", "lora.steps=60"]
    state = trained_run_copy / "checkpoints" / "topic-0" / "latest" / "state.json"
    killed_at = kill_at_checkpoint(args, state, 20)
    assert not (trained_run_copy / "adapters" / "topic-0").exists()

    r = nucleus(*args, "--resume", "--json")
    assert r.returncode == 0, r.stderr
    resumed = json.loads(r.stdout)
    assert resumed["resumed_from"] == killed_at and resumed["steps"] == 60
    assert not (trained_run_copy / "checkpoints" / "topic-0").exists()

    # the same training without the kill, on a second copy: the session's shared run stays as
    # other tests expect it (an adapter trained in it changes what `explore` sees)
    uninterrupted = tmp_path / "uninterrupted"
    shutil.copytree(trained_run, uninterrupted)
    ws = Workspace(uninterrupted)
    full = train.run(_cfg(ws, "lora.steps=60"), ws, "topic-0").to_json()
    assert resumed["tokens"] == full["tokens"]
    for key in ("nb/topic-0/ppl", "heldout/ppl"):
        assert resumed["metrics"][key] == pytest.approx(full["metrics"][key], rel=0.02)


def test_hf_base_trains_the_nucleus_as_the_first_adapter(small_run_copy, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from pipeline import nucleate
    from pipeline.model import train_tokenizer

    base = tmp_path / "hf-base"
    tok = train_tokenizer(["a small corpus of words to learn merges from"] * 50, 300)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=128)).save_pretrained(base)
    tok.save_pretrained(base)
    ws = Workspace(small_run_copy)
    cfg = _cfg(ws, *TRAIN_SETS, f"model.base={base}", "train.nucleus_steps=5")
    nucleate.run(cfg, ws)
    result = train.run(cfg, ws)
    assert result.kind == "lora" and (small_run_copy / "adapters" / "nucleus" / "adapter_model.safetensors").is_file()
    assert (small_run_copy / "model" / "base" / "config.json").is_file()
    assert isinstance(tok, PreTrainedTokenizerFast)


def test_bad_training_input_is_a_clear_error(trained_run_copy, small_run_copy, tmp_path):
    ws = Workspace(trained_run_copy)
    with pytest.raises(UserError, match="unknown neighbourhood 'nucleos'. Did you mean 'nucleus'"):
        train.run(_cfg(ws), ws, "nucleos")
    with pytest.raises(UserError, match="not a safe name"):
        train.run(_cfg(ws), ws, "../etc")
    with pytest.raises(UserError, match="train.block_size: 4096 is above the model's context length \\(512\\)"):
        train.run(_cfg(ws, "train.block_size=4096"), ws, "topic-1")
    r = nucleus("train", "--run-dir", str(small_run_copy))
    assert r.returncode == 2 and "no finished `nucleate` stage" in r.stderr and "Traceback" not in r.stderr

    from transformers import ViTConfig, ViTModel

    not_lm = tmp_path / "vit"
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=37)).save_pretrained(not_lm)
    ws2 = Workspace(small_run_copy)
    from pipeline import nucleate

    nucleate.run(_cfg(ws2), ws2)
    with pytest.raises(UserError, match="is a ViT model, not a causal language model"):
        train.run(_cfg(ws2, f"model.base={not_lm}"), ws2)
    with pytest.raises(UserError, match="cannot load .* offline"):
        train.run(_cfg(ws2, f"model.base={tmp_path / 'nothing-here'}"), ws2)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    values = [lr_lambda(s, 10, 100, 0.1) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert lr_lambda(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_topk_sparsification_keeps_the_largest_fraction():
    p = torch.nn.Parameter(torch.zeros(10, 10))
    magnitudes = torch.randperm(100, generator=torch.Generator().manual_seed(0)).float() + 1
    signs = torch.where(torch.arange(100) % 2 == 0, 1.0, -1.0)
    p.grad = (magnitudes * signs).reshape(10, 10)
    sparsify_gradients([p], 0.1)
    kept = p.grad.flatten()[p.grad.flatten() != 0]
    assert sorted(kept.abs().tolist()) == [float(v) for v in range(91, 101)]


def test_a_neighbourhood_before_the_nucleus_trains_the_nucleus_first(small_run_copy):
    from pipeline import nucleate

    ws = Workspace(small_run_copy)
    cfg = _cfg(ws, *TRAIN_SETS, "train.nucleus_steps=4", "lora.steps=4")
    nucleate.run(cfg, ws)
    result = train.run(cfg, ws, "topic-1")
    assert ws.is_complete("train") and (small_run_copy / "model" / "base" / "model.safetensors").is_file()
    assert result.neighborhood == "topic-1" and (small_run_copy / "adapters" / "topic-1").is_dir()


def test_replay_mixes_nucleus_blocks_into_every_adapter_batch():
    """fit() with replay: each batch holds round(fraction * batch) replay blocks (real tiny model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.lm_data import Blocks
    from pipeline.trainer import FitSettings, fit
    from curriculum.samplers import UniformSampler

    def blocks(token, n):
        return Blocks(torch.full((n, 8), token), torch.ones(n, 8, dtype=torch.bool), np.zeros(n, dtype=np.int64))

    seen = []
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=16))
    forward = model.forward
    model.forward = lambda **kw: seen.append(kw["input_ids"][:, 0].tolist()) or forward(**kw)
    settings = FitSettings(steps=3, lr=1e-3, batch_size=8, replay_fraction=0.25, log_every=1)
    result = fit(model, blocks(5, 20), lambda: iter(UniformSampler(np.zeros(20, dtype=np.int64), 8)),
                 settings, torch.device("cpu"), replay=blocks(7, 10),
                 make_replay_sampler=lambda: iter(UniformSampler(np.zeros(10, dtype=np.int64), 8, seed=1)))
    assert [sorted(batch) for batch in seen] == [[5] * 6 + [7] * 2] * 3
    assert result.tokens == 3 * 8 * 8


def test_community_sampler_and_replay_train_an_adapter(trained_run_copy):
    ws = Workspace(trained_run_copy)
    cfg = _cfg(ws, "train.sampler=community", "train.community_k=1", "lora.replay_fraction=0.25", "lora.steps=10")
    result = train.run(cfg, ws, "topic-2")
    assert result.steps == 10 and result.metrics["nb/topic-2/ppl"] < result.metrics_before["nb/topic-2/ppl"]
    rows = [json.loads(line) for line in (trained_run_copy / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["nb"] == "topic-2" and "train/loss" in r for r in rows)


def test_tensorboard_logs_or_says_what_is_missing(trained_run_copy):
    import importlib.util

    ws = Workspace(trained_run_copy)
    cfg = _cfg(ws, "train.tensorboard=true", "lora.steps=2")
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(UserError, match="needs the tensorboard package"):
            train.run(cfg, ws, "topic-2")
    else:
        train.run(cfg, ws, "topic-2")
        assert list((trained_run_copy / "logs" / "tb" / "topic-2").glob("events.out.tfevents.*"))


def _tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=16))


def test_fit_feeds_per_block_losses_to_odm_and_a_resumed_fit_restores_its_state(tmp_path):
    """An easy topic (one repeated token) and a hard one (random tokens): the training loop hands
    the odm sampler each block's loss, so the hard topic's share grows; a run resumed from its
    checkpoint restores the sampler's rewards and ends exactly where the uninterrupted run ends."""
    from curriculum.samplers import OdmSampler
    from pipeline.lm_data import Blocks
    from pipeline.trainer import FitSettings, fit, row_losses

    g = torch.Generator().manual_seed(1)
    tokens = torch.cat([torch.full((20, 8), 3), torch.randint(0, 16, (20, 8), generator=g)])
    topics = np.repeat([0, 1], 20)
    blocks = Blocks(tokens, torch.ones(40, 8, dtype=torch.bool), topics)

    model = _tiny_lm()  # row_losses agrees with the model's own loss, one row at a time
    labels = tokens[:3]
    out = model(input_ids=labels, labels=labels)
    rows = row_losses(out.logits, labels)
    for i in range(3):
        assert abs(rows[i] - float(model(input_ids=labels[i:i + 1], labels=labels[i:i + 1]).loss.detach())) < 1e-5

    def run(steps_dir, resume, stop_at=None):
        sampler = OdmSampler(topics, 8, seed=2)
        settings = FitSettings(steps=stop_at or 30, lr=1e-2, batch_size=8, checkpoint_every=10, log_every=10)
        fit(_tiny_lm(), blocks, lambda: iter(sampler), settings, torch.device("cpu"),
            checkpoint_dir=steps_dir, resume=resume)
        return sampler

    whole = run(tmp_path / "a", resume=False)
    assert whole.mixture()[1] > whole.mixture()[0]  # the hard topic is drawn more often
    run(tmp_path / "b", resume=False, stop_at=30)  # writes checkpoints at steps 10 and 20
    state = json.loads((tmp_path / "b" / "latest" / "state.json").read_text())
    assert state["step"] == 20 and state["sampler"]["batches_drawn"] == 20
    resumed = run(tmp_path / "b", resume=True)
    assert resumed.batches_drawn == 30
    np.testing.assert_allclose(resumed.rewards, whole.rewards, rtol=1e-5)


@pytest.mark.slow
def test_compiled_and_eager_training_give_the_same_losses():
    """`torch.compile` (train.compile) changes how the step runs, not what it computes: the same
    seed gives the same loss curve within 1e-3, padded blocks (an attention mask) and full
    blocks (none: SDPA's causal path) alike."""
    from pipeline.lm_data import Blocks
    from pipeline.trainer import FitSettings, fit

    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 16, (32, 8), generator=g)
    for mask in (torch.ones(32, 8, dtype=torch.bool), torch.arange(8).expand(32, 8) < 6):
        blocks = Blocks(tokens, mask, np.zeros(32, dtype=np.int64))
        curves = []
        for compiled in (False, True):
            graphs = dict(torch._dynamo.utils.counters["stats"]).get("unique_graphs", 0)
            rows = []
            settings = FitSettings(steps=6, lr=1e-2, batch_size=8, log_every=1, checkpoint_every=100,
                                   compile=compiled)
            fit(_tiny_lm(), blocks, lambda: iter(UniformSampler(blocks.topics, 8, seed=0)), settings,
                torch.device("cpu"), log=rows.append)
            curves.append([r["train/loss"] for r in rows])
            compiled_now = dict(torch._dynamo.utils.counters["stats"]).get("unique_graphs", 0) > graphs
            assert compiled_now == compiled  # dynamo captured the training forward only when asked
        np.testing.assert_allclose(curves[1], curves[0], atol=1e-3)
        assert curves[0][-1] < curves[0][0]  # it trained


def test_the_attention_kernel_choice_is_checked_and_leaves_cpu_training_alone():
    """`train.attention` picks SDPA's kernel on a GPU (measured in benchmarks/train_throughput.py):
    on a CUDA device `flash` and `cudnn` put their kernel first in SDPA's priority order for the
    duration (the order is a process-wide setting, readable without a GPU), `auto` leaves it;
    on a CPU every choice is the same training, and a name it does not know fails before any step."""
    from contextlib import nullcontext

    from pipeline.lm_data import Blocks
    from pipeline.trainer import FitSettings, attention_context, fit

    from torch.nn.attention import SDPBackend

    assert all(isinstance(attention_context(k, torch.device("cpu")), nullcontext) for k in ("auto", "flash", "cudnn"))
    assert isinstance(attention_context("auto", torch.device("cuda")), nullcontext)
    before = torch._C._get_sdp_priority_order()
    for kind, first in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        with attention_context(kind, torch.device("cuda")):
            order = torch._C._get_sdp_priority_order()
            assert order[0] == int(first) and sorted(order) == sorted(before)  # first, the others kept behind
        assert torch._C._get_sdp_priority_order() == before
    with pytest.raises(ValueError, match="attention must be one of"):
        attention_context("flash3", torch.device("cpu"))
    tokens = torch.randint(0, 16, (16, 8), generator=torch.Generator().manual_seed(1))
    blocks = Blocks(tokens, torch.ones(16, 8, dtype=torch.bool), np.zeros(16, dtype=np.int64))
    curves = {}
    for kind in ("auto", "flash", "cudnn"):
        rows = []
        fit(_tiny_lm(), blocks, lambda: iter(UniformSampler(blocks.topics, 4, seed=0)),
            FitSettings(steps=3, lr=1e-2, batch_size=4, log_every=1, checkpoint_every=100, attention=kind),
            torch.device("cpu"), log=rows.append)
        curves[kind] = [r["train/loss"] for r in rows]
    assert curves["auto"] == curves["flash"] == curves["cudnn"] and len(curves["flash"]) == 3
    with pytest.raises(ValueError, match="attention must be one of"):
        fit(_tiny_lm(), blocks, lambda: iter(UniformSampler(blocks.topics, 4, seed=0)),
            FitSettings(steps=3, lr=1e-2, batch_size=4, attention="xformers"), torch.device("cpu"))
    assert resolve_config(None, None, ["train.attention=cudnn"]).train.attention == "cudnn"
    assert resolve_config(None, None, []).train.attention == "auto"


def test_compile_auto_is_on_only_for_long_gpu_trainings():
    from pipeline.train import use_compile

    auto = resolve_config(None, None, [])
    assert use_compile(auto, torch.device("cuda"), 500) and not use_compile(auto, torch.device("cuda"), 50)
    assert not use_compile(auto, torch.device("cpu"), 500)
    forced = resolve_config(None, None, ["train.compile=true"])
    assert use_compile(forced, torch.device("cpu"), 5)
    assert not use_compile(resolve_config(None, None, ["train.compile=false"]), torch.device("cuda"), 500)


def test_chunked_loss_gives_the_full_losses_and_gradients():
    """train.loss=chunked computes what the model's own loss computes, a chunk of positions at a
    time (padding and peft LoRA included), and the same per-row losses the samplers learn from."""
    from peft import LoraConfig, get_peft_model

    from pipeline.loss import StepLoss
    from pipeline.trainer import row_losses

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 16, (4, 8), generator=g)
    labels = ids.masked_fill(torch.arange(8).expand(4, 8) >= 6, -100)  # two padded positions a row
    for wrap in (False, True):
        grads, results = [], []
        for kind in ("full", "chunked"):
            model = _tiny_lm()
            if wrap:
                model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
            loss, rows = StepLoss(model, kind, chunk_tokens=5, rows=True)(ids, None, labels)
            loss.backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
            results.append((float(loss), rows))
        assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
        torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    out = _tiny_lm()(input_ids=ids, labels=labels)
    np.testing.assert_allclose(results[0][1].numpy(), row_losses(out.logits, labels), rtol=1e-5)


def test_bf16_residual_keeps_the_stream_between_layers_in_bf16():
    """train.residual_bf16 under bf16 autocast: every decoder layer hands on bf16 (fp32 without
    it), the loss stays close to the fp32 stream's and the weight gradients stay fp32, for both
    losses and under peft."""
    from peft import LoraConfig, get_peft_model

    from pipeline.loss import StepLoss

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 16, (4, 8), generator=g)
    for kind, wrap in (("full", False), ("chunked", False), ("full", True)):
        seen, losses = {}, {}
        for residual_bf16 in (False, True):
            model = _tiny_lm()
            if wrap:
                model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
            layer = model.get_decoder().layers[0] if not wrap else model.get_base_model().get_decoder().layers[0]
            layer.register_forward_hook(lambda m, i, out, r=residual_bf16: seen.__setitem__(
                r, (out[0] if isinstance(out, tuple) else out).dtype))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, _ = StepLoss(model, kind, chunk_tokens=5, residual_bf16=residual_bf16)(ids, None, ids)
            loss.backward()
            losses[residual_bf16] = float(loss)
            assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
        assert seen == {False: torch.float32, True: torch.bfloat16}, (kind, wrap)
        assert losses[True] == pytest.approx(losses[False], abs=2e-2)
    assert resolve_config(None, None, []).train.residual_bf16 is False


def test_bf16_residual_reaches_the_training_step_only_under_bf16_autocast():
    """From the config to the step: `fit_settings` passes train.residual_bf16 on, and `fit` uses it
    under bf16 autocast (a different curve) and ignores it without autocast (the same curve)."""
    from pipeline.lm_data import Blocks
    from pipeline.train import fit_settings
    from pipeline.trainer import FitSettings, fit

    cfg = resolve_config(None, None, ["train.residual_bf16=true"])
    assert fit_settings(cfg, 10, 1e-3, torch.device("cpu"), replay=False).residual_bf16
    tokens = torch.randint(0, 16, (16, 8), generator=torch.Generator().manual_seed(1))
    blocks = Blocks(tokens, torch.ones(16, 8, dtype=torch.bool), np.zeros(16, dtype=np.int64))
    curves = {}
    for autocast in (None, torch.bfloat16):
        for residual in (False, True):
            rows = []
            fit(_tiny_lm(), blocks, lambda: iter(UniformSampler(blocks.topics, 4, seed=0)),
                FitSettings(steps=3, lr=1e-2, batch_size=4, log_every=1, checkpoint_every=100,
                            autocast_dtype=autocast, residual_bf16=residual), torch.device("cpu"), log=rows.append)
            curves[autocast, residual] = [r["train/loss"] for r in rows]
    assert curves[None, True] == curves[None, False]
    assert curves[torch.bfloat16, True] != curves[torch.bfloat16, False]
    assert curves[torch.bfloat16, True] == pytest.approx(curves[torch.bfloat16, False], abs=5e-2)


def test_validation_passages_are_never_trained_and_feed_the_signals(trained_run):
    data = train.RunData.load(Workspace(trained_run))
    assert data.validation.any() and not (data.validation & data.heldout).any()
    topics = sorted(set(data.topic_of.tolist()))
    rows = set(data.train_rows(topics))
    assert not rows & set(np.flatnonzero(data.validation | data.heldout).tolist())
    assert set(data.signal_rows()) == set(np.flatnonzero(data.validation).tolist())
    # an expanded neighbourhood's passage list drops validation passages too
    val = np.flatnonzero(data.validation).tolist()
    assert data.train_rows([0], passages=val + sorted(rows)[:3]) == sorted(rows)[:3]
    logged = [json.loads(x) for x in (trained_run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert any("val/nucleus/loss" in row and "nucleus/loss" in row for row in logged)


def test_the_manifold_sampler_trains_an_adapter_and_the_report_draws_its_manifold(trained_run_copy):
    """`train.sampler: manifold` through the stage: learned block vectors (from the index's
    embeddings, packed as the blocks are), the aligned traversal with the validation split as its
    probe, replay drawn uniformly; the summary lands in logs/ and `report` draws it."""
    from pipeline import report

    ws = Workspace(trained_run_copy)
    cfg = _cfg(ws, "train.sampler=manifold", "manifold.space=learned", "manifold.traversal=aligned",
               "manifold.clusters=4", "manifold.rebuild_every=4", "lora.replay_fraction=0.25", "lora.steps=12")
    result = train.run(cfg, ws, "topic-2")
    assert result.steps == 12 and result.metrics["nb/topic-2/ppl"] < result.metrics_before["nb/topic-2/ppl"]
    summary = json.loads((trained_run_copy / "logs" / "manifold-topic-2.json").read_text())
    assert summary["space"] == "learned" and summary["builds"] == 3 and len(summary["path"]) == 12
    assert summary["vector_drift"] < 1.0 and set(summary["snapshots"]) == {"start", "end"}
    plots = report.run(cfg, ws).plots
    assert "manifold-topic-2.png" in plots and (trained_run_copy / "reports" / "manifold-topic-2.png").stat().st_size


def test_the_grow_traversal_spreads_its_growth_over_the_stages_steps(trained_run_copy):
    """`manifold.traversal: grow` through the stage: the stage tells the sampler how many batches
    the training draws, so the open region holds every cluster from `grow_fraction` of them on."""
    ws = Workspace(trained_run_copy)
    cfg = _cfg(ws, "train.sampler=manifold", "manifold.traversal=grow", "manifold.grow_fraction=0.5",
               "manifold.clusters=4", "manifold.rebuild_every=4", "lora.steps=12")
    assert train.run(cfg, ws, "topic-2").steps == 12
    summary = json.loads((trained_run_copy / "logs" / "manifold-topic-2.json").read_text())
    assert summary["traversal"] == "grow" and sorted(summary["open_order"]) == [0, 1, 2, 3]
    # one more cluster per 2 batches (3 more over 6): the newest open cluster of each batch
    assert [len(set(summary["path"][:i + 1])) for i in range(0, 12, 2)] == [1, 2, 3, 4, 4, 4]
    from pipeline import report

    assert "manifold-topic-2.png" in report.run(cfg, ws).plots  # the opening order drawn on the clusters


def test_the_aligned_traversal_without_a_validation_split_says_what_is_missing(trained_run_copy):
    """A run indexed without a validation split (its split column holds train and heldout only)
    has no probe for `manifold.traversal: aligned`: a UserError names the key and the fix, and
    the held-out split is never taken in its place."""
    import pyarrow as pa

    path = trained_run_copy / "topics" / "assignments.parquet"
    table = pq.read_table(path).to_pydict()
    table["split"] = ["heldout" if s == "heldout" else "train" for s in table["split"]]
    pq.write_table(pa.table(table), path)
    ws = Workspace(trained_run_copy)
    cfg = _cfg(ws, "train.sampler=manifold", "manifold.traversal=aligned", "lora.steps=2")
    with pytest.raises(UserError, match=r"manifold.traversal: 'aligned' needs validation passages of 'topic-2'.*"
                                        r"split.validation_fraction > 0"):
        train.run(cfg, ws, "topic-2")
