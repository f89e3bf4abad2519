"""The training step's loss, as one module that `torch.compile` and DDP wrap whole.

`full` is the model's own loss: `model(input_ids, labels=...)` builds the logits of every
position, (batch, block, vocab), and upcasts them to fp32 for the cross-entropy. `chunked` never
holds more than `chunk_tokens` positions' logits: the decoder's hidden states go through the
output layer and the cross-entropy a chunk at a time, each chunk under activation checkpointing,
so the backward pass recomputes a chunk's logits instead of keeping them (the idea of
liger-kernel's fused linear cross-entropy, in plain PyTorch). It costs one more output-layer
matmul per token and saves the (tokens x vocab) tensors; it needs a model whose logits are its
output embedding applied to the last hidden state (Llama-style; not models that scale or cap
their logits).

Both return the mean loss over the target tokens and each row's mean loss (what `odm` and
`skillit` learn from), the latter only when asked.

`residual_bf16` (under bf16 autocast) feeds the model its input embeddings cast to bf16, so the
residual stream between layers stays bf16 (every addition to it is of bf16 matmul outputs) instead
of fp32: the memory-bound norms, additions and rotary embedding, about a quarter of a `base` step
on an H100, read and write half the bytes. The weights, their gradients and the optimizer stay
fp32; only the training forward does this, so evaluation sees the model as built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.module_spec import Param, module

LOSSES = ("full", "chunked")
LOSS_MODULES = (
    module("loss", "full", "the model's own loss: logits for every position"),
    module("loss", "chunked", "output layer and cross-entropy a chunk of positions at a time, recomputed "
           "in the backward pass (no tokens x vocab tensor kept)", needs=("plain_logits",)),
)


def _core(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (its LoRA layers are inside it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(batch, block - 1) next-token NLL in fp32 (0 where the label is -100)."""
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=-100,
                           reduction="none")


def row_means(token_nll: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's mean NLL over its targets (rows without targets get 0), detached."""
    target = labels[:, 1:]
    return (token_nll.view_as(target).sum(1) / (target != -100).sum(1).clamp(min=1)).detach()


class StepLoss(nn.Module):
    """forward(input_ids, attention_mask, labels) -> (mean loss, per-row mean loss or None)."""

    def __init__(self, model: nn.Module, kind: str = "full", chunk_tokens: int = 8192, rows: bool = False,
                 residual_bf16: bool = False):
        super().__init__()
        if kind not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")
        self.model, self.kind, self.chunk_tokens, self.rows = model, kind, chunk_tokens, rows
        self.residual_bf16 = residual_bf16

    def _inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.residual_bf16:
            return {"input_ids": input_ids}
        return {"inputs_embeds": self.model.get_input_embeddings()(input_ids).to(torch.bfloat16)}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.kind == "full":
            out = self.model(**self._inputs(input_ids), attention_mask=attention_mask, labels=labels)
            if not self.rows:
                return out.loss, None
            return out.loss, row_means(token_nll(out.logits, labels), labels)
        core = _core(self.model)
        hidden = core.get_decoder()(**self._inputs(input_ids), attention_mask=attention_mask).last_hidden_state
        head = core.get_output_embeddings()
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        y = labels[:, 1:].reshape(-1)

        def chunk_nll(h_c: torch.Tensor, y_c: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(head(h_c).float(), y_c, ignore_index=-100, reduction="none")

        nll = torch.cat([checkpoint(chunk_nll, h[i:i + self.chunk_tokens], y[i:i + self.chunk_tokens],
                                    use_reentrant=False) for i in range(0, len(y), self.chunk_tokens)])
        loss = nll.sum() / (y != -100).sum().clamp(min=1)
        return loss, (row_means(nll, labels) if self.rows else None)
