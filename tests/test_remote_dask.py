"""Data stages on a Dask cluster whose workers share no disk with the flow (tasks.core.shared_scratch).

The mechanism alone, in this process: a fake cluster whose worker cannot see the flow's directories.
Then the real thing: both store roots on `s3://` (moto's S3 server) and an external Dask cluster
(`run.dask_address`) of two worker processes, each with a temp dir of its own (not the flow's) and a
working directory outside the repository. Ingest, dedup (with verification, so all four of its steps map),
decontaminate and quality (whose workers write shards into the output dir), a tokenizer, select and pack
(whose workers write hash buckets into the work dir) give the bytes of a local default-runner run; every
dedup step runs on Dask, the scratch the steps share goes through the store (the workers' caches are in
their own temp dirs; the band-key partitions never reach the flow's disk), and neither the store's scratch
prefix nor a worker's cache is left afterwards."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

import fsspec
import pytest
import yaml
from conftest import tiny_config
from test_object_store import s3_server

from flows.config import load_config
from flows.pipeline import make_plan
from tasks.core.store import Store

DEDUP_STEPS = ("shard_signatures", "group_partition", "shard_shingles", "reduce_edges")
ONLY = ["pack_ref_0"]  # dedup, and stages whose steps write into the output or work dir (decontaminate, quality, pack)
COMPARED = ("ingest", "dedup", "decontaminate", "quality", "tokenizer_ref", "data_ref_0", "pack_ref_0")


def verified_config(root: Path, **run) -> Path:
    """tiny_config with dedup's true-Jaccard verification on (its shingle step maps too)."""
    path = tiny_config(root, **run)
    raw = yaml.safe_load(path.read_text())
    raw["dedup"]["verify"] = True
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def output_files(config: Path, only: tuple[str, ...]) -> dict[str, tuple[str, dict]]:
    """(key, manifest files) of the planned stages `only` in the config's data store."""
    cfg = load_config(config)
    plan = make_plan(cfg)
    found = {}
    for name in only:
        art = Store(cfg.run.data_root).get(plan.stages[name].stage.name, plan.stages[name].key)
        assert art is not None, f"{config}: {name} missing"
        found[name] = (art.key, art.manifest["files"])
    return found


@contextlib.contextmanager
def dask_workers(tmp_path: Path, env: dict[str, str]) -> Iterator[tuple[str, list[Path]]]:
    """A Dask scheduler and two worker processes on 127.0.0.1, each with its own TMPDIR: (address, temp dirs)."""
    from distributed import Nanny, Scheduler, SpecCluster

    temps = [tmp_path / f"worker-{i}-tmp" for i in range(2)]
    for t in temps:
        t.mkdir()
    workers = {f"w{i}": {"cls": Nanny, "options": {"nthreads": 1, "env": {**env, "TMPDIR": str(t)},
                                                   "local_directory": str(t)}}
               for i, t in enumerate(temps)}
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": None}}
    environ = dict(os.environ)  # the nanny sets its workers' OMP_NUM_THREADS, ... in ours: put ours back
    try:
        with SpecCluster(workers=workers, scheduler=scheduler) as cluster:
            os.environ.clear()
            os.environ.update(environ)
            yield cluster.scheduler_address, temps
    finally:
        os.environ.clear()
        os.environ.update(environ)


class AwayCluster:
    """A map "on Dask" in this process whose worker sees none of the driver's shared directories (they are
    renamed away while the calls run) and has a temp dir of its own."""

    on_dask, width = True, 2

    def __init__(self, driver_dirs: list[Path], worker_tmp: Path):
        self.driver_dirs, self.worker_tmp = driver_dirs, worker_tmp

    @contextlib.contextmanager
    def elsewhere(self) -> Iterator[None]:
        away = [(d, d.with_name(d.name + "-away")) for d in self.driver_dirs]
        before = tempfile.tempdir
        for d, a in away:
            d.rename(a)
        tempfile.tempdir = str(self.worker_tmp)
        try:
            yield
        finally:
            tempfile.tempdir = before
            for d, a in away:
                a.rename(d)

    def __call__(self, fn, items, **common):
        with self.elsewhere():
            return [fn(item, **common) for item in items]

    def run_on_workers(self, fn, *args):
        with self.elsewhere():
            fn(*args)


def read_model(path: str, model: str) -> str:  # reads a file the driver wrote (default: what its paths name)
    return f"{path}:{Path(model).read_text()}"


def write_part(item: int, work: str) -> int:
    Path(work, "parts", f"{item}.txt").parent.mkdir(parents=True, exist_ok=True)
    Path(work, "parts", f"{item}.txt").write_text(str(item) * (item + 1))
    Path(work, "junk", f"{item}.bin").parent.mkdir(parents=True, exist_ok=True)
    Path(work, "junk", f"{item}.bin").write_bytes(b"x")
    return item


def sum_part(item: int, work: str) -> int:  # declared: its own part only
    return int(Path(work, "parts", f"{item}.txt").read_text()) + len(list(Path(work, "parts").iterdir()))


def rewrite(item: int, work: str) -> None:
    Path(work, "parts", f"{item}.txt").write_text("rewritten, longer")


def test_shared_scratch_goes_through_the_store(tmp_path):
    from tasks.core.shared_scratch import close_shared_scratch, scratch_files, share_scratch

    work, out, worker_tmp = tmp_path / "work", tmp_path / "out", tmp_path / "worker-tmp"
    for d in (work, out, worker_tmp):
        d.mkdir()
    store = Store("memory://shared-test/data")
    cluster = AwayCluster([work, out], worker_tmp)
    assert share_scratch(cluster, Store(tmp_path / "store"), "demo", "k" * 16, [work, out]) is cluster  # local store
    shared = share_scratch(cluster, store, "demo", "k" * 16, [work, out])
    assert shared.width == 2
    (out / "model.bin").write_text("weights")
    assert shared(read_model, ["a", "b"], model=str(out / "model.bin")) == [f"{p}:weights" for p in "ab"]
    sums = scratch_files(reads=lambda item, work, **_: [f"{work}/parts/{item}.txt"])(sum_part)
    written = scratch_files(driver_reads=lambda work, **_: [f"{work}/parts/*"])(write_part)
    assert shared(written, [1, 2, 3], work=str(work)) == [1, 2, 3]
    assert sorted(p.name for p in (work / "parts").iterdir()) == ["1.txt", "2.txt", "3.txt"]  # what the driver reads
    assert (work / "junk").is_dir() and not any((work / "junk").iterdir())  # the rest: its directories only
    assert shared(sums, [1, 3], work=str(work)) == [11 + 1, 3333 + 1]  # each call saw its own part, no other
    assert shared.counts["up"] == 1 and shared.counts["written"] == 6 and shared.counts["worker_downloads"] == 3
    with pytest.raises(RuntimeError, match="write-once"):
        shared(scratch_files(reads=lambda item, work, **_: [f"{work}/parts/{item}.txt"])(rewrite), [2], work=str(work))
    close_shared_scratch(shared)
    assert not store.fs.exists("/shared-test/data/demo/.scratch-" + "k" * 16)
    assert not any((worker_tmp / "slmflow-scratch").iterdir())  # the worker's cache went with it


@pytest.mark.usefixtures("prefect_server")
def test_data_stages_on_dask_workers_without_the_flows_disk(tmp_path, caplog, monkeypatch):
    import s3fs

    from flows.pipeline import pipeline

    local = verified_config(tmp_path / "local")
    pipeline(str(local), only=ONLY)
    expected = output_files(local, COMPARED)

    driver_tmp = tmp_path / "driver-tmp"  # the flow's scratch and work dirs: no worker sees them
    driver_tmp.mkdir()
    work_files_at_commit: list[str] = []
    commit = Store.commit

    def noting_commit(self, scratch, stage, key, manifest):
        if stage == "dedup":
            work = driver_tmp / "slmflow-work" / "dedup"
            work_files_at_commit.extend(str(p) for p in work.rglob("*") if p.is_file())
        return commit(self, scratch, stage, key, manifest)

    monkeypatch.setattr(Store, "commit", noting_commit)
    monkeypatch.chdir(tmp_path)  # the workers' working directory too: not the repository
    s3fs.S3FileSystem.clear_instance_cache()  # one endpoint per server
    with s3_server() as env, dask_workers(tmp_path, {**env, "PREFECT_API_URL": os.environ["PREFECT_API_URL"]}) as (
            address, worker_tmps):
        config = verified_config(tmp_path / "s3", data_root="s3://slmflow/data", models_root="s3://slmflow/models",
                                 runner="dask", dask_address=address)
        monkeypatch.setattr(tempfile, "tempdir", str(driver_tmp))
        with caplog.at_level("INFO", logger="slmflow"):
            result = pipeline(str(config), only=ONLY)
        monkeypatch.setattr(tempfile, "tempdir", None)
        assert not isinstance(result, BaseException) and isinstance(result, dict), result
        on_s3 = output_files(config, COMPARED)
        left = [p for p in fsspec.filesystem("s3").find("slmflow/data", withdirs=True) if "/.scratch-" in p]
    s3fs.S3FileSystem.clear_instance_cache()

    assert on_s3 == expected  # same keys, same sha256 per file
    assert left == []  # the scratch prefix went with the commit
    lines = [r.getMessage() for r in caplog.records]
    for step in DEDUP_STEPS:
        assert any(m.startswith("dedup: ") and f" x {step} on Dask {address}" in m for m in lines), step
    [shared] = [m for m in lines if m.startswith("dedup: scratch shared through s3://slmflow/data/dedup/.scratch-")]
    up, written, downloaded, down = map(int, re.search(
        r": (\d+) files \(.*\) up from here, (\d+) written by workers, (\d+) downloaded by workers, (\d+) files", shared
    ).groups())
    assert up >= 3 and written > down > 0 and downloaded > 0, shared  # mask, candidates, need up; bands stay remote
    for stage in ("decontaminate", "quality", "pack"):  # their shards and buckets came back through the store
        assert any(m.startswith(f"{stage}: scratch shared through s3://slmflow/data/{stage}/.scratch-") for m in lines)
    # the flow read docs, edges and verified pairs; band-key partitions and shingles stayed with the workers
    assert any("/dedup/docs/" in p for p in work_files_at_commit)
    assert any("/dedup/verified/" in p for p in work_files_at_commit)
    assert not any(("/dedup/bands/" in p or "/dedup/shingles/" in p) for p in work_files_at_commit)
    # the workers' caches were in their own temp dirs, and were dropped at the end
    caches = [t / "slmflow-scratch" for t in worker_tmps]
    assert any(c.is_dir() for c in caches) and not any(c.is_dir() and any(c.iterdir()) for c in caches)
    assert not (driver_tmp / "slmflow-scratch").exists()
