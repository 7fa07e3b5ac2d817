"""The GRPO training loop, the RL counterpart of `tasks.core.train`: draw prompts, sample a group of
completions per prompt, keep the groups the online filter allows, update the policy, checkpoint.

Each step first takes the groups carried over from the previous step (below), then draws rounds of
ceil(missing groups x oversample) prompts (in the training loop's order, one permutation per pass:
resumable from a cursor), samples `num_generations` completions per prompt with the current policy,
scores them with the task verifiers, and refills until `batch_prompts` groups pass the filter or
`max_generation_rounds` rounds are spent (then it trains on what it has and logs the shortfall).

Rewards: the verifier's reward alone decides pass rates and the filter (a format bonus never turns a
wrong answer into a pass); the training reward, verifier + `format_reward` for a completion with
"Answer:", gives the advantages.

Carry-over: groups that pass the filter beyond a full batch are trained by the next step, ahead of
its new draws, instead of being thrown away. They were sampled by the policy before the last update,
so they are slightly off-policy: with num_iterations = 1 the ratio's "old" log-probs are the current
policy's own (detached), so the ratio is 1 and nothing corrects for that lag. It is bounded: a group
is carried at most one step (carried groups beyond the batch are dropped, never carried again), at
most one optimizer step of staleness, the lag of DAPO-style replay with one step.

Steps: every record of a step (the `history` rows of the groups it trains, the `steps` row, the log
lines, the MLflow metrics) uses the 1-based number of the optimizer update. A checkpoint holds the
weights, optimizer, RNG, the prompt cursor, the sample count and the carried groups, with the step's
history rows written first, so a resumed run redoes identical steps.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl
import torch

from tasks.core.base import log
from tasks.core import chat
from tasks.rl.config import GRPOConfig
from tasks.rl.grpo import fill_batch, group_advantages, policy_loss, token_logprobs
from tasks.core.rollout import end_id, is_correct, score_prompts
from tasks.core.store import write_parquet
from tasks.core.tokens import PAD, special_ids
# checkpoint_state: the tests read it from here
from tasks.core.train import BatchOrder, checkpoint_state, resume, save_checkpoint  # noqa: F401



@dataclass
class SampledGroup:
    """The G completions of one drawn prompt and their rewards."""

    gid: str  # unique within a run: step:round:index
    index: int  # the prompt's position in the training rows
    row: dict  # the prompt row
    completions: list[list[int]]
    texts: list[str]
    rewards: np.ndarray  # [G] verifier rewards: pass rate and filter
    train_rewards: np.ndarray  # [G] verifier + format bonus: advantages
    drawn_step: int  # the (1-based) step whose batch filling sampled it

    @property
    def pass_rate(self) -> float:
        return float(np.mean([is_correct(r) for r in self.rewards]))

    def to_json(self) -> dict:
        """JSON state for a checkpoint (the row is stored by its index)."""
        return {"gid": self.gid, "index": self.index, "completions": [[int(t) for t in c] for c in self.completions],
                "texts": list(self.texts),
                "rewards": self.rewards.tolist(), "train_rewards": self.train_rewards.tolist(),
                "drawn_step": self.drawn_step}

    @classmethod
    def from_json(cls, data: dict, rows: list[dict]) -> SampledGroup:
        return cls(data["gid"], data["index"], rows[data["index"]], data["completions"], data["texts"],
                   np.array(data["rewards"], dtype=np.float64), np.array(data["train_rewards"], dtype=np.float64),
                   data["drawn_step"])


def training_rewards(rewards: np.ndarray, texts: list[list[str]], format_reward: float) -> np.ndarray:
    """[n, G] verifier rewards plus `format_reward` for each completion that contains 'Answer:'."""
    bonus = np.array([[chat.ANSWER_PREFIX in t for t in ts] for ts in texts], dtype=np.float64).reshape(rewards.shape)
    return rewards + format_reward * bonus


@dataclass
class LoopState:
    """Everything a checkpoint restores besides weights, optimizer and RNG."""

    step: int = 0
    cursor: int = 0  # position in the endless prompt order
    generated_samples: int = 0
    history: list[dict] = field(default_factory=list)  # one metrics row per step
    resumed_from: int = 0  # the checkpoint's step this run started from
    carry: list[SampledGroup] = field(default_factory=list)  # passed last step beyond its batch: trained next


class Rollouts:
    """Draws the next prompts in order and samples a group for each; keeps this step's groups."""

    def __init__(self, model, tok, rows: list[dict], cfg: GRPOConfig, state: LoopState):
        self.model, self.tok, self.rows, self.cfg, self.state = model, tok, rows, cfg, state
        self.order = BatchOrder(len(rows), 1, cfg.seed)  # the training loop's order
        self.drawn: dict[str, SampledGroup] = {}

    def draw(self, round_index: int, n: int) -> tuple[list[str], np.ndarray]:
        """One round: the next n prompts, G completions each; returns (group ids, verifier rewards [n, G])."""
        cfg, step = self.cfg, self.state.step
        indices = [int(i) for i in self.order.take(self.state.cursor, n)]
        batch = [self.rows[i] for i in indices]
        self.state.cursor += len(batch)
        scored = score_prompts(self.model, self.tok, batch, cfg.num_generations, cfg.sampling(),
                               seed=cfg.seed * 1_000_003 + step * 101 + round_index)
        rewards = np.array(scored.rewards, dtype=np.float64).reshape(len(batch), cfg.num_generations)
        train = training_rewards(rewards, scored.texts, cfg.format_reward)
        groups = [SampledGroup(f"{step + 1}:{round_index}:{i}", index, row, c, t, r, tr, step + 1)
                  for i, (index, row, c, t, r, tr) in enumerate(zip(indices, batch, scored.completions, scored.texts,
                                                                    rewards, train))]
        self.drawn.update({g.gid: g for g in groups})
        return [g.gid for g in groups], rewards


def training_batch(tok, groups: list[SampledGroup], end: int, pad: int, mask_truncated: bool):
    """Right-padded prompt+completion ids and the completion mask (truncated ones masked if asked)."""
    seqs, masks = [], []
    for group in groups:
        prompt = chat.prompt_ids(tok, group.row["question"])
        for ids in group.completions:
            keep = 0 if (mask_truncated and (not ids or ids[-1] != end)) else 1
            seqs.append(prompt + list(ids))
            masks.append([0] * len(prompt) + [keep] * len(ids))
    width = max(map(len, seqs))
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    mask = torch.tensor([m + [0] * (width - len(m)) for m in masks])
    return ids, mask


def advantages(groups: list[SampledGroup], cfg: GRPOConfig) -> torch.Tensor:
    """[n_groups x G] advantages of the groups' training rewards (verifier + format bonus)."""
    rewards = torch.tensor(np.stack([g.train_rewards for g in groups]), dtype=torch.float32)
    return group_advantages(rewards, cfg.scale_rewards).flatten()


def update_policy(model, ref, opt, tok, groups: list[SampledGroup], cfg: GRPOConfig,
                  device: torch.device) -> dict[str, float]:
    """`num_iterations` clipped policy-gradient updates on the kept groups; the loss's statistics.
    Log-probs (policy, old and reference) are taken at the sampling temperature."""
    ids, mask = training_batch(tok, groups, end_id(tok), special_ids(tok)[PAD], cfg.mask_truncated_completions)
    ids, mask = ids.to(device), mask.to(device)
    adv = advantages(groups, cfg).to(device)
    T = cfg.temperature
    with torch.no_grad():
        old = token_logprobs(model, ids, mask, temperature=T) if cfg.num_iterations > 1 else None
        ref_lp = token_logprobs(ref, ids, mask, temperature=T) if ref is not None else None
    for _ in range(cfg.num_iterations):
        lp = token_logprobs(model, ids, mask, temperature=T)
        loss, stats = policy_loss(lp, lp.detach() if old is None else old, adv, mask, eps_low=cfg.epsilon,
                                  eps_high=cfg.epsilon_high, loss_type=cfg.loss_type,
                                  max_completion_len=cfg.max_completion_length, ref_logprobs=ref_lp, beta=cfg.beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        opt.step()
    return {k: v for k, v in stats.items() if v == v}  # NaN stats (e.g. no clipped tokens) dropped


def greedy_pass_rate(model, tok, rows: list[dict], cfg: GRPOConfig) -> float:
    """Held-out greedy pass@1 of the current policy (its own generator: the training draws are untouched)."""
    return score_prompts(model.eval(), tok, rows, 1, cfg.sampling(), greedy=True).pass_rate


def history_rows(step: int, groups: dict[str, SampledGroup], kept: set[str], carried: set[str],
                 per_group: int) -> list[dict]:
    """The `history` table's rows of the groups drawn while filling step `step`'s batch: up to
    `per_group` samples each. `step` is the optimizer update that trains the group: `step` for the
    batch (`kept`), `step + 1` for a group carried to the next batch (`drawn_step` still says
    `step`); a group no update trains has kept False and the step that drew it. `reward` is the
    verifier's."""
    return [{"step": step + 1 if g.gid in carried else step, "drawn_step": step, "prompt_id": g.row["id"],
             "task": g.row["task"], "sample": s, "completion": g.texts[s], "reward": float(g.rewards[s]),
             "pass_rate": g.pass_rate, "kept": g.gid in kept or g.gid in carried}
            for g in groups.values() for s in range(min(per_group, len(g.texts)))]


def grpo(model, tok, rows: list[dict], eval_rows: list[dict], cfg: GRPOConfig, work: Path, device: torch.device,
         log_step: Callable[[int, dict], None] | None = None, mirror: str | None = None) -> LoopState:
    """Train `model` in place from its current weights; resumes from the last checkpoint in `work`.
    Each step's samples go to `work/samples-<step>.parquet` (the `history` table, read with
    `history_table`). log_step(step, metrics) gets step 0's held-out check and every step's metrics.
    mirror: a remote store's work prefix each checkpoint is uploaded to, with its samples files (nothing
    recomputes them, and the `history` table needs all of them after a resume elsewhere)."""
    model.train()
    ref = copy.deepcopy(model).eval() if cfg.beta > 0 else None
    opt = model.configure_optimizer(cfg.lr, cfg.weight_decay, (0.9, 0.99), fused=device.type == "cuda")
    state = LoopState()
    if resumed := resume(work, model, opt, fields=("cursor", "generated_samples")):
        found, saved = resumed
        state.step, state.history = saved["step"], saved["history"]
        state.cursor, state.generated_samples = saved["cursor"], saved["generated_samples"]
        state.carry = [SampledGroup.from_json(g, rows) for g in saved.get("carry", [])]
        state.resumed_from = state.step
        log.info("rl: resuming from %s (step %d)", found.name, state.step)
    if state.step == 0:
        state.history.append({"step": 0, "check_pass_at_1": greedy_pass_rate(model, tok, eval_rows, cfg)})
        if log_step:
            log_step(0, {"check_pass_at_1": state.history[0]["check_pass_at_1"]})
    rollouts = Rollouts(model, tok, rows, cfg, state)
    samples: list[dict] = []
    budget = cfg.max_generated_samples or math.inf
    while state.step < cfg.max_steps and state.generated_samples < budget:
        step = state.step + 1  # the optimizer update this batch trains: every record of it uses this number
        t0 = time.perf_counter()
        rollouts.drawn = {}
        carried = {g.gid: g for g in state.carry}
        model.eval()
        fill = fill_batch(rollouts.draw, cfg.batch_prompts, cfg.filter, cfg.band, cfg.max_generation_rounds,
                          oversample=cfg.oversample, carried=[(g.gid, g.rewards) for g in state.carry])
        gen_seconds = time.perf_counter() - t0
        model.train()
        drawn = rollouts.drawn
        known = {**carried, **drawn}
        batch = [known[gid] for gid in fill.group_ids]
        state.generated_samples += len(drawn) * cfg.num_generations
        last = step == cfg.max_steps or state.generated_samples >= budget
        # passing groups beyond this batch train the next one; fill_batch drops carried ones it cannot use
        state.carry = [] if last else [drawn[gid] for gid, _ in fill.overflow[: cfg.batch_prompts]]
        samples += history_rows(step, drawn, set(fill.group_ids), {g.gid for g in state.carry}, cfg.history_samples)
        if fill.shortfall:
            log.info("rl: step %d kept %d of %d groups after %d rounds", step, len(batch), cfg.batch_prompts,
                     fill.rounds_used)
        metrics = {"generation_rounds": fill.rounds_used, "shortfall": float(fill.shortfall),
                   "carried_groups": fill.carried, "generation_seconds": gen_seconds,
                   "generated_samples": state.generated_samples,
                   "generated_tokens_per_s": sum(len(c) for g in drawn.values() for c in g.completions) / max(gen_seconds, 1e-9)}
        if drawn:  # a batch filled by carried groups alone draws nothing: no reward or filter rate to report
            metrics.update(reward_mean=float(np.mean([g.rewards for g in drawn.values()])),
                           kept_fraction=fill.stats["kept_fraction"],
                           zero_variance_fraction=fill.stats["zero_variance_fraction"])
        t1 = time.perf_counter()
        if batch:
            metrics.update(update_policy(model, ref, opt, tok, batch, cfg, device))
        metrics["train_seconds"] = time.perf_counter() - t1
        state.step = step
        if step % cfg.eval_every == 0 or last:
            metrics["check_pass_at_1"] = greedy_pass_rate(model, tok, eval_rows, cfg)
            model.train()
        state.history.append({"step": step, **metrics})
        if log_step:
            log_step(step, metrics)
        log.info("rl step %d/%d reward %.3f kept %.2f gen %.1fs train %.1fs", step, cfg.max_steps,
                 metrics.get("reward_mean", math.nan), metrics.get("kept_fraction", math.nan), gen_seconds,
                 metrics["train_seconds"])
        if step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
            # samples first: a crash between the two redoes these steps (same seeds, same file names)
            samples_file = work / f"samples-{step:06d}.parquet"
            write_parquet(pl.DataFrame(samples).to_arrow(), samples_file)
            save_checkpoint(work, step, model, opt, state.history,
                            extra={"cursor": state.cursor, "generated_samples": state.generated_samples,
                                   "carry": [g.to_json() for g in state.carry]}, mirror=mirror, beside=(samples_file,))
            samples = []
    if samples:
        write_parquet(pl.DataFrame(samples).to_arrow(), work / f"samples-{state.step:06d}.parquet")
    return state


def history_table(work: Path) -> pl.DataFrame:
    """Every drawn group's stored samples over the run, from the loop's per-checkpoint files."""
    parts = sorted(work.glob("samples-*.parquet"))
    return pl.concat([pl.read_parquet(p) for p in parts]) if parts else pl.DataFrame()
