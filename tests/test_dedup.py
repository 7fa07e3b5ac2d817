"""The dedup stage on planted corpora: exact dedup vs a polars oracle, near-dup clusters, verification."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from tasks.core.stage import run_stage
from tasks.core.store import Artifact, Store, write_parquet
from tasks.core.tokens import normalize
from tasks.dedup import STAGE, DedupConfig
from tasks.ingest import SCHEMA

RNG_WORDS = [f"w{i}" for i in range(5000)]


def make_documents(tmp_path, texts: list[str], shard_rows: int = 40) -> Artifact:
    """A fake ingest output: documents shards with ids in shuffled order."""
    store = Store(tmp_path / "in")
    out = tmp_path / "in" / "ingest" / "k"
    ids = [f"d{i:05d}" for i in np.random.default_rng(0).permutation(len(texts))]
    for s in range(0, len(texts), shard_rows):
        rows = {"id": ids[s:s + shard_rows], "text": texts[s:s + shard_rows], "source": ["t"] * len(texts[s:s + shard_rows])}
        write_parquet(pa.table(rows, schema=SCHEMA), out / "documents" / f"part-{s // shard_rows:05d}.parquet")
    files = {f"documents/{p.name}": "" for p in sorted((out / "documents").iterdir())}
    return Artifact(stage="ingest", key="k", path=str(out), manifest={"files": files, "rows": {}}), ids, store


def random_doc(rng, n=80) -> list[str]:
    return list(rng.choice(RNG_WORDS, n))


def read(art: Artifact, table: str) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(f) for f in art.files(table)])


def test_exact_dedup_equals_polars_unique_oracle(tmp_path):
    rng = np.random.default_rng(1)
    base = [" ".join(random_doc(rng)) for _ in range(60)]
    texts = []
    for _ in range(200):  # copies differing only in case and whitespace
        t = base[rng.integers(len(base))]
        texts.append(t.upper() if rng.random() < 0.3 else t.replace(" ", "  \n ", 2))
    docs, ids, _ = make_documents(tmp_path, texts)
    out = run_stage(STAGE, DedupConfig(near=False), {"documents": docs}, Store(tmp_path / "out")).artifact
    oracle = (pl.DataFrame({"id": ids, "text": texts})
              .with_columns(norm=pl.col("text").map_elements(lambda t: normalize(t, True), return_dtype=pl.String))
              .sort("id").unique("norm", keep="first", maintain_order=True))
    kept = read(out, "documents")
    assert sorted(kept["id"]) == sorted(oracle["id"])
    assert out.manifest["metrics"]["exact_duplicates"] == len(texts) - len(oracle)
    clusters = read(out, "clusters")
    assert set(clusters["kind"]) == {"exact"}
    assert clusters.filter(pl.col("kept"))["doc_id"].to_list() == sorted(clusters.filter(pl.col("kept"))["doc_id"])


def test_near_duplicate_clusters_and_representatives(tmp_path):
    rng = np.random.default_rng(2)
    texts, truth = [], []
    for c in range(30):  # 30 planted clusters of 2-4 light edits of one document
        words = random_doc(rng, 200)
        for _ in range(rng.integers(2, 5)):
            w = list(words)
            # one substitution: Jaccard ~0.95 to the original, ~0.9 between copies, where
            # the 14x8 S-curve gives collision probability > 0.999
            w[rng.integers(len(w))] = "edit" + str(rng.integers(1_000_000))
            texts.append(" ".join(w))
            truth.append(c)
    for _ in range(100):  # unrelated singletons
        texts.append(" ".join(random_doc(rng, 200)))
        truth.append(-1 - len(truth))
    docs, ids, _ = make_documents(tmp_path, texts)
    out = run_stage(STAGE, DedupConfig(), {"documents": docs}, Store(tmp_path / "out")).artifact
    clusters = read(out, "clusters")
    found = {frozenset(g["doc_id"]) for g in clusters.partition_by("cluster_id")}
    planted = {}
    for doc_id, c in zip(ids, truth):
        if c >= 0:
            planted.setdefault(c, set()).add(doc_id)
    assert found == {frozenset(s) for s in planted.values()}
    for group in clusters.partition_by("cluster_id"):
        assert group.filter(pl.col("kept"))["doc_id"].to_list() == [min(group["doc_id"])]
        assert set(group["kind"]) == {"near"}
    kept = read(out, "documents")
    assert len(kept) == 100 + 30 and "dup_cluster" in kept.columns
    assert kept["dup_cluster"].drop_nulls().n_unique() == 30
    m = out.manifest["metrics"]
    assert m["near_duplicates"] == len(texts) - 130 and m["exact_duplicates"] == 0


def test_verification_drops_false_candidates(tmp_path):
    rng = np.random.default_rng(3)
    words = random_doc(rng, 100)
    half = words[:50] + random_doc(rng, 50)  # true shingle Jaccard ~0.3
    texts = [" ".join(words), " ".join(half)]
    docs, _, _ = make_documents(tmp_path, texts)
    loose = DedupConfig(bands=50, rows=1)  # collides at almost any overlap
    unverified = run_stage(STAGE, loose, {"documents": docs}, Store(tmp_path / "a")).artifact
    verified = run_stage(STAGE, loose.model_copy(update={"verify": True}), {"documents": docs}, Store(tmp_path / "b")).artifact
    assert unverified.manifest["metrics"]["near_duplicates"] == 1
    assert verified.manifest["metrics"]["near_duplicates"] == 0
    assert verified.manifest["metrics"]["verified_pairs"] == 0


@pytest.mark.parametrize("shard_rows", [7, 1000])
def test_output_independent_of_sharding_and_repeatable(tmp_path, shard_rows):
    rng = np.random.default_rng(4)
    base = [" ".join(random_doc(rng, 60)) for _ in range(20)]
    texts = base + [t + " tail" for t in base[:10]] + base[:5]
    docs, _, _ = make_documents(tmp_path / "x", texts, shard_rows)
    a = run_stage(STAGE, DedupConfig(), {"documents": docs}, Store(tmp_path / "a")).artifact
    b = run_stage(STAGE, DedupConfig(), {"documents": docs}, Store(tmp_path / "b")).artifact
    assert a.manifest["files"] == b.manifest["files"]  # same bytes
    assert sorted(read(a, "documents")["id"]) == sorted(set(docs_ids := read(a, "documents")["id"]))
    assert len(docs_ids) == 20
