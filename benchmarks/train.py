"""Training throughput: the pretrain stage's loop vs a bare reference loop, same model and batch.

Prints ONE JSON object:
  {"ours": {"tokens_per_s", "mfu"?}, "baseline": {...}, "ratio": ours / baseline, "settings": {...}}

ours     = tasks.core.train.launch: the real loop with its LR schedule, grad clipping, periodic
           validation, checkpoints and batched MLflow logging (to a throwaway SQLite store).
baseline = the minimal loop: next batch -> forward -> backward -> clip -> AdamW step; no schedule,
           logging, evaluation, checkpointing or orchestration.
Both run the same number of steps on the same random token rows; tokens/s is measured after
`--warmup` steps, and the two loops alternate `--repeats` times (best of each reported) so
machine noise hits both alike. On CUDA it also reports MFU (bf16 peak of the GPU).

  python benchmarks/train.py                       # CPU, depth 4 (the default model)
  python benchmarks/train.py --device cuda --depth 12 --batch 32 --seq 1024   # GPT-2-small class
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasks.core.model import GPT, ModelConfig  # noqa: E402
from tasks.core.hardware import autocast, mfu, peak_flops  # noqa: E402
from tasks.core.train import TrainConfig, TrainSpec, launch, targets_of  # noqa: E402


def bare_loop(model_cfg: ModelConfig, rows: np.ndarray, cfg: TrainConfig, device, warmup: int) -> float:
    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg).to(device)
    opt = model.configure_optimizer(cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), fused=device.type == "cuda")
    net = torch.compile(model) if cfg.compile else model
    amp = autocast(device, cfg.precision)
    data = torch.from_numpy(rows).long()
    start = None
    for step in range(cfg.max_steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        batch = data[(step * cfg.batch_size) % len(data):][: cfg.batch_size].to(device)
        inputs, targets = targets_of(batch, pad_id=-1)
        with amp:
            _, loss = net(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (cfg.max_steps - warmup) * cfg.batch_size * (rows.shape[1] - 1) / (time.perf_counter() - start)


def stage_loop(model_cfg: ModelConfig, rows: np.ndarray, cfg: TrainConfig, tmp: Path, warmup: int, i: int) -> float:
    work, out = tmp / f"work{i}", tmp / f"out{i}"
    work.mkdir()
    np.save(tmp / "train.npy", rows)
    np.save(tmp / "val.npy", rows[: cfg.eval_rows])
    from tasks.core.lineage import Tracker

    tracker = Tracker(f"sqlite:///{tmp / 'mlflow.db'}", "bench")
    run_id = tracker.start_parent("bench", {})
    spec = TrainSpec(cfg=cfg, model=model_cfg, train_path=str(tmp / "train.npy"), val_path=str(tmp / "val.npy"),
                     pad_id=-1, tokens_per_byte=0.3, out=str(out), work=str(work),
                     mlflow_uri=tracker.uri, mlflow_experiment="bench", mlflow_run_id=run_id)
    result = launch(spec)
    windows = [h for h in result["history"] if "tokens_per_s" in h and h["step"] > warmup]
    # time-weighted: total tokens over total seconds of the measured windows
    tokens = sum(cfg.log_every * cfg.batch_size * (rows.shape[1] - 1) for _ in windows)
    seconds = sum(cfg.log_every * cfg.batch_size * (rows.shape[1] - 1) / h["tokens_per_s"] for h in windows)
    return tokens / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    model_cfg = ModelConfig(vocab_size=args.vocab, depth=args.depth, max_seq_len=args.seq)
    # log every 10 steps, evaluate and checkpoint twice per run: the stage's normal overheads
    cfg = TrainConfig(batch_size=args.batch, max_steps=args.steps, log_every=10, eval_every=args.steps // 2,
                      checkpoint_every=args.steps // 2 - 1, eval_rows=args.batch, device=args.device,
                      compile=args.compile, warmup_steps=5)
    rows = np.random.default_rng(0).integers(0, args.vocab, (args.batch * args.steps, args.seq + 1), dtype=np.int32)
    ours, base = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            base.append(bare_loop(model_cfg, rows, cfg, device, args.warmup))
            ours.append(stage_loop(model_cfg, rows, cfg, Path(tmp), args.warmup, i))
    model = GPT(model_cfg)
    flops = model.flops_per_token(args.seq)
    peak = peak_flops(device)
    result = {
        "ours": {"tokens_per_s": round(max(ours), 1), "runs": [round(x, 1) for x in ours]},
        "baseline": {"tokens_per_s": round(max(base), 1), "runs": [round(x, 1) for x in base]},
        "ratio": round(max(ours) / max(base), 3),
        "settings": {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "depth": args.depth, "params": model.num_params(), "vocab": args.vocab, "seq_len": args.seq,
                     "batch": args.batch, "steps": args.steps, "warmup": args.warmup, "compile": args.compile,
                     "threads": torch.get_num_threads(), "flops_per_token": flops},
    }
    if peak:
        for k in ("ours", "baseline"):
            result[k]["mfu"] = round(mfu(result[k]["tokens_per_s"], flops, peak), 4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
