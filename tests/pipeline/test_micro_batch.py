"""Micro-batches (pipeline/micro_batch.py): a drawn batch trained in pieces gives the whole
batch's training, and `auto` halves the piece until a step fits."""

import numpy as np
import pytest
import torch

from curriculum.samplers import OdmSampler, UniformSampler
from pipeline import micro_batch
from pipeline.errors import UserError
from pipeline.lm_data import Blocks
from pipeline.trainer import FitSettings, fit
from tests.pipeline.test_train import _tiny_lm


def _blocks(seed: int, n: int, padded: bool) -> Blocks:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 16, (n, 8), generator=g)
    # padded rows of different lengths: pieces hold different numbers of target tokens
    mask = torch.arange(8).expand(n, 8) < torch.randint(3, 9, (n, 1), generator=g) if padded \
        else torch.ones(n, 8, dtype=torch.bool)
    return Blocks(tokens, mask, np.repeat([0, 1], n // 2))


def _train(micro, sampler_kind: str, padded: bool):
    blocks, replay = _blocks(0, 40, padded), _blocks(1, 10, padded)
    model, logged, observed = _tiny_lm(), [], []
    sampler = OdmSampler(blocks.topics, 8, seed=2) if sampler_kind == "odm" else UniformSampler(blocks.topics, 8, seed=0)
    if sampler_kind == "odm":  # record what the learning sampler is told
        observe = sampler.observe
        sampler.observe = lambda batch, losses: observed.append(losses.copy()) or observe(batch, losses)
    settings = FitSettings(steps=6, lr=1e-2, batch_size=8, grad_accum=2, replay_fraction=0.25, log_every=1,
                           checkpoint_every=100, micro_batch_size=micro)
    result = fit(model, blocks, lambda: iter(sampler), settings, torch.device("cpu"), replay=replay,
                 make_replay_sampler=lambda: iter(UniformSampler(replay.topics, 8, seed=1)), log=logged.append)
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    return weights, [r["train/loss"] for r in logged], observed, result


@pytest.mark.parametrize("sampler_kind,padded", [("uniform", True), ("odm", False), ("odm", True)])
def test_pieces_train_what_the_whole_batch_trains(sampler_kind, padded):
    """Batch 8 (6 sampled + 2 replayed blocks) in pieces of 2 against one piece: the same losses,
    the same weights, and a learning sampler told the same per-block losses."""
    whole = _train(None, sampler_kind, padded)
    pieces = _train(2, sampler_kind, padded)
    assert pieces[3].tokens == whole[3].tokens
    assert pieces[1] == pytest.approx(whole[1], abs=1e-5)
    torch.testing.assert_close(pieces[0], whole[0], atol=1e-5, rtol=1e-5)
    assert len(pieces[2]) == len(whole[2]) == (12 if sampler_kind == "odm" else 0)
    for a, b in zip(pieces[2], whole[2]):
        assert a.shape == (6,)
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_auto_halves_the_piece_until_a_step_fits():
    tried = []

    def fits(m):
        tried.append(m)
        return m <= 5

    assert micro_batch.largest_fitting(12, fits) == 3 and tried == [12, 6, 3]  # halving, divisors only
    assert micro_batch.largest_fitting(8, lambda m: True) == 8
    with pytest.raises(UserError, match="train.block_size"):
        micro_batch.largest_fitting(8, lambda m: False)
    # on a CPU `auto` is the whole share, and nothing is probed
    assert micro_batch.resolve("auto", 8, torch.device("cpu"), lambda m: 1 / 0, 0, lambda: None) == 8
    assert micro_batch.resolve(4, 8, torch.device("cpu"), lambda m: 1 / 0, 0, lambda: None) == 4
    with pytest.raises(ValueError, match="does not divide the 8 blocks"):
        micro_batch.resolve(3, 8, torch.device("cpu"), lambda m: 1 / 0, 0, lambda: None)


def test_an_allocation_failure_is_told_apart_from_other_errors():
    # A GPU's out-of-memory error cannot be caused on a CPU: built here, as torch raises it,
    # and as torch.compile re-raises it (wrapped, with the original as its cause).
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    wrapped = RuntimeError("backend compiler failed")
    wrapped.__cause__ = oom
    assert micro_batch.is_oom(oom) and micro_batch.is_oom(wrapped)
    assert not micro_batch.is_oom(ValueError("shapes do not match")) and not micro_batch.is_oom(RuntimeError("x"))


def test_the_optimizer_state_still_to_come_is_counted():
    model = _tiny_lm()
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    n = sum(p.numel() for p in params)
    assert micro_batch.pending_optimizer_bytes(opt) == 2 * 4 * n  # two fp32 moments per weight
    model(input_ids=torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long)).loss.backward()
    opt.step()
    assert micro_batch.pending_optimizer_bytes(opt) == 0


def test_the_training_loop_imports_with_torch_alone():
    """The GPU image has torch and transformers but neither pydantic nor faiss (ENV.md): the
    benchmarks that train there (train_throughput, adapters_routing, micro_batch_probe) import the
    loop and the samplers and must not pull the config in. A child process that refuses those
    packages imports them."""
    import subprocess
    import sys
    from pathlib import Path

    refuse = """
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"pydantic", "faiss", "celery", "datasets", "optuna"}:
            raise ModuleNotFoundError(f"refused: {name}")
sys.meta_path.insert(0, Refuse())
import pipeline.trainer, pipeline.micro_batch, curriculum.samplers, pipeline.lm_data, pipeline.model
"""
    repo = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", refuse], cwd=repo, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
