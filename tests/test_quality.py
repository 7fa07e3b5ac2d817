"""The quality stage: each heuristic's number by hand, each rule tripped by the document built
for it (and by nothing else), per-source relaxations, outputs, metrics and determinism."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from tasks.core.stage import StageError, run_stage
from tasks.core.store import Artifact, Store, write_parquet
from tasks.ingest import SCHEMA
from tasks.quality import SCORES, STAGE, QualityConfig, Thresholds, drop_reasons, quality_scores

RULES = list(Thresholds.model_fields)


def words(n: int, seed: int, lo: int = 4, hi: int = 8) -> list[str]:
    """n distinct lowercase words of lo..hi letters (no repeated word, so no repeated n-gram)."""
    rng, out = np.random.default_rng(seed), {}
    while len(out) < n:
        w = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(lo, hi + 1)))
        out.setdefault(w, None)
    return list(out)


def lines_of(ws: list[str], per_line: int = 10) -> str:
    return "\n".join(" ".join(ws[i:i + per_line]) for i in range(0, len(ws), per_line))


def planted() -> dict[str, str]:
    """rule -> a document that fails exactly that rule (with max_words lowered to 150)."""
    base = words(80, 0)
    phrase = words(15, 1)
    single = words(30, 2)
    return {
        "good": lines_of(base),
        "min_words": lines_of(base[:20]),
        "max_words": lines_of(words(160, 3)),
        "min_mean_word_length": lines_of(words(80, 4, 2, 2)),
        "max_mean_word_length": lines_of(words(80, 5, 12, 14)),
        "max_symbol_to_word_ratio": lines_of([("#" + w if i < 10 else w) for i, w in enumerate(base)]),
        "max_ellipsis_line_fraction": "\n".join(l + ("..." if i < 3 else "") for i, l in enumerate(lines_of(base).split("\n"))),
        "max_bullet_line_fraction": "\n".join("• " + l for l in lines_of(base).split("\n")),
        "max_duplicate_line_fraction": lines_of(base[:50]) + "\n" + "\n".join(f"{w}\n{w}" for w in single),
        "max_top_2gram_fraction": lines_of([x for w in base[:30] for x in ("alphaword", "betaword", w)]),
        "max_duplicate_5gram_fraction": " ".join(base[:50] + phrase + phrase),
        "min_alpha_word_fraction": lines_of(base[:62] + [str(1000 + 7 * i) for i in range(18)]),
    }


CFG = QualityConfig(thresholds=Thresholds(max_words=150), per_source={})


def test_scores_by_hand():
    texts = ["a b c d e a b c d e x", "hello world\nhello world\n\n  - item\n...", "# # x...", ""]
    s = quality_scores(texts)
    assert list(s.columns) == list(SCORES)
    row = s.row(0, named=True)
    assert row["word_count"] == 11 and row["mean_word_length"] == 1.0
    assert row["top_2gram_fraction"] == pytest.approx(2 * 2 / 11)  # "a b" (and others) twice, 2 chars each
    assert row["duplicate_5gram_fraction"] == pytest.approx(5 / 11)  # the second "a b c d e"
    row = s.row(1, named=True)  # 4 non-blank lines, 37 characters
    assert row["word_count"] == 7 and row["mean_word_length"] == pytest.approx(28 / 7)
    assert row["ellipsis_line_fraction"] == 0.25 and row["bullet_line_fraction"] == 0.25
    assert row["duplicate_line_fraction"] == pytest.approx(11 / 37)
    assert row["top_2gram_fraction"] == pytest.approx(2 * 10 / 28)
    assert row["alpha_word_fraction"] == pytest.approx(5 / 7)
    assert row["symbol_to_word_ratio"] == pytest.approx(1 / 7)
    row = s.row(2, named=True)
    assert row["symbol_to_word_ratio"] == pytest.approx(2 / 3)  # max(2 #'s, 1 ellipsis) per word
    assert row["ellipsis_line_fraction"] == 1.0 and row["alpha_word_fraction"] == pytest.approx(1 / 3)
    assert s.row(3) == (0, *[0.0] * (len(SCORES) - 1))  # empty: no division by zero


def test_each_rule_trips_on_its_document_only():
    docs = planted()
    names = list(docs)
    assert set(names) == {"good", *RULES}
    scores = quality_scores([docs[n] for n in names])
    reasons = drop_reasons(scores, ["web"] * len(names), CFG).to_list()
    assert dict(zip(names, reasons)) == {n: (None if n == "good" else n) for n in names}
    for rule in RULES:  # switching the rule off keeps its document: no other rule fires on it
        off = QualityConfig(thresholds=CFG.thresholds.model_copy(update={rule: None}), per_source={})
        assert drop_reasons(scores, ["web"] * len(names), off).to_list()[names.index(rule)] is None


def test_rules_check_in_order_and_per_source_overrides():
    doc = planted()["max_symbol_to_word_ratio"]
    scores = quality_scores([doc, doc, "tiny #"])
    cfg = QualityConfig(per_source={"code": {"max_symbol_to_word_ratio": None}})
    assert drop_reasons(scores, ["web", "code", "code"], cfg).to_list() == [
        "max_symbol_to_word_ratio", None, "min_words"]  # min_words is checked first
    with pytest.raises(StageError, match="unknown rule 'max_sybmols'"):
        STAGE.check(QualityConfig(per_source={"code": {"max_sybmols": 1.0}}))


def make_documents(root, texts: list[str], sources: list[str], shard_rows: int) -> Artifact:
    out = root / "dedup" / "k"
    ids = [f"d{i:03d}" for i in range(len(texts))]
    for s in range(0, len(texts), shard_rows):
        sl = slice(s, s + shard_rows)
        write_parquet(pa.table({"id": ids[sl], "text": texts[sl], "source": sources[sl]}, schema=SCHEMA),
                      out / "documents" / f"part-{s // shard_rows:05d}.parquet")
    files = {f"documents/{p.name}": "" for p in sorted((out / "documents").iterdir())}
    return Artifact(stage="dedup", key="k", path=str(out), manifest={"files": files, "rows": {}})


def test_stage_outputs_metrics_and_determinism(tmp_path):
    docs = planted()
    texts = list(docs.values()) + [docs["max_symbol_to_word_ratio"]]
    sources = ["web"] * len(docs) + ["code"]
    art = make_documents(tmp_path, texts, sources, shard_rows=5)
    cfg = CFG.model_copy(update={"per_source": {"code": {"max_symbol_to_word_ratio": None}}})
    out = run_stage(STAGE, cfg, {"documents": art}, Store(tmp_path / "a")).artifact
    kept = pl.concat([pl.read_parquet(f) for f in out.files("documents")])
    assert kept["id"].to_list() == ["d000", f"d{len(texts) - 1:03d}"]  # good + the relaxed code copy
    assert kept.columns == ["id", "text", "source", *SCORES, "quality_kept"]
    assert [f.rsplit("/", 1)[-1] for f in out.files("documents")] == [f"part-{i:05d}.parquet" for i in range(3)]
    scores = pl.read_parquet(out.files("scores")[0])
    assert scores["doc_id"].to_list() == [f"d{i:03d}" for i in range(len(texts))]
    assert scores["quality_drop_reason"].to_list() == [None, *RULES, None]
    assert scores["chars"].to_list() == [len(t) for t in texts]
    m = out.manifest["metrics"]
    assert (m["docs_in"], m["docs_kept"]) == (len(texts), 2)
    assert m["chars_in"] == sum(map(len, texts)) and m["chars_kept"] == len(texts[0]) + len(texts[-1])
    assert all(m[f"dropped.{r}"] == 1 for r in RULES)
    assert m["docs_in.code"] == m["docs_kept.code"] == 1 and m["docs_in.web"] - m["docs_kept.web"] == len(RULES)
    again = run_stage(STAGE, cfg, {"documents": art}, Store(tmp_path / "b")).artifact
    assert again.manifest["files"] == out.manifest["files"]  # same bytes


def test_default_config_keeps_code_and_problems():
    """The default per-source relaxations: typical Python source and short worked problems pass."""
    code = '''import os\n\n\ndef walk(top):\n    """Yield every file below top."""\n    for root, dirs, files in os.walk(top):\n''' \
           '''        # skip hidden directories\n        dirs[:] = [d for d in dirs if not d.startswith(".")]\n''' \
           '''        for name in files:\n            yield os.path.join(root, name)\n\n\ndef count(top):\n''' \
           '''    return sum(1 for _ in walk(top))\n'''
    problem = "What is 7 + 5?\n\nAnswer: 12\n"
    scores = quality_scores([code, problem])
    cfg = QualityConfig()
    assert drop_reasons(scores, ["stdlib", "reasoning_gym"], cfg).to_list() == [None, None]
    assert drop_reasons(scores, ["web", "web"], cfg).to_list() == ["min_words", "min_words"]  # Gopher as is


def test_scores_do_not_depend_on_the_batching():
    """The stage scores a shard about BATCH_CHARS characters at a time to bound its memory: every score
    is per document, so any batching gives the same table."""
    from tasks.quality import batched_scores

    texts = pl.Series(list(planted().values()) * 3 + ["", "x"])
    whole = quality_scores(texts)
    for batch_chars in (1, 50, 700, 10**9):
        assert batched_scores(texts, batch_chars).equals(whole), batch_chars


def test_concat_parquet_is_write_parquet_of_the_concatenation(tmp_path):
    """The scores table is assembled from per-shard files without holding them all: below `rows` rows the
    bytes are those of one write_parquet; above, row groups of `rows` rows with the same rows in order."""
    import pyarrow.parquet as pq

    from tasks.quality import concat_parquet

    parts = [pl.DataFrame({"doc_id": [f"d{i}-{j}" for j in range(n)], "x": np.arange(n, dtype=np.float64)})
             for i, n in enumerate((5, 0, 7))]
    files = []
    for i, part in enumerate(parts):
        files.append(tmp_path / f"p{i}.parquet")
        write_parquet(part.to_arrow(), files[-1])
    write_parquet(pl.concat(parts).to_arrow(), tmp_path / "whole.parquet")
    concat_parquet(files, tmp_path / "out" / "a.parquet")
    assert (tmp_path / "out" / "a.parquet").read_bytes() == (tmp_path / "whole.parquet").read_bytes()
    concat_parquet(files, tmp_path / "out" / "b.parquet", rows=4)
    small = pq.ParquetFile(tmp_path / "out" / "b.parquet")
    assert [small.metadata.row_group(i).num_rows for i in range(small.num_row_groups)] == [4, 4, 4]
    assert pl.read_parquet(tmp_path / "out" / "b.parquet").equals(pl.concat(parts))
