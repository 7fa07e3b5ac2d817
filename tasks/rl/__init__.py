"""RL with verifiable rewards: GRPO from the SFT model, with online difficulty filtering.

What this GRPO keeps and drops, against DAPO and Dr. GRPO: it keeps DAPO's clip-higher (epsilon_high
0.28), token-level loss (loss_type dapo), overlong masking and dynamic sampling (filter mixed, the
balanced band, or variance for partial-credit rewards), and Dr. GRPO's choice of no KL (beta 0); it
keeps GRPO's std scaling of the advantages (scale_rewards group, which Dr. GRPO drops) and drops
DAPO's soft overlong punishment. Unlike verl's dynamic sampling, passing groups beyond a full batch
are trained by the next step instead of being thrown away (at most one step stale).

The loop lives in `tasks.rl.loop`; this stage reads the SFT model and the prompts (optionally
only those a difficulty table kept), runs it, and writes the model, the `history` table (every
drawn group: the step that trains it, the step that drew it, prompt, verifier pass rate, kept,
sample completions) and the `steps` table (metrics per step, the same step numbers), then logs and
registers the model in MLflow as `slmflow-rl`.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from pydantic import Field

from tasks.core.outputs import kept_ids, load_prompts, model_dir, model_out
from tasks.core.rollout import count_overlong, load_policy, resolve_device, take_per_task
from tasks.core.stage import Stage, StageConfig, StageContext, StageError, new_figure
from tasks.core.store import Artifact, copy_file, write_parquet
from tasks.core.tokens import TOKENIZER_FILE
from tasks.rl.config import GRPOConfig

VERSION = 4  # 2: TRL's setting names, 1-based steps in the history table; 3: band (0.2, 0.8), overflow groups;
# 4: the loop's own held-out check is `check_pass_at_1` (eval_rl's `pass_at_1` is the card's number)
# carried to the next step and refills sized to what is missing, log-probs at the sampling temperature,
# pass rates from the verifier alone, filter variance
REGISTERED_MODEL = "slmflow-rl"


class RLConfig(StageConfig, GRPOConfig):
    use_difficulty: bool = Field(False, description="train only on prompts kept by the difficulty table")
    eval_prompts_per_task: int = Field(100, gt=0, description="held-out prompts per task of the loop's own greedy "
                                       "check, `check_pass_at_1` (the card's held-out number is eval_rl's pass_at_1)")


def rl_curve_figure(history: list[dict], title: str):
    """Mean reward and kept fraction per step, and held-out greedy pass@1 at each eval."""
    fig, ax = new_figure()
    for key, style in (("reward_mean", "-"), ("kept_fraction", ":"), ("check_pass_at_1", "o-")):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points), style, label=key)
    ax.set(xlabel="step", title=title)
    ax.legend()
    return fig


def rl(cfg: RLConfig, inputs: dict[str, Artifact], ctx: StageContext) -> dict:
    import torch  # here, not at the top: the pipeline imports every stage's config, data-only runs included

    from tasks.core.model import save_model
    from tasks.rl.loop import grpo, history_table

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model, tok = load_policy(inputs["model"], device)
    rows = load_prompts(inputs["prompts"], "train")
    if cfg.use_difficulty:
        if "difficulty" not in inputs:
            raise StageError("rl.use_difficulty is set but the stage got no difficulty table")
        keep = kept_ids(inputs["difficulty"])
        rows = [r for r in rows if r["id"] in keep]
    if not rows:
        raise StageError("rl: no training prompts (check prompts sizes and rl.use_difficulty)")
    eval_rows = take_per_task(load_prompts(inputs["prompts"], "eval"), cfg.eval_prompts_per_task)
    overlong = {f"train_{k}": v for k, v in count_overlong(model, tok, rows, cfg.max_completion_length, "rl").items()}

    state = grpo(model, tok, rows, eval_rows, cfg, ctx.work_dir(), device,
                 log_step=lambda step, metrics: ctx.log_history([(step, metrics)]), mirror=ctx.work_mirror)
    history, table = state.history, history_table(ctx.work_dir())
    write_parquet(table.to_arrow(), ctx.out / "history" / "part-00000.parquet")
    # timings stay out of the stored table (MLflow has them), so the same config gives the same bytes on CPU;
    # every row is read for the schema: a metric can be missing from some steps (reward_mean when nothing was drawn)
    steps = pl.DataFrame(history, infer_schema_length=None)
    write_parquet(steps.drop(["generation_seconds", "train_seconds", "generated_tokens_per_s"], strict=False).to_arrow(),
                  ctx.out / "steps" / "part-00000.parquet")
    save_model(model, model_out(ctx.out))
    ctx.log_figure(rl_curve_figure(history, ctx.instance), "rl_curve")
    copy_file(f"{model_dir(inputs['model'])}/{TOKENIZER_FILE}", model_out(ctx.out) / TOKENIZER_FILE)
    info = {}
    if ctx.tracker and ctx.run_id:
        model_info = inputs["model"].manifest.get("info", {})
        if model_info.get("mlflow_model_id"):
            ctx.tracker.log_model_input(ctx.run_id, model_info["mlflow_model_id"])
        info["mlflow_model_id"] = ctx.tracker.log_model(ctx.run_id, model_out(ctx.out), ctx.instance, step=state.step)
        info["registered_version"] = ctx.tracker.register_model(info["mlflow_model_id"], ctx.run_id, REGISTERED_MODEL)
    rewards = [h["reward_mean"] for h in history if "reward_mean" in h]
    evals = [h["check_pass_at_1"] for h in history if "check_pass_at_1" in h]
    metrics = {
        "steps": state.step, "resumed_from_step": state.resumed_from,
        "reward_first": float(np.mean(rewards[:3])) if rewards else 0.0,
        "reward_last": float(np.mean(rewards[-3:])) if rewards else 0.0, "reward_best": max(rewards, default=0.0),
        "check_pass_at_1_start": evals[0] if evals else 0.0, "check_pass_at_1": evals[-1] if evals else 0.0,
        "kept_fraction": float(np.mean([h["kept_fraction"] for h in history if "kept_fraction" in h] or [0])),
        "train_prompts": len(rows), **overlong,
    }
    return {"rows": {"history": len(table), "steps": len(history)}, "metrics": metrics, "info": info}


STAGE = Stage("rl", VERSION, RLConfig, rl, store="models", family="rl",
              report_metrics=("reward_first", "reward_last", "kept_fraction"))  # held-out pass@1: eval_rl's row
