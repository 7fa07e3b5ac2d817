"""The lease object of an s3:// store (tasks.core.lease), against moto's S3 server on 127.0.0.1: one
holder at a time, heartbeats that keep a long holder, takeover of a silent one, and `run_stage` of one
key in two processes computing it once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import boto3
import pytest
from test_object_store import s3_server

from tasks.core.base import StageError
from tasks.core.lease import ObjectLease, lease_timeout_s
from tasks.core.stage import StageConfig
from tasks.core.store import stage_key

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "slmflow"


@pytest.fixture(scope="module")
def s3():
    with s3_server():
        yield boto3.client("s3")


@pytest.fixture
def url():
    """A fresh lease URL per test (one bucket for the module)."""
    return f"s3://{BUCKET}/lease-{uuid.uuid4().hex[:8]}/toy/.lease-0123456789abcdef"


def objects(s3, url: str) -> list[str]:
    prefix = url.removeprefix(f"s3://{BUCKET}/").split("/", 1)[0]
    return [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


def test_one_holder_at_a_time_and_release_leaves_nothing(s3, url):
    first, second = ObjectLease(url, "toy k", timeout_s=10), ObjectLease(url, "toy k", timeout_s=10)
    assert first.acquire(blocking=False)
    assert not second.acquire(blocking=False) and second.held()
    owner = second.owner()
    assert owner["pid"] == os.getpid() and owner["what"] == "toy k" and owner["timeout_s"] == 10
    assert {"holder", "host", "since", "heartbeat"} <= set(owner)
    waits, got = [], []
    waiter = threading.Thread(target=lambda: got.append(second.acquire(on_wait=lambda o, s: waits.append(o),
                                                                       poll_s=0.1)))
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and waits and waits[0]["pid"] == os.getpid()  # blocked, and said on whom
    first.release()
    waiter.join(timeout=5)
    assert got == [True] and second.owner()["holder"] != owner["holder"]
    second.release()
    assert objects(s3, url) == [] and not first.held()
    with ObjectLease(url, timeout_s=10) as lease:  # as a context manager
        assert lease.held() and len(objects(s3, url)) == 1
    assert objects(s3, url) == []


def test_heartbeats_keep_a_holder_beyond_the_timeout(s3, url):
    holder = ObjectLease(url, timeout_s=1)
    assert holder.acquire(blocking=False)
    first_beat = holder.owner()["heartbeat"]
    deadline = time.monotonic() + 2.5  # two and a half timeouts
    while time.monotonic() < deadline:
        assert not ObjectLease(url, timeout_s=1).acquire(blocking=False)
        time.sleep(0.2)
    assert holder.owner()["heartbeat"] > first_beat + 1.5
    holder.release()
    assert objects(s3, url) == []


def put_lease(s3, url: str, since: str, heartbeat: float) -> str:
    body = {"holder": "someone-else", "host": "elsewhere", "pid": 4242, "since": since, "heartbeat": heartbeat,
            "what": "toy k", "timeout_s": 2}
    key = url.removeprefix(f"s3://{BUCKET}/")
    return s3.put_object(Bucket=BUCKET, Key=key, Body=json.dumps(body).encode())["ETag"]


def test_an_old_lease_with_a_fresh_heartbeat_is_not_taken_over(s3, url, caplog):
    etag = put_lease(s3, url, since="2020-01-01T00:00:00+00:00", heartbeat=time.time())
    lease = ObjectLease(url, timeout_s=2)
    assert not lease.acquire(blocking=False) and lease.held()
    assert s3.head_object(Bucket=BUCKET, Key=url.removeprefix(f"s3://{BUCKET}/"))["ETag"] == etag  # untouched
    assert warnings_of(caplog) == []


def test_a_silent_lease_is_taken_over_by_one_waiter_with_one_line(s3, url, caplog):
    put_lease(s3, url, since="2020-01-01T00:00:00+00:00", heartbeat=time.time() - 10)
    waiters = [ObjectLease(url, timeout_s=2) for _ in range(4)]
    won = []
    racers = [threading.Thread(target=lambda w=w: won.append(w.acquire(blocking=False))) for w in waiters]
    for t in racers:
        t.start()
    for t in racers:
        t.join()
    assert sorted(won) == [False, False, False, True]
    [line] = warnings_of(caplog)
    assert "took over the lease of pid 4242 on elsewhere" in line and "without a heartbeat" in line
    for w in waiters:
        w.release()
    assert objects(s3, url) == []


def test_a_holder_whose_lease_was_taken_says_so_and_leaves_it(s3, url, caplog):
    holder = ObjectLease(url, "toy k", timeout_s=1)
    assert holder.acquire(blocking=False)
    etag = put_lease(s3, url, since="2020-01-01T00:00:00+00:00", heartbeat=time.time())  # as a takeover writes
    time.sleep(0.6)  # past its next heartbeat
    holder.release()
    [line] = warnings_of(caplog)
    assert line.startswith("toy k: lost its lease")
    assert s3.head_object(Bucket=BUCKET, Key=url.removeprefix(f"s3://{BUCKET}/"))["ETag"] == etag  # not ours to delete


def test_the_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("SLMFLOW_LEASE_TIMEOUT_S", raising=False)
    assert lease_timeout_s() == 120
    monkeypatch.setenv("SLMFLOW_LEASE_TIMEOUT_S", "2.5")
    assert lease_timeout_s() == 2.5 and ObjectLease("s3://b/k").timeout_s == 2.5
    for bad in ("0", "-1", "soon", "inf"):
        monkeypatch.setenv("SLMFLOW_LEASE_TIMEOUT_S", bad)
        with pytest.raises(StageError, match="SLMFLOW_LEASE_TIMEOUT_S=.* is not a positive number of seconds"):
            lease_timeout_s()


def test_a_store_that_refuses_the_lease_is_one_line(s3):
    with pytest.raises(StageError, match=r"^s3://no-such-bucket/toy/.lease-k: the store refused the key's lease"):
        ObjectLease("s3://no-such-bucket/toy/.lease-k", timeout_s=2).acquire(blocking=False)


class Cfg(StageConfig):
    n: int = 3


def stage_script(root: str, calls: Path, started: Path | None = None, sleep_s: float = 2, peers: Path | None = None,
                 ) -> str:
    """`run_stage` of one toy key on the store `root`, logging to stderr; its outcome as JSON on stdout.
    The stage counts its computations in `calls` and touches `started` once it runs. With `peers` (a
    directory), each process enters it before `run_stage`, and the stage waits for two there: the other
    run asks for the key while this one computes it, however late it started on a busy machine."""
    return textwrap.dedent(f"""
        import json, logging, os, pathlib, time
        from tasks.core.stage import Stage, StageConfig, run_stage
        from tasks.core.store import Store
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        CALLS, STARTED, PEERS = {str(calls)!r}, {str(started or "")!r}, {str(peers or "")!r}
        class Cfg(StageConfig):  # the test's Cfg: the same stage key
            n: int = 3
        def slow(cfg, inputs, ctx):
            with open(CALLS, "a") as f:
                f.write("x")
            if STARTED:
                pathlib.Path(STARTED).write_text("x")
            deadline = time.monotonic() + 30
            while PEERS and len(os.listdir(PEERS)) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep({sleep_s})
            (ctx.out / "rows.txt").write_text("rows")
            return {{"rows": {{"rows": cfg.n}}}}
        if PEERS:
            pathlib.Path(PEERS, str(os.getpid())).write_text("x")
        out = run_stage(Stage("toy", 1, Cfg, slow), Cfg(), {{}}, Store({root!r}))
        print(json.dumps({{"cached": out.cached, "key": out.artifact.key}}))
    """)


def start(script: str, log: Path, **env) -> subprocess.Popen:
    """The script in a process of its own, its log lines (stderr) to `log`."""
    with open(log, "w") as err:
        return subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=err,
                                text=True, env={**os.environ, **env})


def outcome(proc: subprocess.Popen, log: Path) -> tuple[dict, str]:
    out, _ = proc.communicate(timeout=60)
    err = log.read_text()
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.splitlines()[-1]), err


def wait_for(what: str, cond, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 30
    while not cond():
        assert time.monotonic() < deadline and proc.poll() is None, f"{what}: {log.read_text()[-3000:]}"
        time.sleep(0.05)


def stage_dir(s3, prefix: str) -> list[str]:
    return sorted({o["Key"].split("/")[2] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/toy/")
                   .get("Contents", [])})


def test_two_processes_on_one_s3_key_compute_it_once(s3, tmp_path):
    prefix = f"race-{uuid.uuid4().hex[:8]}"
    calls = tmp_path / "calls"
    peers = tmp_path / "peers"
    peers.mkdir()
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    procs = [start(stage_script(f"s3://{BUCKET}/{prefix}", calls, peers=peers), log) for log in logs]
    (first, first_err), (second, second_err) = [outcome(p, log) for p, log in zip(procs, logs)]
    assert calls.read_text() == "x", first_err + "\n----\n" + second_err  # computed once
    assert sorted([first["cached"], second["cached"]]) == [False, True]
    waited = second_err if second["cached"] else first_err
    assert "waiting for another run computing" in waited and "cache hit" in waited
    key = stage_key("toy", 1, Cfg(), {})
    assert first["key"] == second["key"] == key
    assert stage_dir(s3, prefix) == [key]  # no lease left


def test_a_killed_holder_is_taken_over_after_the_lease_timeout(s3, tmp_path):
    prefix = f"kill-{uuid.uuid4().hex[:8]}"
    calls, started = tmp_path / "calls", tmp_path / "started"
    root = f"s3://{BUCKET}/{prefix}"
    holder_log = tmp_path / "holder.log"
    holder = start(stage_script(root, calls, started, sleep_s=60), holder_log, SLMFLOW_LEASE_TIMEOUT_S="2")
    wait_for("the holder never started computing", started.exists, holder, holder_log)
    waiter_log = tmp_path / "waiter.log"
    waiter = start(stage_script(root, calls, sleep_s=0), waiter_log, SLMFLOW_LEASE_TIMEOUT_S="2")
    wait_for("the waiter never waited", lambda: "waiting for another run" in waiter_log.read_text(), waiter, waiter_log)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    killed = time.monotonic()
    result, err = outcome(waiter, waiter_log)
    assert time.monotonic() - killed >= 1.0  # it waited out the silence (2 s since the last heartbeat)
    assert not result["cached"] and calls.read_text() == "xx"
    assert "waiting for another run computing" in err
    assert f"took over the lease of pid {holder.pid}" in err and "without a heartbeat" in err
    assert stage_dir(s3, prefix) == [stage_key("toy", 1, Cfg(), {})]  # committed; no lease left
