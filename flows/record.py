"""The record of a pipeline run, and the lineage graph that `slmflow lineage` draws from the store.

Every `slmflow run` starts by recording the config file and overrides it runs with, its store roots,
its MLflow parent run, and its plan (each instance of the DAG: stage, key, store, and which instances
it reads) twice: in its own `<data_root>/runs/<UTC time>-<run>/record.json`, beside its report, and in
`<data_root>/runs/last-run.json`. The read commands (`status`, `show`, `lineage`, `ls`) follow the
last run's record when no `--config` is given, so after a tiny run `slmflow show sft` finds the
tiny output, and they need no stage module (no torch, mlflow or prefect import): they answer in
well under two seconds. `slmflow gc` keeps what the runs' own records name.

This module imports nothing heavier than the store, on purpose.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tasks.core.store import Store, current_umask

RECORD = "last-run.json"
RUN_RECORD = "record.json"  # one per run, in `runs/<UTC time>-<run>/`


def configured_roots() -> tuple[str, str]:
    """The store roots with no config given: $SLMFLOW_DATA_ROOT and $SLMFLOW_MODELS_ROOT, else data and
    models (as flows/config.py's run.data_root and run.models_root, which would import pydantic)."""
    return os.environ.get("SLMFLOW_DATA_ROOT", "data"), os.environ.get("SLMFLOW_MODELS_ROOT", "models")


def parse_time(text: str) -> datetime:
    """An ISO time as records and manifests write it (UTC when it names no zone)."""
    when = datetime.fromisoformat(text)
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def runs_dir(data_root: str) -> Path:
    """`<data_root>/runs`: reports and run records (a local directory even when the store is remote)."""
    base = Path(data_root) if "://" not in data_root else Path(".")
    return base / "runs"


def write_atomic(path: Path, text: str) -> None:
    """Written beside itself and renamed into place: a killed run leaves no half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644 & ~current_umask())  # mkstemp makes 0600
    os.replace(tmp, path)


def _write_json(path: Path, value: Any) -> None:
    write_atomic(path, json.dumps(value, indent=2))


@dataclass
class Instance:
    """One node of a run's plan: an instance of a stage (`ref_0` is an instance of `pretrain`)."""

    name: str
    stage: str
    key: str
    store: str  # "data" or "models"
    inputs: dict[str, str] = field(default_factory=dict)  # input name -> upstream instance name


@dataclass
class RunRecord:
    config_file: str | None
    overrides: list[str]
    data_root: str
    models_root: str
    stages: dict[str, Instance]
    mlflow_run_id: str | None = None
    created: str = ""

    @classmethod
    def from_plan(cls, cfg, plan, config_file: str | None, overrides: list[str] | None = None,
                  mlflow_run_id: str | None = None) -> RunRecord:
        stages = {name: Instance(name, p.stage.name, p.key, p.stage.store, dict(p.inputs))
                  for name, p in plan.stages.items()}
        return cls(config_file, list(overrides or []), cfg.run.data_root, cfg.run.models_root, stages, mlflow_run_id,
                   datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def store(self, kind: str) -> Store:
        return Store(self.models_root if kind == "models" else self.data_root)

    def roots(self) -> list[Store]:
        return [Store(root) for root in dict.fromkeys((self.data_root, self.models_root))]

    def store_of_stage(self, stage: str) -> Store:
        kind = next((i.store for i in self.stages.values() if i.stage == stage), "data")
        return self.store(kind)

    def describe(self) -> str:
        sets = f" --set {' --set '.join(self.overrides)}" if self.overrides else ""
        return f"{self.config_file or 'a config given as a dict'}{sets}"

    def created_at(self) -> datetime | None:
        return parse_time(self.created) if self.created else None

    def run_dir(self) -> Path:
        """`<data_root>/runs/<UTC time>-<run>/`: the one the run's report went to (flows/report.py), else a new one."""
        runs, tag = runs_dir(self.data_root), (self.mlflow_run_id or "local")[:8]
        reports = sorted(p for p in runs.glob(f"*-{tag}") if p.is_dir() and not p.name.startswith("."))
        if reports and self.mlflow_run_id:
            return reports[-1]
        created = self.created_at() or datetime.now(timezone.utc)
        return runs / f"{created.astimezone(timezone.utc):%Y%m%dT%H%M%SZ}-{tag}"

    def save(self) -> Path:
        """Write the run's own record (`runs/<UTC time>-<run>/record.json`) and `runs/last-run.json`."""
        _write_json(self.run_dir() / RUN_RECORD, asdict(self))
        path = runs_dir(self.data_root) / RECORD
        _write_json(path, asdict(self))
        return path

    @classmethod
    def load(cls, path: Path) -> RunRecord:
        """Raises ValueError (one line naming the file) for a file that is not a run record."""
        try:
            raw = json.loads(path.read_text())
            raw["stages"] = {n: Instance(**i) for n, i in raw["stages"].items()}
            record = cls(**raw)
            record.created_at()  # a date that does not parse fails here, not in gc
            return record
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path} is not a readable run record ({type(e).__name__}: {e}): "
                             f"move it out of {path.parent} or restore it") from None


def recorded_runs(data_root: str) -> list[RunRecord]:
    """Every run recorded under `<data_root>/runs`, oldest first: each run's own record, then
    last-run.json unless it repeats one (it is the only record of a run from before runs kept their own)."""
    runs = runs_dir(data_root)
    records = [RunRecord.load(p) for p in sorted(runs.glob(f"*/{RUN_RECORD}")) if not p.parent.name.startswith(".")]
    last = RunRecord.load(runs / RECORD) if (runs / RECORD).exists() else None
    return records + [last] if last and last not in records else records


@dataclass
class Node:
    id: str  # "<stage>:<key>": one node per output, however many instances read it
    name: str  # the instance name in the record's plan (else the stage's name)
    stage: str
    key: str
    rows: dict[str, int] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    path: str | None = None  # None: not in the store


@dataclass
class Graph:
    nodes: dict[str, Node] = field(default_factory=dict)  # upstream first
    edges: list[tuple[str, str, str]] = field(default_factory=list)  # (producer id, consumer id, input name)

    def inputs_of(self, node_id: str) -> list[tuple[str, str]]:
        return [(name, self.nodes[src].name) for src, dst, name in self.edges if dst == node_id]

    def main_chain(self, node_id: str, through: tuple[str, ...] = ("model", "packed", "documents")) -> list[Node]:
        """From a node up its main line (its model, else its packed tokens, else its documents) to
        the raw data: rl <- sft <- pretrain <- pack <- select <- ... <- ingest."""
        chain = [self.nodes[node_id]]
        while True:
            upstream = {name: src for src, dst, name in self.edges if dst == chain[-1].id}
            nxt = next((upstream[n] for n in through if n in upstream), None)
            if nxt is None:
                return chain
            chain.append(self.nodes[nxt])

    def to_json(self) -> dict:
        return {"nodes": [asdict(n) for n in self.nodes.values()],
                "edges": [{"from": s, "to": d, "input": n} for s, d, n in self.edges]}

    def to_mermaid(self) -> str:
        ids = {nid: f"n{i}" for i, nid in enumerate(self.nodes)}
        lines = ["flowchart TD"]
        for nid, n in self.nodes.items():
            label = n.name if n.name == n.stage else f"{n.name} ({n.stage})"
            missing = "<br/>not in the store" if n.path is None else ""
            lines.append(f'    {ids[nid]}["{label}<br/>{n.key}{missing}"]')
        lines += [f"    {ids[s]} -->|{name}| {ids[d]}" for s, d, name in self.edges]
        return "\n".join(lines) + "\n"


def lineage(record: RunRecord, names: list[str], key: str | None = None) -> Graph:
    """The outputs that produced `names` (instances of the record's plan), each once, upstream first,
    read from the stores' manifests. `key`: another stored output of the (single) named instance."""
    labels = {(i.stage, i.key): i.name for i in record.stages.values()}
    graph = Graph()
    visiting: set[str] = set()

    def visit(stage: str, k: str, name: str) -> str:
        nid = f"{stage}:{k}"
        if nid in graph.nodes or nid in visiting:
            return nid
        visiting.add(nid)
        art = record.store_of_stage(stage).get(stage, k)
        upstream = []
        if art is not None:
            for input_name, ref in art.manifest.get("inputs", {}).items():
                up_name = labels.get((ref["stage"], ref["key"]), ref["stage"])
                upstream.append((visit(ref["stage"], ref["key"], up_name), input_name))
        graph.nodes[nid] = Node(nid, name, stage, k, dict(art.rows) if art else {},
                                art.manifest.get("mlflow_run_id") if art else None, art.path if art else None)
        graph.edges += [(src, nid, input_name) for src, input_name in upstream]
        return nid

    for name in names:
        inst = record.stages[name]
        visit(inst.stage, key or inst.key, name)
    return graph
