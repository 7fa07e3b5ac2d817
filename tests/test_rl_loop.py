"""The GRPO loop: the band validator, verifier-only pass rates beside the format bonus, log-probs at the
sampling temperature, and a tiny run whose carried groups survive a checkpoint and whose step numbers
agree across the history table, the steps table, log_step and the log lines."""

from __future__ import annotations

import logging
import re
import zlib

import numpy as np
import polars as pl
import pytest
import torch
from pydantic import ValidationError

import tasks.rl.loop as loop
from conftest import ONE_DIGIT_ARITHMETIC, chat_tokenizer
from tasks.rl.grpo import group_advantages, group_pass_rates, keep_groups
from tasks.core.model import GPT, ModelConfig
from tasks.rl.loop import GRPOConfig, LoopState, Rollouts, SampledGroup, advantages, grpo, history_table
from tasks.core.rollout import Scored
from tasks.prompts import generate

TASK = "basic_arithmetic"

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- band validator


def test_band_validator_rejects_a_band_that_is_the_mixed_filter():
    assert GRPOConfig().band == (0.2, 0.8)  # the default is valid: keeps k = 2..6 of 8
    with pytest.raises(ValidationError, match=r"rl\.band \[0\.1, 0\.9\] keeps k=1\.\.7 of G=8.*allow_mixed_band"):
        GRPOConfig(band=(0.1, 0.9))
    assert GRPOConfig(band=(0.1, 0.9), allow_mixed_band=True).band == (0.1, 0.9)
    assert GRPOConfig(band=(0.1, 0.9), num_generations=16).band == (0.1, 0.9)  # keeps k = 2..14 of 16
    assert GRPOConfig(band=(0.1, 0.9), filter="mixed").filter == "mixed"  # the band only matters when balanced
    with pytest.raises(ValidationError, match=r"rl\.band \[0\.4, 0\.45\] keeps no pass rate k/8 at G=8"):
        GRPOConfig(band=(0.4, 0.45))
    with pytest.raises(ValidationError, match=r"G=4.*rl\.band=\[0\.375, 0\.625\] keeps k=2\)"):
        GRPOConfig(num_generations=4)  # 0.25, 0.5, 0.75 are all inside (0.2, 0.8)
    GRPOConfig(num_generations=4, band=(0.375, 0.625))  # the suggested fix is accepted


# ---------------------------------------------------------------- verifier rewards vs training rewards


def planted_scores(rewards: list[list[float]], texts: list[list[str]]):
    def score_prompts(model, tok, rows, n, *args, **kwargs):
        assert len(rows) == len(rewards) and n == len(rewards[0])
        return Scored(list(rows), [[[1, 2]] * n for _ in rows], texts, rewards, 0.0)

    return score_prompts


def test_format_bonus_never_turns_a_wrong_answer_into_a_pass(monkeypatch):
    rows = [{"id": f"p{i}", "task": TASK, "question": "q"} for i in range(3)]
    rewards = [[0.5, 0.5, 1.0, 0.0],  # partial credit + a bonus of 0.5 would reach 1.0
               [0.0, 0.0, 0.0, 0.0],
               [1.0, 1.0, 1.0, 0.5]]
    texts = [["Answer: 7", "Answer: 8", "Answer: 3", "no"], ["Answer: 1", "x", "y", "z"], ["Answer: 2"] * 4]
    monkeypatch.setattr(loop, "score_prompts", planted_scores(rewards, texts))
    drawn = {}
    for bonus in (0.0, 0.5):
        cfg = GRPOConfig(num_generations=4, format_reward=bonus, filter="mixed")
        rollouts = Rollouts(None, None, rows, cfg, LoopState())
        ids, verifier = rollouts.draw(0, 3)
        drawn[bonus] = (verifier, [rollouts.drawn[g] for g in ids])
    (v0, groups0), (v5, groups5) = drawn[0.0], drawn[0.5]
    np.testing.assert_array_equal(v0, rewards)
    np.testing.assert_array_equal(v5, rewards)  # the filter sees the verifier alone
    assert [g.pass_rate for g in groups5] == [g.pass_rate for g in groups0] == [0.25, 0.0, 0.75]
    for mode in ("mixed", "balanced", "variance"):
        np.testing.assert_array_equal(keep_groups(group_pass_rates(v5), mode, rewards=v5),
                                      keep_groups(group_pass_rates(v0), mode, rewards=v0))
    # the advantages do include the bonus
    bonus = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=float)
    np.testing.assert_array_equal(np.stack([g.train_rewards for g in groups5]), np.array(rewards) + 0.5 * bonus)
    want = group_advantages(torch.tensor(np.array(rewards) + 0.5 * bonus, dtype=torch.float32)).flatten()
    cfg5 = GRPOConfig(num_generations=4, format_reward=0.5, filter="mixed")
    torch.testing.assert_close(advantages(groups5, cfg5), want)
    assert not torch.equal(advantages(groups5, cfg5), advantages(groups0, cfg5))  # group 1: 0 -> nonzero


# ---------------------------------------------------------------- a tiny run


@pytest.fixture(scope="module")
def rows():
    return generate(TASK, ONE_DIGIT_ARITHMETIC, "train", 1, 24)


@pytest.fixture(scope="module")
def tok(rows):
    return chat_tokenizer(rows)


def new_model(tok) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=tok.get_vocab_size(), depth=1, width=32, max_seq_len=128))


def test_update_policy_scores_at_the_sampling_temperature(tok, rows, monkeypatch):
    seen = []
    real = loop.token_logprobs

    def spy(*args, temperature=1.0, **kwargs):
        seen.append(temperature)
        return real(*args, temperature=temperature, **kwargs)

    monkeypatch.setattr(loop, "token_logprobs", spy)
    cfg = GRPOConfig(num_generations=2, temperature=0.7, beta=0.1, num_iterations=2, filter="none")
    model = new_model(tok)
    group = SampledGroup("1:0:0", 0, rows[0], [[5, 6], [7]], ["a", "b"], np.array([1.0, 0.0]), np.array([1.0, 0.0]), 1)
    opt = model.configure_optimizer(cfg.lr, 0.0, (0.9, 0.99), fused=False)
    loop.update_policy(model, new_model(tok).eval(), opt, tok, [group], cfg, torch.device("cpu"))
    assert seen == [0.7] * 4  # old, reference, and the policy at each of the 2 iterations


def planted(real):
    """The real sampler with rewards planted from a hash of (prompt, sample, text): about half
    correct, so groups of 4 are mostly mixed and rounds overflow (here: step 2's carries into step 3)."""
    def score_prompts(model, tok, rows, n, *args, **kwargs):
        s = real(model, tok, rows, n, *args, **kwargs)
        rewards = [[float(zlib.crc32(f"{r['id']}|{j}|{t}".encode()) % 2 == 0) for j, t in enumerate(ts)]
                   for r, ts in zip(rows, s.texts)]
        return Scored(s.rows, s.completions, s.texts, rewards, s.seconds)

    return score_prompts


class Killed(Exception):
    pass


def test_tiny_run_carries_groups_across_a_checkpoint_and_steps_agree(tok, rows, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(loop, "score_prompts", planted(loop.score_prompts))
    cfg = GRPOConfig(max_steps=4, batch_prompts=2, num_generations=4, max_completion_length=4, filter="mixed",
                     oversample=2.0, max_generation_rounds=3, eval_every=2, checkpoint_every=2, batch_size=64,
                     temperature=0.9, device="cpu", seed=1)
    eval_rows, train_rows = rows[:2], rows[2:]
    cpu = torch.device("cpu")

    logged = []
    with caplog.at_level(logging.INFO, logger="slmflow"):
        straight_model = new_model(tok)
        straight = grpo(straight_model, tok, train_rows, eval_rows, cfg, tmp_path / "a", cpu,
                        log_step=lambda step, m: logged.append((step, m)))
    steps = [h["step"] for h in straight.history]
    assert steps == [0, 1, 2, 3, 4] and [s for s, _ in logged] == steps
    lines = [r.getMessage() for r in caplog.records]
    assert [int(m[1]) for line in lines if (m := re.match(r"rl step (\d+)/4 ", line))] == [1, 2, 3, 4]
    short = [int(m[1]) for line in lines if (m := re.match(r"rl: step (\d+) kept \d+ of 2 groups", line))]
    assert short == [h["step"] for h in straight.history if h.get("shortfall")]

    history = history_table(tmp_path / "a")
    trained = history.filter(pl.col("kept") & (pl.col("sample") == 0))
    assert set(history["step"]) == set(steps[1:])  # the history table's steps are the steps table's
    for h in straight.history[1:]:
        mine = trained.filter(pl.col("step") == h["step"])
        assert len(mine) == 2 or h["shortfall"]  # the groups this update trains: a batch of 2
        # a carried group was drawn one step before the update that trains it, never more
        carried = mine.filter(pl.col("drawn_step") != pl.col("step"))
        assert len(carried) == h["carried_groups"]
        assert (carried["drawn_step"] == h["step"] - 1).all()

    # the same run killed right after its step-2 checkpoint, then resumed: identical to the straight run
    real_save = loop.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise Killed

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        grpo(new_model(tok), tok, train_rows, eval_rows, cfg, tmp_path / "b", cpu)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    saved = loop.checkpoint_state(tmp_path / "b" / "ckpt-2")
    assert len(saved["carry"]) == straight.history[3]["carried_groups"] == 2  # the carry crosses the checkpoint
    # step 3's batch is step 2's overflow alone: nothing drawn, so no reward or filter rate to report
    assert straight.history[3]["generation_rounds"] == 0 and "reward_mean" not in straight.history[3]
    resumed_model = new_model(tok)
    resumed = grpo(resumed_model, tok, train_rows, eval_rows, cfg, tmp_path / "b", cpu)
    assert resumed.resumed_from == 2

    def timeless(history):
        return [{k: v for k, v in h.items() if not k.endswith("seconds") and k != "generated_tokens_per_s"}
                for h in history]

    assert timeless(resumed.history) == timeless(straight.history)
    assert history_table(tmp_path / "b").equals(history)
    for a, b in zip(straight_model.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.equal(a, b)
