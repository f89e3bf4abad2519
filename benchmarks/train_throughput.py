"""Training throughput: Nucleus's loop against a plain Hugging Face `Trainer`, side by side.

Same model (a scratch preset built from config, same init), same packed blocks, same batch,
same optimizer (AdamW, cosine schedule, warm-up, clipping), same number of steps; arms run
alternately, each on a fresh copy of the model. Five arms:

  hf_trainer         transformers.Trainer over the blocks, given its best settings: bf16, fused
                     AdamW, SDPA attention, no attention mask on full blocks, full batches only
                     (no recompilation at an epoch's end), and with `--compile` its
                     `torch_compile=True`
  nucleus_uniform    pipeline.trainer.fit with the uniform block sampler (with `--compile`,
                     `train.compile`: the training forward and loss compiled)
  nucleus_eager      the same, never compiled: what compilation buys
  nucleus_community  pipeline.trainer.fit with the community-traversal sampler (compiled like
                     nucleus_uniform)
  nucleus_chunked    nucleus_uniform with `train.loss: chunked` (no (tokens x vocab) logits kept)
  nucleus_flash, nucleus_cudnn  (only with --arms) nucleus_uniform with the attention kernel
                     forced (`FitSettings.attention`): FlashAttention-2 first or cuDNN's fused
                     attention first; nucleus_uniform takes PyTorch's own order (`auto`, which
                     ran cuDNN's kernels with PyTorch 2.11 on an H100)
  nucleus_eager_seed1  (only with --arms) nucleus_eager on another batch order: the noise
                     floor for comparing loss curves
  nucleus_tuned      (only with --arms) nucleus_uniform with inductor's coordinate-descent
                     tuning of its Triton kernels (longer compilation; element-wise and norm
                     kernels take about a quarter of a `base` step, train_profile.py)
  nucleus_halves     (only with --arms) nucleus_uniform with each batch in two pieces
                     (`train.micro_batch_size` = batch / 2, gradients accumulated): what
                     running a batch that does not fit in pieces costs
  nucleus_liger      (only with --arms; needs liger-kernel on the path) nucleus_uniform with
                     liger-kernel's Triton RMSNorm, RoPE and SwiGLU in place of the Llama model's
                     (what inductor fuses itself took about a quarter of a `base` step)
  nucleus_bf16_residual  (only with --arms; GPU or --bf16-cpu) nucleus_uniform with `train.residual_bf16`
                     (`FitSettings.residual_bf16`): the embeddings enter the model in bf16, so under
                     autocast the residual stream between layers is bf16 instead of fp32, halving
                     what the norms and additions read and write (the weights and their gradients
                     stay fp32; the loss curve says what it costs)

Reports tokens/s per arm, the ratios nucleus/hf, compiled/eager and community/uniform, each
arm's loss curve (the compiled path must match the eager one), the graphs dynamo compiled in
each timed run (0 = no recompilation), and on GPU the model FLOPs utilisation (MFU: 6*N +
12*L*d*T FLOPs per token against 989 TFLOP/s, the H100/H200 dense bf16 peak; N counts every
weight a token's forward multiplies by, the output layer included, as nanoGPT's count does for
a tied embedding, but not the embedding lookup). Every arm is timed over its steady state:
from step `--skip` (after a synchronisation) to its last step, so that compilation, which
transformers' `Trainer` redoes in every `train()` on a fresh model, is never timed, for either
side. An untimed warm-up run of every arm comes first as well.

    python benchmarks/train_throughput.py --data ../shared/data/wikitext-2/train.txt \
        --preset tiny --steps 30 --batch-size 16 --block-size 128           # CPU
    python benchmarks/train_throughput.py --data .device/wikitext-2/train.txt \
        --preset small --steps 200 --batch-size 64 --block-size 512 --repeats 3   # H100, bf16

Topics for the community sampler are groups of `--articles-per-topic` consecutive articles
joined in a ring-plus-chords graph: a sampler's cost depends on the number of topics and
blocks, not on what the topics mean, and this keeps the script free of FAISS (absent on the
GPU image).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from curriculum.samplers import make_sampler  # noqa: E402
from pipeline.lm_data import pack_by_topic, tokenize  # noqa: E402
from pipeline.model import build_scratch_model, count_parameters, train_tokenizer  # noqa: E402
from pipeline.trainer import FitSettings, fit  # noqa: E402
from retrieval.corpus import split_wikitext_articles  # noqa: E402

# arms that draw exactly nucleus_eager's batches: their loss curves must match its curve
SAME_BATCHES = ("nucleus_uniform", "nucleus_chunked", "nucleus_flash", "nucleus_cudnn", "nucleus_tuned",
                "nucleus_halves", "nucleus_liger", "nucleus_bf16_residual")
OPT_IN = ("nucleus_eager_seed1", "nucleus_flash", "nucleus_cudnn", "nucleus_tuned", "nucleus_halves", "nucleus_liger",
          "nucleus_bf16_residual")
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, SXM


def load_articles(path: Path, limit: int | None) -> list[str]:
    """WikiText articles as training texts: the title line, then the body."""
    arts = [f"{t}\n{b}" for t, b in split_wikitext_articles(path.read_text(encoding="utf-8"))]
    return arts[:limit] if limit else arts


def ring_graph(n: int) -> dict[int, list[int]]:
    """Each topic joined to its ring neighbours and one chord: every topic has degree 3-4."""
    adj = {t: {(t - 1) % n, (t + 1) % n, (t + n // 2) % n} - {t} for t in range(n)}
    return {t: sorted(v) for t, v in adj.items()}


def flops_per_token(model, block: int, output_layer: bool = True) -> float:
    """Training FLOPs per token: 6 per weight a token meets (forward and backward) plus causal
    attention's 12*L*d*T. `output_layer=False` is the count of RESULTS.md before issue 15, which
    left the output layer's matmul out (the tied embedding's weights were subtracted)."""
    cfg = model.config
    n = count_parameters(model)  # the tied embedding/output weight counted once: the output matmul
    if not output_layer:
        n -= cfg.vocab_size * cfg.hidden_size
    return 6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * block


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (a recompilation adds one)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - torch without dynamo
        return 0
    return int(counters["stats"]["unique_graphs"])


class SteadyClock:
    """Wall time from the end of step `skip` (synchronised) to the end of the run."""

    def __init__(self, skip: int, device):
        self.skip, self.device, self.t_skip = skip, device, None

    def mark(self, step: int) -> None:
        if step == self.skip:
            self.sync()
            self.t_skip = time.perf_counter()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def seconds(self) -> float:
        self.sync()
        return time.perf_counter() - self.t_skip


def run_hf(model, blocks, args, device, bf16: bool) -> tuple[float, list[float]]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    clock = SteadyClock(args.skip, device)

    class Clock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            clock.mark(state.global_step)
            if state.global_step == args.steps:
                timing["seconds"] = clock.seconds()

    timing: dict[str, float] = {}

    class BlockDataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(blocks)

        def __getitem__(self, i):
            ids, mask = blocks.tokens[i], blocks.mask[i]
            row = {"input_ids": ids, "labels": ids.masked_fill(~mask, -100)}
            if not full:  # a mask only where there is padding: full blocks take SDPA's causal path
                row["attention_mask"] = mask.long()
            return row

    full = bool(blocks.mask.all())
    targs = TrainingArguments(
        output_dir="/tmp/nucleus-bench-hf", per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=args.warmup, weight_decay=0.01,
        max_grad_norm=1.0, adam_beta2=0.95, bf16=bf16, logging_strategy="steps", logging_steps=args.skip,
        save_strategy="no",
        report_to=[], dataloader_num_workers=0, disable_tqdm=True, seed=0, use_cpu=device.type == "cpu",
        optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch", torch_compile=args.compile,
        dataloader_pin_memory=device.type == "cuda",
        # full batches only, as Nucleus's samplers draw them: a short last batch of an epoch would
        # change the compiled graph's shapes and make Trainer recompile inside the timed steps
        dataloader_drop_last=True)
    trainer = Trainer(model=model, args=targs, train_dataset=BlockDataset(), callbacks=[Clock()])
    trainer.train()
    curve = [float(r["loss"]) for r in trainer.state.log_history if "loss" in r]
    return timing["seconds"], curve


def run_liger(model, blocks, args, device, bf16: bool, graph, compiled: bool) -> tuple[float, list[float]]:
    """nucleus_uniform with liger-kernel's RMSNorm, RoPE and SwiGLU. Its RoPE replaces a function
    of transformers' Llama module for every model, so the arm puts the original back after."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    from transformers.models.llama import modeling_llama

    saved = modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaRMSNorm, modeling_llama.LlamaMLP
    try:  # the loss stays fit's own (fused linear cross-entropy would need liger's forward)
        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=False,
                                    model=model)
        return run_nucleus(model, blocks, args, device, bf16, "uniform", graph, compiled)
    finally:
        modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaRMSNorm, modeling_llama.LlamaMLP = saved


def run_nucleus(model, blocks, args, device, bf16: bool, sampler: str, graph, compiled: bool,
                loss: str = "full", seed: int = 0, attention: str = "auto",
                tuned: bool = False, micro: int | None = None, residual_bf16: bool = False) -> tuple[float, list[float]]:
    if tuned:  # inductor's config is read when the graph compiles, inside fit; patched for this arm alone
        import torch._inductor.config as inductor

        with inductor.patch(coordinate_descent_tuning=True):
            return run_nucleus(model, blocks, args, device, bf16, sampler, graph, compiled, loss, seed, attention,
                               micro=micro, residual_bf16=residual_bf16)
    # logged every `skip` steps, as the Trainer arm logs: the same host synchronisations
    settings = FitSettings(steps=args.steps, lr=args.lr, batch_size=args.batch_size, warmup_steps=args.warmup,
                           eval_every=10**9, checkpoint_every=10**9, log_every=args.skip,
                           autocast_dtype=torch.bfloat16 if bf16 else None, compile=compiled, loss=loss,
                           attention=attention, micro_batch_size=micro, residual_bf16=residual_bf16)
    make = lambda: iter(make_sampler(sampler, blocks.topics, args.batch_size, graph, 2, seed))  # noqa: E731
    model.to(device)
    clock = SteadyClock(args.skip, device)
    rows = []

    def log(row: dict) -> None:
        clock.mark(row["step"])
        rows.append(row)

    fit(model, blocks, make, settings, device, log=log)
    return clock.seconds(), [r["train/loss"] for r in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--articles", type=int, default=None)
    p.add_argument("--articles-per-topic", type=int, default=10)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=10,
                   help="steps left out of the timing (compilation); also the loss-logging interval")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup-runs", type=int, default=1,
                   help="untimed runs of every arm first (0: the first timed run compiles, untimed below --skip)")
    p.add_argument("--compile", action="store_true", help="torch.compile in hf_trainer and the nucleus arms")
    p.add_argument("--bf16-cpu", action="store_true",
                   help="bf16 autocast on a CPU too (slow): checks the bf16 arms' loss curves without a GPU")
    p.add_argument("--arms", nargs="+", default=None,
                   help="a subset of the arms (default all; hf_trainer, nucleus_uniform and nucleus_eager "
                        "are always run: the ratios need them); the named arms run first, in the order given")
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()
    if args.steps % args.skip or args.steps <= args.skip:
        p.error(f"--steps ({args.steps}) must be a multiple of --skip ({args.skip}) and larger")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device.type == "cuda" or args.bf16_cpu
    articles = load_articles(args.data, args.articles)
    tok = train_tokenizer(articles, args.vocab_size)
    ids = tokenize(tok, articles)
    topics = [i // args.articles_per_topic for i in range(len(articles))]
    blocks = pack_by_topic(ids, topics, args.block_size, tok.pad_token_id)
    graph = ring_graph(max(topics) + 1)
    base = build_scratch_model(tok, args.preset, seed=0)
    tokens_per_step = args.batch_size * args.block_size
    print(f"device={device} preset={args.preset} params={count_parameters(base):,} blocks={len(blocks)} "
          f"topics={max(topics) + 1} batch={args.batch_size}x{args.block_size} steps={args.steps}", flush=True)

    c = args.compile
    arms = {
        "hf_trainer": lambda m: run_hf(m, blocks, args, device, bf16),
        "nucleus_uniform": lambda m: run_nucleus(m, blocks, args, device, bf16, "uniform", graph, c),
        "nucleus_eager": lambda m: run_nucleus(m, blocks, args, device, bf16, "uniform", graph, False),
        "nucleus_community": lambda m: run_nucleus(m, blocks, args, device, bf16, "community", graph, c),
        "nucleus_chunked": lambda m: run_nucleus(m, blocks, args, device, bf16, "uniform", graph, c, "chunked"),
        # the eager path on another batch order: how far two curves of the same model differ by
        # data order alone, the noise that compiled-vs-eager differences are measured against
        "nucleus_eager_seed1": lambda m: run_nucleus(m, blocks, args, device, bf16, "uniform", graph, False, seed=1),
        "nucleus_flash": lambda m: run_nucleus(m, blocks, args, device, bf16, "uniform", graph, c, attention="flash"),
        "nucleus_cudnn": lambda m: run_nucleus(m, blocks, args, device, bf16, "uniform", graph, c, attention="cudnn"),
        "nucleus_tuned": lambda m: run_nucleus(m, blocks, args, device, bf16, "uniform", graph, c, tuned=True),
        "nucleus_halves": lambda m: run_nucleus(m, blocks, args, device, bf16, "uniform", graph, c,
                                                micro=args.batch_size // 2),
        "nucleus_liger": lambda m: run_liger(m, blocks, args, device, bf16, graph, c),
        "nucleus_bf16_residual": lambda m: run_nucleus(m, blocks, args, device, bf16, "uniform", graph, c,
                                                       residual_bf16=True),
    }
    if args.arms:
        unknown = set(args.arms) - set(arms)
        if unknown:
            p.error(f"--arms: unknown {sorted(unknown)}; choose from {list(arms)}")
        if "nucleus_bf16_residual" in args.arms and not bf16:
            p.error("--arms nucleus_bf16_residual needs bf16 autocast: a GPU, or --bf16-cpu")
        keep = {"hf_trainer", "nucleus_uniform", "nucleus_eager", *args.arms}
        # the named arms first, in the order given (a run cut short still has them), then the rest
        arms = {k: arms[k] for k in dict.fromkeys([*args.arms, *arms]) if k in keep}
    else:
        for opt_in in OPT_IN:
            arms.pop(opt_in)
    failed: dict[str, str] = {}

    def attempt(name: str):
        """One run of an arm on a fresh copy of the model; None if an opt-in arm failed (its extra
        library may not run on this machine: reported, and the other arms go on)."""
        try:
            return arms[name](copy.deepcopy(base))
        except Exception as e:
            if name not in OPT_IN:
                raise
            failed[name] = f"{type(e).__name__}: {e}"
            print(f"  {name:<18} failed: {failed[name]}", flush=True)
            return None

    for _ in range(args.warmup_runs):  # warm-up: compilation, kernels, allocator, tokenizer caches
        for name in arms:
            if name not in failed:
                attempt(name)
    rates: dict[str, list[float]] = {k: [] for k in arms}
    curves: dict[str, list[list[float]]] = {k: [] for k in arms}
    graphs: dict[str, list[int]] = {k: [] for k in arms}
    timed_tokens = (args.steps - args.skip) * tokens_per_step
    for r in range(args.repeats):
        order = list(arms) if r % 2 == 0 else list(reversed(arms))  # alternate to cancel drift
        for name in order:
            if name in failed:
                continue
            before = compiled_graphs()
            result = attempt(name)
            if result is None:
                continue
            seconds, curve = result
            graphs[name].append(compiled_graphs() - before)
            rates[name].append(timed_tokens / seconds)
            curves[name].append(curve)
            print(f"  repeat {r} {name:<18} {rates[name][-1]:>12,.0f} tokens/s  final loss {curve[-1]:.4f}  "
                  f"graphs compiled {graphs[name][-1]}", flush=True)

    med = {k: statistics.median(v) for k, v in rates.items() if v}
    curves = {k: v for k, v in curves.items() if v}
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "bf16": bf16,
           "preset": args.preset, "compile": c,
           "params": count_parameters(base), "batch": args.batch_size, "block": args.block_size,
           "steps": args.steps, "skip": args.skip, "repeats": args.repeats, "tokens_per_s": med, "rates": rates,
           "loss_curves": curves, "graphs_compiled_in_timed_runs": graphs,
           "failed_arms": failed,
           # compiled against the eager (slow) path, same seed and batches: they must agree
           "max_abs_loss_diff_compiled_vs_eager": max(abs(a - b) for a, b in zip(
               curves["nucleus_uniform"][0], curves["nucleus_eager"][0])),
           **({"max_abs_loss_diff_eager_seed0_vs_seed1": max(abs(a - b) for a, b in zip(
               curves["nucleus_eager_seed1"][0], curves["nucleus_eager"][0]))} if "nucleus_eager_seed1" in curves else {}),
           # every arm on the eager arm's batches (same seed, uniform sampler) against its curve
           "max_abs_loss_diff_vs_eager": {k: max(abs(a - b) for a, b in zip(v[0], curves["nucleus_eager"][0]))
                                          for k, v in curves.items() if k in SAME_BATCHES},
           "ratio_nucleus_vs_hf": med["nucleus_uniform"] / med["hf_trainer"],
           "ratio_compiled_vs_eager": med["nucleus_uniform"] / med["nucleus_eager"],
           **({"ratio_community_vs_uniform": med["nucleus_community"] / med["nucleus_uniform"]}
              if "nucleus_community" in med else {}),
           **({"ratio_chunked_vs_full": med["nucleus_chunked"] / med["nucleus_uniform"]}
              if "nucleus_chunked" in med else {})}
    if device.type == "cuda":
        name = out["device"]
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        if peak:
            fpt = flops_per_token(base, args.block_size)
            out["mfu"] = {k: v * fpt / peak for k, v in med.items()}
            out["mfu_without_output_layer"] = {
                k: v * flops_per_token(base, args.block_size, output_layer=False) / peak for k, v in med.items()}
            out["flops_per_token"] = fpt
            out["peak_flops_assumed"] = peak
    print(json.dumps(out, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
