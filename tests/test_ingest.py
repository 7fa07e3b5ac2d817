"""Ingest: NFC, invalid UTF-8 replaced and counted, empty documents dropped and counted, stable ids."""

from __future__ import annotations

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
