"""Ingest: NFC, invalid UTF-8 replaced and counted, empty documents dropped and counted, stable ids."""

from __future__ import annotations

import re
import unicodedata

import polars as pl

from tasks.core.stage import run_stage
from tasks.core.store import Store
from tasks.ingest import STAGE, IngestConfig


def test_normalization_counts_and_stable_ids(tmp_path):
    lines = [
        '{"text": "cafe\\u0301 au lait"}',      # decomposed e + combining accent -> NFC
        '{"text": "   \\n\\t "}',               # empty after stripping: dropped
        '{"text": "plain text"}',
    ]
    raw = ("\n".join(lines) + "\n").encode() + b'{"text": "bad \xff\xfe bytes"}\n'
    (tmp_path / "c.jsonl").write_bytes(raw)
    cfg = IngestConfig(sources=[{"kind": "jsonl", "path": str(tmp_path / "*.jsonl"), "name": "user"}], shard_rows=2)
    out = run_stage(STAGE, cfg, {}, Store(tmp_path / "store")).artifact
    docs = pl.concat([pl.read_parquet(f) for f in out.files("documents")])
    assert docs.columns == ["id", "text", "source"] and len(docs) == 3 and len(out.files("documents")) == 2
    texts = docs["text"].to_list()
    assert texts[0] == "café au lait" and unicodedata.is_normalized("NFC", texts[0]) and len(texts[0]) == 12
    assert texts[2] == "bad \ufffd\ufffd bytes"
    m = out.manifest["metrics"]
    assert (m["dropped_empty"], m["invalid_utf8"], m["documents"]) == (1, 1, 3)
    assert m["docs.user"] == 3 and set(docs["source"]) == {"user"}
    assert docs["id"].n_unique() == 3
    again = run_stage(STAGE, cfg, {}, Store(tmp_path / "store2")).artifact
    assert again.manifest["files"] == out.manifest["files"]  # same ids, same bytes


def test_compressed_jsonl_and_the_users_own_ids(tmp_path):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import pytest

    from tasks.core.stage import StageError

    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(b'{"doc": "A1", "text": "one"}\n{"doc": 7, "text": "two"}\n'))
    with pa.output_stream(str(tmp_path / "b.jsonl.zst"), compression="zstd") as out:
        out.write(b'{"doc": "B1", "text": "three"}\n')
    pq.write_table(pa.table({"key": ["P1", "P2"], "body": ["four", "five"]}), tmp_path / "c.parquet")
    sources = [{"kind": "jsonl", "path": str(tmp_path / "*.jsonl.*"), "id_column": "doc"},
               {"kind": "parquet", "path": str(tmp_path / "*.parquet"), "text_column": "body", "id_column": "key"}]
    art = run_stage(STAGE, IngestConfig(sources=sources), {}, Store(tmp_path / "s")).artifact
    docs = pl.concat([pl.read_parquet(f) for f in art.files("documents")])
    assert dict(zip(docs["id"], docs["text"])) == {"A1": "one", "7": "two", "B1": "three", "P1": "four", "P2": "five"}

    pq.write_table(pa.table({"key": ["P1"], "body": ["six"]}), tmp_path / "d.parquet")  # P1 again
    with pytest.raises(StageError, match=r"ingest: id 'P1' \(parquet:d.parquet:0\) appears twice: a source's "
                                         r"id_column must hold unique ids"):
        run_stage(STAGE, IngestConfig(sources=sources), {}, Store(tmp_path / "t"))
    missing = [{**sources[1], "id_column": "nope"}]
    with pytest.raises(StageError, match=r"c.parquet has no id column 'nope' \(columns: key, body\)"):
        run_stage(STAGE, IngestConfig(sources=missing), {}, Store(tmp_path / "u"))


def test_ids_do_not_depend_on_where_the_files_are(tmp_path):
    """The same files under a local directory and under an fsspec URL (memory://): the same documents and ids."""
    import fsspec

    files = {"a.jsonl": b'{"text": "one"}\n{"text": "two"}\n', "sub/b.jsonl": b'{"text": "three"}\n'}
    fs = fsspec.filesystem("memory")
    for name, data in files.items():
        (tmp_path / "c" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "c" / name).write_bytes(data)
        with fs.open(f"/ingest-ids/c/{name}", "wb") as f:
            f.write(data)
    tables = []
    spellings = (f"{tmp_path}/c/**/*.jsonl", "memory://ingest-ids/c/**/*.jsonl", f"file://{tmp_path}/c/**/*.jsonl")
    for i, path in enumerate(spellings):
        cfg = IngestConfig(sources=[{"kind": "jsonl", "path": path, "name": "mine"}])
        art = run_stage(STAGE, cfg, {}, Store(tmp_path / f"s{i}")).artifact
        tables.append(pl.concat([pl.read_parquet(f) for f in art.files("documents")]))
    assert tables[0]["text"].to_list() == ["one", "two", "three"]
    assert tables[0].equals(tables[1]) and tables[0].equals(tables[2])


def test_progress_by_bytes_and_a_source_listed_twice(tmp_path, caplog):
    import pytest

    from tasks.core.stage import StageContext, StageError

    (tmp_path / "c.jsonl").write_text("".join(f'{{"text": "document {i}"}}\n' for i in range(5)))
    source = {"kind": "jsonl", "path": str(tmp_path / "*.jsonl")}
    with caplog.at_level("INFO", logger="slmflow"):
        run_stage(STAGE, IngestConfig(sources=[source]), {}, Store(tmp_path / "a"))
    assert re.search(r"ingest: 5 jsonl documents, 0\.0 MB in [\d.]+s \([\d.]+ MB/s\)", caplog.text), caplog.text
    caplog.clear()
    ctx = StageContext("ingest", tmp_path)
    with caplog.at_level("INFO", logger="slmflow"):
        items = list(ctx.progress([1_000_000, 3_000_000], 8_000_000, "docs", every_s=0, size=lambda b: b))
    assert items == [1_000_000, 3_000_000]
    assert re.search(r"ingest: 1\.0/8\.0 MB of docs \(1\), [\d.]+ MB/s, ETA \d+s", caplog.text), caplog.text
    assert "ingest: 4.0/8.0 MB of docs (2)" in caplog.text and "ingest: 2 docs, 4.0 MB in" in caplog.text
    with pytest.raises(StageError, match=r"ingest: document jsonl:c.jsonl:1 appears twice \(a source listed twice\?\)"):
        run_stage(STAGE, IngestConfig(sources=[source, source], shard_rows=2), {}, Store(tmp_path / "b"))


def test_null_texts_are_counted_beside_empty_ones(tmp_path, caplog):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [None if i % 5 == 0 else ("  " if i % 7 == 0 else f"document {i}") for i in range(200)]
    pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), tmp_path / "c.parquet")
    cfg = IngestConfig(sources=[{"kind": "parquet", "path": str(tmp_path / "*.parquet"), "name": "web"}])
    with caplog.at_level("INFO", logger="slmflow"):
        m = run_stage(STAGE, cfg, {}, Store(tmp_path / "store")).artifact.manifest["metrics"]
    nulls, blanks = texts.count(None), texts.count("  ")
    assert (nulls, blanks) == (40, 23)
    assert (m["dropped_null"], m["dropped_null.web"], m["dropped_empty"], m["documents"]) == (40, 40, 23, 137)
    assert m["documents"] + m["dropped_null"] + m["dropped_empty"] == len(texts)  # every row accounted for
    assert "ingest: source web: 137 documents; dropped: 40 null, 23 empty" in caplog.text
