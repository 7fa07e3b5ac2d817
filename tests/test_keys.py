"""What a stage key means, setting by setting: identity settings change it, runtime settings never do.

Modelled on Marin's executor tests (assert_same_version / assert_diff_version): each line names one
setting of configs/tiny.yaml and states which stage instances must get a new key when it changes.
"""

from __future__ import annotations

import pytest
from conftest import TINY

from flows.config import load_config
from flows.pipeline import make_plan
from tasks.core.settings import runtime_settings
from tasks.core.store import Store

BASE = make_plan(load_config(TINY))
TRAINING_DOWNSTREAM = {"pretrain", "difficulty_pretrain", "sft", "rl", "eval_pretrain", "eval_sft", "eval_rl"}


def changed_keys(*sets: str) -> set[str]:
    plan = make_plan(load_config(TINY, list(sets)))
    assert list(plan.stages) == list(BASE.stages)
    return {n for n, p in plan.stages.items() if p.key != BASE.stages[n].key}


def assert_same_version(*sets: str) -> None:
    assert changed_keys(*sets) == set(), sets


def assert_diff_version(*sets: str, expected: set[str]) -> None:
    assert changed_keys(*sets) == expected, sets


@pytest.mark.parametrize("setting", [
    # how a training stage runs: device, processes, accumulation, compile, logging, cadence
    "pretrain.device=cpu", "pretrain.nproc=2", "pretrain.grad_accum=2", "pretrain.compile=true",
    "pretrain.log_every=3", "pretrain.eval_every=7", "pretrain.checkpoint_every=9",
    "sft.device=cpu", "sft.nproc=2", "sft.checkpoint_every=50", "sft.eval_every=25",
    "rl.device=cpu", "rl.eval_every=5", "rl.checkpoint_every=5",
    "eval.device=cpu", "difficulty.device=cpu", "preselect.device=cpu",
    "references.models.0.pretrain.nproc=2", "references.models.1.pretrain.checkpoint_every=5",
    # where things go and which runner maps shards
    "run.data_root=/elsewhere", "run.models_root=s3://bucket/models", "run.experiment=other", "run.runner=dask",
    "run.dask_workers=7", "run.execution=deployments", "run.mlflow_uri=http://127.0.0.1:5000",
])
def test_runtime_settings_keep_every_key(setting):
    assert_same_version(setting)


@pytest.mark.parametrize("setting,expected", [
    ("pretrain.lr=0.02", TRAINING_DOWNSTREAM),
    ("pretrain.seed=3", TRAINING_DOWNSTREAM),
    ("pretrain.batch_size=16", TRAINING_DOWNSTREAM),
    ("pretrain.eval_rows=32", TRAINING_DOWNSTREAM),  # what the validation loss measures is part of the output
    ("pretrain.model.depth=3", TRAINING_DOWNSTREAM),
    ("sft.lr=0.01", {"sft", "rl", "eval_sft", "eval_rl"}),
    ("rl.lr=0.002", {"rl", "eval_rl"}),
    ("rl.batch_size=64", {"rl", "eval_rl"}),  # generation batches decide which random draws a sample gets
    ("eval.k=3", {"eval_pretrain", "eval_sft", "eval_rl"}),
    ("eval.batch_size=32", {"eval_pretrain", "eval_sft", "eval_rl"}),
    ("difficulty.k=3", {"difficulty_pretrain", "sft", "rl", "eval_sft", "eval_rl"}),
    ("pack.seq_len=64", TRAINING_DOWNSTREAM | {"pack"}),
    ("references.models.0.pretrain.lr=0.02", {"ref_0", "preselect", "select", "tokenizer", "pack"}
     | TRAINING_DOWNSTREAM),
])
def test_identity_settings_change_that_stage_and_what_is_downstream(setting, expected):
    assert_diff_version(setting, expected=expected)


def test_dedup_setting_changes_dedup_and_everything_after_it():
    changed = changed_keys("dedup.bands=20", "dedup.rows=13")
    assert "dedup" in changed and "ingest" not in changed and "prompts" not in changed
    assert changed == set(BASE.stages) - {"ingest", "prompts"}


def test_runtime_settings_are_recorded_in_the_manifest(tiny_run):
    root, _ = tiny_run
    planned = BASE.stages["pretrain"]
    manifest = Store(root / "models").get("pretrain", planned.key).manifest
    assert manifest["runtime"] == runtime_settings(planned.cfg) and manifest["runtime"]["checkpoint_every"] == 200
    assert "checkpoint_every" not in manifest["config"] and manifest["config"]["lr"] == 0.001


@pytest.mark.usefixtures("prefect_server")
def test_changing_checkpoint_cadence_device_or_processes_reruns_nothing(quick_run):
    from flows.pipeline import pipeline

    root, _ = quick_run
    cfg = load_config(root / "tiny.yaml", ["pretrain.checkpoint_every=7", "pretrain.device=cpu", "pretrain.nproc=2"])
    report = pipeline(cfg.model_dump(mode="json"))["report"]
    assert [r["stage"] for r in report] == list(BASE.stages)
    assert [r["stage"] for r in report if not r["cached"]] == []
