"""RL with verifiable rewards: GRPO from the SFT model, with online difficulty filtering.

Each step draws prompts, samples `num_generations` (G) completions per prompt with the current
policy (batched, KV cache), scores them with the task verifiers, and keeps the groups the
`filter` allows: `none` (plain GRPO), `mixed` (0 < pass rate < 1, DAPO's dynamic sampling) or
`balanced` (pass rate strictly inside `band`, "Online Difficulty Filtering"). It refills with new
prompts until the batch has `batch_prompts` groups or `max_generation_rounds` rounds are used
(then it trains on what it has and logs the shortfall). Loss: clipped policy gradient with
`eps_low`/`eps_high`, `loss_type` grpo | dr_grpo | dapo, optional KL to the start model (`beta`).
Every drawn group lands in a `history` table (step, prompt, pass rate, kept, sample completions).
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import time
from typing import Literal

import numpy as np
import polars as pl
import torch
from pydantic import Field

from tasks.core import chat
from tasks.core.grpo import fill_batch, group_advantages, policy_loss, token_logprobs
from tasks.core.model import save_model
from tasks.core.orchestration import stage_task
from tasks.core.outputs import kept_ids, load_prompts
from tasks.core.rollout import (
    end_id,
    is_correct,
    load_policy,
    resolve_device,
    sample_completions,
    score_completions,
    take_per_task,
)
from tasks.core.stage import Stage, StageConfig, StageContext, StageError, new_figure
from tasks.core.store import Artifact, write_parquet
from tasks.core.tokens import PAD, special_ids
from tasks.core.train import BatchOrder, checkpoint_state, checkpoints, load_checkpoint, save_checkpoint

VERSION = 1
log = logging.getLogger("slmflow")


class RLConfig(StageConfig):
    steps: int = Field(30, gt=0, description="optimizer steps (one batch of groups each)")
    max_generated_samples: int | None = Field(None, gt=0, description="generation budget: stop once this many "
                                              "completions were sampled (compare filters at equal cost)")
    batch_prompts: int = Field(16, gt=0, description="groups (prompts) per training batch")
    num_generations: int = Field(8, ge=2, description="G: completions per prompt")
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = None
    max_new_tokens: int = Field(16, gt=0)
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eps_low: float = Field(0.2, ge=0, description="TRL epsilon")
    eps_high: float = Field(0.28, ge=0, description="TRL epsilon_high (DAPO clip-higher)")
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    beta: float = Field(0.0, ge=0, description="KL weight to the frozen start model")
    updates_per_batch: int = Field(1, gt=0, description="1 = fully on-policy (ratio exactly 1)")
    mask_truncated_completions: bool = True
    format_reward: float = Field(0.0, ge=0, description="bonus for a completion that contains 'Answer:'")
    filter: Literal["none", "mixed", "balanced"] = "balanced"
    band: tuple[float, float] = (0.1, 0.9)
    oversample: float = Field(2.0, ge=1, description="prompts drawn per round = batch_prompts x oversample")
    max_generation_rounds: int = Field(4, gt=0)
    use_difficulty: bool = Field(False, description="train only on prompts kept by the difficulty table")
    eval_every: int = Field(10, gt=0)
    eval_prompts_per_task: int = Field(30, gt=0)
    checkpoint_every: int = Field(10, gt=0)
    history_samples: int = Field(2, ge=0, description="completions per group stored in the history")
    batch_size: int = Field(128, gt=0, description="sequences per generation batch")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0


def rollout_batch(model, tok, rows, cfg: RLConfig, seed: int):
    """G completions per row, their rewards [n, G] and texts."""
    completions = sample_completions(model, tok, rows, cfg.num_generations, cfg.temperature, cfg.top_k,
                                     cfg.max_new_tokens, cfg.batch_size, seed)
    texts, rewards = score_completions(tok, rows, completions)
    rewards = np.array(rewards, dtype=np.float64)
    if cfg.format_reward:
        rewards += cfg.format_reward * np.array([["Answer:" in t for t in ts] for ts in texts])
    return completions, texts, rewards


def training_batch(tok, rows, completions, end: int, pad: int, mask_truncated: bool):
    """Right-padded prompt+completion ids and the completion mask (truncated ones masked if asked)."""
    seqs, masks = [], []
    for row, group in zip(rows, completions):
        prompt = chat.prompt_ids(tok, row["question"])
        for ids in group:
            keep = 0 if (mask_truncated and (not ids or ids[-1] != end)) else 1
            seqs.append(prompt + list(ids))
            masks.append([0] * len(prompt) + [keep] * len(ids))
    width = max(map(len, seqs))
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    mask = torch.tensor([m + [0] * (width - len(m)) for m in masks])
    return ids, mask


def greedy_pass_rate(model, tok, rows, cfg: RLConfig) -> float:
    completions = sample_completions(model, tok, rows, 1, 0.0, None, cfg.max_new_tokens, cfg.batch_size, cfg.seed)
    _, rewards = score_completions(tok, rows, completions)
    return float(np.mean([is_correct(r[0]) for r in rewards]))


def rl_curve_figure(history: list[dict], title: str):
    """Mean reward and kept fraction per step, and held-out greedy pass@1 at each eval."""
    fig, ax = new_figure()
    for key, style in (("reward_mean", "-"), ("kept_fraction", ":"), ("eval_pass_at_1", "o-")):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points), style, label=key)
    ax.set(xlabel="step", title=title)
    ax.legend()
    return fig


def rl(cfg: RLConfig, inputs: dict[str, Artifact], ctx: StageContext) -> dict:
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model, tok = load_policy(inputs["model"], device)
    model.train()
    ref = copy.deepcopy(model).eval() if cfg.beta > 0 else None
    end, pad = end_id(tok), special_ids(tok)[PAD]
    rows = load_prompts(inputs["prompts"], "train")
    if cfg.use_difficulty:
        if "difficulty" not in inputs:
            raise StageError("rl.use_difficulty is set but the stage got no difficulty table")
        keep = kept_ids(inputs["difficulty"])
        rows = [r for r in rows if r["id"] in keep]
    if not rows:
        raise StageError("rl: no training prompts (check prompts sizes and rl.use_difficulty)")
    eval_rows = take_per_task(load_prompts(inputs["prompts"], "eval"), cfg.eval_prompts_per_task)
    order = BatchOrder(len(rows), 1, cfg.seed)  # the training loop's order: resumable from a cursor
    opt = model.configure_optimizer(cfg.lr, cfg.weight_decay, (0.9, 0.99), fused=device.type == "cuda")

    work = ctx.work_dir()
    step, history, cursor, generated_samples = 0, [], 0, 0
    if found := checkpoints(work):
        step, history = load_checkpoint(found[-1], model, opt)
        state = checkpoint_state(found[-1])
        cursor, generated_samples = state["cursor"], state["generated_samples"]
        log.info("rl: resuming from %s (step %d)", found[-1].name, step)
    resumed_from = step
    samples: list[dict] = []  # history table rows (kept in the checkpoint's state via `history`)
    per_round = max(cfg.batch_prompts, math.ceil(cfg.batch_prompts * cfg.oversample))
    if step == 0:
        history.append({"step": 0, "eval_pass_at_1": greedy_pass_rate(model.eval(), tok, eval_rows, cfg)})
        model.train()

    budget = cfg.max_generated_samples or math.inf
    while step < cfg.steps and generated_samples < budget:
        t0 = time.perf_counter()
        drawn: dict[str, tuple] = {}
        model.eval()

        def draw_round(r: int):
            nonlocal cursor
            batch = [rows[i] for i in order.take(cursor, per_round if cfg.filter != "none" else cfg.batch_prompts)]
            cursor += len(batch)
            completions, texts, rewards = rollout_batch(model, tok, batch, cfg, seed=cfg.seed * 1_000_003 + step * 101 + r)
            ids = [f"{step}:{r}:{i}" for i in range(len(batch))]
            for gid, row, c, t, rw in zip(ids, batch, completions, texts, rewards):
                drawn[gid] = (row, c, t, rw)
            return ids, rewards

        fill = fill_batch(draw_round, cfg.batch_prompts, cfg.filter, cfg.band, cfg.max_generation_rounds)
        gen_seconds = time.perf_counter() - t0
        model.train()
        kept = set(fill.group_ids)
        for gid, (row, _, texts, rewards) in drawn.items():
            pass_rate = float(np.mean([is_correct(x) for x in rewards]))
            for s in range(min(cfg.history_samples, len(texts))):
                samples.append({"step": step, "prompt_id": row["id"], "task": row["task"], "sample": s,
                                "completion": texts[s], "reward": float(rewards[s]), "pass_rate": pass_rate,
                                "kept": gid in kept})
        metrics = {"reward_mean": float(np.mean([d[3] for d in drawn.values()])),
                   "kept_fraction": fill.stats["kept_fraction"],
                   "zero_variance_fraction": fill.stats["zero_variance_fraction"],
                   "generation_rounds": fill.rounds_used, "shortfall": float(fill.shortfall),
                   "generation_seconds": gen_seconds}
        if fill.shortfall:
            log.info("rl: step %d kept %d of %d groups after %d rounds", step, len(kept), cfg.batch_prompts, fill.rounds_used)
        generated = sum(len(c) for d in drawn.values() for c in d[1])
        generated_samples += len(drawn) * cfg.num_generations
        metrics["generated_samples"] = generated_samples
        metrics["generated_tokens_per_s"] = generated / max(gen_seconds, 1e-9)

        t1 = time.perf_counter()
        if fill.group_ids:
            batch_rows = [drawn[g][0] for g in fill.group_ids]
            ids, mask = training_batch(tok, batch_rows, [drawn[g][1] for g in fill.group_ids], end, pad,
                                       cfg.mask_truncated_completions)
            ids, mask = ids.to(device), mask.to(device)
            adv = group_advantages(torch.tensor(fill.rewards, dtype=torch.float32), cfg.scale_rewards).flatten().to(device)
            with torch.no_grad():
                old = token_logprobs(model, ids, mask) if cfg.updates_per_batch > 1 else None
                ref_lp = token_logprobs(ref, ids, mask) if ref is not None else None
            for _ in range(cfg.updates_per_batch):
                lp = token_logprobs(model, ids, mask)
                loss, stats = policy_loss(lp, lp.detach() if old is None else old, adv, mask, eps_low=cfg.eps_low,
                                          eps_high=cfg.eps_high, loss_type=cfg.loss_type,
                                          max_completion_len=cfg.max_new_tokens, ref_logprobs=ref_lp, beta=cfg.beta)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
            metrics.update({k: v for k, v in stats.items() if v == v})  # drop NaN stats
        metrics["train_seconds"] = time.perf_counter() - t1
        step += 1
        last_step = step == cfg.steps or generated_samples >= budget
        if step % cfg.eval_every == 0 or last_step:
            metrics["eval_pass_at_1"] = greedy_pass_rate(model.eval(), tok, eval_rows, cfg)
            model.train()
        history.append({"step": step, **metrics})
        ctx.log_history([(step, metrics)])
        log.info("rl step %d/%d reward %.3f kept %.2f gen %.1fs train %.1fs", step, cfg.steps,
                 metrics["reward_mean"], metrics["kept_fraction"], gen_seconds, metrics["train_seconds"])
        if step % cfg.checkpoint_every == 0 and step < cfg.steps:
            # samples first: a crash between the two redoes these steps (same seeds, same file names)
            write_parquet(pl.DataFrame(samples).to_arrow(), work / f"samples-{step:06d}.parquet")
            save_checkpoint(work, step, model, opt, history, extra={"cursor": cursor, "generated_samples": generated_samples})
            samples = []

    if samples:
        write_parquet(pl.DataFrame(samples).to_arrow(), work / f"samples-{step:06d}.parquet")
    parts = sorted(work.glob("samples-*.parquet"))
    table = pl.concat([pl.read_parquet(p) for p in parts]) if parts else pl.DataFrame()
    write_parquet(table.to_arrow(), ctx.out / "history" / "part-00000.parquet")
    write_parquet(pl.DataFrame(history).drop(["generation_seconds", "train_seconds", "generated_tokens_per_s"],
                                             strict=False).to_arrow(), ctx.out / "steps" / "part-00000.parquet")
    save_model(model, ctx.out / "model")
    ctx.log_figure(rl_curve_figure(history, ctx.stage), "rl_curve")
    shutil.copy(f"{inputs['model'].path}/model/tokenizer.json", ctx.out / "model" / "tokenizer.json")
    rewards = [h["reward_mean"] for h in history if "reward_mean" in h]
    evals = [h["eval_pass_at_1"] for h in history if "eval_pass_at_1" in h]
    info = {}
    if ctx.tracker and ctx.run_id:
        model_info = inputs["model"].manifest.get("info", {})
        if model_info.get("mlflow_model_id"):
            ctx.tracker.log_model_input(ctx.run_id, model_info["mlflow_model_id"])
        info["mlflow_model_id"] = ctx.tracker.log_model(ctx.run_id, ctx.out / "model", "rl", step=step)
        info["registered_version"] = ctx.tracker.register_model(info["mlflow_model_id"], ctx.run_id, "slmflow-rl")
    metrics = {
        "steps": step, "resumed_from_step": resumed_from, "reward_first": float(np.mean(rewards[:3])) if rewards else 0.0,
        "reward_last": float(np.mean(rewards[-3:])) if rewards else 0.0, "reward_best": max(rewards, default=0.0),
        "eval_pass_at_1_start": evals[0] if evals else 0.0, "eval_pass_at_1": evals[-1] if evals else 0.0,
        "kept_fraction": float(np.mean([h["kept_fraction"] for h in history if "kept_fraction" in h] or [0])),
        "train_prompts": len(rows),
    }
    return {"rows": {"history": len(table), "steps": len(history)}, "metrics": metrics, "info": info}


STAGE = Stage("rl", VERSION, RLConfig, rl, store="models", family="rl",
              report_metrics=("reward_first", "reward_last", "eval_pass_at_1", "kept_fraction"))
rl_task = stage_task(STAGE)
