"""Ordinary faults become one line naming the file and what to do (tasks.core.faults)."""

from __future__ import annotations

import errno
import gzip
import json
import sqlite3

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.core.faults import explain, on_file
from tasks.ingest.sources import JsonlSource


def test_os_errors_name_the_file_and_the_remedy():
    full = OSError(errno.ENOSPC, "No space left on device", "/store/data/pack/.tmp-ab/part-0.parquet")
    assert explain(full) == ("/store/data/pack/.tmp-ab/part-0.parquet: No space left on device: free space "
                             "(`slmflow gc` lists what the store no longer needs) and rerun: finished stages are kept")
    assert "fix its permissions" in explain(PermissionError(errno.EACCES, "Permission denied", "/store/x"))
    assert "read-only" in explain(OSError(errno.EROFS, "Read-only file system", "/mnt/ro/x"))
    try:  # wrapped by another exception (as Prefect and MLflow do): the cause still speaks
        try:
            raise full
        except OSError as e:
            raise RuntimeError("task failed") from e
    except RuntimeError as outer:
        assert explain(outer).startswith("/store/data/pack/.tmp-ab/part-0.parquet: No space left")
    assert explain(ValueError("a bug")) is None and explain(OSError("no errno")) is None


def test_decoders_errors_get_the_file_they_were_reading(tmp_path):
    bad = tmp_path / "part-0.parquet"
    bad.write_bytes(b"not parquet at all" * 10)
    with pytest.raises(Exception) as caught, on_file(bad):
        pq.read_table(bad)
    line = explain(caught.value)
    assert line.startswith(f"{bad}: not readable as Parquet (") and "slmflow verify" in line

    data = gzip.compress("\n".join(json.dumps({"text": f"document {i} " * 9}) for i in range(3000)).encode())
    (tmp_path / "c.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError) as caught:
        JsonlSource(path=str(tmp_path / "c.jsonl.gz")).check(full=True)
    assert explain(caught.value).startswith(f"{tmp_path / 'c.jsonl.gz'}: corrupt or truncated compressed data")

    with pytest.raises(json.JSONDecodeError) as caught, on_file("manifest.json"):
        json.loads('{"stage": "de')
    assert explain(caught.value).startswith("manifest.json: not valid JSON (")

    db = tmp_path / "mlflow.db"
    db.write_bytes(b"\0garbage" * 512)
    with pytest.raises(sqlite3.DatabaseError) as caught, on_file(db):
        sqlite3.connect(db).execute("SELECT 1 FROM runs")
    assert "is not an SQLite database" in explain(caught.value)

    st = tmp_path / "model.safetensors"
    st.write_bytes(b"\xff" * 64)
    from safetensors.numpy import load_file

    with pytest.raises(Exception) as caught, on_file(st):
        load_file(st)
    assert explain(caught.value).startswith(f"{st}: weights that do not load (")


def test_the_innermost_reader_names_the_file(tmp_path):
    with pytest.raises(pa.ArrowInvalid) as caught, on_file("outer.parquet"), on_file("inner.parquet"):
        raise pa.ArrowInvalid("Parquet magic bytes not found in footer")
    assert explain(caught.value).startswith("inner.parquet: not readable as Parquet")


def test_a_corrupt_stored_input_is_set_aside_and_named(tmp_path):
    from tasks.core.stage import DamagedInput, Stage, StageConfig, run_stage
    from tasks.core.store import Store, read_table, write_parquet

    def produce(cfg, inputs, ctx):
        write_parquet(pa.table({"x": list(range(20_000))}), ctx.out / "rows" / "part-00000.parquet")
        return {"rows": {"rows": 20_000}}

    def consume(cfg, inputs, ctx):
        total = sum(read_table(f)["x"].to_pylist()[-1] for f in inputs["rows"].files("rows"))
        return {"metrics": {"last": total}}

    store = Store(tmp_path / "store")
    producer = Stage("producer", 1, StageConfig, produce)
    made = run_stage(producer, StageConfig(), {}, store).artifact
    shard = tmp_path / "store" / "producer" / made.key / "rows" / "part-00000.parquet"
    data = bytearray(shard.read_bytes())
    at = len(data) // 2  # inside the column chunk (a flip in its dictionary page can decode, silently wrong)
    data[at: at + 64] = bytes(b ^ 0xFF for b in data[at: at + 64])
    shard.write_bytes(bytes(data))  # same size: only the digests can tell

    with pytest.raises(DamagedInput) as caught:
        run_stage(Stage("consumer", 1, StageConfig, consume), StageConfig(), {"rows": made}, store)
    assert caught.value.input_name == "rows"
    assert str(caught.value).startswith(f"consumer: its input rows (producer {made.key}) is damaged: {shard} does not "
                                        f"match its sha256")
    assert store.get("producer", made.key) is None  # set aside: the next run makes it again
    assert run_stage(producer, StageConfig(), {}, store).artifact.manifest["files"] == made.manifest["files"]


def test_a_rust_librarys_os_error_is_read_from_its_message(tmp_path):
    from safetensors import SafetensorError

    with pytest.raises(SafetensorError) as caught, on_file(tmp_path / "model.safetensors"):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert explain(caught.value) == (f"{tmp_path / 'model.safetensors'}: No space left on device: free space "
                                     "(`slmflow gc` lists what the store no longer needs) and rerun: finished "
                                     "stages are kept")


def test_faults_benchmark_fast_cases(early):
    """benchmarks/faults.py on two of its cases, end to end: a run that recovers by itself from a corrupt
    cached file, and a corrupt source that stops the run with one line; both then rerun identically.
    (`python benchmarks/faults.py --workdir DIR --cases ... --set ...` with conftest's QUICK training: the
    cases are about the store and the sources, not learning; started with the session by conftest's `early`.)"""
    [(code, stdout, stderr)] = early["faults"].wait(timeout=900)
    assert code == 0, stderr[-3000:]
    report = json.loads(stdout)
    assert report["summary"] == {"cases": 2, "skipped": [], "ok": 2, "failed": []}, report
    flipped, truncated = report["cases"]["cached_parquet_flipped"], report["cases"]["source_gzip_truncated"]
    assert (flipped["exit"], flipped["lines"], truncated["exit"], truncated["lines"]) == (0, 1, 1, 2)
    assert truncated["file_named"] and truncated["said"][-1].startswith("error: ingest: ")
