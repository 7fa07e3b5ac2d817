"""The dedup stage on planted corpora: exact dedup vs a polars oracle, near-dup clusters, verification."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from tasks.dedup.minhash import (
    connected_components,
    lsh_candidate_pairs,
    minhash_signatures,
    shingle_jaccard,
    word_shingle_hashes,
)
from tasks.core.stage import StageError, run_stage
from tasks.core.store import Artifact, Store, write_parquet
from tasks.core.tokens import normalize
from tasks.dedup import STAGE, DedupConfig
from tasks.ingest import SCHEMA

RNG_WORDS = [f"w{i}" for i in range(5000)]


def make_documents(tmp_path, texts: list[str], shard_rows: int = 40, sources: list[str] | None = None) -> Artifact:
    """A fake ingest output: documents shards with ids in shuffled order (one source "t" by default)."""
    store = Store(tmp_path / "in")
    out = tmp_path / "in" / "ingest" / "k"
    ids = [f"d{i:05d}" for i in np.random.default_rng(0).permutation(len(texts))]
    for s in range(0, len(texts), shard_rows):
        rows = {"id": ids[s:s + shard_rows], "text": texts[s:s + shard_rows],
                "source": (sources or ["t"] * len(texts))[s:s + shard_rows]}
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
    # 200 copies of 60 texts remove 70% of the one source, by design: lift the wipeout guard
    out = run_stage(STAGE, DedupConfig(near=False, max_source_removal=1.0), {"documents": docs},
                    Store(tmp_path / "out")).artifact
    oracle = (pl.DataFrame({"id": ids, "text": texts})
              .with_columns(norm=pl.col("text").map_elements(lambda t: normalize(t, True), return_dtype=pl.String))
              .sort("id").unique("norm", keep="first", maintain_order=True))
    kept = read(out, "documents")
    assert sorted(kept["id"]) == sorted(oracle["id"])
    assert out.manifest["metrics"]["dropped.exact_duplicate"] == len(texts) - len(oracle)
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
    assert m["dropped.near_duplicate"] == len(texts) - 130 and m["dropped.exact_duplicate"] == 0


def test_verification_drops_false_candidates(tmp_path):
    rng = np.random.default_rng(3)
    words = random_doc(rng, 100)
    half = words[:50] + random_doc(rng, 50)  # true shingle Jaccard ~0.3
    texts = [" ".join(words), " ".join(half)]
    docs, _, _ = make_documents(tmp_path, texts)
    loose = DedupConfig(bands=50, rows=1)  # collides at almost any overlap
    unverified = run_stage(STAGE, loose, {"documents": docs}, Store(tmp_path / "a")).artifact
    verified = run_stage(STAGE, loose.model_copy(update={"verify": True}), {"documents": docs}, Store(tmp_path / "b")).artifact
    assert unverified.manifest["metrics"]["dropped.near_duplicate"] == 1
    assert verified.manifest["metrics"]["dropped.near_duplicate"] == 0
    assert verified.manifest["metrics"]["verified_pairs"] == 0


def test_simplify_matches_copies_that_differ_in_numbers(tmp_path):
    rng = np.random.default_rng(5)
    letters = str.maketrans("0123456789", "abcdefghij")  # RNG_WORDS hold digits, which simplify folds
    texts = []
    for _ in range(10):  # a document whose every fifth word is a number, and a copy with other numbers
        words = [w.translate(letters) for w in random_doc(rng, 100)]
        texts += [" ".join(w if i % 5 else str(rng.integers(1000)) for i, w in enumerate(words)) for _ in range(2)]
    texts += [" ".join(random_doc(rng, 100)).translate(letters) for _ in range(10)]
    docs, _, _ = make_documents(tmp_path, texts)
    plain = run_stage(STAGE, DedupConfig(), {"documents": docs}, Store(tmp_path / "a")).artifact
    simple = run_stage(STAGE, DedupConfig(simplify=True, verify=True), {"documents": docs}, Store(tmp_path / "b")).artifact
    assert plain.manifest["metrics"]["dropped.near_duplicate"] == 0         # every 5-shingle holds a number
    assert simple.manifest["metrics"]["dropped.near_duplicate"] == 10
    assert simple.manifest["metrics"]["audit_precision"] == 1.0     # Jaccard of simplified shingles: 1
    assert plain.key != simple.key


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


def in_memory_reference(texts: list[str], ids: list[str], cfg: DedupConfig) -> dict[str, str]:
    """Kept-or-not by the textbook in-memory steps (one source, no policies): exact groups of the
    normalized text, LSH over their representatives, optional verification, union-find.
    Returns each clustered document's cluster id (the smallest id in it)."""
    norm = [normalize(t, cfg.lowercase) for t in texts]
    rep = {}
    for k in sorted(range(len(texts)), key=lambda k: ids[k]):
        rep.setdefault(norm[k], k)
    rep_of = np.array([rep[norm[k]] for k in range(len(texts))])
    hashes, offsets = word_shingle_hashes(texts, cfg.ngram, cfg.lowercase)
    sig = minhash_signatures(hashes, offsets, cfg.bands * cfg.rows, cfg.seed)
    valid = (np.diff(offsets) > 0) & (rep_of == np.arange(len(texts)))
    pairs = lsh_candidate_pairs(sig, cfg.bands, cfg.rows, valid)
    if cfg.verify:
        pairs = pairs[shingle_jaccard(hashes, offsets, pairs) >= cfg.verify_threshold]
    labels = connected_components(len(texts), pairs)[rep_of]
    members: dict[int, list[str]] = {}
    for k, label in enumerate(labels):
        members.setdefault(int(label), []).append(ids[k])
    return {i: min(group) for group in members.values() if len(group) > 1 for i in group}


@pytest.mark.parametrize("verify", [False, True])
def test_out_of_core_steps_equal_the_in_memory_reference(tmp_path, verify):
    """Band keys on disk by partition, pairs per partition, union-find over edge files: the same
    clusters as the in-memory steps, whatever the number of partitions (a runtime setting)."""
    rng = np.random.default_rng(7)
    texts = [" ".join(random_doc(rng, 120)) for _ in range(150)]
    texts += chained(rng, 12, words=120, step=6)                       # a chain: Jaccard ~0.8 neighbours
    texts += [t.upper() for t in texts[:20]]                           # exact duplicates after normalizing
    texts += [" ".join(random_doc(rng, 60)[:30] + t.split()[30:90]) for t in texts[20:40]]  # Jaccard ~0.5-0.6
    docs, ids, _ = make_documents(tmp_path / "in", texts, shard_rows=37)
    cfg = DedupConfig(verify=verify, bands=20, rows=3)  # a loose S-curve: many false candidates to verify
    reference = in_memory_reference(texts, [ids[k] for k in range(len(texts))], cfg)
    outputs = []
    for partitions in (1, 5):
        run = cfg.model_copy(update={"partitions": partitions})
        out = run_stage(STAGE, run, {"documents": docs}, Store(tmp_path / f"p{partitions}")).artifact
        clusters = read(out, "clusters")
        assert dict(zip(clusters["doc_id"], clusters["cluster_id"])) == reference
        assert set(read(out, "documents")["id"]) == set(ids) - {i for i, c in reference.items() if i != c}
        outputs.append(out)
    assert outputs[0].key == outputs[1].key and outputs[0].manifest["files"] == outputs[1].manifest["files"]
    m = outputs[0].manifest["metrics"]
    assert m["candidate_pairs"] > 0 and m["dropped.exact_duplicate"] == 20
    assert ("verified_pairs" in m) == verify and (not verify or m["verified_pairs"] < m["candidate_pairs"])


def chained(rng, n_docs: int, words: int = 200, step: int = 4) -> list[str]:
    """Documents that each differ from the previous one in `step` words: neighbours are near-duplicates
    (true Jaccard ~0.9), the ends of the chain are not (the templated problems that wipe a source out)."""
    doc, out = random_doc(rng, words), []
    for k in range(n_docs):
        doc = doc.copy()
        doc[k * step:(k + 1) * step] = random_doc(rng, step)
        out.append(" ".join(doc))
    return out


def wipeout_corpus(tmp_path, rng):
    web = [" ".join(random_doc(rng)) for _ in range(40)]
    tasks = chained(rng, 30)
    return make_documents(tmp_path, web + tasks, sources=["web"] * len(web) + ["tasks"] * len(tasks))[0]


def test_a_source_wipeout_stops_the_stage_unless_told(tmp_path, caplog):
    docs = wipeout_corpus(tmp_path, np.random.default_rng(5))
    with pytest.raises(StageError, match=r"dedup: source 'tasks' would lose 9\d% of its documents \(2\d of 30\), "
                                         r"above dedup.max_source_removal 0.5"):
        run_stage(STAGE, DedupConfig(), {"documents": docs}, Store(tmp_path / "a"))
    assert not (tmp_path / "a" / "dedup").exists() or not any((tmp_path / "a" / "dedup").rglob("manifest.json"))

    warned = run_stage(STAGE, DedupConfig(source_removal="warn"), {"documents": docs}, Store(tmp_path / "b")).artifact
    assert warned.manifest["metrics"]["duplicate_rate.tasks"] > 0.9 and "source 'tasks' would lose" in caplog.text
    assert warned.manifest["metrics"]["duplicate_rate.web"] == 0.0

    for policy in ("exact", "exempt", 0.99):  # near-dup off for the source, or a Jaccard the chain never reaches
        kept = run_stage(STAGE, DedupConfig(sources={"tasks": policy}), {"documents": docs},
                         Store(tmp_path / f"c{policy}")).artifact
        assert kept.manifest["metrics"]["duplicate_rate.tasks"] == 0.0, policy
        assert kept.rows["documents"] == 70


def test_threshold_and_precision_audit(tmp_path):
    docs = wipeout_corpus(tmp_path, np.random.default_rng(6))
    cfg = DedupConfig(source_removal="warn", audit_pairs=1000)  # every removed document audited
    out = run_stage(STAGE, cfg, {"documents": docs}, Store(tmp_path / "out")).artifact
    m = out.manifest["metrics"]
    assert m["lsh_threshold"] == pytest.approx((1 / 14) ** (1 / 8))  # 0.719: the S-curve's knee
    # the oracle: each removed document's true shingle Jaccard to the one its cluster kept
    texts = dict(zip(*[pl.concat([pl.read_parquet(f) for f in docs.files("documents")])[c].to_list()
                       for c in ("id", "text")]))
    clusters = read(out, "clusters").filter(~pl.col("kept"))

    def shingles(text):
        w = text.lower().split()
        return {tuple(w[i:i + 5]) for i in range(len(w) - 4)}

    jaccard = [len(shingles(texts[d]) & shingles(texts[c])) / len(shingles(texts[d]) | shingles(texts[c]))
               for d, c in zip(clusters["doc_id"], clusters["cluster_id"])]
    assert m["audit_pairs"] == len(jaccard) > 20
    assert m["audit_jaccard_mean"] == pytest.approx(np.mean(jaccard))
    assert m["audit_precision"] == pytest.approx(np.mean(np.array(jaccard) >= 0.7))
    assert m["audit_precision"] < 0.5  # the chain: most removed documents are far from the one kept
