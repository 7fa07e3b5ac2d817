"""Reliability: one computation per key under concurrent runs, a damaged store caught and recomputed,
fsync before the manifest, housekeeping, and a seeded chaos run (SIGKILL at several moments)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from flows.cli import app
from flows.config import load_config
from flows.pipeline import make_plan
from tasks.core.locks import FileLock
from tasks.core.stage import Stage, StageConfig, run_stage
from tasks.core.store import Store, stage_key

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


class Cfg(StageConfig):
    n: int = 3


def hold_lock_then_die(path: Path, ready: Path) -> subprocess.Popen:
    script = textwrap.dedent(f"""
        import pathlib, time
        from tasks.core.locks import FileLock
        FileLock({str(path)!r}).acquire()
        pathlib.Path({str(ready)!r}).write_text("held")
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert time.monotonic() < deadline and proc.poll() is None, "the holder never took the lock"
        time.sleep(0.05)
    return proc


def test_lock_held_by_a_killed_process_is_taken_at_once(tmp_path):
    path = tmp_path / ".lock-abc"
    holder = hold_lock_then_die(path, tmp_path / "ready")
    lock = FileLock(path)
    assert lock.held() and not lock.acquire(blocking=False)
    assert lock.owner()["pid"] == holder.pid
    holder.kill()
    holder.wait()
    start = time.monotonic()
    assert lock.acquire(blocking=False) and time.monotonic() - start < 1  # no lease to wait out
    assert lock.owner()["pid"] == os.getpid()
    lock.release()
    assert not path.exists()  # released locks leave no file


def test_two_processes_compute_one_key_once(tmp_path):
    """Two runs of one stage key at once: one computes, the other waits and takes it as a cache hit."""
    calls = tmp_path / "calls"
    script = textwrap.dedent(f"""
        import json, sys, time
        from tasks.core.stage import Stage, StageConfig, run_stage
        from tasks.core.store import Store
        class Cfg(StageConfig):
            n: int = 3
        def slow(cfg, inputs, ctx):
            with open({str(calls)!r}, "a") as f:
                f.write("x")
            time.sleep(2)
            (ctx.out / "rows.txt").write_text("rows")
            return {{"rows": {{"rows": cfg.n}}}}
        out = run_stage(Stage("toy", 1, Cfg, slow), Cfg(), {{}}, Store({str(tmp_path / "store")!r}))
        print(json.dumps({{"cached": out.cached, "key": out.artifact.key}}))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [json.loads(p.communicate(timeout=120)[0].splitlines()[-1]) for p in procs]
    assert calls.read_text() == "x"  # computed once
    assert sorted(r["cached"] for r in results) == [False, True]
    assert results[0]["key"] == results[1]["key"] == stage_key("toy", 1, Cfg(), {})
    assert [p.name for p in (tmp_path / "store" / "toy").iterdir()] == [results[0]["key"]]


def test_commit_flushes_files_before_the_manifest_and_the_rename(tmp_path, monkeypatch):
    import tasks.core.store as store_module

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(store_module.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                              real_fsync(fd)))

    def write(cfg, inputs, ctx):
        (ctx.out / "table").mkdir()
        (ctx.out / "table" / "part-0.parquet").write_bytes(b"data" * 100)
        return {}

    art = run_stage(Stage("toy", 1, Cfg, write), Cfg(), {}, Store(tmp_path)).artifact
    data = next(i for i, p in enumerate(synced) if p.endswith("part-0.parquet"))
    manifest = next(i for i, p in enumerate(synced) if p.endswith("manifest.json"))
    assert data < manifest and synced[-1] == str(tmp_path / "toy")  # the rename is made durable last
    assert art.manifest["sizes"] == {"table/part-0.parquet": 400}


def test_damaged_output_is_caught_on_read_and_recomputed(tmp_path, caplog):
    store = Store(tmp_path)
    stage = Stage("toy", 1, Cfg, lambda cfg, inputs, ctx: (ctx.out / "rows.txt").write_text("a" * 100) and {})
    key = run_stage(stage, Cfg(), {}, store).artifact.key
    rows = tmp_path / "toy" / key / "rows.txt"
    rows.write_text("a" * 50)  # truncated
    assert store.get("toy", key) is None
    assert f"{rows} has 50 bytes, its manifest says 100" in caplog.text
    again = run_stage(stage, Cfg(), {}, store)
    assert not again.cached and rows.read_text() == "a" * 100
    rows.unlink()
    assert store.get("toy", key) is None and f"{rows} is missing" in caplog.text


def truncate_first_shard(art_dir: Path, table: str) -> Path:
    shard = sorted((art_dir / table).glob("*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return shard


def test_truncated_parquet_in_a_cached_output_is_reported_and_recomputed(project, prefect_server, caplog):
    cfg = project / "tiny.yaml"
    first = runner.invoke(app, ["run", "-c", str(cfg), "--only", "dedup"])
    assert first.exit_code == 0, first.output
    plan = make_plan(load_config(cfg))
    ingest_dir = project / "data" / "ingest" / plan.stages["ingest"].key
    before = json.loads((ingest_dir / "manifest.json").read_text())["files"]
    shard = truncate_first_shard(ingest_dir, "documents")
    again = runner.invoke(app, ["run", "-c", str(cfg), "--only", "dedup"])
    assert again.exit_code == 0, again.output
    assert f"ingest {plan.stages['ingest'].key} is damaged: {shard} has" in caplog.text
    report = Path(again.output.split("report: ")[1].split()[0]).read_text()
    assert f"| ingest | `{plan.stages['ingest'].key}` | no |" in report  # recomputed
    assert f"| dedup | `{plan.stages['dedup'].key}` | yes |" in report  # its input's key is unchanged
    assert json.loads((ingest_dir / "manifest.json").read_text())["files"] == before  # the same bytes again


def test_verify_finds_an_edited_file_and_sets_the_output_aside(project, prefect_server):
    cfg = project / "tiny.yaml"
    assert runner.invoke(app, ["run", "-c", str(cfg), "--only", "ingest"]).exit_code == 0
    key = make_plan(load_config(cfg)).stages["ingest"].key
    shard = sorted((project / "data" / "ingest" / key / "documents").glob("*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the digest can tell
    shard.write_bytes(bytes(data))
    assert Store(project / "data").get("ingest", key) is not None  # the cheap check passes
    result = runner.invoke(app, ["verify", "-c", str(cfg)])
    assert result.exit_code == 1
    assert f"damaged: {shard} does not match its sha256" in " ".join(result.output.split())
    assert Store(project / "data").get("ingest", key) is None
    assert [p.name.startswith(f".damaged-{key}-") for p in (project / "data" / "ingest").iterdir()] == [True]
    ok = runner.invoke(app, ["verify", "-c", str(cfg)])
    assert ok.exit_code == 0 and "verified 0 outputs" in ok.output


def test_gc_lists_then_removes_only_what_no_longer_counts(project):
    cfg = project / "tiny.yaml"
    plan = make_plan(load_config(cfg))
    store = Store(project / "data")
    kept_key, other = plan.stages["ingest"].key, "0123456789abcdef"

    def commit(stage, key):
        scratch = store.scratch(stage, key)
        (scratch / "x.txt").write_text("x" * 1000)
        store.commit(scratch, stage, key, {"stage": stage})

    commit("ingest", kept_key)
    commit("ingest", other)  # no config reaches it
    base = project / "data" / "ingest"
    store.scratch("ingest", other)  # a killed run's scratch
    (base / f".work-{kept_key}").mkdir()  # checkpoints of a finished key
    (base / f".lock-{other}").write_text("{}")  # a lock file nobody holds
    busy = "fedcba9876543210"
    store.scratch("ingest", busy)
    (base / f".work-{busy}").mkdir()
    lock = store.lock("ingest", busy)
    lock.acquire()  # a run in progress: never listed
    try:
        listed = runner.invoke(app, ["gc", "-c", str(cfg)], terminal_width=250)
        assert listed.exit_code == 0, listed.output
        text = " ".join(listed.output.split())
        assert "4 entries" in text and "--yes" in text
        for why in ("unfinished output of a stopped run", "checkpoints of a finished output",
                    "lock file a stopped run left", "output no given config reaches"):
            assert why in text
        assert busy not in text and str(base / kept_key) + " " not in text
        assert len(list(base.iterdir())) == 8  # a dry run removes nothing
        removed = runner.invoke(app, ["gc", "-c", str(cfg), "--yes"], terminal_width=250)
        assert removed.exit_code == 0 and "removed 4 entries" in removed.output
        left = sorted(p.name for p in base.iterdir())
        assert left == sorted([kept_key, f".lock-{busy}", f".work-{busy}", *[p.name for p in base.glob(f".tmp-{busy}-*")]])
    finally:
        lock.release()


def test_two_concurrent_runs_compute_each_stage_once(early):
    """Two `slmflow run` of the tiny config on one store at once, each with its own temporary Prefect
    server (one new Prefect home: the first start migrates it) and one MLflow SQLite file. (tiny.yaml
    with conftest's QUICK training: every stage still runs, the check is who computes it. The two runs
    start with the session: conftest's `early`.)"""
    job = early["two_runs"]
    root, cfg = job.root, job.root / "tiny.yaml"
    for code, out, _ in job.wait(timeout=900):
        assert code == 0, out[-3000:]
        assert "database is locked" not in out and "Traceback" not in out
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("slmflow-tiny").experiment_id], max_results=500)
    executed = Counter(r.data.tags["instance"] for r in runs if r.data.tags.get("cached") == "false")
    hits = Counter(r.data.tags["instance"] for r in runs if r.data.tags.get("cached") == "true")
    instances = set(make_plan(load_config(cfg)).stages)
    assert set(executed) == instances and set(executed.values()) == {1}  # each stage computed exactly once
    assert hits == executed  # the other run took every stage from the store
    assert all(r.info.status == "FINISHED" for r in runs)


# where the chaos run is killed: (kind, target) as benchmarks/chaos.py names them
CHAOS_KILLS = (("data", "dedup"), ("pretrain", "pretrain"), ("rl", "rl"), ("report", "eval_rl"))


def chaos_run(out: str, workdir: str, config: str) -> None:
    """The chaos test's runs, in a process of their own from the start of the session (conftest's `early`):
    `slmflow run` killed at each of CHAOS_KILLS (rerunning in between), then run to the end; what the test
    checks goes to `out` as JSON."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from chaos import ChaosRun
    from conftest import write_json

    run = ChaosRun(Path(workdir), config=Path(config))
    kills = [run.kill_during(kind, target, delay_s=0.0) for kind, target in CHAOS_KILLS]
    finished = run.finish()
    write_json(out, {"kills": [dataclasses.asdict(k) for k in kills], "finish": finished, "files": run.files(),
                     "resumed": {n: run.resumed(n) for n in ("pretrain", "rl")}, "leftovers": run.leftovers()})


@pytest.mark.usefixtures("prefect_server")
def test_chaos_kills_at_four_moments_then_matches_a_clean_run(early, quick_run):
    """The chaos benchmark's seeded small version: SIGKILL the run's whole process group in a data
    stage, mid-pretrain, mid-RL and at the report, rerunning in between; the finished store equals
    the session's clean run byte for byte, both training stages resumed, nothing is left behind.
    (tiny.yaml with conftest's QUICK training, as the session's `quick_run`: each training stage
    still checkpoints before it ends, and the kill comes right after its first checkpoint. The runs are
    `chaos_run`, which conftest's `early` starts with the session.)"""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from chaos import ChaosRun

    chaos = early["chaos"].result(timeout=3600)
    reference_root, _ = quick_run
    reference = ChaosRun(reference_root, config=reference_root / "tiny.yaml")  # the session's store, read only
    kills = chaos["kills"]  # benchmarks/chaos.py's Kill records, one per moment of CHAOS_KILLS
    assert [k["missed"] for k in kills] == [False] * 4
    assert [k["hit"] for k in kills][:3] == [["dedup"], ["pretrain"], ["rl"]] and kills[3]["hit"] == ["report"]
    assert all(not k["survivors"] for k in kills)
    assert chaos["finish"] == 0
    got, expected = chaos["files"], reference.files()
    assert [n for n in expected if got[n] != expected[n]] == []  # every file of every stage, weights included
    assert chaos["resumed"]["pretrain"] and chaos["resumed"]["rl"]
    assert chaos["leftovers"] == []
    from mlflow import MlflowClient  # the killed runs' MLflow runs were ended by the rerun

    client = MlflowClient(tracking_uri=f"sqlite:///{early['chaos'].root / 'chaos' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("slmflow-chaos").experiment_id], max_results=1000)
    assert {r.info.status for r in runs} == {"FINISHED", "KILLED"}
