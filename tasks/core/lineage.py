"""MLflow lineage: how a person follows a model back to its raw data in the MLflow UI.

One experiment per pipeline, a parent run per pipeline run, a child run per stage (cache
hits too, tagged `cached=true` and linked to the run that produced the output). Stage
inputs and outputs are MLflow datasets whose digest is the stage key and whose source is
the store path, so producer and consumer share one dataset record (`dataset.digest`).
Every stage run also links each input to the one run that produced it (tag `input.<name>`
and a clickable line in the run's description), so a person clicks from the RL run back to
ingest; a cache hit points to the producer and never poses as one (its output is logged with
context `reused`, not `output`).
Uses MlflowClient with explicit run ids, never the fluent API's thread-local active run,
so stages may run in worker threads or processes. A SQLite tracking store has one writer at a
time: every call holds a lock file beside the database (two runs at once, or a training process
beside its pipeline, never meet `database is locked`, nor race to create the tables on first use).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Iterable

from mlflow import MlflowClient
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, LoggedModelInput, LoggedModelOutput, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NOTE

from tasks.core.base import log
from tasks.core.locks import FileLock
from tasks.core.settings import identity, runtime_settings
from tasks.core.store import Artifact

# a new SQLite store announces creating its tables at INFO on stderr: a user's first run prints only ours
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# MLflow 3's UI opens an experiment without this tag in its GenAI (traces) view
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def tracking_uri(configured: str | None = None) -> str:
    """Config beats `MLFLOW_TRACKING_URI`, which beats a SQLite file in the working directory."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{name}."))
        else:
            out[name] = str(v)[:6000]  # MLflow's param value limit
    return out


def owner() -> dict[str, str]:
    """Tags naming the process that made a run, so a later run can tell it died (`close_dead_runs`)."""
    return {"slmflow.host": socket.gethostname(), "slmflow.pid": str(os.getpid())}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class OneWriter:
    """An MlflowClient whose calls hold the SQLite database's lock file (and retry if a writer from
    outside slmflow, such as `mlflow ui`, still locks it). Threads sharing it take turns first: the
    lock file serializes processes, one `FileLock` object is not for two threads at once."""

    def __init__(self, client: MlflowClient, db: Path, attempts: int = 8):
        self._client, self._lock, self._attempts = client, FileLock(f"{db}.lock", what=f"MLflow {db}"), attempts
        self._threads = threading.Lock()

    def __getattr__(self, name: str):
        method = getattr(self._client, name)
        if not callable(method):
            return method

        def call(*args, **kwargs):
            for attempt in range(self._attempts):
                with self._threads, self._lock:
                    try:
                        return method(*args, **kwargs)
                    except MlflowException as e:
                        if "database is locked" not in str(e) or attempt == self._attempts - 1:
                            raise
                time.sleep(0.5 * 2 ** attempt)

        return call


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` tracking URI (relative or absolute), else None."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


_SHARED: dict[tuple[str, str, str], Tracker] = {}  # Tracker.shared
_SHARED_LOCK = threading.Lock()
# The runs this process started and has not ended, so an interrupt can end them as KILLED (`kill_open_runs`)
_OPEN: dict[str, tuple[Tracker, dict[str, str]]] = {}
_OPEN_LOCK = threading.Condition()
_KILLED = threading.Event()  # set by `kill_open_runs`: no run is started after it
_STARTING = [0]  # runs being created right now: `kill_open_runs` waits for them, then ends them too


def open_runs() -> dict[str, dict[str, str]]:
    """run id -> tags of the runs this process has open (the pipeline's parent run, stage runs); after
    `kill_open_runs`, the ones it ended."""
    with _OPEN_LOCK:
        return {run_id: tags for run_id, (_, tags) in _OPEN.items()}


def kill_open_runs() -> list[str]:
    """End every run this process has open as KILLED (an interrupted `slmflow run`: the process exits
    right after, and stage threads still running end no run after this). Errors are skipped: best effort."""
    with _OPEN_LOCK:
        _KILLED.set()
        _OPEN_LOCK.wait_for(lambda: _STARTING[0] == 0, timeout=3)  # a create_run in flight lands in _OPEN
        runs = list(_OPEN.items())
    for run_id, (tracker, _) in runs:
        try:
            tracker.client.set_terminated(run_id, "KILLED")
        except Exception as e:  # noqa: BLE001  the others still get their chance
            log.debug("could not end run %s as KILLED: %s", run_id, e)
    return [run_id for run_id, _ in runs]


class Tracker:
    @classmethod
    def shared(cls, uri: str, experiment: str) -> Tracker:
        """This process's Tracker of a tracking store and experiment: the MLflow client and the experiment's
        lookup are made once per process, not once per stage (`slmflow run` makes it while Prefect's
        server starts). A relative SQLite path names a database per working directory."""
        db = sqlite_file(uri)
        key = (uri, experiment, str(db.absolute()) if db else "")
        with _SHARED_LOCK:
            if key not in _SHARED:
                _SHARED[key] = cls(uri, experiment)
            return _SHARED[key]

    def __init__(self, uri: str, experiment: str):
        self.uri, self.experiment = uri, experiment
        self.client = MlflowClient(tracking_uri=uri)
        if db := sqlite_file(uri):
            self.client = OneWriter(self.client, db.absolute())
        found = self.client.get_experiment_by_name(experiment)
        # a SQLite store's artifacts live beside its database (MLflow's default, ./mlruns, is wherever the
        # process happened to start); a tracking server decides for itself
        beside = (db.absolute().parent / "mlruns" / experiment).as_uri() if db else None
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(
            experiment, artifact_location=beside)
        if found is None or found.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
            self.client.set_experiment_tag(self.experiment_id, *EXPERIMENT_KIND)

    def run_link(self, run_id: str) -> str:
        """A markdown link to a run in the MLflow UI: the tracking server's URL when there is one (a link that
        opens from anywhere), else relative (it works wherever `mlflow ui` serves the local store)."""
        try:
            experiment = self.client.get_run(run_id).info.experiment_id
        except MlflowException:  # produced under another tracking store: the id is all we have
            return f"`{run_id}`"
        server = f"{self.uri.rstrip('/')}/" if self.uri.startswith(("http://", "https://")) else ""
        return f"[{run_id[:8]}]({server}#/experiments/{experiment}/runs/{run_id})"

    def link_inputs(self, run_id: str, inputs: dict[str, Artifact], note: str = "") -> None:
        """Tag `input.<name>` = the run that produced that input, and say so in the run's description."""
        lines, tags = [note] if note else [], []
        for name, a in inputs.items():
            producer = a.manifest.get("mlflow_run_id")
            if producer:
                tags.append(RunTag(f"input.{name}", producer))
                lines.append(f"- input `{name}`: {a.stage} `{a.key}`, produced by run {self.run_link(producer)}")
            else:
                lines.append(f"- input `{name}`: {a.stage} `{a.key}` (produced without MLflow)")
        if lines:
            tags.append(RunTag(MLFLOW_RUN_NOTE, "\n".join(lines)))
            self.client.log_batch(run_id, tags=tags)

    def start_parent(self, name: str, tags: dict[str, str]) -> str:
        return self._create(name, {**tags, **owner()}, tags)

    def _create(self, name: str, all_tags: dict[str, str], tags: dict[str, str]) -> str:
        """Create a run and remember it as open for `kill_open_runs`. After an interrupt none is created
        (the stage thread that asks gets an error; the process is exiting); one in flight when the
        interrupt comes is waited for and ended with the others, never left RUNNING."""
        with _OPEN_LOCK:
            if _KILLED.is_set():
                raise RuntimeError("interrupted: no new MLflow run")
            _STARTING[0] += 1
        run_id = None
        try:
            run_id = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags).info.run_id
        finally:
            with _OPEN_LOCK:
                _STARTING[0] -= 1
                if run_id:
                    _OPEN[run_id] = (self, tags)
                _OPEN_LOCK.notify_all()
        return run_id

    def close_dead_runs(self) -> list[str]:
        """End as KILLED the runs that a killed slmflow process on this host left RUNNING (SIGKILL gives
        a process no chance to end its own runs). A run whose pid is alive again (reused) stays."""
        host, dead = socket.gethostname(), []
        for run in self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
            tags = run.data.tags
            if tags.get("slmflow.host") == host and tags.get("slmflow.pid", "").isdigit() and not alive(int(tags["slmflow.pid"])):
                self.client.set_terminated(run.info.run_id, "KILLED")
                dead.append(run.info.run_id)
        return dead

    def _child(self, parent_run_id: str | None, stage: str, key: str, tags: dict[str, str] | None,
               label: str | None = None) -> str:
        all_tags = {"stage": stage, "stage_key": key, "instance": label or stage, **owner(), **(tags or {})}
        if parent_run_id:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        return self._create(label or stage, all_tags, all_tags)

    def start_stage(self, parent_run_id, stage, key, cfg, tags=None, label=None) -> str:
        run_id = self._child(parent_run_id, stage, key, {"cached": "false", **(tags or {})}, label)
        self.log_params(run_id, {**identity(cfg), "runtime": runtime_settings(cfg)})  # runtime ones as runtime.<name>
        return run_id

    def log_params(self, run_id: str, settings: dict) -> None:
        params = [Param(k, v) for k, v in flatten(settings).items()]
        for i in range(0, len(params), 100):  # MLflow's batch limit for params
            self.client.log_batch(run_id, params=params[i : i + 100])

    def log_cached(self, parent_run_id, artifact: Artifact, inputs: dict[str, Artifact], tags=None,
                   label: str | None = None) -> str:
        """A child run for a cache hit: inputs, output and a link to the producing run."""
        producer = artifact.manifest.get("mlflow_run_id") or ""
        run_id = self._child(parent_run_id, artifact.stage, artifact.key,
                             {"cached": "true", "produced_by_run": producer, **(tags or {})}, label)
        self.log_datasets(run_id, inputs.values(), "input")
        note = f"Cache hit: the output was produced by run {self.run_link(producer)}." if producer else "Cache hit."
        self.link_inputs(run_id, inputs, note)
        self.finish_stage(run_id, artifact, produced=False)
        return run_id

    def log_datasets(self, run_id: str, artifacts: Iterable[Artifact], context: str) -> None:
        """MLflow has no dataset outputs: outputs are dataset inputs with context `output`."""
        entries = []
        for a in artifacts:
            with warnings.catch_warnings():  # a local path matches two equal source classes
                warnings.simplefilter("ignore", UserWarning)
                source = resolve_dataset_source(a.path)
            # named by the instance that made it (ref_0, not pretrain): preselect's three models stay apart
            ds = MetaDataset(source=source, name=a.manifest.get("instance") or a.stage, digest=a.key)
            entries.append(DatasetInput(ds._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, context)]))
        if entries:
            self.client.log_inputs(run_id, datasets=entries)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        self.log_history(run_id, [(step or 0, metrics)])

    def log_history(self, run_id: str, rows: list[tuple[int, dict[str, float]]]) -> None:
        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step) for step, metrics in rows for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):  # MLflow's batch limit
            self.client.log_batch(run_id, metrics=batch[i : i + 1000])

    def log_model(self, run_id: str, local_dir: Path, name: str, step: int = 0, params: dict | None = None) -> str:
        """An MLflow logged model made of our own files (safetensors + JSON): nothing pickled."""
        model = self.client.create_logged_model(self.experiment_id, name=name, source_run_id=run_id,
                                                params={k: str(v) for k, v in (params or {}).items()})
        self.client.log_model_artifacts(model.model_id, str(local_dir))
        self.client.finalize_logged_model(model.model_id, "READY")
        self.client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
        return model.model_id

    def log_figure(self, run_id: str, fig, name: str) -> None:
        import matplotlib.pyplot as plt

        self.client.log_figure(run_id, fig, f"plots/{name}.png")
        plt.close(fig)

    def register_model(self, model_id: str, run_id: str, name: str) -> str:
        """A new version of registered model `name` from a logged model; returns the version."""
        try:
            self.client.create_registered_model(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        # the artifact location, not a models:/ URI (resolving that would use the global tracking URI)
        source = self.client.get_logged_model(model_id).artifact_location
        return str(self.client.create_model_version(name, source=source, run_id=run_id, model_id=model_id).version)

    def has_model_version(self, name: str, version: str, run_id: str | None) -> bool:
        """This store's registry has that version, registered by that run (not one of another store's)."""
        try:
            return self.client.get_model_version(name, version).run_id == run_id
        except MlflowException:
            return False

    def describe_model_version(self, name: str, version: str, description: str, tags: dict[str, str],
                               model_id: str | None = None, run_id: str | None = None,
                               metrics: dict[str, float] | None = None) -> None:
        """Description and tags on a registered model version (and the model), metrics on its logged
        model (MLflow shows a version's metrics from there); metrics are logged once per model."""
        self.client.update_registered_model(name, description=description.split("\n\n")[0])
        self.client.update_model_version(name, version, description=description)
        for k, v in tags.items():
            self.client.set_model_version_tag(name, version, k, v)
        if model_id and run_id and metrics and not self.client.get_logged_model(model_id).metrics:
            ts = int(time.time() * 1000)
            self.client.log_batch(run_id, metrics=[Metric(k, float(v), ts, 0, model_id=model_id)
                                                   for k, v in metrics.items()])

    def log_model_input(self, run_id: str, model_id: str) -> None:
        """The upstream model a training stage starts from: MLflow's model-to-model lineage."""
        self.client.log_inputs(run_id, models=[LoggedModelInput(model_id)])

    def finish_stage(self, run_id: str, artifact: Artifact, produced: bool = True) -> None:
        """produced: this run computed the output (a cache hit logs it as `reused`, and no metrics)."""
        self.log_datasets(run_id, [artifact], "output" if produced else "reused")
        rows = {f"rows.{k}": v for k, v in artifact.rows.items()}
        metrics = {k: v for k, v in artifact.manifest.get("metrics", {}).items() if isinstance(v, (int, float))}
        logged = self.client.get_run(run_id).data.metrics  # a training loop already logged its history
        summary = {k: v for k, v in metrics.items() if k not in logged} if produced else {}
        self.log_metrics(run_id, {**rows, **summary})
        self.client.log_batch(run_id, tags=[RunTag("store_path", artifact.path)])
        self.end(run_id, "FINISHED")

    def describe(self, run_id: str, text: str) -> None:
        """The run's description (the note the MLflow UI shows under the run's name)."""
        self.client.set_tag(run_id, MLFLOW_RUN_NOTE, text)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    def end(self, run_id: str, status: str) -> None:
        with _OPEN_LOCK:
            if _KILLED.is_set():  # interrupted: `kill_open_runs` ended it as KILLED
                return
            _OPEN.pop(run_id, None)
        self.client.set_terminated(run_id, status)

