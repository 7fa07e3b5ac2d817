"""The pipeline flow under Prefect: caching, --only/--force, reproducibility, MLflow lineage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.config import load_config
from flows.pipeline import make_plan, pipeline

pytestmark = pytest.mark.usefixtures("prefect_server")
REFERENCES = [f"{s}_{i}" for i in range(3) for s in ("data_ref", "pack_ref", "ref")]  # tiny.yaml: K = 3
STAGES = ["ingest", "dedup", "prompts", "decontaminate", "quality", "tokenizer_ref", *REFERENCES, "preselect",
          "select", "tokenizer", "pack", "pretrain", "difficulty_pretrain", "sft", "rl", "eval_pretrain", "eval_sft", "eval_rl"]


def run(project: Path, sets=(), only=None, force=None) -> dict:
    cfg = load_config(project / "tiny.yaml", list(sets))
    return pipeline(cfg.model_dump(mode="json"), only, force)


def by_stage(result: dict) -> dict:
    return {r["stage"]: r for r in result["report"]}


def test_tiny_pipeline_end_to_end_then_all_cache_hits(quick_run):
    root, result = quick_run
    first = by_stage(result)
    assert list(first) == STAGES
    assert not any(r["cached"] for r in first.values())
    assert first["ingest"]["rows"]["documents"] > 200
    assert 0 < first["dedup"]["rows"]["documents"] < first["ingest"]["rows"]["documents"]
    again = run(root)
    assert Path(again["report_path"]).read_text().count("| yes |") == len(STAGES)  # all hits
    second = by_stage(again)
    assert all(r["cached"] for r in second.values())
    assert {s: r["key"] for s, r in second.items()} == {s: r["key"] for s, r in first.items()}
    report = Path(again["report_path"]).read_text()
    assert "| ingest |" in report and "| dedup |" in report


def test_changing_dedup_setting_reruns_only_dedup(project):
    base = by_stage(run(project, only=["dedup"]))
    changed = by_stage(run(project, ["dedup.rows=4", "dedup.bands=20"], only=["dedup"]))
    assert changed["ingest"]["cached"] and changed["ingest"]["key"] == base["ingest"]["key"]
    assert not changed["dedup"]["cached"] and changed["dedup"]["key"] != base["dedup"]["key"]
    # --only ingest runs nothing downstream of it
    assert list(by_stage(run(project, only=["ingest"]))) == ["ingest"]
    # --force recomputes a hit under the same key, and nothing else
    forced = by_stage(run(project, only=["dedup"], force=["dedup"]))
    assert forced["ingest"]["cached"] and not forced["dedup"]["cached"]
    assert forced["dedup"]["key"] == base["dedup"]["key"]


def test_only_computes_missing_upstream(project):
    result = by_stage(run(project, only=["dedup"]))
    assert not result["ingest"]["cached"] and not result["dedup"]["cached"]


def test_plan_keys_match_run_and_upstream_keys_are_stable(project):
    cfg = load_config(project / "tiny.yaml")
    plan = make_plan(cfg)
    assert list(plan.stages) == STAGES
    ran = by_stage(run(project, only=["dedup"]))
    assert {n: plan.stages[n].key for n in ran} == {n: r["key"] for n, r in ran.items()}
    other = make_plan(load_config(project / "tiny.yaml", ["dedup.ngram=3"]))
    assert other.stages["ingest"].key == plan.stages["ingest"].key
    assert other.stages["dedup"].key != plan.stages["dedup"].key


def test_mlflow_lineage(project):
    result = run(project, only=["dedup"])
    run(project, only=["dedup"])  # second run: cache hits are child runs too
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("slmflow-tiny")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2
    first_children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result["mlflow_run_id"]]
    assert sorted(r.data.tags["stage"] for r in first_children) == ["dedup", "ingest"]
    assert all(r.data.tags["cached"] == "false" and r.info.status == "FINISHED" for r in first_children)
    second_parent = next(p for p in parents if p.info.run_id != result["mlflow_run_id"])
    hits = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == second_parent.info.run_id]
    assert [r.data.tags["cached"] for r in hits] == ["true"] * 2
    producers = {r.data.tags["stage"]: r.info.run_id for r in first_children}
    assert {r.data.tags["stage"]: r.data.tags["produced_by_run"] for r in hits} == producers

    def datasets(run_id, context):
        inputs = client.get_run(run_id).inputs.dataset_inputs
        return [d.dataset for d in inputs if {t.key: t.value for t in d.tags}["mlflow.data.context"] == context]

    ingest_out = datasets(producers["ingest"], "output")
    dedup_in = datasets(producers["dedup"], "input")
    assert len(ingest_out) == 1 and len(dedup_in) == 1
    assert dedup_in[0].digest == ingest_out[0].digest == by_stage(result)["ingest"]["key"]
    assert json.loads(ingest_out[0].source)["uri"] == str(project / "data" / "ingest" / ingest_out[0].digest)
    # the same dataset record joins producer and consumer: search by digest finds both
    found = client.search_runs([exp.experiment_id], f"dataset.digest = '{ingest_out[0].digest}'")
    assert {producers["ingest"], producers["dedup"]} <= {r.info.run_id for r in found}
    # the cluster-size histogram is a PNG on dedup's run
    assert [a.path for a in client.list_artifacts(producers["dedup"], "plots")] == ["plots/cluster_sizes.png"]


@pytest.mark.usefixtures("prefect_server")
def test_a_stage_map_runs_as_many_shards_at_once_as_there_are_cores(monkeypatch):
    """Prefect's default thread pool would start all 12 shards at once (12 shards' memory); a stage's
    map keeps as many in flight as there are cores, and returns results in item order."""
    import os
    import threading
    import time

    from prefect import flow

    from tasks.core.orchestration import ShardMap

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    lock, running, peak = threading.Lock(), [0], [0]

    def shard(i: int, scale: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        return i * scale

    @flow
    def mapped() -> list[int]:
        return ShardMap("demo")(shard, list(range(12)), scale=3)

    assert mapped() == [3 * i for i in range(12)]
    assert peak[0] == 2
