import numpy as np
import torch

from pipeline import rabbit_holes
from pipeline.config import resolve_config
from pipeline.model import load_pretrained
from pipeline.train import RunData
from pipeline.workspace import Workspace


def _setup(run_dir, *sets):
    ws = Workspace(run_dir)
    cfg = resolve_config(ws.stored_config(), None, list(sets))
    model, tok = load_pretrained(str(run_dir / "model" / "base"))
    return cfg, ws, model, tok, RunData.load(ws)


def test_probe_training_lowers_the_topics_heldout_loss_and_leaves_the_base_alone(trained_run):
    cfg, _, model, tok, data = _setup(trained_run, "explore.probe_steps=30")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    topic = int(np.bincount(data.topic_of[data.heldout]).argmax())  # the topic with most held-out text
    probe = rabbit_holes.probe_training(cfg, model, tok, data, topic, torch.device("cpu"))
    assert probe is not None and probe.topic == topic and probe.tokens > 0
    assert probe.loss_after < probe.loss_before
    assert probe.progress == (probe.loss_before - probe.loss_after) / (probe.tokens / 1000)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no LoRA left in the base
    assert not any("lora" in name for name, _ in model.named_modules())


def test_continuation_is_reproducible_for_a_seed(trained_run):
    cfg, _, model, tok, data = _setup(trained_run)
    topic = int(data.topic_of[~data.heldout][0])
    prompt = rabbit_holes.topic_prompt(tok, data, topic, 8, np.random.default_rng(0))
    assert len(prompt) == 9 and prompt[0] == tok.eos_token_id
    a = rabbit_holes.continue_text(model, tok, prompt, 20, seed=3, device=torch.device("cpu"))
    b = rabbit_holes.continue_text(model, tok, prompt, 20, seed=3, device=torch.device("cpu"))
    assert a == b and a.strip()
