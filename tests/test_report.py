"""The report card's held-out table: standard errors and the constant-answer baseline."""

import math

import polars as pl
import pytest

from flows.report import accuracy_table, headline, mean_standard_error, standard_error, to_markdown
from tasks.core.outputs import load_prompts
from tasks.core.rollout import constant_answer_baseline


def card_row(stage: str, accuracy: dict, prompts: dict) -> dict:
    mean = sum(accuracy.values()) / len(accuracy)
    return {"stage": stage, "key": "k", "cached": False, "rows": {}, "seconds": 1.0, "path": "p",
            "metrics": {"pass_at_1": mean, "sampled_pass_at_1": 0.2, "pass_at_k": 0.5},
            "accuracy": accuracy, "prompts": prompts}


def test_standard_errors_in_the_table():
    assert standard_error(0.1, 100) == pytest.approx(0.03)
    assert mean_standard_error([0.1, 0.5], [100, 25]) == pytest.approx(math.sqrt(0.03 ** 2 + 0.1 ** 2) / 2)
    card = [card_row("eval_sft", {"a": 0.1, "b": 0.5}, {"a": 100, "b": 25})]
    baseline = {"a": {"answer": "1", "pass_at_1": 0.04, "prompts": 100}, "b": {"answer": "x", "pass_at_1": 0.0, "prompts": 25}}
    header, rows = accuracy_table(card, baseline)
    assert header == ["model", "a", "b", "mean", "sampled pass@1", "pass@k", "prompts"]
    assert rows[0] == ["eval_sft", "0.100 ± 0.030", "0.500 ± 0.100", "0.300 ± 0.052", "0.200", "0.500", "125"]
    assert rows[1][:4] == ["constant answer", "0.040 ± 0.020", "0.000 ± 0.000", "0.020 ± 0.010"]
    assert "| constant answer | 0.040 ± 0.020 |" in to_markdown(card, baseline)
    ingest = {**card_row("ingest", {"a": 0.0}, {}), "accuracy": {}, "cached": True, "seconds": 59.0}
    assert headline([ingest, *card], baseline) == ("Held-out mean greedy pass@1: sft 0.300, constant answer 0.020. "
                                                   "1 of 2 stages computed (1 cached), 1.0 min.")


def test_constant_answer_baseline_matches_an_oracle(quick_run):
    _, result = quick_run
    prompts = next(r for r in result["report"] if r["stage"] == "prompts")
    from tasks.core.store import Store

    artifact = Store(prompts["path"].rsplit("/prompts/", 1)[0]).get("prompts", prompts["key"])
    baseline = constant_answer_baseline(artifact, "eval", None)
    train = pl.DataFrame(load_prompts(artifact, "train"))
    held_out = pl.DataFrame(load_prompts(artifact, "eval"))
    for task, b in baseline.items():
        counts = train.filter(pl.col("task") == task)["answer"].value_counts(sort=True)
        top = counts["count"][0]
        assert b["answer"] == min(counts.filter(pl.col("count") == top)["answer"])  # ties: the smallest answer
        answers = held_out.filter(pl.col("task") == task)["answer"]
        assert b["prompts"] == len(answers)
        assert b["pass_at_1"] == pytest.approx((answers == b["answer"]).mean())  # these verifiers: exact match
    assert result["baseline"] == baseline  # the pipeline's card shows the same numbers
    from pathlib import Path

    assert "| constant answer |" in Path(result["report_path"]).read_text()  # and so does report.md


def test_card_shows_what_did_not_fit_per_task():
    """Per-task counts of examples too long for a row or a model are on the card when not zero."""
    from types import SimpleNamespace

    from flows.report import report_card
    from tasks.core.stage import Outcome
    from tasks.core.store import Artifact

    metrics = {"pass_at_1": 0.5, "too_long.gcd": 3, "too_long.leg_counting": 0, "train_too_long.gcd": 7, "other": 1}
    artifact = Artifact(stage="eval", key="k", path="p", manifest={"metrics": metrics, "rows": {}})
    plan = SimpleNamespace(stages={"eval_sft": SimpleNamespace(stage=SimpleNamespace(report_metrics=("pass_at_1",)))})
    [row] = report_card([("eval_sft", Outcome(artifact=artifact, cached=False, seconds=1.0))], plan)
    assert row["metrics"] == {"pass_at_1": 0.5, "too_long.gcd": 3, "train_too_long.gcd": 7}
