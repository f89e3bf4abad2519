"""Shared + expert LoRA on a real tiny model: group batches, joint training that moves the shared
adapter and only the batch's expert, and an export that plain peft loads to the same logits."""

import numpy as np
import pytest
import torch

from curriculum.joint import SHARED, GroupBatches, activate, add_joint_lora, export_expert, trainable_parameters
from pipeline.lm_data import Blocks
from pipeline.model import build_scratch_model, train_tokenizer
from pipeline.trainer import FitSettings, fit


@pytest.fixture(scope="module")
def tiny(wikitext_dir, tmp_path_factory):
    """(a saved tiny base, its tokenizer, passages); peft wraps a model in place, so each test
    loads its own copy of the base."""
    lines = [line for line in (wikitext_dir / "valid.txt").read_text().splitlines() if len(line) > 80][:300]
    tokenizer = train_tokenizer(lines, 512)
    base_dir = tmp_path_factory.mktemp("joint") / "base"
    build_scratch_model(tokenizer, "tiny", 0).save_pretrained(base_dir)
    return base_dir, tokenizer, lines


def _base(base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir)


def _lora(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}


def test_group_batches_take_one_group_per_batch_in_proportion():
    groups = np.repeat([0, 1, 2], [60, 30, 10])
    s = GroupBatches(groups, 4, seed=3, cycle=100)
    drawn = []
    for _ in range(100):
        batch = s.next_batch()
        assert len(set(groups[batch])) == 1 and groups[batch[0]] == s.group
        drawn.append(s.group)
    assert np.bincount(drawn).tolist() == [60, 30, 10]
    again = GroupBatches(groups, 4, seed=3, cycle=100)
    again.skip(40)
    s2 = GroupBatches(groups, 4, seed=3, cycle=100)
    for _ in range(40):
        s2.next_batch()
    assert np.array_equal(again.next_batch(), s2.next_batch())


def test_joint_training_moves_the_shared_adapter_and_only_the_batch_expert(tiny, tmp_path):
    base_dir, tokenizer, lines = tiny
    model = add_joint_lora(_base(base_dir), ["nbx", "nby"], shared_rank=4, expert_rank=2, scale=2.0, seed=0)
    assert trainable_parameters(model) == sum(p.numel() for n, p in model.named_parameters()
                                              if ".lora_" in n and (f".{SHARED}." in n or ".nbx." in n or ".nby." in n))
    ids = tokenizer(lines[:8], truncation=True, max_length=32, padding="max_length", return_tensors="pt")
    blocks = Blocks(ids["input_ids"], ids["attention_mask"].bool(), np.zeros(8, dtype=np.int64))  # group 0 only
    before = _lora(model)
    fit(model, blocks, lambda: GroupBatches(blocks.topics, 4), FitSettings(steps=3, lr=1e-2, batch_size=4),
        torch.device("cpu"), on_batch=lambda idx: activate(model, "nbx"), desc="joint")
    after = _lora(model)
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert any(f".{SHARED}." in n for n in moved) and any(".nbx." in n for n in moved)
    assert not any(".nby." in n for n in moved)  # expert nby saw no batch


def test_export_is_one_stock_peft_adapter_with_the_summed_delta(tiny, tmp_path):
    from peft import PeftModel

    base_dir, tokenizer, lines = tiny
    model = add_joint_lora(_base(base_dir), ["nbx", "nby"], 4, 2, 2.0, seed=1)
    with torch.no_grad():  # B starts at zero: give every adapter a non-zero delta
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    x = torch.tensor([tokenizer(lines[0])["input_ids"][:24]])
    model.eval()
    activate(model, "nby")
    with torch.no_grad():
        ref = model(input_ids=x).logits
        model.base_model.set_adapter([SHARED])
        shared_only = model(input_ids=x).logits
    export_expert(model, "nby", tmp_path / "nby")
    plain = PeftModel.from_pretrained(_base(base_dir), tmp_path / "nby").eval()
    assert plain.peft_config["default"].r == 6
    with torch.no_grad():
        got = plain(input_ids=x).logits
    assert (got - ref).abs().max().item() < 1e-4
    assert (ref - shared_only).abs().max().item() > 1e-2  # the expert's part is in the export
