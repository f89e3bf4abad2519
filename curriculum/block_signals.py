"""What the manifold sampler measures on blocks with the model being trained: one forward pass.

For blocks `idx` (a prefix of `prefix_tokens` tokens of each, evaluation mode, no gradient):

- `acts[layer]`: the mean-pooled hidden state at each chosen layer (`hidden_states[layer]`;
  -1 is the last, the output layer's input);
- `losses`: the mean next-token loss of each block's prefix;
- `grads` (when asked): last-layer gradient features. The gradient of a block's mean loss with
  respect to the output layer's weight W (vocab x d) is sum_t delta_t x_t^T / T, with x_t the
  last hidden state and delta_t = softmax(z_t) - onehot(y_t), so it needs the forward pass only.
  It is compressed with a Kronecker random projection (R_out delta_t)(R_in x_t)^T (k_out x k_in,
  as in LoGra, Choe et al. 2024), whose inner products approximate those of the full gradients
  (Johnson-Lindenstrauss). The features are what LESS and GREATS compare to a probe set's.

`make_features` builds the callable the sampler calls; `probe_gradient` the probe set's mean
feature. Both leave the model's mode and gradients as they found them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from pipeline.errors import UserError


def _projections(vocab: int, hidden: int, k_out: int, k_in: int, seed: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r_out = torch.randn(vocab, k_out, generator=g) / k_out ** 0.5
    r_in = torch.randn(hidden, k_in, generator=g) / k_in ** 0.5
    return r_out.to(device), r_in.to(device)


@torch.no_grad()
def measure(model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor, layers: tuple[int, ...],
            with_grads: bool, projections: tuple[torch.Tensor, torch.Tensor] | None, batch: int = 128,
            autocast_dtype: torch.dtype | None = None) -> dict:
    """Features of the blocks in `tokens` ((n, T) on the model's device; `mask` marks the real
    tokens: a topic's padded last block counts its real ones only). Results stay on the device
    until the end: one copy to the host, not one per batch (each would wait for the GPU)."""
    was_training = model.training
    model.eval()
    acts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    losses, grads = [], []
    device = tokens.device
    try:
        for start in range(0, len(tokens), batch):
            ids, real = tokens[start:start + batch], mask[start:start + batch].float()
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = model(input_ids=ids, output_hidden_states=True)
            hs = out.hidden_states
            n_real = real.sum(1, keepdim=True).clamp(min=1)
            for layer in layers:
                acts[layer].append((hs[layer].float() * real[..., None]).sum(1) / n_real)
            target, w = ids[:, 1:], real[:, 1:]  # position t predicts token t + 1
            n_targets = w.sum(1).clamp(min=1)
            logp = torch.log_softmax(out.logits[:, :-1].float(), -1)
            nll = -logp.gather(-1, target[..., None])[..., 0]
            losses.append((nll * w).sum(1) / n_targets)
            if with_grads:
                r_out, r_in = projections
                delta = (logp.exp() @ r_out - r_out[target]) * w[..., None]  # R_out (softmax - onehot)
                x = hs[-1][:, :-1].float() @ r_in
                grads.append(torch.einsum("bto,bti->boi", delta, x).flatten(1) / n_targets[:, None])
    finally:
        model.train(was_training)
    return {"acts": {layer: torch.cat(v).cpu().numpy() for layer, v in acts.items()},
            "losses": torch.cat(losses).double().cpu().numpy(),
            "grads": torch.cat(grads).cpu().numpy() if with_grads else None}


def check_layers(model: nn.Module, layers: tuple[int, ...]) -> None:
    """`manifold.layers` against the model's depth, before anything is measured: its hidden
    states are the embeddings (0) and one per layer (1..L), indexed from the end by -1..-(L+1)."""
    depth = model.config.num_hidden_layers
    bad = [layer for layer in layers if not -(depth + 1) <= layer <= depth]
    if bad:
        raise UserError(f"manifold.layers: this model has {depth} layers, so {bad} name no hidden state; use "
                        f"1..{depth} (a layer's output), 0 (the embeddings) or -1 (the last layer); got {list(layers)}")


def make_features(model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor, layers: tuple[int, ...],
                  prefix_tokens: int, seed: int, autocast_dtype: torch.dtype | None = None, k_out: int = 16,
                  k_in: int = 16, probe: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> tuple[Callable, Callable | None]:
    """(features(idx, with_grads), probe_gradient() or None) over the training blocks `tokens`
    and `mask` ((n, T) on the device) and the probe blocks `probe` (tokens, mask), each read up
    to `prefix_tokens`."""
    check_layers(model, layers)  # the stages check earlier (train.check_model); sweeps and benchmarks here
    width = min(prefix_tokens, tokens.shape[1])
    emb = model.get_output_embeddings().weight
    proj = _projections(emb.shape[0], emb.shape[1], k_out, k_in, seed, tokens.device)

    def features(idx: np.ndarray, with_grads: bool) -> dict:
        at = torch.as_tensor(np.asarray(idx), device=tokens.device)
        return measure(model, tokens[at, :width], mask[at, :width], layers, with_grads, proj,
                       autocast_dtype=autocast_dtype)

    def probe_gradient() -> np.ndarray:
        """The probe set's gradient feature (its blocks' mean: the gradient of their mean loss)."""
        return measure(model, probe[0][:, :width], probe[1][:, :width], layers, True, proj,
                       autocast_dtype=autocast_dtype)["grads"].mean(0)

    return features, (probe_gradient if probe is not None else None)
