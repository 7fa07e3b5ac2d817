"""One validation path: the runner calls a stage's `check`, on every path, before anything runs."""

from __future__ import annotations

import pytest

from flows.config import resolve_config
from flows.pipeline import _pipeline, make_plan
from flows.stages import _stages
from tasks.core.stage import Stage, StageConfig, StageError, run_stage
from tasks.core.store import Store

from conftest import TINY

BAD = ["pretrain.warmup_steps=100000"]  # warmup must end before max_steps: pretrain's check says so


class Toy(StageConfig):
    n: int = 1


def test_run_stage_checks_before_it_computes_and_not_on_a_hit(tmp_path):
    calls = {"check": 0, "fn": 0}

    def check(cfg):
        calls["check"] += 1
        if cfg.n < 0:
            raise StageError("toy.n: must be >= 0")

    def fn(cfg, inputs, ctx):
        calls["fn"] += 1
        (ctx.out / "x.txt").write_text(str(cfg.n))
        return {}

    stage, store = Stage("toy", 1, Toy, fn, check=check), Store(tmp_path / "data")
    with pytest.raises(StageError, match="toy.n"):
        run_stage(stage, Toy(n=-1), {}, store)
    assert calls == {"check": 1, "fn": 0} and not list((tmp_path / "data").rglob("x.txt"))
    run_stage(stage, Toy(n=2), {}, store)
    assert calls == {"check": 2, "fn": 1}
    assert run_stage(stage, Toy(n=2), {}, store).cached and calls == {"check": 2, "fn": 1}


def test_every_path_checks_every_needed_stage_first(tmp_path, monkeypatch):
    """The plan, the pipeline flow and the stage flow (deployments, serve) fail on a bad pretrain setting
    before any stage runs (nothing here has a store or a server: a check that ran late would fail otherwise)."""
    monkeypatch.chdir(tmp_path)  # a late check would leave an MLflow store here
    plan = make_plan(resolve_config(str(TINY), BAD))
    with pytest.raises(StageError, match="pretrain.warmup_steps"):
        plan.check(plan.needed(None))
    plan.check(plan.needed(["prompts"]))  # pretrain is not needed: its check does not run
    with pytest.raises(StageError, match="pretrain.warmup_steps"):
        _pipeline(str(TINY), None, None, BAD, None)
    with pytest.raises(StageError, match="pretrain.warmup_steps"):
        _stages("pretrain", str(TINY), BAD, None, False, None)
    assert list(tmp_path.iterdir()) == []
