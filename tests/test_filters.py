"""The documents-filter building block: a filter states its decision, `write_filtered` writes the kept
rows under each shard's name and every dropped document with its reason."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from flows.config import load_config
from flows.pipeline import make_plan
from tasks.core.filters import Decision, write_filtered
from tasks.core.store import Store, write_parquet
from tasks.quality import Thresholds


def test_write_filtered_keeps_names_adds_columns_and_records_reasons(tmp_path):
    shards = []
    for i, ids in enumerate((["a", "b", "c"], ["d", "e"])):
        path = tmp_path / "in" / f"part-{i:05d}.parquet"
        write_parquet(pa.table({"id": ids, "text": [f"text {x}" for x in ids], "source": ["s"] * len(ids),
                                "score": [0.0] * len(ids)}), path)
        shards.append(str(path))
    decisions = [Decision(np.array([True, False, True]), [None, "too_short", None],
                          {"score": pa.array([1.0, 2.0, 3.0])}),
                 Decision(np.array([False, False]), "all_gone")]
    counts = write_filtered(shards, decisions, tmp_path / "out")
    kept = [pl.read_parquet(tmp_path / "out" / "documents" / f"part-{i:05d}.parquet") for i in range(2)]
    assert kept[0]["id"].to_list() == ["a", "c"] and kept[0]["score"].to_list() == [1.0, 3.0]  # replaced
    assert len(kept[1]) == 0 and kept[1].columns == ["id", "text", "source", "score"]  # empty, same schema
    dropped = pl.concat([pl.read_parquet(tmp_path / "out" / "dropped" / f"part-{i:05d}.parquet") for i in range(2)])
    assert dropped.rows() == [("b", "s", "too_short"), ("d", "s", "all_gone"), ("e", "s", "all_gone")]
    assert counts == {"docs_in": 5, "docs_out": 2, "chars_in": 30, "chars_out": 12, "dropped.too_short": 1,
                      "dropped.all_gone": 2}
    with pytest.raises(ValueError, match="covers 2 of its 3 documents"):
        write_filtered(shards[:1], [Decision(np.array([True, True]), "x")], tmp_path / "bad")


@pytest.mark.parametrize("stage,reasons", [
    ("dedup", {"exact_duplicate", "near_duplicate"}),
    ("decontaminate", {"eval_question"}),
    ("quality", set(Thresholds.model_fields)),
    ("select", {"dropped_source", "quality_filter", "over_budget"}),
])
def test_each_filter_stage_accounts_for_every_document(tiny_run, stage, reasons):
    root, _ = tiny_run
    plan = make_plan(load_config(root / "tiny.yaml"))
    store = Store(root / "data")
    planned = plan.stages[stage]
    art = store.get(planned.stage.name, planned.key)
    source = plan.stages[planned.inputs["documents"]]
    ids_in = pl.concat([pl.read_parquet(f) for f in store.get(source.stage.name, source.key).files("documents")])["id"]
    kept = pl.concat([pl.read_parquet(f) for f in art.files("documents")])["id"]
    dropped = pl.concat([pl.read_parquet(f) for f in art.files("dropped")])
    assert len(dropped) > 0 or stage == "decontaminate"  # tiny's eval questions are in no document
    assert set(dropped["reason"]) <= reasons, set(dropped["reason"])
    assert sorted(kept.to_list() + dropped["doc_id"].to_list()) == sorted(ids_in.to_list())  # each exactly once
    assert art.rows["documents"] == len(kept)
    if stage == "quality":  # the same reason as the scores table's
        scores = pl.read_parquet(art.files("scores")[0]).filter(~pl.col("quality_kept"))
        assert dict(zip(dropped["doc_id"], dropped["reason"])) == dict(zip(scores["doc_id"], scores["quality_drop_reason"]))


def test_filter_shard_is_write_filtered_for_one_shard_and_decisions_may_be_lazy(tmp_path):
    """A mapped shard function calls `filter_shard` and returns its counts; `write_filtered` takes decisions
    from a generator (read from disk one shard at a time) and gives the same files and counts."""
    from tasks.core.filters import filter_shard, total_counts

    shards = []
    for i, ids in enumerate((["a", "b", "c"], ["d"])):
        path = tmp_path / "in" / f"part-{i:05d}.parquet"
        write_parquet(pa.table({"id": ids, "text": [f"t{x}" for x in ids], "source": ["s"] * len(ids)}), path)
        shards.append(str(path))
    masks = [np.array([True, False, True]), np.array([False])]
    asked = []

    def lazy():
        for mask in masks:
            asked.append(len(asked))
            yield Decision(mask, "gone")

    whole = write_filtered(shards, lazy(), tmp_path / "a")
    assert asked == [0, 1]
    counts = Counter()
    for path, mask in zip(shards, masks):
        counts.update(filter_shard(path, Decision(mask, "gone"), tmp_path / "b"))
    assert total_counts(counts) == whole == {"docs_in": 4, "docs_out": 2, "chars_in": 8, "chars_out": 4, "dropped.gone": 2}
    for sub in ("documents", "dropped"):
        for i in range(2):
            name = f"{sub}/part-{i:05d}.parquet"
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_filter_stages_hold_a_window_of_shards_at_a_time(tmp_path):
    """quality maps its shards a window at a time (Prefect's thread pool would start all of them at
    once), and each shard's work writes its own outputs: only counts come back."""
    from tasks.core.stage import _map_threads, run_stage
    from tasks.quality import STAGE, QualityConfig
    from tests.test_quality import make_documents, planted

    texts = list(planted().values())
    art = make_documents(tmp_path, texts, ["web"] * len(texts), shard_rows=2)
    calls = []

    def recording_map(fn, items, **common):
        calls.append(len(items))
        results = _map_threads(fn, items, **common)
        assert all(isinstance(r, dict) and "docs_in" in r for r in results)  # counts, not rows
        return results

    out = run_stage(STAGE, QualityConfig(), {"documents": art}, Store(tmp_path / "s"), map_fn=recording_map).artifact
    window = os.cpu_count() or 1
    assert sum(calls) == len(out.files("documents")) == 6 and max(calls) <= window and len(calls) == -(-6 // window)
