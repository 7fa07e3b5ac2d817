"""Which reasoning-gym tasks the base model learns by SFT, and how fast: held-out greedy pass@1 per task
against SFT steps, beside each task's constant-answer baseline measured on the same eval prompts.

Runs the pipeline's own prompts, sft and eval stages (into a store under `--root`, the config's
stores untouched) from the config's pretrained base model and tokenizer; missing ones are computed
first with the pipeline (`slmflow run --only pretrain`). Every SFT run uses the config's `sft`
settings with `max_steps` set to each `--steps` value (so each is its own schedule, as the
pipeline would run it), and the config's `eval` settings with `--max-completion-length`.

Prints ONE JSON object:
  {"settings": {...},
   "tasks": {task: {"train_problems", "eval_prompts", "constant_answer", "pass_at_1": {steps: p},
                    "se": {steps: se}}},
   "mean": {"constant_answer", "pass_at_1": {steps: p}, "se": {steps: se}},
   "sft_seconds": {steps: s}}

  python benchmarks/sft_tasks.py --steps 200 600
  python benchmarks/sft_tasks.py --tasks '{"aiw": {"max_entities": 9}}' --set sft.lr=3e-3

The base corpus holds a few hundred problems of 15 reasoning-gym tasks (ingest's reasoning_gym
source, decontaminated against the config's own eval prompts, not against these): a task among them
may have seen some of its eval questions in pretraining.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flows.config import load_config  # noqa: E402
from flows.pipeline import make_plan, pipeline  # noqa: E402
from flows.report import mean_standard_error, standard_error  # noqa: E402
from tasks import eval as evaluation  # noqa: E402
from tasks import prompts, sft  # noqa: E402
from tasks.core.rollout import constant_answer_baseline  # noqa: E402
from tasks.core.stage import run_stage  # noqa: E402
from tasks.core.store import Store  # noqa: E402

TASKS = {  # the default tasks, and two of the old defaults (small problem spaces) beside them
    **prompts.DEFAULT_TASKS,
    "gcd": {"min_numbers": 2, "max_numbers": 2, "min_value": 1, "max_value": 30},
    "leg_counting": {"min_animals": 1, "max_animals": 2, "min_instances": 1, "max_instances": 4},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--set", action="append", default=[], help="config override, stage.field=value")
    ap.add_argument("--tasks", default=None, help="JSON {task: generator kwargs} (default: TASKS)")
    ap.add_argument("--steps", type=int, nargs="+", default=[200, 600])
    ap.add_argument("--train-size", type=int, default=2000)
    ap.add_argument("--eval-size", type=int, default=150)
    ap.add_argument("--seq-len", type=int, default=96, help="sft.seq_len (long questions need more than 64)")
    ap.add_argument("--max-completion-length", type=int, default=32)
    ap.add_argument("--root", default=None, help="store of this benchmark's outputs (default: a temp dir)")
    args = ap.parse_args()
    tasks = json.loads(args.tasks) if args.tasks else TASKS

    cfg = load_config(args.config, args.set)
    plan = make_plan(cfg)
    data, models = Store(cfg.run.data_root), Store(cfg.run.models_root)
    keys = {s: plan.stages[s].key for s in ("pretrain", "tokenizer")}
    if models.get("pretrain", keys["pretrain"]) is None:
        pipeline(cfg.model_dump(mode="json"), ["pretrain"])
    base, tokenizer = models.get("pretrain", keys["pretrain"]), data.get("tokenizer", keys["tokenizer"])

    root = Path(args.root or tempfile.mkdtemp(prefix="slmflow-sft-tasks-"))
    mine = Store(root)
    problems = run_stage(prompts.STAGE, prompts.PromptsConfig(tasks=tasks, train_size=args.train_size,
                                                              eval_size=args.eval_size), {}, mine).artifact
    eval_cfg = cfg.eval.model_copy(update={"max_completion_length": args.max_completion_length,
                                           "max_prompts_per_task": None})
    baseline = constant_answer_baseline(problems, eval_cfg.split, None)
    out = {t: {"train_problems": problems.manifest["metrics"][f"train.{t}"], "eval_prompts": baseline[t]["prompts"],
               "constant_answer": baseline[t]["pass_at_1"], "pass_at_1": {}, "se": {}} for t in sorted(tasks)}
    mean = {"constant_answer": sum(b["pass_at_1"] for b in baseline.values()) / len(baseline), "pass_at_1": {}, "se": {}}
    seconds = {}
    for steps in args.steps:
        sft_cfg = sft.SFTConfig.model_validate({**cfg.sft.model_dump(), "max_steps": steps, "seq_len": args.seq_len})
        tuned = run_stage(sft.STAGE, sft_cfg, {"model": base, "prompts": problems, "tokenizer": tokenizer}, mine)
        seconds[steps] = round(tuned.seconds, 1)
        metrics = run_stage(evaluation.STAGE, evaluation.EvalConfig.model_validate(eval_cfg.model_dump()),
                            {"model": tuned.artifact, "prompts": problems}, mine).artifact.manifest["metrics"]
        ps, ns = [metrics[f"pass_at_1.{t}"] for t in out], [row["eval_prompts"] for row in out.values()]
        for (t, row), p in zip(out.items(), ps):
            row["pass_at_1"][steps] = round(p, 4)
            row["se"][steps] = round(standard_error(p, row["eval_prompts"]), 4)
        mean["pass_at_1"][steps] = round(metrics["pass_at_1"], 4)
        mean["se"][steps] = round(mean_standard_error(ps, ns), 4)
    settings = {"config": args.config, "set": args.set, "tasks": tasks, "steps": args.steps, "seq_len": args.seq_len,
                "train_size": args.train_size, "eval_size": args.eval_size, "sft_lr": cfg.sft.lr,
                "sft_batch_size": cfg.sft.batch_size, "base_model": base.key, "root": str(root)}
    print(json.dumps({"settings": settings, "tasks": out, "mean": mean, "sft_seconds": seconds}, indent=1))


if __name__ == "__main__":
    main()
