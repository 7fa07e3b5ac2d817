"""The tiny pipeline end to end on an S3 object store: moto's S3 server on 127.0.0.1, read and written
through s3fs, both store roots `s3://...`. Every stage reads its inputs through the store API, so
the outputs are byte-identical to the session's local run (same keys, same sha256 per file, model
weights included): the same config gives the same bytes in a second store."""

from __future__ import annotations

import logging

import fsspec
import pytest
from conftest import tiny_config

from flows.config import load_config
from flows.pipeline import make_plan, pipeline
from tasks.core.store import Store

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on a free loopback port, with the environment that points s3fs at it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        fsspec.filesystem("s3").mkdir("slmflow")
        yield env
    server.stop()


def test_tiny_pipeline_on_s3_matches_the_local_run(s3_server, tiny_run, tmp_path):
    local_root, local = tiny_run
    config = tiny_config(tmp_path, data_root="s3://slmflow/data", models_root="s3://slmflow/models")
    result = pipeline(str(config))
    report = {r["stage"]: r for r in result["report"]}
    assert not any(r["cached"] for r in report.values())
    assert all(r["path"].startswith("s3://slmflow/") for r in report.values())
    cfg = load_config(config)
    plan = make_plan(cfg)
    stores = {"data": (Store(cfg.run.data_root), Store(local_root / "data")),
              "models": (Store(cfg.run.models_root), Store(local_root / "models"))}
    local_keys = {r["stage"]: r["key"] for r in local["report"]}
    for name, planned in plan.stages.items():
        assert report[name]["key"] == local_keys[name] == planned.key
        remote, here = stores[planned.stage.store]
        on_s3 = remote.get(planned.stage.name, planned.key)
        assert on_s3 is not None and on_s3.manifest["files"] == here.get(planned.stage.name, planned.key).manifest["files"], name
    assert not remote.fs.exists("slmflow/models/pretrain/.work-" + plan.stages["pretrain"].key)
    again = {r["stage"]: r for r in pipeline(str(config))["report"]}
    assert all(r["cached"] for r in again.values())
