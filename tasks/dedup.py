"""Dedup: exact duplicates (normalized text), then MinHash-LSH near-duplicates (Broder's MinHash with LSH banding,
as datatrove and text-dedup run it).

Per shard (mapped over workers): a digest of each document's normalized text and its MinHash
signature of word n-gram shingles. Globally: exact groups, LSH with explicit `bands` x `rows`
over the exact-group representatives, optional true-Jaccard verification of candidate
pairs, union-find clusters. Each cluster keeps one document: the smallest id (a rule that
does not depend on shard order). Outputs: kept `documents` (+ `dup_cluster`), `dropped` (reason
`exact_duplicate` or `near_duplicate`) and `clusters` (`doc_id`, `cluster_id`, `kind` exact/near,
`kept`) for every member of a cluster of size > 1.

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

import hashlib
import logging
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import polars as pl
import pyarrow as pa
from pydantic import Field

from tasks.core.filters import Decision, write_filtered
from tasks.core.minhash import (
    collision_probability,
    connected_components,
    lsh_candidate_pairs,
    minhash_signatures,
    shingle_jaccard,
    word_shingle_hashes,
)
from tasks.core.orchestration import stage_task
from tasks.core.outputs import document_shards
from tasks.core.stage import Stage, StageConfig, StageContext, StageError, new_figure
from tasks.core.store import read_table, write_parquet
from tasks.core.tokens import normalize

VERSION = 2  # 2: a dropped table (tasks.core.filters); kept shards keep their input names
log = logging.getLogger("slmflow")


class DedupConfig(StageConfig):
    exact: bool = Field(True, description="drop exact duplicates of the normalized text first")
    near: bool = Field(True, description="MinHash-LSH near-duplicate removal")
    lowercase: bool = Field(True, description="lowercase when normalizing and shingling")
    ngram: int = Field(5, ge=1, description="word n-gram shingle length")
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

    def policy(self, source: str):
        return self.sources.get(source, "fuzzy")

    def needs_shingles(self) -> bool:
        return self.verify or any(isinstance(v, float) for v in self.sources.values())


def shard_signatures(path: str, cfg: DedupConfig) -> dict:
    """One shard: ids, sources, exact digests and MinHash signatures (mapped over workers)."""
    table = read_table(path, columns=["id", "source", "text"])
    texts = table["text"].combine_chunks()
    digests = [hashlib.blake2b(normalize(t, cfg.lowercase).encode(), digest_size=16).hexdigest()
               for t in texts.to_pylist()]
    out = {"id": table["id"].to_pylist(), "source": table["source"].to_pylist(), "digest": digests}
    if cfg.near:
        hashes, offsets = word_shingle_hashes(texts, cfg.ngram, cfg.lowercase)
        out["signatures"] = minhash_signatures(hashes, offsets, cfg.bands * cfg.rows, cfg.seed)
        out["valid"] = np.diff(offsets) > 0
        if cfg.needs_shingles():
            out["hashes"], out["offsets"] = hashes, offsets
        log.info("dedup: %s: %d documents, %d shingles", Path(path).name, len(texts), len(hashes))
    return out


def _concat_shingles(parts: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    hashes = np.concatenate([p["hashes"] for p in parts])
    offsets, base = [np.zeros(1, np.int64)], 0
    for p in parts:
        offsets.append(p["offsets"][1:] + base)
        base += p["offsets"][-1]
    return hashes, np.concatenate(offsets)


def find_clusters(parts: list[dict], cfg: DedupConfig) -> tuple[pl.DataFrame, dict]:
    """Per document: its cluster id (smallest id in the cluster), kind, kept; plus pair counts."""
    docs = pl.DataFrame({
        "id": [i for p in parts for i in p["id"]],
        "source": [s for p in parts for s in p["source"]],
        "digest": [d for p in parts for d in p["digest"]],
    }).with_row_index("idx")
    policy = [cfg.policy(source) for source in docs["source"].to_list()]
    exempt = pl.Series([p == "exempt" for p in policy])
    if cfg.exact:  # an exempt document is its own group: it is neither removed nor removes
        docs = docs.with_columns(exact_rep=pl.when(exempt).then(pl.col("id"))
                                 .otherwise(pl.col("id").min().over(pl.when(~exempt).then(pl.col("digest")))))
    else:
        docs = docs.with_columns(exact_rep=pl.col("id"))
    rep_idx = docs.join(docs.select(exact_rep="id", rep_idx="idx"), on="exact_rep", how="left").sort("idx")["rep_idx"]
    rep_idx = rep_idx.to_numpy().astype(np.int64)
    n = len(docs)
    stats = {"candidate_pairs": 0}
    labels = np.arange(n, dtype=np.int64)
    if cfg.near:
        signatures = np.concatenate([p["signatures"] for p in parts])
        is_rep = rep_idx == np.arange(n)
        fuzzy = np.array([p not in ("exempt", "exact") for p in policy], dtype=bool)
        valid = np.concatenate([p["valid"] for p in parts]) & is_rep & fuzzy  # exact copies take no part in LSH
        pairs = lsh_candidate_pairs(signatures, cfg.bands, cfg.rows, valid)
        stats["candidate_pairs"] = len(pairs)
        # the true Jaccard a pair must reach: verify_threshold when verifying, a source's own threshold
        need = np.array([p if isinstance(p, float) else 0.0 for p in policy])
        need = np.maximum(need[pairs[:, 0]], need[pairs[:, 1]]) if len(pairs) else np.zeros(0)
        if cfg.verify:
            need = np.maximum(need, cfg.verify_threshold)
        if (need > 0).any():
            hashes, offsets = _concat_shingles(parts)
            pairs = pairs[shingle_jaccard(hashes, offsets, pairs) >= need]
            stats["verified_pairs"] = len(pairs)
        labels = connected_components(n, pairs)
    docs = docs.with_columns(component=pl.Series(labels[rep_idx]))  # an exact copy joins its rep's cluster
    docs = docs.with_columns(
        cluster_id=pl.col("id").min().over("component"),
        cluster_size=pl.len().over("component"),
        kind=pl.when(pl.col("exact_rep") != pl.col("id")).then(pl.lit("exact")).otherwise(pl.lit("near")),
    ).with_columns(kept=pl.col("id") == pl.col("cluster_id"))
    # A kept representative is "exact" when every other member of its cluster is an exact copy.
    only_exact = ((pl.col("kind") == "exact") | pl.col("kept")).all().over("component")
    docs = docs.with_columns(kind=pl.when(pl.col("kept") & only_exact).then(pl.lit("exact")).otherwise(pl.col("kind")))
    return docs.drop("digest", "component"), stats


def check_sources(docs: pl.DataFrame, cfg: DedupConfig) -> dict[str, float]:
    """Each source's removed share; stop (or warn) when one exceeds cfg.max_source_removal."""
    per_source = docs.group_by("source").agg(rate=(~pl.col("kept")).mean(), removed=(~pl.col("kept")).sum(),
                                              total=pl.len()).sort("source")
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


def audit(files: list[str], docs: pl.DataFrame, cfg: DedupConfig) -> dict[str, float]:
    """True shingle Jaccard of a seeded sample of removed near-duplicates against their cluster's kept document."""
    removed = docs.filter(~pl.col("kept") & (pl.col("kind") == "near"))
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
    hashes, offsets = word_shingle_hashes(pa.array([texts[i] for i in ids], pa.large_string()), cfg.ngram, cfg.lowercase)
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
    parts = ctx.map(shard_signatures, files, cfg=cfg)
    docs, stats = find_clusters(parts, cfg)
    removal = check_sources(docs, cfg)  # before anything is written
    threshold = (1 / cfg.bands) ** (1 / cfg.rows)  # the S-curve's knee: P(candidate) ~ 0.5 there
    log.info("dedup: LSH %d bands x %d rows: pairs above Jaccard ~%.2f become candidates", cfg.bands, cfg.rows, threshold)

    # Kept documents, shard by shard in the input's layout, with their cluster id when clustered.
    decisions, start = [], 0
    for part in parts:
        rows = docs.slice(start, len(part["id"]))
        start += len(part["id"])
        cluster = rows.select(pl.when(pl.col("cluster_size") > 1).then(pl.col("cluster_id")))["cluster_id"]
        reason = rows.select(pl.when(~pl.col("kept")).then(pl.col("kind") + "_duplicate"))["kind"]
        decisions.append(Decision(rows["kept"].to_numpy(), reason.to_list(),
                                  {"dup_cluster": pa.array(cluster.to_list(), pa.string())}))
    write_filtered(files, decisions, ctx.out)

    clustered = docs.filter(pl.col("cluster_size") > 1).sort("cluster_id", "id")
    write_parquet(clustered.select(doc_id="id", cluster_id="cluster_id", kind="kind", kept="kept").to_arrow(),
                  ctx.out / "clusters" / "part-00000.parquet")

    removed = docs.filter(~pl.col("kept"))
    metrics = {
        "docs_in": len(docs),
        "docs_out": len(docs) - len(removed),
        "exact_duplicates": int((removed["kind"] == "exact").sum()),
        "near_duplicates": int((removed["kind"] == "near").sum()),
        "duplicate_rate": len(removed) / max(1, len(docs)),
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
    return {"rows": {"documents": metrics["docs_out"], "clusters": len(clustered)}, "metrics": metrics}


STAGE = Stage("dedup", VERSION, DedupConfig, dedup,
              report_metrics=("exact_duplicates", "near_duplicates", "duplicate_rate", "clusters", "lsh_threshold",
                              "audit_precision"))
dedup_task = stage_task(STAGE)
