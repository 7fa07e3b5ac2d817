"""Shared fixtures: one Prefect test server per session, a fresh store + MLflow DB per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "slmflow")
# stages also run outside a flow here (run_stage): their log lines need no flow run
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def prefect_server():
    """A temporary Prefect API on 127.0.0.1 (its own SQLite database), stopped at the end."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: a second thread only adds sync cost (and spins badly on a busy machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A working directory with tiny.yaml pointed at a store and an MLflow SQLite file inside it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = yaml.safe_load(TINY.read_text())
    raw["run"].update(data_root=str(tmp_path / "data"), models_root=str(tmp_path / "models"),
                      mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return tmp_path
