"""Sampling throughput: batched KV-cache generation vs full re-forward, same model, prompts and draws.

Prints ONE JSON object:
  {"ours": {"tokens_per_s"}, "baseline": {"tokens_per_s"}, "ratio": ours / baseline, "settings": {...}}

ours     = GPT.generate(use_cache=True): prefill the left-padded batch once, then one token per
           step through a preallocated KV cache.
baseline = GPT.generate(use_cache=False): the same sampler, re-running the whole sequence each step.
Both generate exactly `--new` tokens per row (no eos), from the same seeded generator, so they
produce identical tokens (checked) and the same amount of work is counted. Best of `--repeats`.

  python benchmarks/generation.py                   # CPU, depth 4, batch 16, 128 new tokens
  python benchmarks/generation.py --device cuda --depth 12 --batch 64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasks.core.model import GPT, ModelConfig  # noqa: E402


def timed(model: GPT, prompts: list[list[int]], args, use_cache: bool) -> tuple[float, list[list[int]]]:
    g = torch.Generator(device=args.device).manual_seed(0)
    if args.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(prompts, args.new, temperature=1.0, top_k=50, generator=g, use_cache=use_cache)
    if args.device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt", type=int, default=32, help="longest prompt; lengths vary from half of it")
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=args.vocab, depth=args.depth, max_seq_len=args.prompt + args.new)).to(args.device).eval()
    lengths = torch.randint(args.prompt // 2, args.prompt + 1, (args.batch,)).tolist()
    prompts = [torch.randint(0, args.vocab, (n,)).tolist() for n in lengths]
    tokens = args.batch * args.new
    ours, base = [], []
    for _ in range(args.repeats):
        seconds, cached = timed(model, prompts, args, use_cache=True)
        ours.append(tokens / seconds)
        seconds, full = timed(model, prompts, args, use_cache=False)
        base.append(tokens / seconds)
    print(json.dumps({
        "ours": {"tokens_per_s": round(max(ours), 1), "runs": [round(x, 1) for x in ours]},
        "baseline": {"tokens_per_s": round(max(base), 1), "runs": [round(x, 1) for x in base]},
        "ratio": round(max(ours) / max(base), 2),
        "same_tokens": cached == full,
        "settings": {"device": args.device, "depth": args.depth, "params": model.num_params(), "vocab": args.vocab,
                     "batch": args.batch, "prompt_lengths": [min(lengths), max(lengths)], "new_tokens": args.new,
                     "threads": torch.get_num_threads()},
    }))


if __name__ == "__main__":
    main()
