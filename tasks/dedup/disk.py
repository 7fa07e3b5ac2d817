"""The dedup stage's global steps out of core: every view of the whole corpus is on disk.

Memory is bounded by one shard or one partition, plus a few numbers per document (the union-find
parent, the exact-duplicate representative, the LSH mask: about 30 bytes each, 120 MB for four
million documents). The layout under the stage's work directory, step by step:

    docs/shard-S.parquet          per shard: idx (global row number), id, source, digest, has_shingles
    bands/p-P/shard-S.parquet     per shard and key partition: band, key, idx  (key % partitions = P)
    edges/q-Q/from-P.parquet      candidate pairs (i < j) of partition P whose i % edge_parts = Q
    shingles/shard-S-B.parquet    with verification: unique shingle hashes of candidate documents (8 MB text batches)
    verified/q-Q.parquet          the distinct (and verified) pairs of edge partition Q
    final.parquet                 per document: cluster id and size, kind, kept (sorted by idx)

Each per-shard and per-partition step is a plain function of paths, so the stage maps it over
threads, Prefect tasks or Dask workers alike; workers that do not see the work directory (a remote
store's) get the files each step declares it reads through the store (tasks.core.shared_scratch).
The exact step and the cluster assignment are duckdb queries over Parquet (they spill to disk).
"""

from __future__ import annotations

import glob
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from tasks.dedup.minhash import Components, bucket_pairs, shingle_jaccard, unique_pairs
from tasks.core.shared_scratch import scratch_files
from tasks.core.store import write_parquet

BAND_ROWS_PER_PARTITION = 1_000_000  # 17 MB of (band, key, idx) plus the sort's temporaries


def partition_count(rows: int, bands: int, partitions: int, width: int = 1) -> int:
    """The configured number of key partitions, or enough that each holds at most
    BAND_ROWS_PER_PARTITION and there is one per worker (`width`): then as many partitions are in
    memory at once on a small corpus as on a big one, and memory does not grow with the corpus."""
    return partitions or max(width, -(-rows * bands // BAND_ROWS_PER_PARTITION))


def write_band_keys(work: Path, shard: str, keys: np.ndarray, idx: np.ndarray, partitions: int) -> None:
    """One shard's band keys (n, bands) of documents `idx`, split by key partition."""
    n, bands = keys.shape
    band = np.tile(np.arange(bands, dtype=np.uint8), n)
    key, doc = keys.ravel(), np.repeat(idx, bands)
    part = key % np.uint64(partitions)
    order = np.argsort(part, kind="stable")
    cuts = np.searchsorted(part[order], np.arange(partitions + 1))
    for p in range(partitions):
        rows = order[cuts[p]:cuts[p + 1]]
        write_parquet(pa.table({"band": band[rows], "key": key[rows], "idx": doc[rows]}),
                            work / "bands" / f"p-{p:05d}" / f"{shard}.parquet")


@scratch_files(reads=lambda part_dir, work, **_: [f"{work}/mask.npy", f"{part_dir}/*"])
def group_partition(part_dir: str, work: str, edge_parts: int, max_bucket: int) -> int:
    """One key partition: the candidate pairs of its buckets among the documents in LSH (`mask.npy`),
    written by edge partition. Returns the number of distinct pairs written."""
    work_dir = Path(work)
    mask = np.load(work_dir / "mask.npy", mmap_mode="r")
    table = pq.read_table(part_dir)
    doc = table["idx"].to_numpy()
    take = mask[doc]
    pairs = bucket_pairs(table["band"].to_numpy()[take], table["key"].to_numpy()[take], doc[take], max_bucket)
    pairs = unique_pairs(pairs, len(mask))
    q = pairs[:, 0] % edge_parts
    name = Path(part_dir).name
    for part in range(edge_parts):
        sel = pairs[q == part]
        if len(sel):
            write_parquet(pa.table({"i": sel[:, 0], "j": sel[:, 1]}),
                                work_dir / "edges" / f"q-{part:05d}" / f"from-{name}.parquet")
    return len(pairs)


def read_pairs(paths: list[str]) -> np.ndarray:
    if not paths:
        return np.zeros((0, 2), np.int64)
    table = pq.read_table(paths)
    return np.c_[table["i"].to_numpy(), table["j"].to_numpy()].astype(np.int64)


def candidate_mask(work: Path, n: int) -> np.ndarray:
    """Documents that are an end of at least one candidate pair (read edge file by edge file)."""
    mask = np.zeros(n, bool)
    for path in sorted(glob.glob(str(work / "edges" / "*" / "*.parquet"))):
        pairs = read_pairs([path])
        mask[pairs.ravel()] = True
    return mask


def write_shingle_sets(work: Path, shard: str, idx: np.ndarray, hashes: np.ndarray, offsets: np.ndarray) -> None:
    """Unique shingle hashes of documents `idx` (their shingles in hashes[offsets[k]:offsets[k+1]])."""
    sets = [np.unique(hashes[offsets[k]:offsets[k + 1]]) for k in range(len(idx))]
    sizes = np.array([len(s) for s in sets], np.int64)
    flat = np.concatenate(sets) if sets else np.zeros(0, np.uint64)
    write_parquet(pa.table({"idx": np.repeat(idx, sizes), "h": flat}), work / "shingles" / f"{shard}.parquet")


def _shingles_of(work: Path, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hashes, offsets) of `docs` (sorted, unique) in that order, read from shingles/*.parquet."""
    files = sorted(glob.glob(str(work / "shingles" / "*.parquet")))
    table = pads.dataset(files).to_table(filter=pads.field("idx").isin(pa.array(docs)))
    idx, h = table["idx"].to_numpy(), table["h"].to_numpy()
    if len(idx) and (np.diff(idx) < 0).any():  # files are written in idx order and usually read so: no copies
        order = np.argsort(idx, kind="stable")
        idx, h = idx[order], h[order]
    return h, np.searchsorted(idx, np.r_[docs, np.iinfo(np.int64).max])


@scratch_files(reads=lambda edge_dir, work, **_: [f"{work}/need.npy", f"{edge_dir}/*", f"{work}/shingles/*"])
def reduce_edges(edge_dir: str, work: str, n: int, chunk_pairs: int = 10_000) -> dict:
    """One edge partition: its distinct candidate pairs; those whose ends need a true shingle Jaccard
    (`need.npy`, per document; a pair needs the larger) keep only those that reach it. Pairs are
    checked `chunk_pairs` at a time, so at most 2 x chunk_pairs documents' shingles are in memory.
    Writes verified/q-Q.parquet; returns the pair counts."""
    work_dir = Path(work)
    pairs = unique_pairs(read_pairs(sorted(glob.glob(f"{edge_dir}/*.parquet"))), n)
    stats = {"candidate_pairs": len(pairs), "checked": 0}
    need_path = work_dir / "need.npy"
    if need_path.exists() and len(pairs):
        need_doc = np.load(need_path, mmap_mode="r")
        need = np.maximum(need_doc[pairs[:, 0]], need_doc[pairs[:, 1]])
        check = np.flatnonzero(need > 0)
        ok = np.ones(len(pairs), bool)
        for part in np.array_split(check, -(-len(check) // chunk_pairs)) if len(check) else []:
            docs = np.unique(pairs[part])
            hashes, offsets = _shingles_of(work_dir, docs)
            jaccard = shingle_jaccard(hashes, offsets, np.searchsorted(docs, pairs[part]), already_sets=True)
            ok[part] = jaccard >= need[part]
        pairs = pairs[ok]
        stats["checked"] = len(check)
    stats["pairs"] = len(pairs)
    write_parquet(pa.table({"i": pairs[:, 0], "j": pairs[:, 1]}),
                        work_dir / "verified" / f"{Path(edge_dir).name}.parquet")
    return stats


def components(work: Path, n: int) -> np.ndarray:
    """Component label per document (its smallest idx) over every verified pair, file by file."""
    union = Components(n)
    for path in sorted(glob.glob(str(work / "verified" / "*.parquet"))):
        union.add(read_pairs([path]))
    return union.labels()


def connect(work: Path, memory_limit: str) -> duckdb.DuckDBPyConnection:
    """A duckdb connection that spills to the work directory past `memory_limit`."""
    (work / "duckdb").mkdir(exist_ok=True)
    con = duckdb.connect()
    con.execute(f"SET memory_limit = '{memory_limit}'")
    con.execute(f"SET temp_directory = '{work / 'duckdb'}'")
    con.execute(f"CREATE VIEW docs AS SELECT * FROM read_parquet('{work / 'docs' / '*.parquet'}')")
    return con
