"""Dedup: exact duplicates (normalized text), then MinHash-LSH near-duplicates (Broder's MinHash with LSH banding,
as datatrove and text-dedup run it).

Out of core, in steps that each hold one shard or one partition (tasks.dedup.disk has the
layout): per shard, a digest of each document's normalized text and the LSH band keys of its MinHash
signature of word n-gram shingles (of datatrove's simplified text with `simplify`), written to disk
by key partition; exact groups (a duckdb query over the digests); per key partition, the candidate
pairs of the exact-group representatives that share a bucket (`bands` x `rows`); per edge partition, distinct pairs and optional true-Jaccard
verification; union-find over the edge files (one integer per document); clusters assigned by a
duckdb query; then the filter pass, shard by shard. Every per-shard and per-partition step is a
map, so on a Dask cluster (`run.runner: dask`) adding workers speeds up all of them. Each cluster
keeps one document: the smallest id (a rule that does not depend on shard order or partitioning). Outputs: kept `documents` (+ `dup_cluster`), `dropped` (reason
`exact_duplicate` or `near_duplicate`) and `clusters` (`doc_id`, `cluster_id`, `kind` exact/near,
`kept`) for every member of a cluster of size > 1. Metrics: a filter's (tasks.core.filters:
`dropped.exact_duplicate`, `dropped.near_duplicate`, ...), `duplicate_rate`, the clusters and the
guard rails' numbers below.

Guard rails (the "source wipeout" that fuzzy dedup inflicts on templated text: worked problems that
share a question template chain into clusters of dozens of documents): the stage reports the LSH
threshold (the S-curve's knee (1/bands)^(1/rows), about 0.72 for 14 x 8) and the duplicate rate of
every source, and stops with one line when a source would lose more than `max_source_removal` of
its documents (`source_removal: warn` logs it instead). A per-source policy in `sources` takes a
source out of dedup (`exempt`), out of near-dup only (`exact`), or sets the true shingle Jaccard its
near-dup pairs must reach (a number). Every run audits a seeded sample of removed near-duplicates:
the true Jaccard of each against the document its cluster kept (`audit_jaccard_mean`, and
`audit_precision`, the share at or above `verify_threshold`); a low precision means clusters chain
through documents that are each similar to the next but not to the one kept.
"""

from __future__ import annotations

import glob
import hashlib
import shutil
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from pydantic import Field

from tasks.core.base import log
from tasks.dedup.disk import (
    candidate_mask,
    components,
    connect,
    group_partition,
    partition_count,
    reduce_edges,
    write_band_keys,
    write_shingle_sets,
)
from tasks.core.filters import Decision, filter_documents
from tasks.dedup.minhash import band_keys, collision_probability, minhash_signatures, shingle_jaccard, word_shingle_hashes
from tasks.core.outputs import document_shards
from tasks.core.settings import runtime
from tasks.core.shared_scratch import scratch_files
from tasks.core.stage import Stage, StageConfig, StageContext, StageError, new_figure
from tasks.core.store import parquet_rows, read_table, write_parquet
from tasks.core.tokens import normalize

VERSION = 2  # 2: a dropped table (tasks.core.filters); kept shards keep their input names


class DedupConfig(StageConfig):
    exact: bool = Field(True, description="drop exact duplicates of the normalized text first")
    near: bool = Field(True, description="MinHash-LSH near-duplicate removal")
    lowercase: bool = Field(True, description="lowercase when normalizing and shingling")
    ngram: int = Field(5, ge=1, description="word n-gram shingle length")
    simplify: bool = Field(False, description="near-dup shingles of datatrove's simplified text (every number "
                           "0, diacritics stripped): more recall on copies edited in numbers or accents, but "
                           "templated problems that differ only in their numbers become duplicates")
    bands: int = Field(14, ge=1, description="LSH bands (b)")
    rows: int = Field(8, ge=1, description="rows per band (r); num_perm = bands * rows")
    seed: int = Field(1, description="seed of the MinHash permutations")
    verify: bool = Field(False, description="keep only candidate pairs whose true shingle Jaccard >= verify_threshold")
    verify_threshold: float = Field(0.7, gt=0, le=1)
    max_source_removal: float = Field(0.5, gt=0, le=1, description="the largest share of one source's documents "
                                      "dedup may remove before it stops (or warns: source_removal)")
    source_removal: Literal["error", "warn"] = "error"
    sources: dict[str, Literal["exempt", "exact"] | Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=dict, description="per-source policy: exempt (never removed, never removes), exact "
        "(exact dedup only), or the true shingle Jaccard its near-dup pairs must reach")
    audit_pairs: int = Field(100, ge=0, description="removed near-duplicates whose true Jaccard to their cluster's "
                             "kept document is measured (seeded sample)")
    partitions: int = runtime(0, "band-key partitions (each one task); 0: at most 1M band rows each, "
                                  "and one per worker at least", ge=0)
    memory_limit: str = runtime("1GB", "duckdb's memory for the exact step and cluster assignment; it spills past it")

    def policy(self, source: str):
        return self.sources.get(source, "fuzzy")

    def shingles(self, texts) -> tuple[np.ndarray, np.ndarray]:
        """Shingle hashes and offsets of `texts` under these settings (signatures, verification and audit alike)."""
        return word_shingle_hashes(texts, self.ngram, self.lowercase, self.simplify)

    def needs_shingles(self) -> bool:
        return self.verify or any(isinstance(v, float) for v in self.sources.values())


def text_batches(texts: pa.Array, max_bytes: int = 8 << 20) -> list[tuple[int, int]]:
    """[start, stop) row ranges of about `max_bytes` of text each: a shard's working memory (about
    14x its text) is bounded by a batch, whatever the shard size a user's corpus comes in."""
    ends = np.cumsum(pc.fill_null(pc.binary_length(texts), 0).to_numpy(zero_copy_only=False))
    if not len(ends):
        return []
    cuts = np.unique(np.r_[0, np.searchsorted(ends, np.arange(max_bytes, ends[-1], max_bytes), "right"), len(ends)])
    return list(zip(cuts[:-1].tolist(), cuts[1:].tolist()))


@scratch_files(reads=lambda **_: [], driver_reads=lambda work, **_: [f"{work}/docs/*"])  # its bands stay on workers
def shard_signatures(item: tuple[str, int], cfg: DedupConfig, work: str, partitions: int) -> int:
    """One shard (mapped over workers): each document's global row `idx`, id, source and exact digest
    to docs/, and the LSH band keys of those with shingles to bands/ by key partition."""
    path, base = item
    table = read_table(path, columns=["id", "source", "text"])
    texts = table["text"].combine_chunks()
    idx = np.arange(base, base + len(texts), dtype=np.int64)
    digests, has_shingles, keys, shingles = [], np.zeros(len(texts), bool), [], 0
    for start, stop in text_batches(texts):
        batch = texts.slice(start, stop - start)
        digests += [hashlib.blake2b(normalize(t, cfg.lowercase).encode(), digest_size=16).hexdigest()
                    for t in batch.to_pylist()]
        if cfg.near:
            hashes, offsets = cfg.shingles(batch)
            has = np.diff(offsets) > 0
            has_shingles[start:stop] = has
            signatures = minhash_signatures(hashes, offsets, cfg.bands * cfg.rows, cfg.seed)[has]
            keys.append(band_keys(signatures, cfg.bands, cfg.rows))
            shingles += len(hashes)
    name = f"shard-{base:012d}"
    if cfg.near:
        keys = np.concatenate(keys) if keys else np.zeros((0, cfg.bands), np.uint64)
        write_band_keys(Path(work), name, keys, idx[has_shingles], partitions)
        log.info("dedup: %s: %d documents, %d shingles", Path(path).name, len(texts), shingles)
    write_parquet(pa.table({"idx": idx, "id": table["id"], "source": table["source"],
                                  "digest": pa.array(digests, pa.string()), "has_shingles": has_shingles}),
                        Path(work) / "docs" / f"{name}.parquet")
    return len(texts)


@scratch_files(reads=lambda work, **_: [f"{work}/candidates.npy"], driver_reads=lambda **_: [])
def shard_shingles(item: tuple[str, int], cfg: DedupConfig, work: str) -> int:
    """One shard: the unique shingle hashes of its documents that are an end of a candidate pair."""
    path, base = item
    wanted = np.load(Path(work) / "candidates.npy", mmap_mode="r")
    table = read_table(path, columns=["text"])
    rows = np.flatnonzero(wanted[base:base + len(table)])
    texts = table["text"].take(pa.array(rows, pa.int64())).combine_chunks()
    for k, (start, stop) in enumerate(text_batches(texts)):  # a file per 8 MB of text, in idx order
        hashes, offsets = cfg.shingles(texts.slice(start, stop - start))
        write_shingle_sets(Path(work), f"shard-{base:012d}-{k:05d}", rows[start:stop] + base, hashes, offsets)
    return len(rows)


def exact_step(con, cfg: DedupConfig) -> dict[str, np.ndarray]:
    """Per document (in idx order): its exact-group representative (the smallest id among the
    documents with its digest; itself when exempt or without exact dedup), whether it is in LSH
    and the true Jaccard its near-dup pairs must reach."""
    sources = [s for (s,) in con.execute("SELECT DISTINCT source FROM docs").fetchall()]
    policy = {s: cfg.policy(s) for s in sources}
    floor = cfg.verify_threshold if cfg.verify else 0.0
    con.register("policy", pa.table({
        "source": pa.array(sources, pa.string()),
        "exempt": [policy[s] == "exempt" for s in sources],
        "fuzzy": [policy[s] not in ("exempt", "exact") for s in sources],
        "need": [max(floor, policy[s]) if isinstance(policy[s], float) else floor for s in sources]}))
    exact = "TRUE" if cfg.exact else "FALSE"
    rows = con.execute(f"""
        WITH d AS (SELECT idx, id, digest, has_shingles, exempt, fuzzy, need FROM docs JOIN policy USING (source)),
             groups AS (SELECT digest, arg_min(idx, id) AS rep FROM d WHERE NOT exempt GROUP BY digest)
        SELECT CASE WHEN d.exempt OR NOT {exact} THEN d.idx ELSE groups.rep END AS rep_idx,
               d.has_shingles AND d.fuzzy AS lsh, d.need
        FROM d LEFT JOIN groups USING (digest) ORDER BY d.idx""").fetchnumpy()
    rep_idx = np.asarray(rows["rep_idx"], np.int64)
    lsh = np.asarray(rows["lsh"], bool) & (rep_idx == np.arange(len(rep_idx)))  # exact copies take no part
    return {"rep_idx": rep_idx, "lsh": lsh, "need": np.asarray(rows["need"], np.float64)}


def near_step(items: list[tuple[str, int]], n: int, need: np.ndarray, cfg: DedupConfig, ctx: StageContext,
              work: Path, partitions: int) -> tuple[np.ndarray, dict]:
    """Candidate pairs per key partition, distinct (and verified) per edge partition, then the
    connected components: a label per document."""
    parts = sorted(glob.glob(str(work / "bands" / "*")))
    counts = ctx.map(group_partition, parts, work=str(work), edge_parts=partitions, max_bucket=64)
    stats: dict = {}
    if cfg.needs_shingles() and sum(counts):
        np.save(work / "candidates.npy", candidate_mask(work, n))
        ctx.map(shard_shingles, items, cfg=cfg, work=str(work))
        np.save(work / "need.npy", need)
    edges = sorted(glob.glob(str(work / "edges" / "*")))
    reduced = ctx.map(reduce_edges, edges, work=str(work), n=n)
    stats["candidate_pairs"] = sum(r["candidate_pairs"] for r in reduced)
    if any(r["checked"] for r in reduced):
        stats["verified_pairs"] = sum(r["pairs"] for r in reduced)
    return components(work, n), stats


def find_clusters(items: list[tuple[str, int]], n: int, cfg: DedupConfig, ctx: StageContext) -> tuple[Path, dict]:
    """Per document: its cluster id (smallest id in the cluster), size, kind, kept, written to
    final.parquet in idx order (the documents' order: shard by shard, row by row).
    items: each shard with its first document's idx; n: the documents in all of them."""
    work = ctx.work_dir() / "dedup"
    shutil.rmtree(work, ignore_errors=True)  # intermediate files of a killed run: recomputed
    work.mkdir(parents=True)
    partitions = partition_count(n, cfg.bands, cfg.partitions, ctx.workers)
    ctx.map(shard_signatures, items, cfg=cfg, work=str(work), partitions=partitions)
    con = connect(work, cfg.memory_limit)
    exact = exact_step(con, cfg)
    labels, stats = np.arange(n, dtype=np.int64), {"candidate_pairs": 0}
    if cfg.near:
        np.save(work / "mask.npy", exact["lsh"])
        labels, stats = near_step(items, n, exact["need"], cfg, ctx, work, partitions)
    rep_idx = exact["rep_idx"]
    con.register("component", pa.table({"idx": np.arange(n, dtype=np.int64), "component": labels[rep_idx],
                                        "exact_copy": rep_idx != np.arange(n)}))  # an exact copy joins its rep's cluster
    # A kept representative is "exact" when every other member of its cluster is an exact copy.
    con.execute(f"""COPY (
        WITH d AS (SELECT idx, id, source, component, exact_copy,
                          min(id) OVER (PARTITION BY component) AS cluster_id,
                          count(*) OVER (PARTITION BY component) AS cluster_size
                   FROM docs JOIN component USING (idx)),
             k AS (SELECT *, id = cluster_id AS kept FROM d)
        SELECT idx, id, source, cluster_id, cluster_size, kept,
               CASE WHEN exact_copy OR (kept AND bool_and(exact_copy OR kept) OVER (PARTITION BY component))
                    THEN 'exact' ELSE 'near' END AS kind
        FROM k ORDER BY idx) TO '{work / "final.parquet"}' (FORMAT parquet, ROW_GROUP_SIZE 65536)""")
    con.close()
    return work / "final.parquet", stats


class Decisions:
    """Each shard's decision, read from final.parquet when `filter_documents` asks for it (one at a time)."""

    def __init__(self, final: Path, items: list[tuple[str, int]], n: int):
        self.final, self.bases = final, [base for _, base in items] + [n]

    def __iter__(self):
        dataset = pads.dataset(self.final)
        for base, end in zip(self.bases[:-1], self.bases[1:]):
            rows = dataset.to_table(filter=(pads.field("idx") >= base) & (pads.field("idx") < end)).sort_by("idx")
            kept = rows["kept"].to_numpy(zero_copy_only=False)
            clustered = pc.greater(rows["cluster_size"], 1)
            cluster = pc.if_else(clustered, rows["cluster_id"], pa.scalar(None, pa.string()))
            reason = pc.if_else(rows["kept"], pa.scalar(None, pa.string()), pc.binary_join_element_wise(
                rows["kind"], "_duplicate", ""))
            yield Decision(kept, reason.to_pylist(), {"dup_cluster": cluster.cast(pa.string())})


def check_sources(docs: pl.LazyFrame, cfg: DedupConfig) -> dict[str, float]:
    """Each source's removed share; stop (or warn) when one exceeds cfg.max_source_removal."""
    per_source = docs.group_by("source").agg(rate=(~pl.col("kept")).mean(), removed=(~pl.col("kept")).sum(),
                                              total=pl.len()).sort("source").collect(engine="streaming")
    for source, rate, removed, total in per_source.iter_rows():
        if rate > cfg.max_source_removal:
            message = (f"dedup: source {source!r} would lose {rate:.0%} of its documents ({removed:,} of {total:,}), "
                       f"above dedup.max_source_removal {cfg.max_source_removal}: give it a policy (--set "
                       f"dedup.sources.{source}=exact, =exempt or a Jaccard such as 0.9), raise the limit, or "
                       f"--set dedup.source_removal=warn")
            if cfg.source_removal == "error":
                raise StageError(message)
            log.warning("%s (source_removal: warn, so it goes ahead)", message)
    return {s: r for s, r, _, _ in per_source.iter_rows()}


def audit(files: list[str], docs: pl.LazyFrame, cfg: DedupConfig) -> dict[str, float]:
    """True shingle Jaccard of a seeded sample of removed near-duplicates against their cluster's kept document."""
    removed = docs.filter(~pl.col("kept") & (pl.col("kind") == "near")).select("id", "cluster_id").collect()
    if not cfg.near or cfg.audit_pairs == 0 or removed.is_empty():
        return {}
    sample = removed.sample(min(cfg.audit_pairs, len(removed)), seed=cfg.seed).sort("id")
    wanted = set(sample["id"].to_list()) | set(sample["cluster_id"].to_list())
    texts: dict[str, str] = {}
    for path in files:
        table = read_table(path, columns=["id", "text"])
        texts.update((i, t) for i, t in zip(table["id"].to_pylist(), table["text"].to_pylist()) if i in wanted)
    ids = sorted(wanted)
    index = {i: k for k, i in enumerate(ids)}
    hashes, offsets = cfg.shingles(pa.array([texts[i] for i in ids], pa.large_string()))
    pairs = np.array([[index[a], index[b]] for a, b in zip(sample["id"], sample["cluster_id"])], np.int64)
    jaccard = shingle_jaccard(hashes, offsets, pairs)
    return {"audit_pairs": len(pairs), "audit_jaccard_mean": float(jaccard.mean()),
            "audit_precision": float((jaccard >= cfg.verify_threshold).mean())}


def cluster_size_figure(sizes: np.ndarray):
    fig, ax = new_figure()
    bins = np.unique(np.geomspace(2, max(3, sizes.max() + 1), 30).astype(int))
    ax.hist(sizes, bins=bins, color="tab:blue")
    ax.set(xscale="log", yscale="log", xlabel="cluster size (documents)", ylabel="clusters",
           title=f"duplicate clusters: {len(sizes)}")
    return fig


def dedup(cfg: DedupConfig, inputs: dict, ctx: StageContext) -> dict:
    files = document_shards(inputs["documents"], "dedup")
    sizes = [parquet_rows(f) for f in files]
    items = list(zip(files, np.cumsum([0, *sizes[:-1]]).tolist()))  # each shard's first global idx
    final, stats = find_clusters(items, sum(sizes), cfg, ctx)
    docs = pl.scan_parquet(final)
    removal = check_sources(docs, cfg)  # before anything is written
    threshold = (1 / cfg.bands) ** (1 / cfg.rows)  # the S-curve's knee: P(candidate) ~ 0.5 there
    log.info("dedup: LSH %d bands x %d rows: pairs above Jaccard ~%.2f become candidates", cfg.bands, cfg.rows, threshold)

    done = filter_documents(ctx, files, Decisions(final, items, sum(sizes)), ["exact_duplicate", "near_duplicate"])
    clustered = (docs.filter(pl.col("cluster_size") > 1).select("id", "cluster_id", "kind", "kept", "cluster_size")
                 .sort("cluster_id", "id").collect(engine="streaming"))
    write_parquet(clustered.select(doc_id="id", cluster_id="cluster_id", kind="kind", kept="kept").to_arrow(),
                  ctx.out / "clusters" / "part-00000.parquet")

    metrics = {
        **done.metrics,
        "duplicate_rate": done.metrics["docs_dropped"] / max(1, done.metrics["docs_in"]),
        "clusters": clustered["cluster_id"].n_unique(),
        "largest_cluster": int(clustered["cluster_size"].max() or 0),
        **stats,
    }
    metrics["lsh_threshold"] = threshold
    metrics["lsh_p_candidate_at_0.5"] = float(collision_probability(0.5, cfg.bands, cfg.rows))
    metrics.update({f"duplicate_rate.{s}": r for s, r in removal.items()})
    metrics.update(audit(files, docs, cfg))
    if len(clustered):
        sizes = clustered.unique("cluster_id")["cluster_size"].to_numpy()
        ctx.log_figure(cluster_size_figure(sizes), "cluster_sizes")
    return {"rows": {"documents": metrics["docs_kept"], "clusters": len(clustered)}, "metrics": metrics}


STAGE = Stage("dedup", VERSION, DedupConfig, dedup,
              report_metrics=("dropped.exact_duplicate", "dropped.near_duplicate", "duplicate_rate", "clusters",
                              "lsh_threshold", "audit_precision"))
