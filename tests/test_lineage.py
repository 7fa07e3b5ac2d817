"""Lineage as a person meets it: the CLI's DAG, read commands that follow the store, MLflow links
from every input to its producer, Prefect artifacts, one-line server errors, a fast CLI."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from flows.cli import app
from flows.config import load_config
from flows.pipeline import make_plan
from tests.test_cli import fails_cleanly

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def upstream(plan, name: str) -> set[str]:
    return set(plan.needed([name]))


def test_lineage_lists_each_instance_once(quick_run):
    root, _ = quick_run
    cfg = str(root / "tiny.yaml")
    plan = make_plan(load_config(cfg))
    result = runner.invoke(app, ["lineage", "rl", "-c", cfg, "--format", "json"])
    assert result.exit_code == 0, result.output
    graph = json.loads(result.stdout)  # stderr says which plan and stores it read
    names = [n["name"] for n in graph["nodes"]]
    assert sorted(names) == sorted(upstream(plan, "rl"))  # each instance once: ingest once, ref_0 as ref_0
    assert names[0] == "ingest" and names[-1] == "rl"  # upstream first
    ids = [n["id"] for n in graph["nodes"]]
    for edge in graph["edges"]:  # every edge points downstream
        assert ids.index(edge["from"]) < ids.index(edge["to"])
    by_name = {n["name"]: n for n in graph["nodes"]}
    assert by_name["ref_0"]["stage"] == "pretrain" and by_name["ref_0"]["key"] == plan.stages["ref_0"].key
    assert len(graph["edges"]) == sum(len(plan.stages[n].inputs) for n in upstream(plan, "rl"))

    table = runner.invoke(app, ["lineage", "rl", "-c", cfg])
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert len(lines) < 4 * len(names) + 10  # a row per output, not a tree that repeats ingest
    assert sum(plan.stages["ingest"].key in ln for ln in lines) == 1
    mermaid = runner.invoke(app, ["lineage", "rl", "-c", cfg, "--format", "mermaid"])
    assert mermaid.stdout.startswith("flowchart TD") and mermaid.stdout.count("-->") == len(graph["edges"])


def test_read_commands_follow_the_store(quick_run, monkeypatch):
    root, _ = quick_run
    monkeypatch.chdir(root)  # its store is data/ here, as configs/default.yaml's is in the project
    record = json.loads((root / "data" / "runs" / "last-run.json").read_text())
    # the last run here is tiny.yaml's (other tests rerun it, some as a dict with runtime changes: same keys)
    assert record["stages"]["sft"]["key"] == make_plan(load_config(root / "tiny.yaml")).stages["sft"].key
    show = runner.invoke(app, ["show", "sft"])  # no --config: the tiny run's plan, not configs/default.yaml
    assert show.exit_code == 0, show.output
    assert '"stage": "sft"' in show.output and "the last run" in show.output
    assert record["stages"]["sft"]["key"] in show.output
    listing = runner.invoke(app, ["ls"])
    assert listing.exit_code == 0, listing.output
    sft_row = next(ln for ln in listing.output.splitlines() if record["stages"]["sft"]["key"] in ln)
    assert "tiny.yaml" in sft_row and " sft " in sft_row
    assert "outputs," in listing.output.splitlines()[-1]


def test_mlflow_links_reach_ingest_from_the_rl_run(quick_run):
    root, result = quick_run
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("slmflow-tiny")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    rl = next(r for r in result["report"] if r["stage"] == "rl")
    manifest = json.loads((Path(rl["path"]) / "manifest.json").read_text())
    run = client.get_run(manifest["mlflow_run_id"])
    hops = []
    while run.data.tags["stage"] != "ingest":  # follow tags only: no search by digest
        tags = run.data.tags
        nxt = next(tags[f"input.{n}"] for n in ("model", "packed", "documents") if f"input.{n}" in tags)
        assert f"runs/{nxt}" in tags["mlflow.note.content"]  # a clickable line in the description too
        run = client.get_run(nxt)
        hops.append(run.data.tags["instance"])
        assert len(hops) < 12
    assert hops == ["sft", "pretrain", "pack", "select", "quality", "decontaminate", "dedup", "ingest"]
    assert run.data.tags["cached"] == "false"

    # the producer is unique: no cache hit logs the output as its own
    ingest_key = run.data.tags["stage_key"]
    for r in client.search_runs([exp.experiment_id], f"dataset.digest = '{ingest_key}'", max_results=500):
        contexts = {next(t.value for t in d.tags if t.key == "mlflow.data.context") for d in r.inputs.dataset_inputs
                    if d.dataset.digest == ingest_key}
        if "output" in contexts:
            assert r.info.run_id == run.info.run_id

    parent = client.get_run(result["mlflow_run_id"])
    assert parent.data.params["dedup.bands"] == "14" and "overrides" in parent.data.tags
    card = {r["stage"]: r for r in result["report"]}
    assert parent.data.metrics["eval_rl.pass_at_1"] == pytest.approx(card["eval_rl"]["metrics"]["pass_at_1"])
    assert [a.path for a in client.list_artifacts(result["mlflow_run_id"]) if a.path == "lineage.mmd"]

    preselect = client.search_runs([exp.experiment_id], "attributes.run_name = 'preselect'", max_results=1)[0]
    assert {"ref_0", "ref_1", "ref_2"} <= {d.dataset.name for d in preselect.inputs.dataset_inputs}  # by instance
    models = {m.name for m in client.search_logged_models([exp.experiment_id])}
    assert {"ref_0", "ref_1", "pretrain", "sft", "rl"} <= models
    version = client.get_model_version("slmflow-rl", manifest["info"]["registered_version"])
    assert "Lineage (each a link to the run that made it): rl [" in version.description
    assert f"(#/experiments/{exp.experiment_id}/runs/" in version.description and "ingest [" in version.description
    assert parent.data.tags["mlflow.note.content"].startswith("Held-out mean greedy pass@1: pretrain ")
    assert version.tags["stage_key"] == manifest["key"]
    logged = client.get_logged_model(manifest["info"]["mlflow_model_id"])
    assert {m.key for m in logged.metrics} >= {"pass_at_1"}


def test_prefect_task_runs_link_to_store_and_mlflow(quick_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    root, result = quick_run
    sft = next(r for r in result["report"] if r["stage"] == "sft")
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"sft-{sft['key']}"])))
    # other runs of these settings on this server (the S3 run, the chaos run) make the same key: this run's
    # artifact is the one that names its store path
    ours = [a for a in found if sft["path"] in a.data]
    assert ours, f"no artifact on the sft task run naming {sft['path']}"
    manifest = json.loads((Path(sft["path"]) / "manifest.json").read_text())
    assert manifest["mlflow_run_id"] in ours[0].data and ours[0].task_run_id is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_server_is_one_line(project):
    uri = f"http://127.0.0.1:{free_port()}"
    line = fails_cleanly(project, ["run", "-c", str(project / "tiny.yaml"), "--only", "ingest",
                                   "--set", f"run.mlflow_uri={uri}"], uri, "does not answer")
    assert "mlflow server --host 127.0.0.1" in line


def test_unreachable_prefect_server_is_one_line(project, monkeypatch):
    url = f"http://127.0.0.1:{free_port()}/api"
    monkeypatch.setenv("PREFECT_API_URL", url)
    fails_cleanly(project, ["run", "-c", str(project / "tiny.yaml"), "--only", "ingest"], url, "does not answer")


def test_read_commands_import_no_torch_mlflow_or_prefect(quick_run):
    """`--help` and the read commands of a recorded run stay fast: no heavy import (benchmarks/cli.py times them)."""
    root, _ = quick_run
    code = ("import sys; from typer.testing import CliRunner; from flows.cli import app; "
            "r = [CliRunner().invoke(app, a) for a in (['--help'], ['status'], ['lineage', 'rl'], ['show', 'sft'], ['ls'])]; "
            "assert all(x.exit_code == 0 for x in r), [x.output for x in r]; "
            "print([m for m in ('torch', 'mlflow', 'prefect') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
