"""`slmflow serve` and the Dask runner, with real components on 127.0.0.1.

The serve test drives the session's Prefect server with the commands a user types. `slmflow deploy`,
its work pools and schedule, process workers on the `cpu` and `gpu` pools and a stage rerun through its
deployment are tests/test_agents.py's, on the agents' topology.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import tiny_config

from flows.config import load_config
from flows.pipeline import make_plan
from tasks.core.store import Store

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the project's .venv: prefect and slmflow as a user runs them


@dataclass
class Server:
    url: str
    env: dict[str, str]
    logs: Path

    def api(self, method: str, path: str, **kwargs) -> dict | list | None:
        # the server answers 503 while its SQLite database is busy (a serving process shutting down, a
        # loaded machine): retry for up to 30 s rather than fail the test on the server's momentary state
        for attempt in range(30):
            response = httpx.request(method, f"{self.url}{path}", timeout=30, **kwargs)
            if response.status_code != 503:
                break
            time.sleep(1)
        response.raise_for_status()
        return response.json() if response.content else None

    def start(self, name: str, *args: str, cwd: Path = ROOT) -> subprocess.Popen:
        """A long-running process (its own process group, so its children stop with it)."""
        log = open(self.logs / f"{name}.log", "w")
        return subprocess.Popen(args, cwd=cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def run(self, *args: str, cwd: Path = ROOT, timeout: float = 600) -> str:
        done = subprocess.run(args, cwd=cwd, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"{' '.join(map(str, args))} exited {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}"
        return done.stdout


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def server(prefect_server, tmp_path) -> Server:
    """The session's Prefect server, as a user's shell has it (PREFECT_API_URL); logs under tmp_path."""
    return Server(os.environ["PREFECT_API_URL"], dict(os.environ), tmp_path)


def test_serve_serves_every_deployment_with_the_configured_schedule(server, tmp_path):
    config = tiny_config(tmp_path / "served")
    proc = server.start("serve", str(BIN / "slmflow"), "serve", "-c", str(config), "--set", "run.schedule=0 4 * * 1")
    try:
        deadline = time.monotonic() + 180
        while len(found := server.api("POST", "/deployments/filter", json={})) < 6:
            assert proc.poll() is None and time.monotonic() < deadline, (server.logs / "serve.log").read_text()[-3000:]
            time.sleep(1)
        by_name = {d["name"]: d for d in found}
        assert sorted(by_name) == ["data", "eval", "pipeline", "pretrain", "rl", "sft"]
        [schedule] = by_name["pipeline"]["schedules"]
        assert schedule["schedule"]["cron"] == "0 4 * * 1" and schedule["active"]
        assert by_name["pipeline"]["parameters"]["config"] == str(config) and not by_name["sft"]["schedules"]
        # the serving process runs what is triggered: one data stage into the configured store
        server.run(str(BIN / "prefect"), "deployment", "run", "slmflow-stage/data", "--param", 'names=["prompts"]',
                   "--watch", cwd=tmp_path)
        cfg = load_config(config)
        plan = make_plan(cfg)
        stored = Store(cfg.run.data_root)
        assert stored.get("prompts", plan.stages["prompts"].key) is not None
        assert stored.get("ingest", plan.stages["ingest"].key) is None  # only the named stage
    finally:
        stop(proc)
        for d in server.api("POST", "/deployments/filter", json={}):
            server.api("DELETE", f"/deployments/{d['id']}")


def manifests(config: Path, only: tuple[str, ...] = ()) -> dict[str, dict]:
    """Every planned stage's manifest in the config's store (each must be there)."""
    cfg = load_config(config)
    plan = make_plan(cfg)
    found = {}
    for name, p in plan.stages.items():
        if only and name not in only:
            continue
        art = Store(cfg.run.models_root if p.stage.store == "models" else cfg.run.data_root).get(p.stage.name, p.key)
        assert art is not None, f"{config}: {name} {p.key} missing"
        found[name] = art.manifest
    return found


@pytest.mark.usefixtures("prefect_server")
def test_dask_runner_gives_byte_identical_dedup(tmp_path, caplog):
    import os

    from flows.pipeline import pipeline

    results, on_dask = {}, {}
    environ = dict(os.environ)
    for runner in ("default", "dask"):
        config = tiny_config(tmp_path / runner, runner=runner)
        caplog.clear()
        with caplog.at_level("INFO", logger="slmflow"):
            pipeline(str(config), only=["dedup"])
        # the local cluster's worker settings (OMP_NUM_THREADS=1, PYTHONHASHSEED) stay out of ours
        assert dict(os.environ) == environ
        results[runner] = manifests(config, only=("ingest", "dedup"))
        on_dask[runner] = [r.getMessage() for r in caplog.records if " on Dask tcp://127.0.0.1:" in r.getMessage()]
    assert not on_dask["default"]
    # every step of dedup runs on the local cluster: the shards, the key partitions, the edge partitions
    for step in ("shard_signatures", "group_partition", "reduce_edges"):
        assert any(m.startswith("dedup: ") and f" x {step} on Dask" in m for m in on_dask["dask"]), step
    for name in ("ingest", "dedup"):
        assert results["dask"][name]["key"] == results["default"][name]["key"]
        assert results["dask"][name]["files"] == results["default"][name]["files"]


def test_deployments_mode_needs_a_prefect_server(tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from typer.testing import CliRunner

    from flows.cli import app

    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # no server configured
        result = CliRunner().invoke(app, ["run", "-c", str(tiny_config(tmp_path)), "--set", "run.execution=deployments"])
    assert result.exit_code == 1, result.output
    assert "needs a Prefect server" in result.output and "PREFECT_API_URL" in result.output
    assert not (tmp_path / "data").exists()  # nothing ran


def test_store_roots_from_environment_and_shared_spelling(tmp_path, monkeypatch):
    from flows.config import RunSettings

    monkeypatch.setenv("SLMFLOW_DATA_ROOT", "/shared/data")
    monkeypatch.delenv("SLMFLOW_MODELS_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    run = RunSettings()
    assert run.data_root == "/shared/data" and run.models_root == "models"
    assert RunSettings(data_root="here").data_root == "here"  # the config beats the environment
    shared = run.shared()
    assert shared.models_root == str(tmp_path / "models") and shared.mlflow_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert RunSettings(data_root="s3://bucket/slm").shared().data_root == "s3://bucket/slm"
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["run.schedule=*/30 * * * *"])  # not YAML: kept as the string it is
    assert cfg.run.schedule == "*/30 * * * *"


def test_a_stage_map_on_dask_is_as_wide_as_the_cluster():
    """map_bounded's window on Dask is the cluster's thread count (a machine's CPU count would leave a
    big cluster idle)."""
    from distributed import LocalCluster

    from tasks.core.orchestration import ShardMap

    with LocalCluster(n_workers=3, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        assert ShardMap("demo", cluster.scheduler_address).width == 3
    assert ShardMap("demo").width == os.cpu_count()
