"""What `train.micro_batch_size: auto` picks, and what its probe costs, on a GPU.

Three trainings of the same model on the same batches: `auto` (the probe, then the pieces it
picked), the whole batch (no probe), and `auto` again under a memory cap
(`torch.cuda.set_per_process_memory_fraction`) that the whole batch does not fit in, so the
probe has to halve. Reports the piece each picked, seconds, peak memory and the loss curves,
which must agree (bf16 rounding). A large vocabulary makes the logits dominate memory.

    python3 benchmarks/micro_batch_probe.py --cap-gib 1.5 --json-out $OUT/micro_probe.json   # GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from curriculum.samplers import UniformSampler  # noqa: E402
from pipeline.lm_data import Blocks  # noqa: E402
from pipeline.trainer import FitSettings, fit  # noqa: E402


def train(micro, blocks: Blocks, args, device: torch.device) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab_size, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         max_position_embeddings=args.block_size)).to(device)
    logged: list[dict] = []
    settings = FitSettings(steps=args.steps, lr=1e-3, batch_size=args.batch_size, log_every=1, checkpoint_every=10**9,
                           autocast_dtype=torch.bfloat16 if device.type == "cuda" else None, micro_batch_size=micro)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    result = fit(model, blocks, lambda: iter(UniformSampler(blocks.topics, args.batch_size, seed=0)), settings, device,
                 log=logged.append)
    return {"setting": micro, "picked": result.micro_batch_size, "seconds": round(time.perf_counter() - t, 3),
            "peak_mib": torch.cuda.max_memory_allocated(device) // 2**20 if device.type == "cuda" else None,
            "losses": [r["train/loss"] for r in logged]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--cap-gib", type=float, default=1.5, help="memory this process may use in the capped run")
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    n = 4 * args.batch_size
    blocks = Blocks(torch.randint(0, args.vocab_size, (n, args.block_size), generator=g),
                    torch.ones(n, args.block_size, dtype=torch.bool), np.zeros(n, dtype=np.int64))
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "args": vars(args)}
    out["auto"] = train("auto", blocks, args, device)
    out["whole"] = train(None, blocks, args, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        cap = min(1.0, (torch.cuda.memory_allocated(device) + args.cap_gib * 2**30) / total)
        torch.cuda.set_per_process_memory_fraction(cap, torch.cuda.current_device())  # an index: a bare "cuda" is refused
        out["auto_capped"] = train("auto", blocks, args, device)
    for k in ("auto", "whole", "auto_capped"):
        if k in out:
            print(f"{k:12s} picked {out[k]['picked']:4d}  {out[k]['seconds']:7.2f} s  peak {out[k]['peak_mib']} MiB  "
                  f"losses {[round(x, 4) for x in out[k]['losses']]}", flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
