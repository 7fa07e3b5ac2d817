"""Eval: held-out accuracy of a model on the prompts stage's eval split (reasoning-gym verifiers).

Per prompt (the first `max_prompts_per_task` of each task, in table order): one greedy
completion (pass@1) and k samples at `temperature` (pass@k). A sample is correct when its
verifier gives full credit (reward 1.0, `tasks.core.rollout.is_correct`).

- pass_at_1: fraction of prompts whose greedy completion is correct.
- pass_at_k: fraction of prompts with at least one correct sample out of k (the unbiased
  estimator 1 - C(n-c, k)/C(n, k) at n = k).
- sampled_pass_at_1: mean fraction of correct samples (the unbiased pass@1 estimate at temperature).
- completion_tokens: mean greedy completion length in generated tokens (<|end|> included when emitted).

Each is logged per task (`pass_at_1.<task>`) and as the mean over tasks (each task weighs the
same). Output table `results`, one row per prompt. The model input is any training-stage
output (`<path>/model/` with weights, config and tokenizer).
"""

from __future__ import annotations

import polars as pl
from pydantic import Field

from tasks.core import chat
from tasks.core.rollout import Sampling, count_overlong, generation_metrics, prompts_and_policy, score_prompts
from tasks.core.settings import Device, device_setting
from tasks.core.stage import Stage, StageConfig, StageContext, log
from tasks.core.store import Artifact, write_parquet

VERSION = 1
MEASURES = ("pass_at_1", "pass_at_k", "sampled_pass_at_1", "completion_tokens")


class EvalConfig(StageConfig, Sampling):
    split: str = Field("eval", description="which prompts table to evaluate on")
    max_prompts_per_task: int | None = Field(100, ge=1, description="first N prompts of each task (None: all)")
    k: int = Field(4, ge=1, description="samples per prompt for pass@k")
    temperature: float = Field(0.8, gt=0, description="sampling temperature of the k samples (greedy is separate)")
    device: Device = device_setting()


def summarize(results: pl.DataFrame) -> dict[str, float]:
    """Per-task and over-task-mean metrics from a results table (also used by tests)."""
    per_task = (
        results.group_by("task")
        .agg(
            pass_at_1=pl.col("greedy_correct").cast(pl.Float64).mean(),
            pass_at_k=(pl.col("samples_correct") > 0).cast(pl.Float64).mean(),
            sampled_pass_at_1=(pl.col("samples_correct") / pl.col("k")).mean(),
            completion_tokens=pl.col("completion_tokens").cast(pl.Float64).mean(),
            prompts=pl.len(),
        )
        .sort("task")
    )
    metrics: dict[str, float] = {}
    for row in per_task.iter_rows(named=True):
        for m in (*MEASURES, "prompts"):
            metrics[f"{m}.{row['task']}"] = row[m]
    for m in MEASURES:
        metrics[m] = float(per_task[m].mean())
    metrics["prompts"] = len(results)
    metrics["tasks"] = len(per_task)
    return metrics


def evaluate(cfg: EvalConfig, inputs: dict[str, Artifact], ctx: StageContext) -> dict:
    rows, model, tok = prompts_and_policy("eval", inputs, cfg.split, cfg.max_prompts_per_task, cfg.device)
    overlong = count_overlong(model, tok, rows, cfg.max_completion_length, ctx.instance)

    sampling = cfg.sampling()
    greedy = score_prompts(model, tok, rows, 1, sampling, greedy=True, progress=ctx.progress)
    samples = score_prompts(model, tok, rows, cfg.k, sampling, progress=ctx.progress)
    texts = [t[0] for t in greedy.texts]
    results = pl.DataFrame({
        "prompt_id": [r["id"] for r in rows],
        "task": [r["task"] for r in rows],
        "greedy_completion": texts,
        "greedy_answer": [chat.extract_answer(t) for t in texts],
        "greedy_score": [r[0] for r in greedy.rewards],
        "greedy_correct": [c == 1 for c in greedy.correct],
        "samples_correct": samples.correct,
        "k": [cfg.k] * len(rows),
        "completion_tokens": [len(c[0]) for c in greedy.completions],
    }, schema_overrides={"samples_correct": pl.Int32, "k": pl.Int32, "completion_tokens": pl.Int32})
    write_parquet(results.to_arrow(), ctx.out / "results" / "part-00000.parquet")
    metrics = {**summarize(results), **generation_metrics(greedy, samples), **overlong}
    tasks = sorted(k.split(".", 1)[1] for k in metrics if k.startswith("pass_at_1."))
    log.info("%s: held-out greedy pass@1 %.3f (%s), sampled pass@1 %.3f, pass@%d %.3f, %d prompts", ctx.instance,
             metrics["pass_at_1"], ", ".join(f"{t} {metrics[f'pass_at_1.{t}']:.3f}" for t in tasks),
             metrics["sampled_pass_at_1"], cfg.k, metrics["pass_at_k"], len(results))
    return {"rows": {"results": len(results)}, "metrics": metrics}


STAGE = Stage("eval", VERSION, EvalConfig, evaluate, family="eval", report_metrics=("pass_at_1", "sampled_pass_at_1", "pass_at_k", "completion_tokens"))
