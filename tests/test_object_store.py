"""The tiny pipeline end to end on an S3 object store: moto's S3 server on 127.0.0.1, read and written
through s3fs, both store roots `s3://...`. Every stage reads its inputs through the store API, so
the outputs are byte-identical to the session's local run (same keys, same sha256 per file, model
weights included): the same config gives the same bytes in a second store. (The config is tiny.yaml
with conftest's QUICK training, compared with the session's `quick_run`: every stage runs on S3, and
what is compared is the bytes, not how far training got. The S3 side is `run_on_s3`, which conftest's
`early` starts with the session.)"""

from __future__ import annotations

import contextlib
import logging

import fsspec
import pytest

from flows.config import load_config
from flows.pipeline import make_plan
from tasks.core.store import Store

pytestmark = pytest.mark.usefixtures("prefect_server")


@contextlib.contextmanager
def s3_server():
    """moto's S3 server on a free loopback port, with the environment that points s3fs at it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            fsspec.filesystem("s3").mkdir("slmflow")
            yield env
    finally:
        server.stop()


def run_on_s3(out: str, config: str) -> None:
    """The S3 side of the test, in a process of its own (conftest's `early`): the pipeline on `config`
    (both store roots s3://slmflow/...) against moto's S3 server, then again; each planned output as the
    store API reads it back from S3, and what else the test checks, to `out` as JSON (the bucket goes
    with the server)."""
    from conftest import write_json
    from flows.pipeline import pipeline

    with s3_server():
        result = pipeline(config)
        cfg = load_config(config)
        plan = make_plan(cfg)
        stores = {"data": Store(cfg.run.data_root), "models": Store(cfg.run.models_root)}
        on_s3 = {}
        for name, planned in plan.stages.items():
            art = stores[planned.stage.store].get(planned.stage.name, planned.key)
            on_s3[name] = None if art is None else art.manifest["files"]
        work_left = stores["models"].fs.exists("slmflow/models/pretrain/.work-" + plan.stages["pretrain"].key)
        again = pipeline(config)
    write_json(out, {"result": result, "on_s3": on_s3, "work_left": work_left, "again": again})


def test_tiny_pipeline_on_s3_matches_the_local_run(early, quick_run):
    s3 = early["s3"].result(timeout=3600)
    local_root, local = quick_run
    report = {r["stage"]: r for r in s3["result"]["report"]}
    assert not any(r["cached"] for r in report.values())
    assert all(r["path"].startswith("s3://slmflow/") for r in report.values())
    plan = make_plan(load_config(early["s3"].root / "tiny.yaml"))
    here = {"data": Store(local_root / "data"), "models": Store(local_root / "models")}
    local_keys = {r["stage"]: r["key"] for r in local["report"]}
    for name, planned in plan.stages.items():
        assert report[name]["key"] == local_keys[name] == planned.key
        on_s3 = s3["on_s3"][name]
        assert on_s3 is not None and on_s3 == here[planned.stage.store].get(planned.stage.name, planned.key).manifest["files"], name
    assert not s3["work_left"]
    again = {r["stage"]: r for r in s3["again"]["report"]}
    assert all(r["cached"] for r in again.values())
