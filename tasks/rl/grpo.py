"""GRPO building blocks: group advantages, the clipped policy loss and its aggregations, per-token
log-probs, and the online difficulty filter (DeepSeekMath's GRPO, with DAPO's and Dr. GRPO's variants and "Online
Difficulty Filtering for Reasoning Oriented RL").

Pure torch / numpy: no Prefect, no MLflow. The band's rule, `in_band`, lives in `tasks.core.rollout`
(the offline difficulty stage uses it too). torch is imported by the functions that use it: the
filter half serves the RL config, which imports without torch (a data-only run never loads it).

Names follow TRL's GRPOConfig / verl where they exist:
  G (num_generations)      samples per prompt; rewards come as [n_groups, G].
  scale (scale_rewards)    "group" | "batch" | "none" (Dr. GRPO: no std division).
  eps_low  = TRL `epsilon`       lower clip: ratio >= 1 - eps_low   (default 0.2).
  eps_high = TRL `epsilon_high`  upper clip: ratio <= 1 + eps_high  (TRL: defaults to epsilon;
                                 DAPO "clip-higher" uses 0.28).
  loss_type                "grpo" | "dr_grpo" | "dapo" (TRL's names; TRL's "bnpo" is this "dapo"
                           on one process).
  beta                     KL coefficient (default 0, as in TRL); k3 estimator.
  max_completion_len       TRL `max_completion_length` (dr_grpo's constant).
  mode="mixed"             verl `filter_groups` (metric acc) / DAPO dynamic sampling;
  mode="variance"          verl `filter_groups` on the reward itself: drop groups whose rewards are all equal;
  max_generation_rounds    verl `max_num_gen_batches`.
  carried / overflow       groups that pass beyond a full batch: verl drops them, `fill_batch` hands them
                           back for the next step (at most one step stale).
  temperature              TRL divides the logits by the sampling temperature before log_softmax.
  mask_truncated_completions is the caller's job: zero the mask rows of truncated completions.

Documented choices:
  * std: Bessel-corrected (unbiased, torch.std's default), as TRL computes it; A = (r - mean) /
    (std + eps). A group whose rewards are all equal gets exactly zero advantage (no NaN, no
    rounding residue), whatever `scale`. Needs G >= 2.
  * alignment: per-token log-probs are aligned with the *tokens* they score: out[:, t] =
    log p(tokens[:, t] | tokens[:, :t]), taken from logits[:, t - 1]; out[:, 0] = 0 (nothing
    predicts the first token). So a completion mask over `input_ids` applies to the log-probs as is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Literal, NamedTuple, Sequence

import math

import numpy as np

from tasks.core.rollout import in_band

if TYPE_CHECKING:
    import torch

Scale = Literal["group", "batch", "none"]
LossType = Literal["grpo", "dr_grpo", "dapo"]
FilterMode = Literal["none", "mixed", "balanced", "variance"]
DEFAULT_BAND = (0.2, 0.8)  # strict: at G = 8 keeps k = 2..6 correct (pass rates 0.25..0.75)


# ---------------------------------------------------------------- advantages


def group_advantages(rewards: torch.Tensor, scale: Scale = "group", eps: float = 1e-4) -> torch.Tensor:
    """[n_groups, G] rewards -> [n_groups, G] advantages A = r - mean_group(r), then divided by
    (std + eps): the group's std ("group"), the std of all rewards in the batch ("batch"), or not
    at all ("none", Dr. GRPO). Stds are Bessel-corrected (TRL). Zero-variance groups give 0."""
    import torch

    r = torch.as_tensor(rewards)
    r = r if r.is_floating_point() else r.float()
    if r.dim() != 2 or r.shape[1] < 2:
        raise ValueError(f"rewards must be [n_groups, G] with G >= 2, got {tuple(r.shape)}")
    centered = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        centered = centered / (r.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centered = centered / (r.std() + eps)
    elif scale != "none":
        raise ValueError(f"scale must be group, batch or none, not {scale!r}")
    flat = (r == r[:, :1]).all(dim=1, keepdim=True)  # all-equal group: exactly zero, not ~1e-13
    return centered.masked_fill(flat, 0.0)


# ---------------------------------------------------------------- policy loss


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, *, eps_low: float = 0.2, eps_high: float = 0.2,
                loss_type: LossType = "dapo", max_completion_len: int | None = None,
                ref_logprobs: torch.Tensor | None = None, beta: float = 0.0,
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate loss over the completion tokens.

    logprobs / old_logprobs / ref_logprobs [B, T] (old and ref are treated as constants),
    advantages [B] (one per sequence, broadcast over its tokens), mask [B, T] (1 = a token that
    counts). Per token: ratio = exp(lp - old), loss = -min(ratio*A, clip(ratio, 1-eps_low,
    1+eps_high)*A) + beta * k3, k3 = exp(ref - lp) - (ref - lp) - 1 (only if beta > 0 and ref given).
    Aggregation (L = per-token loss, m = mask):
      grpo:    mean_i( sum_t m*L / max(1, sum_t m) )   -- every row counts, even an empty one (TRL)
      dr_grpo: sum(m*L) / (B * max_completion_len)
      dapo:    sum(m*L) / max(1, sum(m))               -- token-mean over the batch
    Returns (loss, stats): clip_fraction (masked tokens on the clipped branch: A>0 and ratio >
    1+eps_high, or A<0 and ratio < 1-eps_low), clip_high_fraction, clip_low_fraction, ratio_mean,
    ratio_max (NaN when no token counts), kl (only when used), loss.
    """
    import torch

    if logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape or logprobs.dim() != 2:
        raise ValueError(f"logprobs, old_logprobs and mask must all be [B, T]: "
                         f"{tuple(logprobs.shape)}, {tuple(old_logprobs.shape)}, {tuple(mask.shape)}")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be [B]={logprobs.shape[0]}, got {tuple(advantages.shape)}")
    m = mask.to(logprobs.dtype)
    A = advantages.to(logprobs.dtype)[:, None]
    ratio = torch.exp(logprobs - old_logprobs.detach())
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.minimum(ratio * A, clipped * A)
    use_kl = beta > 0 and ref_logprobs is not None
    if use_kl:
        d = ref_logprobs.detach() - logprobs
        kl = torch.exp(d) - d - 1.0
        per_token = per_token + beta * kl

    B, n_tokens = logprobs.shape[0], m.sum()
    if loss_type == "grpo":
        loss = ((per_token * m).sum(1) / m.sum(1).clamp(min=1.0)).mean()
    elif loss_type == "dr_grpo":
        if not max_completion_len or max_completion_len < 1:
            raise ValueError("loss_type dr_grpo needs max_completion_len >= 1")
        loss = (per_token * m).sum() / (B * max_completion_len)
    elif loss_type == "dapo":
        loss = (per_token * m).sum() / n_tokens.clamp(min=1.0)
    else:
        raise ValueError(f"loss_type must be grpo, dr_grpo or dapo, not {loss_type!r}")

    with torch.no_grad():  # diagnostics over the tokens that count
        keep = m > 0
        n = max(int(keep.sum()), 1)
        high = (A > 0) & (ratio > 1.0 + eps_high) & keep
        low = (A < 0) & (ratio < 1.0 - eps_low) & keep
        empty = not bool(keep.any())
        stats = {
            "clip_fraction": float((high | low).sum()) / n,
            "clip_high_fraction": float(high.sum()) / n,
            "clip_low_fraction": float(low.sum()) / n,
            "ratio_mean": float("nan") if empty else float(ratio[keep].mean()),
            "ratio_max": float("nan") if empty else float(ratio[keep].max()),
            "loss": float(loss),
        }
        if use_kl:
            stats["kl"] = float((kl * m).sum()) / n
    return loss, stats


# ---------------------------------------------------------------- log-probs


def sequence_logprobs(model_logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[B, T, V] logits (logits[:, t] predict tokens[:, t+1]) and [B, T] tokens -> [B, T] fp32
    log-probs aligned with the tokens: out[:, t] = log p(tokens[:, t] | tokens[:, :t]) for t >= 1,
    out[:, 0] = 0. p = softmax(logits / temperature): the distribution the samples were drawn from."""
    import torch
    import torch.nn.functional as F

    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logp = torch.log_softmax(model_logits[:, :-1].float() / temperature, dim=-1)
    picked = logp.gather(-1, tokens[:, 1:, None].long()).squeeze(-1)
    return F.pad(picked, (1, 0), value=0.0)


def token_logprobs(model: Callable[..., torch.Tensor], input_ids: torch.Tensor,
                   completion_mask: torch.Tensor, attn_mask: torch.Tensor | None = None,
                   temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probs of `input_ids` (prompt + completion) under `model` at the sampling
    `temperature` (log_softmax(logits / temperature), as TRL), aligned with `completion_mask`
    [B, T] and zero outside it. attn_mask [B, T] marks real tokens (pass it for left-padded
    prompts; `GPT.forward` takes it as `attn_mask`). Gradients flow (call under torch.no_grad()
    for old / reference log-probs)."""
    logits = model(input_ids) if attn_mask is None else model(input_ids, attn_mask=attn_mask)
    return sequence_logprobs(logits, input_ids, temperature).masked_fill(~completion_mask.bool(), 0.0)


# ---------------------------------------------------------------- online difficulty filter


def kept_counts(band: tuple[float, float], G: int) -> list[int]:
    """The correct-sample counts k (pass rate k / G) a band keeps with G samples per group:
    (0.1, 0.9) at G = 8 keeps 1..7, the same groups as the mixed filter; (0.2, 0.8) keeps 2..6."""
    return [k for k in range(G + 1) if in_band(k / G, band)]


def group_pass_rates(rewards: np.ndarray, threshold: float = 1.0) -> np.ndarray:
    """[n_groups, G] rewards -> [n_groups] fraction of samples with reward >= threshold (full
    credit, as `tasks.core.rollout.is_correct`)."""
    r = np.asarray(rewards, dtype=float)
    if r.ndim != 2:
        raise ValueError(f"rewards must be [n_groups, G], got shape {r.shape}")
    return (r >= threshold).mean(axis=1) if r.shape[1] else np.zeros(r.shape[0])


def flat_groups(rewards: np.ndarray) -> np.ndarray:
    """[n_groups, G] rewards -> [n_groups] True where all G rewards are equal (zero variance)."""
    r = np.asarray(rewards, dtype=float)
    return (r == r[:, :1]).all(axis=1)


def keep_groups(pass_rates: np.ndarray, mode: FilterMode, band: tuple[float, float] = DEFAULT_BAND,
                rewards: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask over groups: "none" keeps all, "mixed" keeps 0 < p < 1 (DAPO dynamic sampling /
    verl filter_groups on acc), "balanced" keeps low < p < high (`in_band`), "variance" keeps groups
    whose `rewards` [n_groups, G] are not all equal (verl filter_groups on the reward: with partial
    credit a group can have no full-credit sample and still a learning signal)."""
    p = np.asarray(pass_rates, dtype=float)
    if mode == "none":
        return np.ones(p.shape, dtype=bool)
    if mode == "mixed":
        return (p > 0.0) & (p < 1.0)
    if mode == "balanced":
        return np.asarray(in_band(p, tuple(band)), dtype=bool)
    if mode == "variance":
        if rewards is None:
            raise ValueError("mode variance needs the rewards")
        return ~flat_groups(rewards)
    raise ValueError(f"mode must be none, mixed, balanced or variance, not {mode!r}")


def round_size(missing: int, mode: FilterMode, oversample: float) -> int:
    """Prompts to draw for `missing` groups: ceil(missing x oversample), at least 1; exactly
    `missing` with mode none (every group passes). The 1e-9 keeps 10 x 1.1 at 11, not 12."""
    if mode == "none":
        return missing
    return max(1, math.ceil(missing * oversample - 1e-9))


class FillResult(NamedTuple):
    group_ids: list  # the batch, at most batch_groups: carried groups first, then fresh ones in draw order
    rewards: np.ndarray  # [len(group_ids), G]
    rounds_used: int
    shortfall: bool  # fewer than batch_groups kept when the round cap was hit
    stats: dict[str, float]
    overflow: list  # (id, rewards [G]) of fresh groups that passed beyond the batch, in draw order
    carried: int  # how many of group_ids came from `carried`


def fill_batch(draw_round: Callable[[int, int], tuple[Sequence[Any], np.ndarray]], batch_groups: int,
               mode: FilterMode = "mixed", band: tuple[float, float] = DEFAULT_BAND,
               max_generation_rounds: int = 10, threshold: float = 1.0, oversample: float = 1.0,
               carried: Sequence[tuple[Any, np.ndarray]] = ()) -> FillResult:
    """Fill a batch of `batch_groups` groups that pass the filter.

    `carried` (id, rewards [G]) are groups that passed last step beyond its batch: they go first, in
    order, without drawing again; those beyond batch_groups are dropped, never carried twice (so a
    carried group is at most one step old). Then rounds are drawn until the batch is full or
    `max_generation_rounds` rounds were drawn: draw_round(round_index, n) -> (group_ids [n],
    rewards [n, G]) samples n new prompts, n = `round_size` of the groups still missing. Passing
    groups fill the batch in draw order; those beyond it are returned as `overflow` for the caller
    to carry. The ids are returned as given: make them unique across rounds and steps.
    stats (over the fresh draws): rounds, groups_drawn, groups_kept (passed the filter, overflow
    included), carried_groups (in the batch), carried_dropped, batch_fill (batch / wanted); when a
    group was drawn also kept_fraction (groups_kept / groups_drawn: the filter's survival rate),
    zero_variance_fraction (drawn groups whose rewards are all equal) and pass_rate_mean."""
    if batch_groups < 1 or max_generation_rounds < 1:
        raise ValueError("batch_groups and max_generation_rounds must be >= 1")
    ids = [gid for gid, _ in carried[:batch_groups]]
    kept_rewards = [np.asarray(r, dtype=float) for _, r in carried[:batch_groups]]
    overflow: list = []
    drawn = passed = zero_var = 0
    rate_sum = 0.0
    rounds = 0
    G = kept_rewards[0].shape[0] if kept_rewards else 0
    while rounds < max_generation_rounds and len(ids) < batch_groups:
        n = round_size(batch_groups - len(ids), mode, oversample)
        group_ids, rewards = draw_round(rounds, n)
        r = np.asarray(rewards, dtype=float)
        if r.ndim != 2 or len(group_ids) != r.shape[0]:
            raise ValueError(f"draw_round({rounds}, {n}) must give n ids and [n, G] rewards: "
                             f"{len(group_ids)} ids, rewards shape {r.shape}")
        rounds, G = rounds + 1, r.shape[1]
        rates = group_pass_rates(r, threshold)
        keep = keep_groups(rates, mode, band, r)
        drawn += r.shape[0]
        passed += int(keep.sum())
        zero_var += int(flat_groups(r).sum())
        rate_sum += float(rates.sum())
        for row in np.flatnonzero(keep):
            if len(ids) < batch_groups:
                ids.append(group_ids[row])
                kept_rewards.append(r[row])
            else:
                overflow.append((group_ids[row], r[row]))
    n_carried = min(len(carried), batch_groups)
    stats = {
        "rounds": float(rounds),
        "groups_drawn": float(drawn),
        "groups_kept": float(passed),
        "carried_groups": float(n_carried),
        "carried_dropped": float(len(carried) - n_carried),
        "batch_fill": len(ids) / batch_groups,
    }
    if drawn:
        stats.update(kept_fraction=passed / drawn, zero_variance_fraction=zero_var / drawn,
                     pass_rate_mean=rate_sum / drawn)
    rewards_out = np.stack(kept_rewards) if kept_rewards else np.zeros((0, G))
    return FillResult(ids, rewards_out, rounds, len(ids) < batch_groups, stats, overflow, n_carried)
