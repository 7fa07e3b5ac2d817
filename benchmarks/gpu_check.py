"""Every CUDA path of the pipeline, run and measured on the GPU at hand (benchmarks/gpu_check.sh runs this).

Prints ONE JSON object (parts in this order; one not started within `--budget` seconds is skipped):
  generation KV-cache sampling tokens/s of the depth-12 model at batch 64, 128 and 256 (128 new tokens)
  pipeline   the tiny pipeline (configs/tiny.yaml) end to end on CUDA: exit code, seconds, how many of its
             training runs ran on CUDA, and the MFU its pretrain stage recorded
  pretrain   tokens/s and MFU of the bare training loop (bf16 autocast, fused AdamW) at depths 12 and 20
             (GPT-2-small and -medium class widths 768 and 1280, vocab 32768, seq 1024), compile off and on
  stage_loop the pretrain stage's own loop (schedule, clipping, validation, checkpoints, MLflow logging)
             against the bare loop at depth 12, compiled: the overhead of the stage
with the GPU name, its dense bf16 peak and torch's version. A part that fails reports its error and the
others still run. On a machine without CUDA it prints one line and exits 0.

  python benchmarks/gpu_check.py [--steps 30] [--skip-pipeline]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from tasks.core.hardware import lookup_peak, mfu  # noqa: E402
from tasks.core.model import GPT, ModelConfig  # noqa: E402
from tasks.core.train import TrainConfig  # noqa: E402

VOCAB, SEQ = 32768, 1024


def bare_tokens_per_s(depth: int, batch: int, steps: int, compile_: bool) -> float:
    from train import bare_loop  # benchmarks/train.py: the minimal reference loop

    model_cfg = ModelConfig(vocab_size=VOCAB, depth=depth, max_seq_len=SEQ)
    rows = np.random.default_rng(0).integers(0, VOCAB, (batch * steps, SEQ + 1), dtype=np.int32)
    cfg = TrainConfig(batch_size=batch, max_steps=steps, device="cuda", compile=compile_)
    return bare_loop(model_cfg, rows, cfg, torch.device("cuda"), warmup=max(3, steps // 3))


def pretrain_part(steps: int, deadline: float) -> dict:
    out, peak = {}, lookup_peak(torch.cuda.get_device_name())
    for depth, batch in ((12, 32), (20, 16)):
        flops = GPT(ModelConfig(vocab_size=VOCAB, depth=depth, max_seq_len=SEQ)).flops_per_token(SEQ)
        for compile_ in (False, True):
            name = f"depth{depth}_{'compiled' if compile_ else 'eager'}"
            if time.perf_counter() > deadline:
                out[name] = {"skipped": "time budget spent"}
                continue
            rate = bare_tokens_per_s(depth, batch, steps, compile_)
            out[name] = {"tokens_per_s": round(rate), "batch": batch, "flops_per_token": flops,
                         "mfu": round(mfu(rate, flops, peak), 4) if peak else None}
            torch.cuda.empty_cache()
    return out


def stage_loop_part(steps: int) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train.py"), "--device", "cuda", "--depth", "12",
           "--vocab", str(VOCAB), "--seq", str(SEQ), "--batch", "32", "--steps", str(max(steps, 30)),
           "--warmup", "10", "--repeats", "1", "--compile"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no output")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def generation_part() -> dict:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=VOCAB, depth=12, max_seq_len=SEQ)).cuda().eval()
    out = {}
    for batch in (64, 128, 256):
        prompts = [torch.randint(0, VOCAB, (int(n),)).tolist() for n in torch.randint(32, 65, (batch,))]
        g = torch.Generator(device="cuda").manual_seed(0)
        model.generate(prompts[:8], 8, temperature=1.0, generator=g)  # warm-up: kernels, allocator
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(prompts, 128, temperature=1.0, generator=g, use_cache=True)
        torch.cuda.synchronize()
        out[f"batch{batch}"] = {"tokens_per_s": round(batch * 128 / (time.perf_counter() - start))}
    return out


def pipeline_part() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "tiny.yaml"
        text = (ROOT / "configs" / "tiny.yaml").read_text()
        config.write_text(text)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "-c", str(config)], cwd=tmp, env=env,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - start
        result = {"exit_code": proc.returncode, "seconds": round(seconds, 1)}
        if proc.returncode:
            result["error"] = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:]
            return result
        # the training loop logs "train on <device> (...)": every training stage must have run on CUDA
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if " train on " in ln]
        result["training_runs"] = len(lines)
        result["training_runs_on_cuda"] = sum(" train on cuda" in ln for ln in lines)
        manifests = sorted(Path(tmp).glob("models/pretrain/*/manifest.json"))
        if manifests:
            metrics = json.loads(manifests[-1].read_text()).get("metrics", {})
            result["pretrain_mfu"], result["pretrain_tokens_per_s"] = metrics.get("mfu"), metrics.get("tokens_per_s")
        return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="training steps per measurement (a third are warm-up)")
    p.add_argument("--skip-pipeline", action="store_true")
    p.add_argument("--budget", type=float, default=290, help="seconds: a part not started by then is skipped")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}); nothing to measure")
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name()
    report: dict = {"device": name, "peak_bf16_flops": lookup_peak(name), "torch": torch.__version__}
    began = time.perf_counter()
    # cheapest and most telling first: a later part is skipped once the budget is spent
    parts = {"generation": generation_part}
    if not args.skip_pipeline:
        parts["pipeline"] = pipeline_part
    parts["pretrain"] = lambda: pretrain_part(args.steps, began + args.budget)
    parts["stage_loop"] = lambda: stage_loop_part(args.steps)
    for part, run in parts.items():
        start = time.perf_counter()
        if start - began > args.budget:
            report[part] = {"skipped": f"time budget of {args.budget:.0f}s spent"}
            continue
        try:
            report[part] = run()
        except Exception as e:  # noqa: BLE001 - one failing path must not hide the others' figures
            report[part] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc().splitlines()[-3:]}
        report[part + "_seconds"] = round(time.perf_counter() - start, 1)
        print(f"gpu_check: {part} done in {report[part + '_seconds']}s", file=sys.stderr, flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
