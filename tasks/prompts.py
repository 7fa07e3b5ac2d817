"""Prompts: reasoning-gym problems for SFT, RL and evaluation, with eval decontaminated from train.

For each task (in sorted name order, so the output does not depend on the config's key order)
`train_size` train and `eval_size` eval problems are generated with the task's generator
settings (`tasks[name]`, reasoning-gym Config kwargs: the difficulty). reasoning-gym builds
item i of a dataset with seed s from `Random(s + i)`, so seeds s and s + 1 give the same
items shifted by one index; the generator seed is therefore a hash of (task, seed)
(`generator_seed`), which makes any two different seeds give unrelated items.

Clean-up, on the normalized question (`tasks.core.tokens.normalize`: NFC, whitespace folded,
lowercased, stripped): duplicates within eval and within train are dropped (the first kept), then every
train question that also appears in eval is removed (TULU 3 style decontamination,
the eval set stays unseen). `decontaminated.<task>` counts distinct train questions removed (further copies
of one count as duplicates). Small generator settings have few distinct questions, so both
counts can be large: fewer than `train_size` train rows per task may remain (`train.<task>`).

Output tables `train` and `eval` (Parquet shards `part-*.parquet` of `shard_rows` rows):
`id` (hash of task, split, seed and generator index: stable), `task`, `difficulty`
(canonical JSON of the generator kwargs), `question`, `answer`, `solution` (a worked
solution where the task has one: gsm_symbolic's `answer_cot` without its final
"#### x" line; else null) and `metadata` (the generator's metadata as JSON; tuples become
lists, other non-JSON values strings). Verifiers come from the task library by `task`
(`tasks.core.chat.score`). `tasks.core.outputs.load_prompts(artifact, split)` reads a split.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any, Iterator

import pyarrow as pa
from pydantic import Field

from tasks.core import gym
from tasks.core.chat import completion_text, jsonable, score
from tasks.core.outputs import PROMPT_SPLITS as SPLITS
from tasks.core.stage import Stage, StageConfig, StageContext, StageError, log
from tasks.core.store import canonical_json, write_parquet
from tasks.core.tokens import normalize

VERSION = 1
SCHEMA = pa.schema([
    ("id", pa.string()), ("task", pa.string()), ("difficulty", pa.string()), ("question", pa.string()),
    ("answer", pa.string()), ("solution", pa.string()), ("metadata", pa.string()),
])
# The default run's tasks, three kinds, each with thousands of distinct problems (room to generalise:
# the held-out problems are new, not memorised): two-digit addition, reversing a short word list, and
# "Alice in Wonderland" sibling/friend questions (the answer is a count in the question plus one).
DEFAULT_TASKS: dict[str, dict[str, Any]] = {
    "basic_arithmetic": {"min_terms": 2, "max_terms": 2, "min_digits": 2, "max_digits": 2,
                         "operators": ["+"], "allow_parentheses": False, "allow_negation": False},
    "word_sequence_reversal": {"min_words": 2, "max_words": 3},
    "aiw": {"task_type_weights": [0.5, 0.5, 0.0], "max_entities": 9},
}


class PromptsConfig(StageConfig):
    tasks: dict[str, dict[str, Any]] = Field(default_factory=lambda: {k: dict(v) for k, v in DEFAULT_TASKS.items()},
                                             description="reasoning-gym task name -> generator kwargs (the difficulty)")
    train_size: int = Field(2000, gt=0, description="train prompts generated per task (before dedup/decontamination)")
    eval_size: int = Field(100, gt=0, description="eval prompts generated per task (before dedup)")
    train_seed: int = Field(0, description="seed of the train split")
    eval_seed: int = Field(1, description="seed of the eval split; must differ from train_seed")
    shard_rows: int = Field(5000, gt=0, description="rows per Parquet shard")


def generator_seed(task: str, seed: int) -> int:
    """The reasoning-gym seed of (task, seed): 30 bits of blake2b, far apart for different seeds."""
    digest = hashlib.blake2b(f"{task}\0{seed}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 34


def prompt_id(task: str, split: str, seed: int, index: int) -> str:
    return hashlib.sha256(f"{task}\0{split}\0{seed}\0{index}".encode()).hexdigest()[:20]


def check(cfg: PromptsConfig) -> None:
    if cfg.train_seed == cfg.eval_seed:
        raise StageError(f"prompts.eval_seed: must differ from prompts.train_seed (both {cfg.train_seed})")
    if not cfg.tasks:
        raise StageError("prompts.tasks: name at least one reasoning-gym task")
    for task, kwargs in cfg.tasks.items():
        gym.check_task(task, kwargs, "prompts.tasks")


def generate(task: str, kwargs: dict, split: str, seed: int, size: int, ctx: StageContext | None = None) -> list[dict]:
    """`size` rows of one task and split, in generator index order."""
    difficulty = canonical_json(kwargs)
    generated = gym.items(task, kwargs, size, generator_seed(task, seed), f"prompts.tasks ({split})")
    if ctx is not None:
        generated = ctx.progress(generated, size, f"{task} {split} prompts")
    rows = []
    for i, item in enumerate(generated):
        metadata = jsonable(item.get("metadata") or {})
        answer = item.get("answer")
        rows.append({
            "id": prompt_id(task, split, seed, i),
            "task": task,
            "difficulty": difficulty,
            "question": str(item["question"]),
            "answer": None if answer is None else str(answer),
            "solution": gym.solution_of(metadata),
            "metadata": json.dumps(metadata, sort_keys=True, ensure_ascii=False),
        })
    return rows


def verified(rows: list[dict], counts: Counter, split: str) -> list[dict]:
    """The rows whose gold answer, written in the chat format (what SFT teaches and RL rewards), passes
    the task's own verifier; the rest are counted (`gold_rejected.<task>`) and logged. A task whose
    verifier rejects most of its gold answers (no gold answer, as propositional_logic, or one the answer
    extraction changes) stops the stage: nothing could be learned from it."""
    if not rows:
        return rows
    task = rows[0]["task"]
    passes = [r["answer"] is not None and score(r, completion_text(r["answer"])) == 1.0 for r in rows]
    ok = [r for r, good in zip(rows, passes) if good]
    rejected = len(rows) - len(ok)
    counts[f"gold_rejected.{task}"] += rejected
    if rejected:
        bad = rows[passes.index(False)]
        message = (f"prompts.tasks.{task}: its verifier rejects {rejected:,} of {len(rows):,} {split} gold answers "
                   f"given as 'Answer: <gold>' (e.g. answer {bad['answer']!r})")
        if rejected > len(rows) / 2:
            raise StageError(f"{message}: slmflow trains on gold answers; choose a task that has them")
        log.warning("%s: those rows are dropped", message)
    return ok


def distinct(rows: list[dict], seen: set[str], counts: Counter, split: str) -> Iterator[tuple[dict, str]]:
    """(row, normalized question) of the rows whose question `seen` lacks (it is added); counts the rest
    as `duplicates_dropped.<split>`."""
    for row in rows:
        key = normalize(row["question"])
        if key in seen:
            counts[f"duplicates_dropped.{split}"] += 1
            continue
        seen.add(key)
        yield row, key


def _write(rows: list[dict], split: str, shard_rows: int, ctx: StageContext) -> None:
    chunks = [rows[s:s + shard_rows] for s in range(0, len(rows), shard_rows)] or [[]]
    for n, chunk in enumerate(chunks):
        table = pa.Table.from_pylist(chunk, schema=SCHEMA)
        write_parquet(table, ctx.out / split / f"part-{n:05d}.parquet")


def make_prompts(cfg: PromptsConfig, inputs: dict, ctx: StageContext) -> dict:
    tasks = sorted(cfg.tasks)
    counts: Counter = Counter()

    eval_rows, eval_keys = [], set()
    for task in tasks:
        rows = verified(generate(task, cfg.tasks[task], "eval", cfg.eval_seed, cfg.eval_size, ctx), counts, "eval")
        for row, _ in distinct(rows, eval_keys, counts, "eval"):
            eval_rows.append(row)
            counts[f"eval.{task}"] += 1

    train_rows, train_keys = [], set()
    for task in tasks:
        counts[f"decontaminated.{task}"] += 0
        rows = verified(generate(task, cfg.tasks[task], "train", cfg.train_seed, cfg.train_size, ctx), counts, "train")
        for row, key in distinct(rows, train_keys, counts, "train"):
            if key in eval_keys:
                counts[f"decontaminated.{task}"] += 1
            else:
                train_rows.append(row)
                counts[f"train.{task}"] += 1

    _write(train_rows, "train", cfg.shard_rows, ctx)
    _write(eval_rows, "eval", cfg.shard_rows, ctx)
    for task in tasks:
        for split in SPLITS:
            counts[f"{split}.{task}"] += 0
    metrics = dict(sorted(counts.items()))
    metrics.update(
        train_rows=len(train_rows),
        eval_rows=len(eval_rows),
        decontaminated=sum(counts[f"decontaminated.{t}"] for t in tasks),
        duplicates_dropped=counts["duplicates_dropped.train"] + counts["duplicates_dropped.eval"],
        **{f"duplicates_dropped.{s}": counts[f"duplicates_dropped.{s}"] for s in SPLITS},
    )
    return {"rows": {"train": len(train_rows), "eval": len(eval_rows)}, "metrics": metrics}


STAGE = Stage("prompts", VERSION, PromptsConfig, make_prompts, check=check,
              report_metrics=("train_rows", "eval_rows", "decontaminated", "duplicates_dropped"))
