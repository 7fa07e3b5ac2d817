"""The documents-filter building block: a filter states its decision, `filter_documents` writes the kept
rows under each shard's name and every dropped document with its reason, and counts in one vocabulary."""

from __future__ import annotations

import os

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from flows.config import load_config
from flows.pipeline import make_plan
from tasks.core.filters import Decision, filter_documents
from tasks.core.stage import StageContext
from tasks.core.store import Store, write_parquet
from tasks.quality import Thresholds

VOCABULARY = {"docs_in", "docs_kept", "docs_dropped", "chars_in", "chars_kept", "chars_dropped", "kept_doc_fraction",
              "kept_char_fraction"}
FILTERS = {"dedup": {"exact_duplicate", "near_duplicate"}, "decontaminate": {"eval_question"},
           "quality": set(Thresholds.model_fields), "select": {"over_budget", "dropped_source"}}


def shards(tmp_path, rows: list[list[tuple[str, str, str]]], **columns) -> list[str]:
    """One Parquet shard per list of (id, text, source) rows, with `columns` (name -> one value per shard's row)."""
    paths = []
    for i, part in enumerate(rows):
        path = tmp_path / "in" / f"part-{i:05d}.parquet"
        ids, texts, sources = map(list, zip(*part)) if part else ([], [], [])
        extra = {k: [v] * len(part) for k, v in columns.items()}
        write_parquet(pa.table({"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string()),
                                "source": pa.array(sources, pa.string()), **extra}), path)
        paths.append(str(path))
    return paths


def test_filter_documents_keeps_names_adds_columns_and_records_reasons(tmp_path):
    files = shards(tmp_path, [[(x, f"text {x}", "s") for x in "abc"], [(x, f"text {x}", "s") for x in "de"]], score=0.0)
    decisions = [Decision(np.array([True, False, True]), [None, "too_short", None],
                          {"score": pa.array([1.0, 2.0, 3.0])}),
                 Decision(np.array([False, False]), "all_gone")]
    ctx = StageContext("t", tmp_path / "out")
    m = filter_documents(ctx, files, decisions, ["too_short", "all_gone"]).metrics
    kept = [pl.read_parquet(tmp_path / "out" / "documents" / f"part-{i:05d}.parquet") for i in range(2)]
    assert kept[0]["id"].to_list() == ["a", "c"] and kept[0]["score"].to_list() == [1.0, 3.0]  # replaced
    assert len(kept[1]) == 0 and kept[1].columns == ["id", "text", "source", "score"]  # empty, same schema
    dropped = pl.concat([pl.read_parquet(tmp_path / "out" / "dropped" / f"part-{i:05d}.parquet") for i in range(2)])
    assert dropped.rows() == [("b", "s", "too_short"), ("d", "s", "all_gone"), ("e", "s", "all_gone")]
    assert m == {"docs_in": 5, "docs_kept": 2, "docs_dropped": 3, "chars_in": 30, "chars_kept": 12, "chars_dropped": 18,
                 "kept_doc_fraction": 2 / 5, "kept_char_fraction": 12 / 30, "dropped.too_short": 1, "dropped.all_gone": 2,
                 "docs_in.s": 5, "docs_kept.s": 2}
    with pytest.raises(ValueError, match="covers 2 of its 3 documents"):
        filter_documents(StageContext("t", tmp_path / "bad"), files[:1], [Decision(np.array([True, True]), "x")], ["x"])
    with pytest.raises(ValueError, match="reason 'typo', not one of"):
        filter_documents(StageContext("t", tmp_path / "bad"), files[:1], [Decision(np.zeros(3, bool), "typo")], ["x"])


def short_or_b(path: str, table: pa.Table, limit: int) -> Decision:
    """A per-shard filter: drops texts under `limit` characters, then source b; the ids it dropped go back."""
    chars = np.array([len(t) for t in table["text"].to_pylist()])
    is_b = np.array([s == "b" for s in table["source"].to_pylist()])
    reason = np.where(chars < limit, "too_short", np.where(is_b, "source_b", None))
    keep = reason == None  # noqa: E711  (elementwise)
    return Decision(keep, reason.tolist(), extra=[i for i, k in zip(table["id"].to_pylist(), keep) if not k])


def test_one_vocabulary_whether_decisions_are_mapped_or_lazy(tmp_path):
    """Exact counts on three shards of two sources (one shard empty): a decision mapped over workers and the
    same decisions handed lazily give the same files, metrics and extras, in shard order."""
    rows = [[("a1", "xx", "a"), ("b1", "bbbbbb", "b"), ("a2", "aaaaaaa", "a")], [],
            [("b2", "b", "b"), ("a3", "aaaa", "a"), ("b3", "bbbb", "b"), ("a4", "a", "a")]]
    files = shards(tmp_path, rows)
    reasons = ["too_short", "source_b", "never_given"]
    mapped = filter_documents(StageContext("t", tmp_path / "mapped"), files, short_or_b, reasons, limit=3)
    asked = []

    def lazy():
        for path in files:
            asked.append(path)
            yield short_or_b(path, pl.read_parquet(path).to_arrow(), limit=3)

    handed = filter_documents(StageContext("t", tmp_path / "lazy"), files, lazy(), reasons)
    assert asked == files and handed.metrics == mapped.metrics and handed.extras == mapped.extras
    assert mapped.extras == [["a1", "b1"], [], ["b2", "b3", "a4"]]
    m = mapped.metrics
    assert set(m) == VOCABULARY | {f"dropped.{r}" for r in reasons} | {"docs_in.a", "docs_in.b", "docs_kept.a", "docs_kept.b"}
    assert (m["docs_in"], m["docs_kept"], m["docs_dropped"]) == (7, 2, 5) and m["docs_in"] == m["docs_kept"] + m["docs_dropped"]
    assert (m["chars_in"], m["chars_kept"], m["chars_dropped"]) == (25, 11, 14)
    assert m["chars_in"] == m["chars_kept"] + m["chars_dropped"]
    assert (m["dropped.too_short"], m["dropped.source_b"], m["dropped.never_given"]) == (3, 2, 0)
    assert sum(m[f"dropped.{r}"] for r in reasons) == m["docs_dropped"]
    assert (m["docs_in.a"], m["docs_in.b"], m["docs_kept.a"], m["docs_kept.b"]) == (4, 3, 2, 0)  # b: all gone
    assert m["docs_in.a"] + m["docs_in.b"] == m["docs_in"] and m["docs_kept.a"] == m["docs_kept"]
    assert (m["kept_doc_fraction"], m["kept_char_fraction"]) == (2 / 7, 11 / 25)
    for sub in ("documents", "dropped"):
        for i in range(3):
            name = f"{sub}/part-{i:05d}.parquet"
            assert (tmp_path / "mapped" / name).read_bytes() == (tmp_path / "lazy" / name).read_bytes()


def tiny_outputs(root, stage):
    """(the stage's output, its documents input, the Stage) in the session's tiny run."""
    plan = make_plan(load_config(root / "tiny.yaml"))
    store, planned = Store(root / "data"), plan.stages[stage]
    source = plan.stages[planned.inputs["documents"]]
    return store.get(planned.stage.name, planned.key), store.get(source.stage.name, source.key), planned.stage


@pytest.mark.parametrize("stage", sorted(FILTERS))
def test_each_filter_stage_accounts_for_every_document(quick_run, stage):
    root, _ = quick_run
    art, source, _ = tiny_outputs(root, stage)
    ids_in = pl.concat([pl.read_parquet(f) for f in source.files("documents")])["id"]
    kept = pl.concat([pl.read_parquet(f) for f in art.files("documents")])["id"]
    dropped = pl.concat([pl.read_parquet(f) for f in art.files("dropped")])
    assert len(dropped) > 0 or stage == "decontaminate"  # tiny's eval questions are in no document
    assert set(dropped["reason"]) <= FILTERS[stage], set(dropped["reason"])
    assert sorted(kept.to_list() + dropped["doc_id"].to_list()) == sorted(ids_in.to_list())  # each exactly once
    assert art.rows["documents"] == len(kept)
    if stage == "quality":  # the same reason as the scores table's
        scores = pl.read_parquet(art.files("scores")[0]).filter(~pl.col("quality_kept"))
        assert dict(zip(dropped["doc_id"], dropped["reason"])) == dict(zip(scores["doc_id"], scores["quality_drop_reason"]))


def test_the_four_filter_stages_report_one_vocabulary(quick_run):
    """Every filter stage's manifest holds the same metrics for the same numbers, and they match its files."""
    root, _ = quick_run
    for stage, reasons in FILTERS.items():
        art, source, spec = tiny_outputs(root, stage)
        m = art.manifest["metrics"]
        assert VOCABULARY <= set(m) and {f"dropped.{r}" for r in reasons} <= set(m), stage
        assert not {"docs_out", "chars_out", "removed", "exact_duplicates", "docs_dropped_by_source"} & set(m), stage
        assert set(spec.report_metrics) <= set(m), stage  # the report card shows them
        docs = pl.concat([pl.read_parquet(f, columns=["source", "text"]) for f in source.files("documents")])
        kept = pl.concat([pl.read_parquet(f, columns=["source", "text"]) for f in art.files("documents")])
        dropped = pl.concat([pl.read_parquet(f) for f in art.files("dropped")])
        assert (m["docs_in"], m["docs_kept"], m["docs_dropped"]) == (len(docs), len(kept), len(dropped)), stage
        assert (m["chars_in"], m["chars_kept"]) == (docs["text"].str.len_chars().sum(), kept["text"].str.len_chars().sum())
        assert m["chars_dropped"] == m["chars_in"] - m["chars_kept"]
        assert {r: m[f"dropped.{r}"] for r in reasons} == {r: dropped["reason"].eq(r).sum() for r in reasons}, stage
        per_source = {f"docs_in.{s}": n for s, n in docs["source"].value_counts().rows()}
        per_source |= {f"docs_kept.{s}": kept["source"].eq(s).sum() for s in docs["source"].unique()}
        assert {k: v for k, v in m.items() if k.startswith(("docs_in.", "docs_kept."))} == per_source, stage


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
        assert all(set(counts) >= {"docs_in", "docs_kept"} and extra is None for counts, extra in results)  # counts, not rows
        return results

    out = run_stage(STAGE, QualityConfig(), {"documents": art}, Store(tmp_path / "s"), map_fn=recording_map).artifact
    window = os.cpu_count() or 1
    assert sum(calls) == len(out.files("documents")) == 6 and max(calls) <= window and len(calls) == -(-6 // window)
