"""Does SFT learn as fast from the pretrained base as from random init? Two-digit addition, same loop.

SFT (tasks.core.train, the pipeline's loop and packing) on reasoning-gym two-digit addition from each
start, at equal settings and steps, then held-out and training greedy pass@1; beside each start,
the two numbers of `tasks.core.model.activation_scale` (how much the residual stream has grown over
the embeddings, the largest attention logit). Starts:

  pretrained   the config's pretrained base (computed first with the pipeline if missing)
  random       a fresh model of the same shape (the same init as pretraining's)
  a model dir  any saved model (`<store>/pretrain/<key>/model`) with the same tokenizer

Prints ONE JSON object: {"settings": {...}, "starts": {name: {"heldout_pass_at_1", "heldout_se",
"train_pass_at_1", "final_loss", "seconds", "residual_growth", "max_attention_logit"}}}

  python benchmarks/sft_start.py                                   # default config, 800 steps
  python benchmarks/sft_start.py --set pretrain.lr=0.003           # the old default's base
  python benchmarks/sft_start.py --starts pretrained models/pretrain/KEY/model --steps 400
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
from flows.config import load_config  # noqa: E402
from flows.pipeline import make_plan, pipeline  # noqa: E402
from flows.report import standard_error  # noqa: E402
from tasks import prompts  # noqa: E402
from tasks.core.chat import completion_text, example_ids  # noqa: E402
from tasks.core.configs import TrainConfig  # noqa: E402
from tasks.core.model import GPT, activation_scale, load_model, save_model  # noqa: E402
from tasks.core.outputs import load_prompts  # noqa: E402
from tasks.core.rollout import Sampling, score_prompts  # noqa: E402
from tasks.core.stage import run_stage  # noqa: E402
from tasks.core.store import Store  # noqa: E402
from tasks.core.tokens import BOS, PAD, load_tokenizer, special_ids  # noqa: E402
from tasks.core.train import TrainSpec, train  # noqa: E402
from tasks.sft import pack_examples  # noqa: E402

ADDITION = {"basic_arithmetic": {"min_terms": 2, "max_terms": 2, "min_digits": 2, "max_digits": 2, "operators": ["+"],
                                 "allow_parentheses": False, "allow_negation": False}}


def pass_at_1(model, tok, rows) -> float:
    scored = score_prompts(model, tok, rows, 1, Sampling(max_completion_length=8), greedy=True)
    return float(np.mean([c == 1 for c in scored.correct]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--set", action="append", default=[], help="config override, stage.field=value")
    ap.add_argument("--starts", nargs="+", default=["pretrained", "random"])
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--train-size", type=int, default=1000, help="problems generated (about 940 remain after dedup)")
    ap.add_argument("--eval-size", type=int, default=200)
    args = ap.parse_args()

    cfg = load_config(args.config, args.set)
    key = make_plan(cfg).stages["pretrain"].key
    models = Store(cfg.run.models_root)
    if models.get("pretrain", key) is None:
        pipeline(cfg.model_dump(mode="json"), ["pretrain"])
    base_dir = f"{models.get('pretrain', key).path}/model"
    tok = load_tokenizer(base_dir)
    specials = special_ids(tok)

    root = Path(tempfile.mkdtemp(prefix="slmflow-sft-start-"))
    problems = run_stage(prompts.STAGE, prompts.PromptsConfig(tasks=ADDITION, train_size=args.train_size,
                                                              eval_size=args.eval_size), {}, Store(root)).artifact
    train_rows, eval_rows = load_prompts(problems, "train"), load_prompts(problems, "eval")
    examples = [example_ids(tok, r["question"], completion_text(r["answer"])) for r in train_rows]
    # rows as long as the longest example (one example per row, ~21 tokens): the set-up, and fast
    tokens, mask, _ = pack_examples(examples, max(len(ids) for ids, _ in examples) - 1, specials[PAD])
    np.save(root / "train.npy", tokens)
    np.save(root / "mask.npy", mask)
    probe = torch.from_numpy(tokens[:8, :-1].astype(np.int64))

    out = {}
    for i, start in enumerate(args.starts):
        if start == "random":
            torch.manual_seed(cfg.pretrain.seed)
            save_model(GPT(load_model(base_dir).config), root / "random")
            (root / "random" / "tokenizer.json").write_text(Path(base_dir, "tokenizer.json").read_text())
        model_dir = {"pretrained": base_dir, "random": str(root / "random")}.get(start, start)
        start_model = load_model(model_dir).eval()
        scale = activation_scale(start_model, probe)
        train_cfg = TrainConfig(batch_size=args.batch_size, max_steps=args.steps, lr=args.lr, schedule="linear",
                                warmup_steps=10, eval_every=10**6, checkpoint_every=10**6, log_every=50)
        spec = TrainSpec(cfg=train_cfg, model=start_model.config, init_from=model_dir,
                         train_path=str(root / "train.npy"), train_mask_path=str(root / "mask.npy"),
                         pad_id=specials[PAD], segment_bos_id=specials[BOS], out=str(root / f"out-{i}"),
                         work=str(root / f"work-{i}"))
        t0 = time.perf_counter()
        result = train(spec)
        tuned = load_model(root / f"out-{i}").eval()
        held = pass_at_1(tuned, tok, eval_rows)
        out[start] = {"heldout_pass_at_1": round(held, 4), "heldout_se": round(standard_error(held, len(eval_rows)), 4),
                      "train_pass_at_1": round(pass_at_1(tuned, tok, train_rows[:200]), 4),
                      "final_loss": round(result["train_loss"], 4), "seconds": round(time.perf_counter() - t0, 1),
                      **{k: round(v, 2) for k, v in scale.items()}}
        print(start, json.dumps(out[start]), file=sys.stderr, flush=True)
    settings = {"config": args.config, "set": args.set, "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size,
                "train_problems": len(train_rows), "eval_prompts": len(eval_rows), "base_model": key}
    print(json.dumps({"settings": settings, "starts": out}, indent=1))


if __name__ == "__main__":
    main()
