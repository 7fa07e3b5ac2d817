"""Thin Prefect wrappers: a stage becomes a task whose cache key is its stage key.

The store, not Prefect's result storage, is the source of truth: the flow asks Prefect to
refresh its cache whenever the store lacks the output or a stage is forced, so a Prefect
`Cached` state always means the store holds that output. Results are JSON (never pickles).
"""

from __future__ import annotations

import functools
import hashlib
from typing import Callable

from prefect import task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run, task_run
from pydantic import BaseModel

from tasks.core.lineage import Tracker, tracking_uri
from tasks.core.stage import Outcome, Stage, StageConfig, run_stage
from tasks.core.store import Artifact, Store, stage_key


class RunContext(BaseModel):
    """Where a pipeline run keeps things; passed to every stage task (small, JSON-able)."""

    data_root: str = "data"
    models_root: str = "models"
    mlflow_uri: str | None = None
    experiment: str = "slmflow"
    parent_run_id: str | None = None

    def store(self, stage: Stage) -> Store:
        return Store(self.models_root if stage.store == "models" else self.data_root)

    def tracker(self) -> Tracker:
        return Tracker(tracking_uri(self.mlflow_uri), self.experiment)


def prefect_map(stage_name: str) -> Callable[..., list]:
    """Map a function over shards as Prefect tasks (visible per shard in the UI)."""

    def _map(fn: Callable, items: list, **common) -> list:
        shard_task = task(fn, name=f"{stage_name}-shard", cache_policy=NO_CACHE)
        return shard_task.map(items, **{k: unmapped(v) for k, v in common.items()}).result()

    return _map


def prefect_cache_key(stage: Stage, run: RunContext, cfg: StageConfig, inputs: dict[str, Artifact]) -> str:
    # The store root is part of Prefect's key: two stores must never share a cache record.
    root = hashlib.sha256(run.store(stage).root.encode()).hexdigest()[:8]
    return f"{stage.name}-{stage_key(stage.name, stage.version, cfg, {k: a.key for k, a in inputs.items()})}-{root}"


@functools.cache  # one task object per stage, shared by its module and the flow
def stage_task(stage: Stage):
    """The Prefect task of a stage: `task(run, cfg, inputs, force) -> Outcome`."""

    def _key(_context, params) -> str:
        return prefect_cache_key(stage, params["run"], params["cfg"], params["inputs"])

    @task(name=stage.name, cache_key_fn=_key, persist_result=True, result_serializer="json")
    def _stage(run: RunContext, cfg: StageConfig, inputs: dict[str, Artifact], force: bool = False,
               label: str | None = None) -> Outcome:
        tags = {"prefect.flow_run_id": str(flow_run.id or ""), "prefect.task_run_id": str(task_run.id or "")}
        return run_stage(
            stage, cfg, inputs, run.store(stage), tracker=run.tracker(), parent_run_id=run.parent_run_id,
            force=force, map_fn=prefect_map(stage.name), tags=tags, label=label,
        )

    return _stage
