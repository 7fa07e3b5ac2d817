"""Rollouts: sample completions for chat prompts and score them with the tasks' verifiers.

Shared by eval, difficulty and RL (`score_prompts`). A prompt row is a dict from `load_prompts`
(`id`, `task`, `question`, `answer`, `metadata`, ...). Completions are token ids generated with
the model's KV cache (`GPT.generate`), stopping at `<|end|>` (kept as the last id when sampled).

Determinism: one `torch.Generator` seeded once per call draws every sample in batch order, so
the same (model, rows, n, settings, batch_size, seed) gives the same completions on the same
device. The draws depend on the batch layout: each row's copies are laid out consecutively
(row 0 x n, row 1 x n, ...) and cut into batches of `batch_size` sequences, so changing
`batch_size`, the row order or n changes which random numbers a sequence gets (and left padding
depends on the other prompts in a batch, which can move logits by float rounding).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np
import polars as pl

from tasks.core import chat
from tasks.core.base import StageError, log
from tasks.core.outputs import load_prompts, local_model_dir
from tasks.core.tokens import END, load_tokenizer, special_ids

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # torch is imported where a model runs: the stage configs and the report's baseline need none
    import torch

CORRECT = 1.0  # a sample counts as correct when its verifier reward is at least this (full credit)


def is_correct(reward: float) -> bool:
    """Full credit only: reasoning-gym gives partial rewards (e.g. the answer inside extra text)."""
    return reward >= CORRECT


def in_band(pass_rate, band: tuple[float, float]):
    """The difficulty band's rule (offline difficulty and RL's online filter): low < pass_rate < high, both ends excluded; a float gives a bool, an array (numpy,
    polars Series or expression) gives an elementwise mask."""
    low, high = band
    return (pass_rate > low) & (pass_rate < high)


def end_id(tok) -> int:
    ids = special_ids(tok)
    if END not in ids:
        raise ValueError(f"the tokenizer has no {END} token (special tokens: {sorted(ids)})")
    return ids[END]


class Sampling(BaseModel):
    """How completions are sampled, under TRL's generation names: one declaration for eval, difficulty and
    GRPO (their configs extend it, so each stage's settings and key keep these names), passed as one object
    to `score_prompts`. Greedy decoding is `score_prompts(..., greedy=True)`, not a temperature of 0."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    temperature: float = Field(1.0, gt=0, description="sampling temperature (GRPO's loss takes its log-probs at it "
                               "too, as TRL)")
    top_k: int | None = Field(None, ge=1, description="sample from the top_k tokens only (None: all)")
    max_completion_length: int = Field(20, ge=1, description="tokens generated per completion at most (a three-word "
                                       "reversal needs up to 18)")
    batch_size: int = Field(128, ge=1, description="sequences per generation batch (decides each sample's random draws)")
    seed: int = Field(0, description="seed of the sampling generator")

    def sampling(self) -> Sampling:
        """Just the sampling settings of a config that extends this one."""
        return Sampling(**{name: getattr(self, name) for name in Sampling.model_fields})


def _device(model) -> torch.device:
    import torch

    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):  # a fake model in tests
        return torch.device("cpu")


def sample_completions(model, tok, rows: Sequence[dict], n: int, sampling: Sampling, *, greedy: bool = False,
                       seed: int | None = None, progress: Callable[[Iterable, int, str], Iterator] | None = None
                       ) -> list[list[list[int]]]:
    """For each row, n completions (generated token ids, `<|end|>` included when reached).

    Sequences are the rows' prompts, each repeated n times in place, in batches of `sampling.batch_size`
    sequences; one generator seeded with `seed` (default `sampling.seed`) serves every batch (see the
    module docstring for what the draws depend on). greedy: argmax decoding (the n copies are then
    identical, so use n=1). `progress(iterable, total, what)` (e.g. `ctx.progress`) wraps the loop over batches.
    """
    import torch

    batch_size, max_new_tokens = sampling.batch_size, sampling.max_completion_length
    temperature, top_k = (0.0, None) if greedy else (sampling.temperature, sampling.top_k)
    if n < 1:
        raise ValueError(f"need n >= 1 (got n={n})")
    eos = end_id(tok)
    prompts = [chat.prompt_ids(tok, row["question"]) for row in rows]
    limit = getattr(getattr(model, "dims", None), "max_seq_len", None)
    longest = max(map(len, prompts), default=0) + max_new_tokens
    if limit is not None and longest > limit:
        log.warning("rollout: prompt + completion up to %d tokens, beyond the model's max_seq_len %d "
                    "(positions it never trained on)", longest, limit)
    seqs = [p for p in prompts for _ in range(n)]
    generator = torch.Generator(device=_device(model)).manual_seed(sampling.seed if seed is None else seed)
    starts = range(0, len(seqs), batch_size)
    if progress is not None:
        starts = progress(starts, len(starts), "batches generated")
    out: list[list[int]] = []
    for s in starts:
        out.extend(model.generate(seqs[s : s + batch_size], max_new_tokens, temperature=temperature, top_k=top_k,
                                  eos_id=eos, generator=generator, use_cache=True))
    return [out[i * n : (i + 1) * n] for i in range(len(rows))]


def score_completions(tok, rows: Sequence[dict], completions: Sequence[Sequence[Sequence[int]]]
                      ) -> tuple[list[list[str]], list[list[float]]]:
    """(texts, rewards), nested like `completions`: decoded up to `<|end|>`, scored by the row's verifier."""
    texts = [[chat.decode_completion(tok, list(ids)) for ids in per_row] for per_row in completions]
    rewards = [[float(chat.score(row, text)) for text in per_row] for row, per_row in zip(rows, texts)]
    return texts, rewards


@dataclass
class Scored:
    """n completions per prompt, each scored by its task's verifier (nested per prompt, per sample)."""

    rows: list[dict]
    completions: list[list[list[int]]]  # generated token ids
    texts: list[list[str]]
    rewards: list[list[float]]
    seconds: float  # generation time

    @property
    def correct(self) -> list[int]:
        """Full-credit samples per prompt."""
        return [sum(map(is_correct, r)) for r in self.rewards]

    @property
    def pass_rate(self) -> float:
        """Mean over prompts of the share of full-credit samples (greedy n=1: pass@1)."""
        return float(np.mean([c / len(r) for c, r in zip(self.correct, self.rewards)])) if self.rows else 0.0

    @property
    def generated_tokens(self) -> int:
        return sum(len(c) for per_row in self.completions for c in per_row)

    def table(self) -> pl.DataFrame:
        """One row per prompt: `prompt_id`, `task`, `k`, `correct`, `pass_rate`."""
        return pl.DataFrame({
            "prompt_id": [r["id"] for r in self.rows], "task": [r["task"] for r in self.rows],
            "k": [len(r) for r in self.rewards], "correct": self.correct,
        }, schema_overrides={"k": pl.Int32, "correct": pl.Int32}).with_columns(
            pass_rate=pl.col("correct") / pl.col("k"))

    def samples(self) -> pl.DataFrame:
        """One row per sample: `prompt_id`, `sample`, `completion`, `reward`."""
        return pl.DataFrame({
            "prompt_id": [r["id"] for r, ts in zip(self.rows, self.texts) for _ in ts],
            "sample": [j for ts in self.texts for j in range(len(ts))],
            "completion": [t for ts in self.texts for t in ts],
            "reward": [x for rs in self.rewards for x in rs],
        }, schema_overrides={"sample": pl.Int32, "reward": pl.Float64})


def score_prompts(model, tok, rows: Sequence[dict], n: int, sampling: Sampling, *, greedy: bool = False,
                  seed: int | None = None, progress: Callable[[Iterable, int, str], Iterator] | None = None) -> Scored:
    """Sample n completions per prompt (greedy: argmax, use n=1) and score each with its task's
    verifier: what eval, offline difficulty and RL's held-out check all measure. Arguments as
    `sample_completions`'s."""
    start = time.monotonic()
    completions = sample_completions(model, tok, rows, n, sampling, greedy=greedy, seed=seed, progress=progress)
    seconds = time.monotonic() - start
    texts, rewards = score_completions(tok, rows, completions)
    return Scored(list(rows), completions, texts, rewards, seconds)


def generation_metrics(*scored: Scored) -> dict[str, float]:
    """Tokens generated, seconds spent and the rate, over one or more scored sets."""
    tokens, seconds = sum(s.generated_tokens for s in scored), sum(s.seconds for s in scored)
    return {"generated_tokens": tokens, "generate_seconds": round(seconds, 3),
            "generate_tokens_per_s": tokens / max(1e-9, seconds)}


def constant_answer_baseline(prompts, split: str, per_task: int | None) -> dict[str, dict]:
    """Per task, what answering every prompt with the train split's most frequent gold answer scores on
    the rows an eval stage sees (`split`, first `per_task` of each task), by the task's own verifier:
    {task: {"answer", "pass_at_1", "prompts"}}. A model has learned a task only where it beats this."""
    train = pl.DataFrame(load_prompts(prompts, "train")).select("task", "answer")
    common = {t: a for t, a in train.group_by("task").agg(pl.col("answer").mode().sort().first()).iter_rows()}
    rows = take_per_task(load_prompts(prompts, split), per_task)
    out: dict[str, dict] = {}
    for task in sorted({r["task"] for r in rows}):
        mine = [r for r in rows if r["task"] == task]
        answer = common.get(task)
        correct = [answer is not None and chat.score(r, chat.completion_text(answer)) == 1.0 for r in mine]
        out[task] = {"answer": answer, "pass_at_1": float(np.mean(correct)), "prompts": len(mine)}
    return out


def count_overlong(model, tok, rows: Sequence[dict], max_new_tokens: int, stage: str) -> dict[str, int]:
    """Prompts per task that do not fit, two ways. `too_long.<task>`: prompt + `max_new_tokens` exceed the
    model's `max_seq_len` (still scored, but on positions the model never trained on).
    `answer_too_long.<task>`: the gold answer in the chat format, with its end token, is longer than
    `max_new_tokens`, so no completion can finish correctly (RL masks every cut completion, so such a task
    trains on nothing). Each task's count is logged; a task with more than half of its prompts not fitting
    either way stops the stage (its score would mean little)."""
    limit = getattr(getattr(model, "dims", None), "max_seq_len", None)
    totals, over, longest, cut, longest_answer = Counter(), Counter(), {}, Counter(), {}
    for row in rows:
        task = row["task"]
        totals[task] += 1
        answer = len(chat.encode_plain(tok, chat.completion_text(row["answer"]))) + 1
        if answer > max_new_tokens:
            cut[task] += 1
            longest_answer[task] = max(answer, longest_answer.get(task, 0))
        n = len(chat.prompt_ids(tok, row["question"])) + max_new_tokens
        if limit is not None and n > limit:
            over[task] += 1
            longest[task] = max(n, longest.get(task, 0))
    for task in sorted(cut):
        message = (f"{stage}: {cut[task]:,} of {totals[task]:,} gold answers of task {task} need more than "
                   f"{max_new_tokens} new tokens (max_completion_length; the longest needs {longest_answer[task]} "
                   f"with its end token)")
        if cut[task] > totals[task] / 2:
            raise StageError(f"{message}: raise max_completion_length")
        log.warning("%s: those prompts cannot be answered in full", message)
    for task in sorted(over):
        message = (f"{stage}: {over[task]:,} of {totals[task]:,} prompts of task {task} plus {max_new_tokens} new tokens "
                   f"exceed the model's max_seq_len {limit} (the longest needs {longest[task]})")
        if over[task] > totals[task] / 2:
            raise StageError(f"{message}: lower the completion length, shorten the task's prompts, or train a model "
                             f"with a longer max_seq_len")
        log.warning("%s: scored on positions it never trained on", message)
    return ({f"too_long.{task}": over[task] for task in sorted(over)}
            | {f"answer_too_long.{task}": cut[task] for task in sorted(cut)})


def take_per_task(rows: Sequence[dict], cap: int | None) -> list[dict]:
    """The first `cap` rows of each task, in the given order (all rows when cap is None)."""
    if cap is None:
        return list(rows)
    seen: dict[str, int] = {}
    out = []
    for row in rows:
        if seen.get(row["task"], 0) < cap:
            seen[row["task"]] = seen.get(row["task"], 0) + 1
            out.append(row)
    return out


def prompts_and_policy(stage: str, inputs: dict, split: str, per_task: int | None, device: str):
    """(prompt rows, model, tokenizer) of a stage that scores a model: the first `per_task` rows of each
    task of the `prompts` input's split, and the `model` input on `device`."""
    rows = take_per_task(load_prompts(inputs["prompts"], split), per_task)
    if not rows:
        raise StageError(f"{stage}: prompts split {split!r} has no rows")
    model, tok = load_policy(inputs["model"], resolve_device(device))
    return rows, model, tok


def resolve_device(device: str) -> torch.device:
    """The torch device of a `device` setting: auto is cuda when available, else cpu."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_policy(artifact, device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer) from a training-stage output: `<artifact.path>/model/`."""
    from tasks.core.model import load_model

    directory = local_model_dir(artifact)
    return load_model(directory, device).eval(), load_tokenizer(directory)
