"""Where a training step's GPU time goes: kernel time by kind, for one arm of `train_throughput.py`.

Trains a scratch preset through `pipeline.trainer.fit` (compiled unless `--eager`) on random
tokens (kernel times do not depend on the text), profiles `--active` micro-steps after
`--wait` untimed ones (compilation and warm-up), and sums the CUDA kernels' time by kind:
matrix products, attention, Triton kernels (inductor's fused element-wise, norm and loss code),
the optimizer and the rest. The share of attention and of element-wise work says which
change can pay; `--attention` picks the attention kernel as `FitSettings.attention` does.

    python3 benchmarks/train_profile.py --preset base --batch-size 64 --block-size 1024 --attention auto
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.lm_data import Blocks  # noqa: E402
from pipeline.model import PRESETS, _scratch_config  # noqa: E402
from pipeline.trainer import FitSettings, fit  # noqa: E402

# kernel name -> kind; the first pattern that matches wins
KINDS = (
    ("attention", r"flash|fmha|sdpa|attention|attn"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|sm90_|sm80_|ampere|hopper|splitk"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("triton", r"^triton"),
)


def kind_of(name: str) -> str:
    low = name.lower()
    return next((k for k, pat in KINDS if re.search(pat, low)), "other")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="base", choices=sorted(PRESETS))
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--attention", default="auto", choices=["auto", "flash", "cudnn"])
    p.add_argument("--eager", action="store_true")
    p.add_argument("--wait", type=int, default=12, help="micro-steps before profiling (compilation, warm-up)")
    p.add_argument("--active", type=int, default=4, help="micro-steps profiled")
    p.add_argument("--top", type=int, default=15, help="slowest kernels listed")
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()

    from transformers import LlamaForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = LlamaForCausalLM(_scratch_config(args.vocab_size, args.preset)).to(device)
    n_blocks = 4 * args.batch_size
    tokens = torch.randint(0, args.vocab_size, (n_blocks, args.block_size))
    blocks = Blocks(tokens=tokens, mask=torch.ones_like(tokens, dtype=torch.bool), topics=np.zeros(n_blocks, dtype=np.int64))
    rng = np.random.default_rng(0)

    def sampler():
        while True:
            yield rng.choice(n_blocks, args.batch_size, replace=False)

    steps = args.wait + args.active + 1
    settings = FitSettings(steps=steps, lr=1e-3, batch_size=args.batch_size, warmup_steps=2, eval_every=10**9,
                           checkpoint_every=10**9, log_every=10**9, compile=not args.eager,
                           autocast_dtype=torch.bfloat16 if device.type == "cuda" else None, attention=args.attention)
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    schedule = torch.profiler.schedule(wait=args.wait, warmup=1, active=args.active, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=schedule) as prof:
        # on_batch runs before each micro-batch: one profiler step per optimizer step here
        fit(model, blocks, sampler, settings, device, on_batch=lambda idx: prof.step(), desc="profile")
    # the profiler's own step annotations (`ProfilerStep#N`) also appear on the GPU's timeline,
    # each spanning a whole step: they are not kernels and would count every step twice
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.startswith("ProfilerStep")]
    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, float] = defaultdict(float)
    for e in kernels:
        us = e.time_range.elapsed_us()
        by_kind[kind_of(e.name)] += us
        by_name[e.name] += us
    total = sum(by_kind.values()) or 1.0
    # first kernel start to last kernel end: above the summed kernel time by the GPU's idle gaps
    # (the host not keeping up: launch overhead, synchronisation), which CUDA graphs would remove
    span = (max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)) if kernels else 0
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "preset": args.preset,
           "batch": args.batch_size, "block": args.block_size, "attention": args.attention,
           "compiled": not args.eager, "profiled_steps": args.active,
           "kernel_ms_per_step": round(total / 1e3 / args.active, 2),
           "span_ms_per_step": round(span / 1e3 / args.active, 2),
           "gpu_idle_share": round(1 - total / span, 4) if span else None,
           "share_by_kind": {k: round(v / total, 4) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
           "slowest_kernels_ms_per_step": {n[:120]: round(v / 1e3 / args.active, 3) for n, v in
                                           sorted(by_name.items(), key=lambda kv: -kv[1])[:args.top]}}
    print(json.dumps(out, indent=2))
    if not kernels:
        print("no CUDA kernels were recorded: on a CPU this script only checks that the step runs", file=sys.stderr)
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
