"""A user swaps tasks freely: reasoning-gym tasks beyond the defaults go through prompts, SFT, eval and RL.

tests/test_chat.py checks more tasks' gold answers against their verifiers; here four others (a word
list, a logic puzzle, a chain of sums and a string task, with long questions and multi-token answers)
run through every stage that reads prompts, from the tiny pipeline's base model and tokenizer.
"""

from __future__ import annotations

import polars as pl
import pytest

from flows.config import load_config
from flows.pipeline import make_plan
from tasks import eval as evaluation
from tasks import prompts, rl, sft
from tasks.core.outputs import load_prompts
from tasks.core.stage import run_stage
from tasks.core.store import Store

OTHER_TASKS = {
    "word_sequence_reversal": {"min_words": 2, "max_words": 3},
    "aiw": {"task_type_weights": [1.0, 0.0, 0.0], "max_entities": 6},  # Alice's siblings puzzles
    "chain_sum": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2},
    "spell_backward": {"min_word_len": 3, "max_word_len": 6},
}


@pytest.mark.usefixtures("one_thread")
def test_other_tasks_run_through_prompts_sft_eval_and_rl(quick_run, tmp_path):
    root, _ = quick_run
    plan = make_plan(load_config(root / "tiny.yaml", []))
    base = Store(root / "models").get("pretrain", plan.stages["pretrain"].key)
    tokenizer = Store(root / "data").get("tokenizer", plan.stages["tokenizer"].key)
    data, models = Store(tmp_path / "data"), Store(tmp_path / "models")

    tasks = run_stage(prompts.STAGE, prompts.PromptsConfig(tasks=OTHER_TASKS, train_size=40, eval_size=6), {},
                      data).artifact
    m = tasks.manifest["metrics"]
    for task in OTHER_TASKS:
        assert m[f"gold_rejected.{task}"] == 0 and m[f"train.{task}"] > 20 and m[f"eval.{task}"] > 3

    # rows of the base model's 128 tokens hold every example (up to ~125 at this 512-token vocabulary)
    tuned = run_stage(sft.STAGE, sft.SFTConfig(max_steps=4, batch_size=4, seq_len=128, eval_every=4, task_weights={}),
                      {"model": base, "prompts": tasks, "tokenizer": tokenizer}, models).artifact
    sm = tuned.manifest["metrics"]
    assert sm["train_too_long"] == 0 and not [k for k in sm if k.startswith("train_too_long.")]
    assert sm["train_examples"] + sm["val_examples"] == tasks.rows["train"]

    held_out = evaluation.EvalConfig(max_completion_length=24, k=2, batch_size=64)
    scored = run_stage(evaluation.STAGE, held_out, {"model": tuned, "prompts": tasks}, data).artifact
    results = pl.read_parquet(scored.files("results"))
    counts = dict(results.group_by("task").len().iter_rows())
    assert counts == {t: tasks.manifest["metrics"][f"eval.{t}"] for t in OTHER_TASKS}
    assert all(f"pass_at_1.{t}" in scored.manifest["metrics"] for t in OTHER_TASKS)

    grpo = rl.RLConfig(max_steps=2, batch_prompts=4, num_generations=2, max_completion_length=24, filter="none",
                       eval_every=2, eval_prompts_per_task=3, batch_size=64)
    trained = run_stage(rl.STAGE, grpo, {"model": tuned, "prompts": tasks}, models).artifact
    history = pl.read_parquet(trained.files("history"))
    assert trained.manifest["metrics"]["steps"] == 2 and history.height >= 8
    assert set(history["prompt_id"]) <= {r["id"] for r in load_prompts(tasks, "train")}  # RL draws the swapped-in tasks' training prompts
