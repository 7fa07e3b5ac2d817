"""A stage: (name, VERSION, config, inputs) -> output directory in the store.

`run_stage` is the whole contract without Prefect (tests call it directly): it asks the store
for the stage key, checks the settings on a miss, computes under the key's lock and commits the
output with its manifest. `tasks.core.orchestration.stage_task` runs it as a Prefect task that
always runs and reports a hit as a `Cached` state: the store, not Prefect's cache, decides.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, TypeVar

from pydantic import BaseModel, ConfigDict

from tasks.core.base import StageError, log  # noqa: F401  (re-exported: the contract names them)
from tasks.core.checkpoint_mirror import pull_checkpoints
from tasks.core.faults import file_of
from tasks.core.fingerprint import Code, current_code, stale_line, stale_modules
from tasks.core.settings import identity, runtime_settings
from tasks.core.shared_scratch import close_shared_scratch, share_scratch
from tasks.core.store import Artifact, Store, stage_key

if TYPE_CHECKING:  # mlflow is imported by whoever makes a Tracker, not by every stage module
    from tasks.core.lineage import Tracker

T = TypeVar("T")
R = TypeVar("R")
MB = 1e6  # progress lines count input in megabytes
MEMORY_SIZE = r"(?i)^\d+(\.\d+)?\s*(B|[KMGT]i?B)$"  # a duckdb memory_limit setting: 512MB, 1GB, 2GiB


class StageConfig(BaseModel):
    """Base of every stage's config: unknown fields are errors, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DamagedInput(StageError):
    """A stored input failed to decode and no longer matches its manifest: it was set aside, so
    computing it again (then this stage) recovers; `input_name` says which input."""

    def __init__(self, message: str, input_name: str):
        super().__init__(message)
        self.input_name = input_name


@dataclass(frozen=True)
class Stage:
    name: str
    version: int
    config: type[StageConfig]
    # fn(cfg, inputs, ctx) writes into ctx.out and returns {"rows": {...}, "metrics": {...}}
    fn: Callable[..., dict]
    store: str = "data"  # which store root: "data" (Parquet) or "models" (weights)
    # which deployment runs it (deployments/prefect.yaml): data | pretrain | sft | rl | eval
    family: str = "data"
    # cheap validation of settings and paths that pydantic cannot see (files, cross-field rules); the runner
    # calls it (run_stage before computing, and the flows for every needed stage before the first one runs),
    # never the stage function itself
    check: Callable[[Any], None] | None = None
    report_metrics: tuple[str, ...] = ()  # metrics shown on the report card


class Outcome(BaseModel):
    """What a stage task returns: the output's identity, whether it was a cache hit, and time."""

    artifact: Artifact
    cached: bool
    seconds: float
    run_id: str | None = None  # this task's MLflow stage run (on a hit, the run that records the hit)
    stale: list[str] = []  # a hit made by other code: the modules that changed since (tasks.core.fingerprint)


def _map_threads(fn: Callable[..., R], items: list[T], **common: Any) -> list[R]:
    """`[fn(x, **common) for x in items]`, on threads (numpy and arrow release the GIL)."""
    if len(items) <= 1:
        return [fn(x, **common) for x in items]
    with ThreadPoolExecutor() as pool:
        return list(pool.map(lambda x: fn(x, **common), items))


def new_figure(figsize: tuple[float, float] = (6, 3.5)):
    """(figure, axes) for a stage's plot, drawn off-screen (no display on workers); `log_figure` saves it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)


@dataclass
class StageContext:
    """What a stage function gets besides its config and inputs."""

    stage: str
    out: Path
    tracker: Tracker | None = None
    run_id: str | None = None
    map: Callable[..., list] = _map_threads  # map(fn, items, **common); under Prefect an orchestration.ShardMap
    work: Path | None = None  # survives a crash of this stage key (checkpoints); see Store.work_dir
    instance: str = ""  # the name in the DAG (`ref_0` for a pretrain stage); logged models are named by it
    window: int | None = None  # most items `map_bounded` has in flight at once; None: the map's width
    # a remote root's copy of work's checkpoints (Store.work_mirror): trainers upload each one there
    work_mirror: str | None = None

    def __post_init__(self) -> None:
        self.instance = self.instance or self.stage

    @property
    def workers(self) -> int:
        """How many items `map` runs at once: the map's `width` (a Dask cluster's threads), else the CPUs."""
        return getattr(self.map, "width", None) or os.cpu_count() or 1

    def map_bounded(self, fn: Callable[..., R], items: list[T], **common: Any) -> Iterator[R]:
        """`map` over `window` items at a time, yielding results in item order as each window ends, so
        the stage sees (and reports progress on) one window of shards' results at a time, whatever the
        corpus."""
        window = self.window or self.workers
        for start in range(0, len(items), window):
            yield from self.map(fn, items[start:start + window], **common)

    def work_dir(self) -> Path:
        assert self.work is not None, "run_stage sets ctx.work"
        return self.work

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.log_history([(step or 0, metrics)])

    def log_history(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        """Many steps' metrics in one batched MLflow call."""
        if self.tracker and self.run_id and rows:
            self.tracker.log_history(self.run_id, rows)

    def log_figure(self, fig, name: str) -> None:
        """Save a matplotlib figure as PNG to MLflow (not the store: plots are not data)."""
        fig.tight_layout()
        if self.tracker and self.run_id:
            self.tracker.log_figure(self.run_id, fig, name)
        else:
            import matplotlib.pyplot as plt

            plt.close(fig)

    def progress(self, items: Iterable[T], total: int | None, what: str, every_s: float = 5.0,
                 size: Callable[[T], int] | None = None) -> Iterator[T]:
        """Yield items, logging `stage: n/total what, rate/s, ETA` every few seconds. With `size` (an item's
        share of the input, in bytes), `total` is in bytes and the line reads MB, MB/s and the ETA by bytes:
        documents vary in size, bytes do not."""
        start = last = time.monotonic()
        n = done = 0
        for n, item in enumerate(items, 1):
            done += size(item) if size else 0
            yield item
            now = time.monotonic()
            if now - last >= every_s:
                last = now
                count = done if size else n
                rate = count / (now - start)
                eta = f", ETA {(total - count) / rate:.0f}s" if total and rate > 0 else ""
                if size:
                    of = f"/{total / MB:.1f}" if total else ""
                    log.info("%s: %.1f%s MB of %s (%d), %.1f MB/s%s", self.stage, done / MB, of, what, n, rate / MB, eta)
                else:
                    of = f"/{total}" if total else ""
                    log.info("%s: %d%s %s, %.0f/s%s", self.stage, n, of, what, rate, eta)
        seconds = time.monotonic() - start
        if size:
            log.info("%s: %d %s, %.1f MB in %.1fs (%.1f MB/s)", self.stage, n, what, done / MB, seconds,
                     done / MB / max(seconds, 1e-9))
        else:
            log.info("%s: %d %s in %.1fs", self.stage, n, what, seconds)


def run_stage(
    stage: Stage,
    cfg: StageConfig,
    inputs: dict[str, Artifact],
    store: Store,
    *,
    tracker: Tracker | None = None,
    parent_run_id: str | None = None,
    force: bool = False,
    map_fn: Callable[..., list] | None = None,
    tags: dict[str, str] | None = None,
    label: str | None = None,
    key: str | None = None,
    config_file: str | None = None,
) -> Outcome:
    """Return the stage's output, computing it unless the store already holds it.

    One computation per key, however many runs ask at once: the computing run holds the key's lock
    (`Store.lock`); another run waits for it and then takes the output as a cache hit. A lock left
    by a killed run is free at once, and the next holder drops the killed run's scratch.
    label: the instance name in the DAG (MLflow run name), when a stage appears more than once.
    key: the stage key when the caller computed it already (the plan); else computed here.
    config_file: the pipeline config that asked for the output (recorded in the manifest for `slmflow ls`)."""
    key = key or stage_key(stage.name, stage.version, cfg, {k: a.key for k, a in inputs.items()})
    start = time.monotonic()

    def cached(hit: Artifact) -> Outcome:
        recorded, current = hit.manifest.get("code"), code_of(stage)
        stale = stale_modules(recorded, current)
        if stale:  # the same key, made by other code: said, never recomputed unless asked (--rerun-stale)
            log.warning("%s", stale_line(label or stage.name, key, recorded, current))
        else:
            log.info("%s: cache hit %s", label or stage.name, key)
        store.tidy(stage.name, key)
        run_id = tracker.log_cached(parent_run_id, hit, inputs, tags, label=label) if tracker else None
        return Outcome(artifact=hit, cached=True, seconds=time.monotonic() - start, run_id=run_id, stale=stale)

    if not force and (hit := store.get(stage.name, key)) is not None:
        return cached(hit)
    if stage.check:  # the one validation path: bad settings and paths fail here, before anything is written
        stage.check(cfg)
    lock = store.lock(stage.name, key)

    def waiting(owner: dict, waited: float) -> None:
        who = f"pid {owner.get('pid', '?')} on {owner.get('host', '?')} since {owner.get('since', '?')}"
        log.info("%s: waiting for another run computing %s (%s), %.0fs so far", label or stage.name, key, who, waited)

    lock.acquire(on_wait=waiting)
    try:
        if not force and (hit := store.get(stage.name, key)) is not None:  # computed while we waited
            return cached(hit)
        store.clear_stale(stage.name, key)
        return _compute(stage, cfg, inputs, store, key, start, tracker, parent_run_id, map_fn, tags, label,
                        config_file)
    finally:
        lock.release()


def _compute(stage: Stage, cfg: StageConfig, inputs: dict[str, Artifact], store: Store, key: str, start: float,
             tracker: Tracker | None, parent_run_id: str | None, map_fn: Callable[..., list] | None,
             tags: dict[str, str] | None, label: str | None, config_file: str | None) -> Outcome:
    scratch = store.scratch(stage.name, key)
    code = code_of(stage)  # the code that runs now, read before it runs
    run_id = tracker.start_stage(parent_run_id, stage.name, key, cfg, tags, label=label) if tracker else None
    ctx = StageContext(stage.name, scratch, tracker, run_id, map_fn or _map_threads, store.work_dir(stage.name, key),
                       label or stage.name, work_mirror=store.work_mirror(stage.name, key))
    try:
        ctx.map = share_scratch(ctx.map, store, stage.name, key, [ctx.work, ctx.out])  # workers without our disk
        if ctx.work_mirror:  # checkpoints another machine saved before it stopped: resume from them
            pull_checkpoints(ctx.work_mirror, ctx.work, label or stage.name)
        if tracker:
            tracker.log_datasets(run_id, inputs.values(), "input")
            tracker.link_inputs(run_id, inputs)
        result = stage.fn(cfg, inputs, ctx) or {}
        manifest = {
            "stage": stage.name,
            "key": key,
            "instance": label or stage.name,  # the DAG's name for it when it was made (datasets are named by it)
            "version": stage.version,
            "config": identity(cfg),  # what the key hashes
            "runtime": runtime_settings(cfg),  # how this output was computed (not hashed)
            "inputs": {k: {"stage": a.stage, "key": a.key} for k, a in inputs.items()},
            "rows": result.get("rows", {}),
            "metrics": result.get("metrics", {}),
            "info": result.get("info", {}),  # non-numeric facts, e.g. the MLflow logged model id
            "code": code.manifest() if code else None,  # the code that made it (not hashed): a later hit compares
            "mlflow_run_id": run_id,
            "prefect": tags or {},
            "config_file": config_file,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.monotonic() - start, 3),
        }
        artifact = store.commit(scratch, stage.name, key, manifest)
        shutil.rmtree(ctx.work, ignore_errors=True)
        store.drop_work_mirror(stage.name, key)
        close_shared_scratch(ctx.map)
    except BaseException as e:
        store.discard(scratch)
        close_shared_scratch(ctx.map)
        with contextlib.suppress(OSError):  # keep checkpoints for a resume; drop an empty work dir
            ctx.work.rmdir()
        if tracker and run_id:
            tracker.end(run_id, "FAILED")
        if isinstance(e, Exception) and (damaged := damaged_input(e, inputs, label or stage.name)):
            raise damaged from e
        raise
    if tracker and run_id:
        tracker.finish_stage(run_id, artifact)
    return Outcome(artifact=artifact, cached=False, seconds=time.monotonic() - start, run_id=run_id)


def code_of(stage: Stage) -> Code | None:
    """The fingerprint of the code `stage` runs (its function's module and the project modules it imports),
    or None when it cannot be read."""
    return current_code(getattr(stage.fn, "__module__", None))


def damaged_input(e: Exception, inputs: dict[str, Artifact], label: str) -> DamagedInput | None:
    """When `e` came from reading a file of a stored input whose digests no longer match its manifest:
    that input set aside, as a DamagedInput naming it (None for any other failure)."""
    path = file_of(e)
    for name, art in inputs.items():
        if not path or not path.startswith(f"{art.path}/"):
            continue
        store = Store(art.path.rsplit("/", 2)[0])
        problems = store.problems(art.stage, art.key, art.manifest, digests=True)
        if problems:
            aside = store.set_aside(art.stage, art.key)
            return DamagedInput(f"{label}: its input {name} ({art.stage} {art.key}) is damaged: {problems[0]}; set "
                                f"aside as {aside}: it is made again (by this run, when it made it; else by the next)", name)
    return None
