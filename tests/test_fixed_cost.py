"""What `slmflow run` pays before its first stage: a data-only run never imports torch, and Prefect's
temporary server starts while the run is planned (benchmarks/fixed_cost.py times both)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT, tiny_config

from flows.prefect_server import PrefectAPI, ServerError


def test_a_data_only_run_imports_no_torch(tmp_path):
    """The CLI, the pipeline (every stage's config) and a plan, then the ingest stage itself."""
    config = tiny_config(tmp_path)
    code = f"""
import sys
from pathlib import Path

import flows.cli, flows.pipeline, flows.stages
from flows.cli_common import load_plan
from tasks.core.stage import run_stage
from tasks.core.store import Store

cfg, plan = load_plan(Path({str(config)!r}), ["ingest.sources=[{{kind: pydoc}}]"])
ingest = plan.stages["ingest"]
ingest.stage.check(ingest.cfg)
out = run_stage(ingest.stage, ingest.cfg, {{}}, Store(cfg.run.data_root), key=ingest.key)
assert out.artifact.rows["documents"] > 0, out
print([m for m in ("torch", "safetensors") if m in sys.modules])
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_temporary_server_starts_on_entry_and_is_waited_for_only_by_url(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    said = []
    with PrefectAPI(log=said.append) as api:
        assert api._proc.poll() is None and said == []  # starting in its own process; nobody waited yet
    assert api._proc.poll() is not None  # a run that stops before its flow (a bad setting) stops it too
    assert "PREFECT_API_URL" not in os.environ


def test_a_configured_server_is_used_as_it_is(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing answers on port 9
    with PrefectAPI() as api:
        assert api._proc is None  # nothing started
        with pytest.raises(ServerError, match="PREFECT_API_URL=http://127.0.0.1:9/api does not answer"):
            api.url()
