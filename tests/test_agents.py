"""Agents that share nothing but the servers and an object store: benchmarks/agents.py's topology on 127.0.0.1.

moto's S3 server, a Prefect server, an MLflow tracking server with its artifacts in the object store, a
cpu and a gpu Prefect worker and two Dask workers, each in an empty directory of its own (and, as root,
under a user of its own that cannot read another's files), importing slmflow from a pip-installed copy.
The benchmark runs in the background from the start of the session (conftest's `early`), right after
the session's `quick_run`, which is its reference: the same pipeline on a local store. The three
reference models are seeded into the object store from it (the benchmark alone trains them too), so
the run's gpu flow runs are pretrain, sft and rl. Here, what it found is checked.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from agents import can_isolate  # noqa: E402


@pytest.fixture(scope="module")
def agents(early) -> dict:
    [(code, stdout, stderr)] = early["agents"].wait(timeout=3600)
    assert code == 0, stderr[-4000:]
    return __import__("json").loads(stdout)


def test_the_pipeline_on_agents_gives_the_local_bytes(agents):
    p = agents["checks"]["pipeline"]
    assert p["different"] == []  # every planned output: the same key and the same sha256 per file
    assert set(p["training_pools"]) == {"pretrain", "sft", "rl"}  # the references are seeded (conftest)
    assert set(p["training_pools"].values()) == {"gpu"} and all(p["training_subflows"].values())
    assert sorted(p["dask_tasks"]) == ["dask-1", "dask-2"] and all(n > 0 for n in p["dask_tasks"].values())
    assert agents["identical"]


def test_agents_write_only_their_own_directories_and_import_the_installed_package(agents):
    checks = agents["checks"]
    assert checks["checkout_written"] == [] and checks["outside_agents"] == []
    assert sorted(checks["agents"]) == ["cpu-1", "dask-1", "dask-2", "gpu-1"]
    for name, agent in checks["agents"].items():
        assert "/package/site/flows/" in agent["code"], name  # not the checkout
    if can_isolate():  # in a mount namespace of its own: the checkout and the others' directories look empty
        assert checks["isolation"] == "mount namespaces"
        assert not any(a["sees_checkout"] or a["sees_others"] for a in checks["agents"].values())
    else:  # said, not passed over: without root (or CAP_SYS_ADMIN) the agents run side by side
        assert checks["isolation"].startswith("none")


def test_mlflow_over_http_holds_runs_datasets_models_and_links(agents):
    m = agents["checks"]["mlflow"]
    assert m["parents"] == 1 and m["training_under_parent"] == 3
    assert m["stage_runs"] >= 26 and m["with_datasets"] >= 26
    assert m["logged_models"] >= 3 and m["registered_versions"] >= 1
    assert m["absolute_links"] > 0 and m["artifacts_in_store"] > 0


def test_a_killed_gpu_agent_is_resumed_by_a_new_one_from_the_store(agents):
    r = agents["checks"]["resume"]
    assert r["killed_after"] and r["killed_processes"] >= 2  # after a checkpoint reached the store: worker and run
    assert any("from s3://" in line for line in r["resume_lines"]), r["resume_lines"]
    assert r["same_weights"] and r["work_left"] == []
    assert r["took_over"]  # the killed holder's lease, after its timeout
    assert agents["resumed"]


def test_two_agents_asking_for_one_key_compute_it_once(agents):
    c = agents["checks"]["computed_once"]
    assert c["states"] == ["COMPLETED", "COMPLETED"]
    assert c["waited"] == 2  # both queued behind the key's lease (the benchmark held it until they did)
    assert (c["computed"], c["hits"]) == (1, 1)  # then one computed it and the other took the hit
    assert agents["computed_once"]


def test_deploy_makes_the_pools_a_paused_nightly_schedule_and_stage_reruns(agents):
    """`slmflow deploy`'s pools and deployments, the README's commands that turn the nightly schedule on
    and off again, `prefect deployment run slmflow-stage/eval -p names=[eval_rl] -p force=true` (a rerun
    of one stage, on the gpu pool) and `slmflow serve` refusing the names deployments already have."""
    d = agents["checks"]["deployments"]
    assert d["pools"]["cpu"]["type"] == d["pools"]["gpu"]["type"] == "process"
    assert d["pools"]["gpu"]["concurrency_limit"] == 1
    assert d["deployment_pools"] == {"pipeline": "cpu", "data": "cpu", "pretrain": "gpu", "sft": "gpu", "rl": "gpu",
                                     "eval": "gpu"}
    assert d["sft_env"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert d["pipeline_overrides"] == ["run.execution=deployments"]
    assert d["schedule"] == {"cron": "0 3 * * *", "active": False, "listed": True, "resumed": True, "paused_again": True}
    r = d["rerun"]
    assert r["same_key_and_files"] and r["new_mlflow_run"] and r["others_untouched"] == []  # only the named stage ran
    assert (r["parent_family"], r["parent_status"], r["pool"]) == ("eval", "FINISHED", "gpu")
    said = "\n".join(d["serve"]["said"])
    assert d["serve"]["exit"] == 1, said
    assert "already has" in said and "slmflow-pipeline/pipeline" in said and "prefect deployment delete" in said
