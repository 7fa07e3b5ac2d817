"""Rollouts: batch layout, determinism, greedy decoding and scoring with the real verifiers."""

from __future__ import annotations

import pytest
import torch

from conftest import ONE_DIGIT_ARITHMETIC, chat_tokenizer
from tasks.core import chat
from tasks.core.model import GPT, ModelConfig
from tasks.core.rollout import Sampling, end_id, is_correct, sample_completions, score_completions, take_per_task
from tasks.prompts import generate

TASK = "basic_arithmetic"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def rows():
    return generate(TASK, ONE_DIGIT_ARITHMETIC, "eval", 1, 6)


@pytest.fixture(scope="module")
def tok(rows):
    return chat_tokenizer(rows)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=tok.get_vocab_size(), depth=1, width=32, max_seq_len=128)).eval()


def reference(model, tok, rows, n, temperature, max_new_tokens, batch_size, seed):
    """The documented layout spelled out: each prompt n times in place, cut into batches, one generator."""
    seqs = [chat.prompt_ids(tok, r["question"]) for r in rows for _ in range(n)]
    g = torch.Generator().manual_seed(seed)
    flat = []
    for s in range(0, len(seqs), batch_size):
        flat += model.generate(seqs[s:s + batch_size], max_new_tokens, temperature=temperature,
                               eos_id=end_id(tok), generator=g)
    return [flat[i * n:(i + 1) * n] for i in range(len(rows))]


def test_layout_shapes_and_reference(model, tok, rows):
    # batches of 4 split the rows' copies
    got = sample_completions(model, tok, rows, 3, Sampling(temperature=1.0, max_completion_length=12, batch_size=4, seed=7))
    assert len(got) == len(rows) and all(len(c) == 3 for c in got)
    end = end_id(tok)
    for per_row in got:
        for ids in per_row:
            assert 1 <= len(ids) <= 12 and end not in ids[:-1]
    assert got == reference(model, tok, rows, 3, 1.0, 12, 4, 7)


def test_same_seed_same_completions(model, tok, rows):
    a = sample_completions(model, tok, rows, 4, Sampling(temperature=1.0, max_completion_length=10, batch_size=8, seed=3))
    b = sample_completions(model, tok, rows, 4, Sampling(temperature=1.0, max_completion_length=10, batch_size=8, seed=3))
    c = sample_completions(model, tok, rows, 4, Sampling(temperature=1.0, max_completion_length=10, batch_size=8, seed=4))
    assert a == b and a != c
    # top_k=1 is greedy: every copy equals the greedy completion, whatever the seed
    greedy = sample_completions(model, tok, rows, 1, Sampling(max_completion_length=10, batch_size=8, seed=0), greedy=True)
    top1 = sample_completions(model, tok, rows, 2, Sampling(temperature=1.0, top_k=1, max_completion_length=10, batch_size=5, seed=99))
    assert all(t == [g[0], g[0]] for t, g in zip(top1, greedy))


def test_greedy_does_not_depend_on_seed_or_batch_size(model, tok, rows):
    a = sample_completions(model, tok, rows, 1, Sampling(max_completion_length=10, batch_size=64, seed=0), greedy=True)
    b = sample_completions(model, tok, rows, 1, Sampling(max_completion_length=10, batch_size=2, seed=123), greedy=True)
    assert a == b


def test_progress_wraps_the_batches(model, tok, rows):
    seen = []

    def progress(items, total, what):
        for x in items:
            seen.append((x, total, what))
            yield x

    sample_completions(model, tok, rows, 2, Sampling(temperature=1.0, max_completion_length=4, batch_size=5, seed=0), progress=progress)
    assert [s[0] for s in seen] == [0, 5, 10] and seen[0][1] == 3  # 12 sequences in batches of 5


def test_score_completions_uses_the_verifier(tok, rows):
    end = end_id(tok)
    right = [chat.encode_plain(tok, chat.completion_text(r["answer"])) + [end] for r in rows]
    wrong = [chat.encode_plain(tok, "Answer: banana") + [end, 7, 8] for _ in rows]  # text after <|end|> is cut
    texts, rewards = score_completions(tok, rows, [[a, b] for a, b in zip(right, wrong)])
    assert [t[0] for t in texts] == [chat.completion_text(r["answer"]) for r in rows]
    assert all(t[1] == "Answer: banana" for t in texts)
    assert [r[0] for r in rewards] == [1.0] * len(rows) and [r[1] for r in rewards] == [0.0] * len(rows)
    assert is_correct(1.0) and not is_correct(0.5)


def test_take_per_task():
    rows = [{"task": t, "id": i} for i, t in enumerate("aabbbac")]
    assert [r["id"] for r in take_per_task(rows, 2)] == [0, 1, 2, 3, 6]
    assert take_per_task(rows, None) == rows


def test_overlong_prompts_are_counted_per_task_and_most_stop_the_stage(tok, rows):
    """A prompt whose completion would run past max_seq_len is counted (and logged); most of a task's stop."""
    from tasks.core.rollout import count_overlong
    from tasks.core.stage import StageError

    lengths = [len(chat.prompt_ids(tok, r["question"])) for r in rows]
    short, long_ = min(lengths), max(lengths)
    assert short < long_  # the fixture's questions differ in length
    budget = max(answer_tokens(tok, r) for r in rows)  # every gold answer fits
    model = GPT(ModelConfig(vocab_size=tok.get_vocab_size(), depth=1, width=32, max_seq_len=long_ + budget))
    assert count_overlong(model, tok, rows, budget, "eval") == {}
    over = sum(n == long_ for n in lengths)  # "Calculate 0 - 10." is one digit longer than the rest
    assert over == 1 and count_overlong(model, tok, rows, budget + 1, "eval") == {f"too_long.{TASK}": 1}
    with pytest.raises(StageError, match=rf"eval: {len(rows)} of {len(rows)} prompts of task {TASK} plus 100 new"):
        count_overlong(model, tok, rows, 100, "eval")


def answer_tokens(tok, row) -> int:
    return len(chat.encode_plain(tok, chat.completion_text(row["answer"]))) + 1  # with the end token


def test_answers_longer_than_the_completion_budget_are_counted_and_most_stop_the_stage(tok, rows):
    """A gold answer (chat format + end token) longer than max_completion_length can never be completed:
    counted per task; when most of a task's are, the stage stops naming the setting."""
    from tasks.core.rollout import count_overlong
    from tasks.core.stage import StageError

    needed = sorted(answer_tokens(tok, r) for r in rows)
    model = GPT(ModelConfig(vocab_size=tok.get_vocab_size(), depth=1, width=32, max_seq_len=512))
    assert count_overlong(model, tok, rows, needed[-1], "rl") == {}
    cut = sum(n == needed[-1] for n in needed)
    assert 0 < cut <= len(rows) / 2  # multi-digit answers are the longest, and a minority here
    assert count_overlong(model, tok, rows, needed[-1] - 1, "rl") == {f"answer_too_long.{TASK}": cut}
    with pytest.raises(StageError, match=rf"rl: {len(rows)} of {len(rows)} gold answers of task {TASK} need more "
                                         rf"than {needed[0] - 1} new tokens \(max_completion_length"):
        count_overlong(model, tok, rows, needed[0] - 1, "rl")
