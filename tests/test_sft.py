"""SFT: whole-example packing and the completion-only loss (prompt tokens give no gradient)."""

from __future__ import annotations

import torch

from tasks.core.model import GPT, ModelConfig, token_loss
from tasks.core.train import IGNORE, targets_of
from tasks.sft import pack_examples

PAD = 1


def example(prompt_len: int, completion_len: int, start: int) -> tuple[list[int], list[int]]:
    ids = list(range(start, start + prompt_len + completion_len))
    return ids, [0] * prompt_len + [1] * completion_len


def test_pack_examples_keeps_examples_whole():
    examples = [example(5, 3, 10), example(4, 2, 30), example(6, 4, 50), example(30, 5, 100), example(3, 3, 200)]
    tokens, mask, dropped = pack_examples(examples, seq_len=15, pad_id=PAD)
    assert dropped == 1  # 35 tokens > seq_len + 1
    assert tokens.shape == mask.shape == (2, 16)
    # best fit decreasing: 10 opens row 0, 8 opens row 1 (it does not fit beside 10), 6 fills row 0 exactly
    # (least room that holds it), 6 goes to row 1; in input order, 8 + 6 would have closed row 0 at 14
    assert tokens[0].tolist() == examples[2][0] + examples[1][0]
    assert mask[0].tolist() == examples[2][1] + examples[1][1]
    assert tokens[1].tolist() == examples[0][0] + examples[4][0] + [PAD] * 2
    assert mask[1].tolist() == examples[0][1] + examples[4][1] + [0, 0]


def test_prompt_tokens_get_no_loss_and_no_gradient():
    torch.manual_seed(0)
    examples = [example(6, 4, 3), example(5, 3, 20)]
    tokens, mask, _ = pack_examples(examples, seq_len=23, pad_id=PAD)
    rows, masks = torch.from_numpy(tokens).long(), torch.from_numpy(mask).long()
    inputs, targets = targets_of(rows, PAD, masks)
    learn = masks[:, 1:] == 1
    assert torch.equal(targets != IGNORE, learn)  # targets exactly the completion tokens
    model = GPT(ModelConfig(vocab_size=64, depth=1, width=32, max_seq_len=32))
    logits = model(inputs)
    logits.retain_grad()
    token_loss(logits, targets).backward()
    grad_norm_per_position = logits.grad.abs().sum(-1)
    assert torch.all(grad_norm_per_position[~learn] == 0)  # prompt and pad positions: exactly zero
    assert torch.all(grad_norm_per_position[learn] > 0)


def test_examples_that_do_not_fit_are_counted_per_task_and_a_lost_task_stops(caplog):
    import pytest

    from tasks.core.stage import StageError
    from tasks.sft import count_too_long

    rows = [{"task": "short"}] * 4 + [{"task": "wordy"}] * 4
    examples = [example(5, 3, 0)] * 4 + [example(20, 3, 0)] * 3 + [example(5, 3, 0)]  # 3 of 4 wordy: 23 > 16
    with pytest.raises(StageError, match=r"sft: 3 of 4 train examples of task wordy do not fit a row \(sft.seq_len "
                                         r"15 \+ 1 tokens; the longest has 23\): raise sft.seq_len \(the base model "
                                         r"allows 64\)"):
        count_too_long(rows, examples, 15, "train", 64)
    examples[5] = example(5, 3, 0)  # now 2 of 4: half, not most: counted and logged, not fatal
    assert count_too_long(rows, examples, 15, "train", 64) == {"train_too_long.wordy": 2}
    assert "2 of 4 train examples of task wordy do not fit a row" in caplog.text
    assert count_too_long(rows[:4], examples[:4], 15, "train", 64) == {}


def test_task_weights_repeat_examples_by_task():
    from collections import Counter

    from tasks.sft import mixed

    rows = [{"task": "add", "id": f"a{i}"} for i in range(1000)] + [{"task": "aiw", "id": f"w{i}"} for i in range(1000)]
    counts = Counter(r["task"] for r in mixed(rows, {"add": 3.0, "aiw": 0.5, "absent": 9.0}, seed=0))
    assert counts["add"] == 3000 and 450 < counts["aiw"] < 550  # a hash-chosen half of aiw, once
    half = {r["id"] for r in mixed(rows, {"aiw": 0.5}, seed=0) if r["task"] == "aiw"}
    assert half == {r["id"] for r in mixed(rows, {"aiw": 0.5}, seed=0) if r["task"] == "aiw"}  # deterministic
    assert half < {r["id"] for r in mixed(rows, {"aiw": 0.7}, seed=0) if r["task"] == "aiw"}  # more only adds
    assert Counter(r["task"] for r in mixed(rows, {}, seed=0)) == {"add": 1000, "aiw": 1000}
