"""Thin Prefect wrappers: a stage becomes a task whose cache key is its stage key.

The store, not Prefect's result storage, is the source of truth: the flow asks Prefect to
refresh its cache whenever the store lacks the output or a stage is forced, so a Prefect
`Cached` state always means the store holds that output. Results are JSON (never pickles).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
from typing import Callable, Iterator

from prefect import task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run, task_run
from pydantic import BaseModel

from tasks.core.lineage import Tracker, tracking_uri
from tasks.core.stage import Outcome, Stage, StageConfig, StageError, log, run_stage
from tasks.core.store import Artifact, Store, stage_key


class RunContext(BaseModel):
    """Where a pipeline run keeps things; passed to every stage task (small, JSON-able)."""

    data_root: str = "data"
    models_root: str = "models"
    mlflow_uri: str | None = None
    experiment: str = "slmflow"
    parent_run_id: str | None = None
    dask_address: str | None = None  # data stages map their shards on this Dask scheduler (run.runner dask)

    def store(self, stage: Stage) -> Store:
        return Store(self.models_root if stage.store == "models" else self.data_root)

    def tracker(self) -> Tracker:
        return Tracker(tracking_uri(self.mlflow_uri), self.experiment)


def prefect_map(stage_name: str, dask_address: str | None = None) -> Callable[..., list]:
    """Map a function over shards as Prefect tasks (visible per shard in the UI): on the flow's
    task runner, or on a Dask cluster through prefect-dask. Results come back in item order."""

    def _map(fn: Callable, items: list, **common) -> list:
        shard_task = task(fn, name=f"{stage_name}-shard", cache_policy=NO_CACHE)
        fixed = {k: unmapped(v) for k, v in common.items()}
        if dask_address is None:
            return shard_task.map(items, **fixed).result()
        from prefect_dask import DaskTaskRunner

        first = next(iter(inspect.signature(fn).parameters))  # the mapped argument
        log.info("%s: %d shards on Dask %s", stage_name, len(items), dask_address)
        with DaskTaskRunner(address=dask_address) as runner:
            return runner.map(shard_task, {first: items, **fixed}).result()

    return _map


@contextlib.contextmanager
def dask_scheduler(runner: str, address: str | None, workers: int) -> Iterator[str | None]:
    """Where shard maps run: None (Prefect's default task runner), the configured Dask scheduler,
    or a local Dask cluster for the length of this block whose workers report to our Prefect API."""
    if runner != "dask":
        yield None
        return
    try:
        from distributed import LocalCluster
        import prefect_dask  # noqa: F401
    except ImportError:
        raise StageError("run.runner dask needs prefect-dask: pip install -e '.[dask]'") from None
    if address:
        yield address
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:  # also the temporary server's URL when there is no PREFECT_API_URL
        api = str(client.api_url)
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, env={"PREFECT_API_URL": api}) as cluster:
        yield cluster.scheduler_address


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
            force=force, map_fn=prefect_map(stage.name, run.dask_address), tags=tags, label=label,
        )

    return _stage
