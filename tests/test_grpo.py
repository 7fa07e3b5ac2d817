"""GRPO blocks: advantages, loss aggregations (hand-computed), on-policy = REINFORCE, clipping,
KL, log-prob alignment against a brute-force loop and at a sampling temperature, and the online
difficulty filter (bands at G, variance, carry-over and refill sizes)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tasks.rl.grpo import (
    DEFAULT_BAND,
    fill_batch,
    group_advantages,
    group_pass_rates,
    keep_groups,
    kept_counts,
    policy_loss,
    round_size,
    sequence_logprobs,
    token_logprobs,
)
from tasks.core.model import GPT, ModelConfig

# ---------------------------------------------------------------- advantages


def test_advantages_each_scale():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    eps = 1e-4
    # group 0: mean 0.5, centered +-0.5; Bessel std = sqrt((4 * 0.25) / 3) = sqrt(1/3); group 1 flat
    sign = torch.tensor([1.0, -1.0, -1.0, 1.0])
    none = group_advantages(r, "none")
    torch.testing.assert_close(none, torch.stack([0.5 * sign, torch.zeros(4)]))
    group = group_advantages(r, "group", eps)
    torch.testing.assert_close(group, torch.stack([0.5 / (math.sqrt(1 / 3) + eps) * sign, torch.zeros(4)]))
    # batch: all 8 rewards, mean 0.75, sum of squares 6 * 0.0625 + 2 * 0.5625 = 1.5, var 1.5 / 7
    batch = group_advantages(r, "batch", eps)
    torch.testing.assert_close(batch, torch.stack([0.5 / (math.sqrt(1.5 / 7) + eps) * sign, torch.zeros(4)]))
    # three distinct values: centered [-.5, 0, .5], Bessel var 0.5 / 2 -> std 0.5
    torch.testing.assert_close(group_advantages(torch.tensor([[0.0, 0.5, 1.0]]), "group", eps),
                               torch.tensor([[-0.5, 0.0, 0.5]]) / (0.5 + eps))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_zero_variance_group_gives_exact_zero(scale):
    r = torch.tensor([[0.1, 0.1, 0.1], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])  # 0.1 * 3 / 3 != 0.1 in floats
    a = group_advantages(r, scale)
    assert not torch.isnan(a).any()
    assert torch.equal(a, torch.zeros_like(a))


def test_advantages_reject_bad_input():
    with pytest.raises(ValueError):
        group_advantages(torch.ones(3, 1))
    with pytest.raises(ValueError):
        group_advantages(torch.ones(2, 3), "rank")


# ---------------------------------------------------------------- loss aggregations


def two_sequences():
    """Lengths 3 and 1 (T = 3); ratios inside the clip range; padding holds junk (ratio 100)."""
    ratios = torch.tensor([[1.1, 0.9, 1.0], [1.05, 100.0, 100.0]])
    old = torch.full((2, 3), -2.0)
    lp = old + ratios.log()
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv = torch.tensor([1.0, -1.0])
    return lp, old, adv, mask


def test_loss_types_hand_computed_show_length_bias():
    lp, old, adv, mask = two_sequences()
    # per-token loss -ratio * A: sequence 0 -> -1.1, -0.9, -1.0 (sum -3.0); sequence 1 -> +1.05
    expected = {
        "grpo": (-3.0 / 3 + 1.05 / 1) / 2,  # 0.025: the single token weighs 3x a long-sequence token
        "dr_grpo": (-3.0 + 1.05) / (2 * 4),  # -0.24375 with max_completion_len 4
        "dapo": (-3.0 + 1.05) / 4,  # -0.4875: every token weighs the same
    }
    for loss_type, want in expected.items():
        loss, stats = policy_loss(lp, old, adv, mask, loss_type=loss_type, max_completion_len=4)
        assert loss.item() == pytest.approx(want, abs=1e-6), loss_type
        assert stats["loss"] == pytest.approx(want, abs=1e-6)
        assert stats["clip_fraction"] == 0.0
        assert stats["ratio_mean"] == pytest.approx((1.1 + 0.9 + 1.0 + 1.05) / 4, abs=1e-6)
        assert stats["ratio_max"] == pytest.approx(1.1, abs=1e-6)  # padding's ratio 100 ignored
        assert "kl" not in stats
    with pytest.raises(ValueError):
        policy_loss(lp, old, adv, mask, loss_type="dr_grpo")  # needs max_completion_len


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_on_policy_is_reinforce_with_group_baseline(loss_type):
    torch.manual_seed(0)
    B, T, L = 3, 4, 6
    lp = torch.randn(B, T).requires_grad_()
    old = lp.detach().clone()
    adv = torch.tensor([0.7, -1.3, 0.4])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 1, 1, 0]]).float()
    loss, stats = policy_loss(lp, old, adv, mask, loss_type=loss_type, max_completion_len=L)
    assert stats["ratio_mean"] == 1.0 and stats["ratio_max"] == 1.0 and stats["clip_fraction"] == 0.0
    loss.backward()
    lengths = mask.sum(1, keepdim=True)
    weight = {"grpo": mask / (lengths * B), "dr_grpo": mask / (B * L), "dapo": mask / mask.sum()}[loss_type]
    torch.testing.assert_close(lp.grad, -adv[:, None] * weight)
    # and the value: -sum(A * weight) over tokens
    assert loss.item() == pytest.approx(float(-(adv[:, None] * weight).sum()), abs=1e-6)


# ---------------------------------------------------------------- clipping


def one_token(ratio: float, adv: float, **kw):
    """Loss, d loss / d logprob and stats for a single token (dapo: the loss is the per-token loss)."""
    old = torch.tensor([[-1.0]])
    lp = (old + math.log(ratio)).requires_grad_()
    loss, stats = policy_loss(lp, old, torch.tensor([adv]), torch.ones(1, 1), **kw)
    loss.backward()
    return loss.item(), lp.grad.item(), stats


@pytest.mark.parametrize(
    "ratio, adv, eps_low, eps_high, clipped, loss",
    [
        (1.3, 1.0, 0.2, 0.2, True, -1.2),  # above 1 + eps_high, A > 0: flat at the clip
        (1.3, 1.0, 0.2, 0.28, True, -1.28),
        (1.25, 1.0, 0.2, 0.2, True, -1.2),
        (1.25, 1.0, 0.2, 0.28, False, -1.25),  # DAPO clip-higher lets it through
        (0.7, -1.0, 0.2, 0.28, True, 0.8),  # below 1 - eps_low, A < 0: flat at the clip
        (0.75, -1.0, 0.2, 0.28, True, 0.8),  # eps_high does not move the low side
        (0.85, -1.0, 0.2, 0.28, False, 0.85),
        (1.5, -1.0, 0.2, 0.2, False, 1.5),  # pessimistic side: never clipped
        (0.5, 1.0, 0.2, 0.2, False, -0.5),
    ],
)
def test_clipping(ratio, adv, eps_low, eps_high, clipped, loss):
    value, grad, stats = one_token(ratio, adv, eps_low=eps_low, eps_high=eps_high)
    assert value == pytest.approx(loss, abs=1e-6)
    assert stats["clip_fraction"] == (1.0 if clipped else 0.0)
    # d(-ratio * A)/d logprob = -ratio * A on the unclipped branch, 0 on the clipped one
    assert grad == pytest.approx(0.0 if clipped else -ratio * adv, abs=1e-6)


def test_clip_fraction_counts_masked_tokens_only():
    old = torch.zeros(2, 2)
    lp = torch.tensor([[1.3, 1.0], [1.3, 1.3]]).log()  # ratios
    mask = torch.tensor([[1, 1], [1, 0]])
    _, stats = policy_loss(lp, old, torch.tensor([1.0, -1.0]), mask)
    # masked tokens: (1.3, A+) clipped, (1.0, A+) not, (1.3, A-) not -> 1 / 3
    assert stats["clip_fraction"] == pytest.approx(1 / 3)
    assert stats["clip_high_fraction"] == pytest.approx(1 / 3) and stats["clip_low_fraction"] == 0.0


# ---------------------------------------------------------------- KL


def test_kl_term_k3():
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old = lp.detach().clone()
    ref = torch.tensor([[-1.5, 0.0]])
    mask = torch.tensor([[1, 0]])
    adv = torch.tensor([0.5])
    base, _ = policy_loss(lp, old, adv, mask)
    ignored, stats0 = policy_loss(lp, old, adv, mask, ref_logprobs=ref, beta=0.0)
    assert ignored.item() == base.item() == pytest.approx(-0.5) and "kl" not in stats0
    # k3 at ref - lp = -0.5: exp(-0.5) + 0.5 - 1 = 0.6065306597 - 0.5
    k3 = 0.1065306597
    loss, stats = policy_loss(lp, old, adv, mask, ref_logprobs=ref, beta=0.1)
    assert loss.item() == pytest.approx(-0.5 + 0.1 * k3, abs=1e-6)
    assert stats["kl"] == pytest.approx(k3, abs=1e-6)  # the masked token with ref 0.0 is ignored
    loss.backward()
    # d/dlp: -A (ratio 1) + beta * (1 - exp(ref - lp)) = -0.5 + 0.1 * (1 - 0.6065306597)
    assert lp.grad[0, 0].item() == pytest.approx(-0.5 + 0.1 * 0.3934693403, abs=1e-6)
    assert lp.grad[0, 1].item() == 0.0


# ---------------------------------------------------------------- log-prob alignment


def test_token_logprobs_alignment_matches_brute_force():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=20, depth=1, width=32)).eval()
    ids = torch.randint(0, 20, (2, 7))
    cmask = torch.zeros(2, 7, dtype=torch.bool)
    cmask[0, 3:] = True
    cmask[1, 4:6] = True
    with torch.no_grad():
        got = token_logprobs(model, ids, cmask)
        full = sequence_logprobs(model(ids), ids)
        for t in range(1, 7):  # log p(ids[:, t] | ids[:, :t]) from the prefix alone
            logp = torch.log_softmax(model(ids[:, :t])[:, -1].float(), -1)
            want = logp.gather(-1, ids[:, t : t + 1]).squeeze(-1)
            torch.testing.assert_close(full[:, t], want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[:, t], torch.where(cmask[:, t], want, 0.0), atol=1e-5, rtol=1e-5)
    assert full.dtype == torch.float32 and torch.equal(full[:, 0], torch.zeros(2))
    assert torch.equal(got[~cmask], torch.zeros(int((~cmask).sum())))

    # a left-padded copy of row 1 with attn_mask scores its completion the same
    pad = 2
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids[1:]], 1)
    real = torch.cat([torch.zeros(1, pad, dtype=torch.bool), torch.ones(1, 7, dtype=torch.bool)], 1)
    pmask = torch.cat([torch.zeros(1, pad, dtype=torch.bool), cmask[1:]], 1)
    with torch.no_grad():
        left = token_logprobs(model, padded, pmask, attn_mask=real)
    torch.testing.assert_close(left[:, pad:], got[1:], atol=1e-5, rtol=1e-5)

    # gradients reach the model through the loss
    lp = token_logprobs(model, ids, cmask)
    loss, _ = policy_loss(lp, lp.detach(), torch.tensor([1.0, -1.0]), cmask)
    loss.backward()
    assert model.embed_tokens.weight.grad is not None


def test_token_logprobs_at_sampling_temperature():
    torch.manual_seed(1)
    model = GPT(ModelConfig(vocab_size=20, depth=1, width=32)).eval()
    ids = torch.randint(0, 20, (2, 6))
    cmask = torch.zeros(2, 6, dtype=torch.bool)
    cmask[:, 2:] = True
    with torch.no_grad():
        logits = model(ids).float()
        got = token_logprobs(model, ids, cmask, temperature=0.5)
        plain = token_logprobs(model, ids, cmask)
    for t in range(2, 6):  # by hand: log_softmax(logits / T) of the token, from the previous position
        for b in range(2):
            want = torch.log_softmax(logits[b, t - 1] / 0.5, -1)[ids[b, t]]
            assert got[b, t].item() == pytest.approx(want.item(), abs=1e-5)
            assert plain[b, t].item() == pytest.approx(torch.log_softmax(logits[b, t - 1], -1)[ids[b, t]].item(),
                                                       abs=1e-5)
    assert (got[cmask] - plain[cmask]).abs().min() > 1e-3  # T = 0.5 is not T = 1
    assert torch.equal(got[~cmask], torch.zeros(int((~cmask).sum())))
    with pytest.raises(ValueError):
        sequence_logprobs(logits, ids, temperature=0.0)


# ---------------------------------------------------------------- online filter


def test_pass_rates_and_keep_modes():
    rewards = np.array([[1.0, 0.0, 0.5, 1.0], [0.9, 0.9, 0.9, 0.9], [1.0, 1.0, 1.0, 1.0]])
    np.testing.assert_allclose(group_pass_rates(rewards), [0.5, 0.0, 1.0])  # partial credit fails
    np.testing.assert_allclose(group_pass_rates(rewards, threshold=0.5), [0.75, 1.0, 1.0])

    p = np.array([0.0, 0.25, 0.3, 0.5, 0.75, 1.0, 0.125])
    np.testing.assert_array_equal(keep_groups(p, "none"), [True] * 7)
    np.testing.assert_array_equal(keep_groups(p, "mixed"), [False, True, True, True, True, False, True])
    # strict band: both 0.25 and 0.75 are out
    np.testing.assert_array_equal(keep_groups(p, "balanced", (0.25, 0.75)),
                                  [False, False, True, True, False, False, False])
    with pytest.raises(ValueError):
        keep_groups(p, "hard")


def test_kept_counts_default_band_is_intermediate():
    assert kept_counts((0.1, 0.9), 8) == [1, 2, 3, 4, 5, 6, 7]  # every k the mixed filter keeps
    assert kept_counts(DEFAULT_BAND, 8) == [2, 3, 4, 5, 6]  # pass rates 0.25 .. 0.75
    assert kept_counts((0.1, 0.9), 16) == list(range(2, 15))  # 1/16 = 0.0625 is out: not mixed at G = 16
    assert kept_counts((0.4, 0.45), 8) == []
    # planted pass rates k/8, k = 0..8, three groups each
    p = np.repeat(np.arange(9) / 8, 3)
    mixed, old, default = (keep_groups(p, "mixed"), keep_groups(p, "balanced", (0.1, 0.9)),
                           keep_groups(p, "balanced", DEFAULT_BAND))
    assert mixed.sum() == 21 and np.array_equal(old, mixed)
    assert default.sum() == 15 and not (default & ~mixed).any()  # a strict subset: drops k = 1 and k = 7
    np.testing.assert_array_equal(np.unique(p[default]), [0.25, 0.375, 0.5, 0.625, 0.75])


def test_variance_filter_keeps_partial_credit_signal():
    rewards = np.array([[0.5, 0.5, 0.5, 0.5],  # no variance: dropped
                        [0.5, 0.0, 0.0, 0.0],  # no full credit, still a signal: kept (mixed drops it)
                        [1.0, 1.0, 1.0, 1.0],  # dropped
                        [1.0, 0.5, 1.0, 1.0]])  # kept (pass rate 0.75: mixed keeps it too)
    rates = group_pass_rates(rewards)
    np.testing.assert_array_equal(keep_groups(rates, "variance", rewards=rewards), [False, True, False, True])
    np.testing.assert_array_equal(keep_groups(rates, "mixed"), [False, False, False, True])
    with pytest.raises(ValueError):
        keep_groups(rates, "variance")  # needs the rewards

    res = fill_batch(lambda i, n: ([(i, j) for j in range(4)], rewards), 3, "variance", max_generation_rounds=5)
    assert res.group_ids == [(0, 1), (0, 3), (1, 1)] and res.rounds_used == 2
    assert res.stats["kept_fraction"] == 0.5 and res.stats["zero_variance_fraction"] == 0.5


@pytest.mark.parametrize("G", [4, 8])
def test_mixed_filter_sanity_law(G):
    rng = np.random.default_rng(0)
    n = 20000
    for p in (0.1, 0.3, 0.5, 0.8, 0.95):
        rewards = (rng.random((n, G)) < p).astype(float)
        kept = keep_groups(group_pass_rates(rewards), "mixed").mean()
        q = 1 - p**G - (1 - p) ** G
        se = math.sqrt(q * (1 - q) / n)
        assert abs(kept - q) <= 4 * se, (p, G, kept, q)


def test_fill_batch_hits_round_cap_with_shortfall():
    calls = []

    def draw(i, n):
        calls.append(i)
        return [f"r{i}g{j}" for j in range(6)], np.zeros((6, 4))

    ids, rewards, rounds, shortfall, stats, overflow, carried = fill_batch(draw, 4, "mixed", max_generation_rounds=5)
    assert calls == [0, 1, 2, 3, 4] and rounds == 5 and shortfall
    assert ids == [] and rewards.shape == (0, 4) and overflow == [] and carried == 0
    assert stats["groups_drawn"] == 30 and stats["groups_kept"] == 0 and stats["kept_fraction"] == 0.0
    assert stats["zero_variance_fraction"] == 1.0 and stats["rounds"] == 5


def test_fill_batch_stops_early_and_returns_overflow():
    # each round: 4 groups, the 2nd and 4th mixed
    rows = np.array([[0, 0, 0, 0], [1, 0, 0, 1], [1, 1, 1, 1], [0, 1, 1, 1]], dtype=float)
    calls = []

    def draw(i, n):
        calls.append(i)
        return [(i, j) for j in range(4)], rows

    res = fill_batch(draw, 3, "mixed", max_generation_rounds=10)
    assert calls == [0, 1] and res.rounds_used == 2 and not res.shortfall
    assert res.group_ids == [(0, 1), (0, 3), (1, 1)]
    np.testing.assert_array_equal(res.rewards, rows[[1, 3, 1]])
    assert [gid for gid, _ in res.overflow] == [(1, 3)]  # passed beyond the batch: kept for the next step
    np.testing.assert_array_equal(res.overflow[0][1], rows[3])
    assert res.stats["groups_drawn"] == 8 and res.stats["groups_kept"] == 4
    assert res.stats["kept_fraction"] == 0.5 and res.stats["zero_variance_fraction"] == 0.5
    assert res.stats["batch_fill"] == 1.0

    # none keeps everything: one round fills it
    res = fill_batch(draw, 3, "none", max_generation_rounds=10)
    assert res.rounds_used == 1 and res.group_ids == [(0, 0), (0, 1), (0, 2)]
    # balanced (0.3, 0.6) keeps only p = 0.5 (row 1); p = 0.75 (row 3) is out
    res = fill_batch(draw, 2, "balanced", band=(0.3, 0.6), max_generation_rounds=10)
    assert res.group_ids == [(0, 1), (1, 1)] and res.rounds_used == 2


def planted_draw(pass_plan: list[list[bool]], G: int = 4):
    """A draw function whose round r (over the whole run) gives len(pass_plan[r]) groups, mixed (one
    correct sample) where True, all wrong where False; records the n it was asked for."""
    asked: list[int] = []
    rounds = iter(range(len(pass_plan)))

    def draw(i, n):
        asked.append(n)
        r = next(rounds)
        rewards = np.array([[1.0] + [0.0] * (G - 1) if ok else [0.0] * G for ok in pass_plan[r]])
        return [f"r{r}g{j}" for j in range(len(pass_plan[r]))], rewards

    return draw, asked


def test_overflow_is_carried_into_the_next_batch_and_refills_draw_what_is_missing():
    # step 1: batch 3, oversample 2 -> one round of 6 prompts, 5 pass: 3 train now, 2 overflow
    # step 2: the 2 carried go first; 1 missing -> ceil(1 x 2) = 2 prompts, 1 passes
    draw, asked = planted_draw([[True, False, True, True, True, True], [False, True]])
    first = fill_batch(draw, 3, "mixed", oversample=2.0)
    assert asked == [6] and first.group_ids == ["r0g0", "r0g2", "r0g3"] and first.carried == 0
    assert [gid for gid, _ in first.overflow] == ["r0g4", "r0g5"]
    assert first.stats["groups_kept"] == 5 and first.stats["carried_groups"] == 0

    second = fill_batch(draw, 3, "mixed", oversample=2.0, carried=first.overflow)
    assert asked == [6, 2]  # sized to the one missing group, not a full round of 6
    assert second.group_ids == ["r0g4", "r0g5", "r1g1"] and second.carried == 2 and second.overflow == []
    np.testing.assert_array_equal(second.rewards[:2], np.stack([r for _, r in first.overflow]))
    assert second.stats["carried_groups"] == 2 and second.stats["groups_drawn"] == 2
    assert second.stats["kept_fraction"] == 0.5  # over the fresh draws only


def test_refill_after_one_missing_group_draws_ceil_oversample():
    # round 0: 5 prompts (ceil(3 x 1.5)), 2 pass; round 1 is for one group: ceil(1 x 1.5) = 2 prompts
    draw, asked = planted_draw([[True, False, False, True, False], [False, True]])
    res = fill_batch(draw, 3, "balanced", band=(0.2, 0.3), oversample=1.5)
    assert asked == [5, 2] and res.group_ids == ["r0g0", "r0g3", "r1g1"] and res.rounds_used == 2
    assert round_size(1, "mixed", 1.5) == 2 and round_size(1, "mixed", 1.0) == 1
    assert round_size(10, "mixed", 1.1) == 11  # 10 x 1.1 = 11.000000000000002 in floats
    assert round_size(5, "none", 2.0) == 5  # every group passes: no oversampling


def test_carried_groups_beyond_the_batch_are_dropped_not_carried_again():
    carried = [(f"c{j}", np.array([1.0, 0.0, 0.0, 0.0])) for j in range(5)]
    draw, asked = planted_draw([])
    res = fill_batch(draw, 3, "mixed", oversample=2.0, carried=carried)
    assert asked == [] and res.rounds_used == 0 and not res.shortfall  # the carry fills the batch
    assert res.group_ids == ["c0", "c1", "c2"] and res.overflow == [] and res.carried == 3
    assert res.stats["carried_dropped"] == 2 and "kept_fraction" not in res.stats  # nothing drawn
