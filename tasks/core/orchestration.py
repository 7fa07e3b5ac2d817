"""Thin Prefect wrappers: a stage becomes a Prefect task; shard maps become mapped tasks.

The store, not Prefect's result storage, is the source of truth: a stage task always runs, asks
the store, and returns a `Cached` state on a hit. Results stay in memory (never pickled to disk).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import re
from typing import Callable, Iterator

from prefect import task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run, task_run
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel

from tasks.core.faults import debugging, explain
from tasks.core.lineage import Tracker, tracking_uri
from tasks.core.stage import Outcome, Stage, StageConfig, StageError, log, run_stage
from tasks.core.store import Artifact, Store


class _QuietStageErrors(logging.Filter):
    """Prefect logs a task that returns a Failed state at ERROR with the state's repr and an empty
    traceback ("NoneType: None"); for a StageError the command prints its one line itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return re.search(r"result=\w*(StageError|DamagedInput)\(", record.getMessage()) is None


logging.getLogger("prefect.task_runs").addFilter(_QuietStageErrors())


class RunContext(BaseModel):
    """Where a pipeline run keeps things; passed to every stage task (small, JSON-able)."""

    data_root: str = "data"
    models_root: str = "models"
    mlflow_uri: str | None = None
    experiment: str = "slmflow"
    parent_run_id: str | None = None
    dask_address: str | None = None  # data stages map their shards on this Dask scheduler (run.runner dask)
    config_file: str | None = None  # the pipeline config file, recorded in each manifest it produces

    def store(self, stage: Stage) -> Store:
        return Store(self.models_root if stage.store == "models" else self.data_root)

    def tracker(self) -> Tracker:
        return Tracker.shared(tracking_uri(self.mlflow_uri), self.experiment)


class ShardMap:
    """Map a function over shards as Prefect tasks (visible per shard in the UI): on a thread pool as
    wide as this machine's cores, or on a Dask cluster through prefect-dask. Results come back in item
    order. `width`: how many items run at once (what `StageContext.map_bounded` puts in a window).
    `on_dask`: its workers may share no disk with this machine (with a remote store, `run_stage` shares the
    steps' scratch files through the store: tasks.core.shared_scratch)."""

    def __init__(self, stage_name: str, dask_address: str | None = None):
        self.stage_name, self.dask_address = stage_name, dask_address

    @property
    def on_dask(self) -> bool:
        return self.dask_address is not None

    def run_on_workers(self, fn: Callable, *args) -> None:
        """`fn(*args)` on every worker of the cluster (a shared-scratch cache to drop)."""
        from distributed import Client

        with Client(self.dask_address, timeout=30) as client:
            client.run(fn, *args)

    @functools.cached_property
    def width(self) -> int:
        if self.dask_address is None:
            return os.cpu_count() or 1
        from distributed import Client

        with Client(self.dask_address, timeout=30) as client:  # the cluster's threads, all workers
            return max(1, sum(client.nthreads().values()))

    def __call__(self, fn: Callable, items: list, **common) -> list:
        shard_task = task(fn, name=f"{self.stage_name}-{fn.__name__}", cache_policy=NO_CACHE)
        fixed = {k: unmapped(v) for k, v in common.items()}
        first = next(iter(inspect.signature(fn).parameters))  # the mapped argument
        if self.dask_address is None:
            # The flow's own thread pool has no bound: it would start every shard at once, each with its
            # memory and threads. One pool per map, as many threads as cores (a separate pool: a bounded
            # shared one would deadlock when stage tasks wait on their own shard tasks).
            runner = ThreadPoolTaskRunner(max_workers=self.width)
        else:
            from prefect_dask import DaskTaskRunner

            log.info("%s: %d x %s on Dask %s", self.stage_name, len(items), fn.__name__, self.dask_address)
            runner = DaskTaskRunner(address=self.dask_address)
        with runner:
            return runner.map(shard_task, {first: items, **fixed}).result()


@contextlib.contextmanager
def dask_scheduler(runner: str, address: str | None, workers: int) -> Iterator[str | None]:
    """Where shard maps run: None (Prefect's default task runner), the configured Dask scheduler,
    or a local Dask cluster for the length of this block whose workers report to our Prefect API."""
    if runner != "dask":
        yield None
        return
    try:
        import prefect_dask  # noqa: F401
        from distributed import LocalCluster
    except ImportError:
        raise StageError("run.runner dask needs prefect-dask: pip install -e '.[dask]'") from None
    if address:
        yield address
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:  # also the temporary server's URL when there is no PREFECT_API_URL
        api = str(client.api_url)
    # Dask's nanny sets its workers' OMP_NUM_THREADS=1, PYTHONHASHSEED, ... in *our* environment and
    # leaves them there: in-process training and later subprocesses would run with one thread (other
    # bytes on CPU). Put ours back once the workers are up, and again at the end.
    environ = dict(os.environ)

    def restore() -> None:
        os.environ.clear()
        os.environ.update(environ)

    try:
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=None, env={"PREFECT_API_URL": api}) as cluster:
            restore()
            yield cluster.scheduler_address
    finally:
        restore()


def mlflow_run_url(tracker: Tracker, run_id: str) -> str:
    """Where a person opens a run: a link on a tracking server, else how to open the local store."""
    if tracker.uri.startswith(("http://", "https://")):
        url = f"{tracker.uri.rstrip('/')}/#/experiments/{tracker.experiment_id}/runs/{run_id}"
        return f"[{run_id}]({url})"
    return f"`{run_id}` (open with `mlflow ui --backend-store-uri {tracker.uri}`)"


def link_task_run(outcome: Outcome, instance: str, tracker: Tracker) -> None:
    """A markdown artifact on the task run: its key, store path and MLflow run (Prefect UI, Artifacts)."""
    from prefect.artifacts import create_markdown_artifact

    art = outcome.artifact
    lines = [f"**{instance}** ({art.stage}) `{art.key}`: {'cache hit' if outcome.cached else 'computed'}", "",
             f"- store: `{art.path}`"]
    if outcome.run_id:
        lines.append(f"- MLflow stage run: {mlflow_run_url(tracker, outcome.run_id)}")
    producer = art.manifest.get("mlflow_run_id")
    if outcome.cached and producer:
        lines.append(f"- produced by MLflow run: {mlflow_run_url(tracker, producer)}")
    key = re.sub(r"[^a-z0-9-]", "-", f"{instance}-{art.key}".lower())  # Prefect's artifact key alphabet
    create_markdown_artifact(markdown="\n".join(lines), key=key, description=f"{instance} {art.key}")


@functools.cache  # one task object per stage, shared by its module and the flow
def stage_task(stage: Stage):
    """The Prefect task of a stage: `task(run, cfg, inputs, force, label, key) -> Outcome`.

    The store alone decides hit or miss (in `run_stage`); a hit ends the task in a Completed state
    named `Cached`, which the Prefect UI shows as such. Nothing goes to Prefect's result storage.
    A StageError ends it Failed with its one line (no traceback); `state.result()` raises it again."""

    @task(name=stage.name, cache_policy=NO_CACHE, persist_result=False)
    def _stage(run: RunContext, cfg: StageConfig, inputs: dict[str, Artifact], force: bool = False,
               label: str | None = None, key: str | None = None):
        tags = {"prefect.flow_run_id": str(flow_run.id or ""), "prefect.task_run_id": str(task_run.id or "")}
        try:
            tracker = run.tracker()
            outcome = run_stage(
                stage, cfg, inputs, run.store(stage), tracker=tracker, parent_run_id=run.parent_run_id,
                force=force, map_fn=ShardMap(stage.name, run.dask_address), tags=tags, label=label, key=key,
                config_file=run.config_file,
            )
        except StageError as e:  # bad input or settings: a one-line Failed state, not a traceback
            return Failed(message=str(e), data=e)
        except Exception as e:  # an ordinary fault (disk full, a corrupt file): one line too, naming the file
            if debugging() or (line := explain(e)) is None:
                raise
            fault = StageError(f"{label or stage.name}: {line}")
            fault.__cause__ = e
            return Failed(message=str(fault), data=fault)
        link_task_run(outcome, label or stage.name, tracker)
        if outcome.cached:
            return Completed(name="Cached", data=outcome, message=f"in the store: {outcome.artifact.path}")
        return outcome

    return _stage
