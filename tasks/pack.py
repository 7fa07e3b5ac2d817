"""Pack: tokenize documents and pack them into fixed-length training rows.

Split by document: a document is in val when its `doc_hash(id, seed)` lies in the lowest
`val_fraction` of the hash range (at least one document: the smallest hash), else in
train; a document's split depends on its id and the seed only, and raising `val_fraction`
only moves documents from train to val. The rule is the tokenizer stage's held-out rule,
so with equal seeds and `val_fraction <= tokenizer.heldout_fraction` the tokenizer never
trained on a val document (metric `val_unseen_by_tokenizer`).

Each document is encoded as plain text (special-token strings in it are not matched),
prefixed with `<|bos|>`, and the documents of a split are concatenated in (hash, id) order
(a shuffle that does not depend on sharding) into one stream S of L tokens. Rows have
`seq_len + 1` tokens with stride `seq_len`: row i = S[i*seq_len : i*seq_len + seq_len + 1],
so consecutive rows overlap by one token and a trainer takes inputs = row[:-1], targets =
row[1:]: every token but the first of S is a target exactly once and none is wasted. There
are ceil((L - 1) / seq_len) rows; only the last is padded with `<|pad|>` (at least its first
two tokens are real). Targets equal to `pad_id` must be ignored in the loss
(`ignore_index=pad_id`); `<|pad|>` never occurs in S, so that drops padding only.

Memory is bounded by a shard and one hash bucket, not by the corpus: each shard's tokens go to
disk by hash range (a power-of-two number of buckets, about 50k documents each), and each split's
stream is cut into rows bucket by bucket, in hash order, by a writer that carries the unfinished
row from one bucket to the next (the same rows as cutting the whole stream at once).

Output tables `train` and `val`: Parquet shards `part-*.parquet` of one column `tokens`,
fixed_size_list<int32>[seq_len + 1]; `tasks.core.outputs.load_tokens` reads one split as an int32 array
(n_rows, seq_len + 1). Metrics give what a trainer needs from the manifest: `seq_len`,
`vocab_size`, `bos_id`, `pad_id`, and for bits per byte on val,
`val_targets` (non-pad targets = val_tokens - 1) and `val_bytes` (UTF-8 bytes of the val
documents' text): bpb = mean_val_loss_nats * val_targets / (val_bytes * ln 2).
"""

from __future__ import annotations

import functools
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field
from tokenizers import Tokenizer

from tasks.core.base import log
from tasks.core.outputs import TOKEN_SPLITS as SPLITS
from tasks.core.outputs import document_shards
from tasks.core.shared_scratch import scratch_files
from tasks.core.stage import Stage, StageConfig, StageContext, StageError
from tasks.core.store import parquet_rows, read_table, write_parquet
from tasks.core.tokens import BOS, PAD, doc_hash, hash_order, load_tokenizer, special_ids

VERSION = 1
_BATCH = 1024  # documents per encode_batch call (each call is multi-threaded)
_BUCKET_DOCS = 50_000  # documents per hash bucket (about 100-200 MB of tokens for web-length text)


class PackConfig(StageConfig):
    seq_len: int = Field(256, ge=1, description="tokens a model sees per row; rows hold seq_len + 1")
    val_fraction: float = Field(0.01, gt=0, lt=1, description="share of documents (by id hash) in val; at least one")
    seed: int = Field(0, description="seed of the document hash; keep equal to tokenizer.seed")
    shard_rows: int = Field(8192, gt=0, description="rows per Parquet shard")


@functools.lru_cache(maxsize=4)
def _plain_tokenizer(path: str) -> Tokenizer:
    """The tokenizer at `path`, encoding special-token strings as plain text (cached per process)."""
    tok = load_tokenizer(path)
    tok.encode_special_tokens = True
    return tok


@scratch_files(reads=lambda **_: [])  # it only writes its buckets into work
def tokenize_shard(item: tuple[int, str], tokenizer: str, bos_id: int, seed: int, n_shards: int, work: str,
                   buckets: int) -> dict:
    """One documents shard: each document's id, hash, UTF-8 bytes and tokens (`<|bos|>` + text),
    written to work/b-B/ by the top bits of its hash (bucket B holds one contiguous hash range, so
    the buckets in order, each sorted, are the global (hash, id) order). Returns small counts."""
    index, path = item
    start = time.monotonic()
    tok = _plain_tokenizer(tokenizer)
    table = read_table(path, columns=["id", "text"])
    ids, texts = table["id"].to_pylist(), table["text"].to_pylist()
    tokens: list[np.ndarray] = []
    for s in range(0, len(texts), _BATCH):
        tokens += [np.array([bos_id, *enc.ids], np.int32) for enc in tok.encode_batch_fast(texts[s:s + _BATCH])]
    hashes = doc_hash(ids, seed)
    nbytes = pc.binary_length(table["text"]).to_numpy().astype(np.int64)
    bits = buckets.bit_length() - 1  # buckets is 2**bits: the hash's top bits name its bucket
    bucket = (hashes >> np.uint64(64 - bits)).astype(np.int64) if bits else np.zeros(len(ids), np.int64)
    for b in np.unique(bucket).tolist():
        rows = np.flatnonzero(bucket == b)
        offsets = np.zeros(len(rows) + 1, np.int32)
        np.cumsum([len(tokens[k]) for k in rows], out=offsets[1:])
        flat = np.concatenate([tokens[k] for k in rows])
        write_parquet(pa.table({"id": pa.array([ids[k] for k in rows], pa.string()), "hash": hashes[rows],
                                "bytes": nbytes[rows], "tokens": pa.ListArray.from_arrays(offsets, flat)}),
                      Path(work) / f"b-{b:05d}" / f"shard-{index:05d}.parquet")
    n_tokens = sum(len(t) for t in tokens)
    log.info("pack: shard %d/%d (%s): %d documents, %d tokens in %.1fs",
             index + 1, n_shards, path.rsplit("/", 1)[-1], len(ids), n_tokens, time.monotonic() - start)
    return {"docs": len(ids), "min_hash": int(hashes.min()) if len(ids) else None,
            "max_hash": int(hashes.max()) if len(ids) else None}


def pack_rows(stream: np.ndarray, seq_len: int, pad_id: int) -> np.ndarray:
    """Rows of seq_len + 1 tokens, stride seq_len (one-token overlap); the last row padded."""
    if len(stream) < 2:
        return np.zeros((0, seq_len + 1), np.int32)
    n_rows = -(-(len(stream) - 1) // seq_len)
    buf = np.full(n_rows * seq_len + 1, pad_id, np.int32)
    buf[: len(stream)] = stream
    return np.lib.stride_tricks.sliding_window_view(buf, seq_len + 1)[::seq_len].copy()


class RowWriter:
    """Cuts a stream that arrives in pieces into the rows `pack_rows` would cut from the whole of it,
    and writes them `shard_rows` at a time: memory holds one piece and one shard of rows."""

    def __init__(self, out: Path, seq_len: int, pad_id: int, shard_rows: int):
        self.out, self.seq_len, self.pad_id, self.shard_rows = out, seq_len, pad_id, shard_rows
        self.carry, self.pending, self.rows, self.shards, self.tokens = np.zeros(0, np.int32), [], 0, 0, 0

    def add(self, piece: np.ndarray) -> None:
        self.tokens += len(piece)
        buf = np.concatenate([self.carry, piece])
        full = max(0, (len(buf) - 1) // self.seq_len)  # rows whose seq_len + 1 tokens are all here
        if full:
            self._emit(np.lib.stride_tricks.sliding_window_view(buf[:full * self.seq_len + 1],
                                                                self.seq_len + 1)[::self.seq_len])
        self.carry = buf[full * self.seq_len:]

    def close(self) -> int:
        """Pad and write the last row (if it holds a target), then the last shard; returns the rows."""
        self._emit(pack_rows(self.carry, self.seq_len, self.pad_id), final=True)
        return self.rows

    def _emit(self, rows: np.ndarray, final: bool = False) -> None:
        self.pending.append(np.array(rows, np.int32))
        self.rows += len(rows)
        pending = np.concatenate(self.pending) if self.pending else np.zeros((0, self.seq_len + 1), np.int32)
        while len(pending) >= self.shard_rows or (final and len(pending)):
            write_parquet(rows_table(pending[:self.shard_rows]), self.out / f"part-{self.shards:05d}.parquet")
            pending, self.shards = pending[self.shard_rows:], self.shards + 1
        self.pending = [pending]


def rows_table(rows: np.ndarray) -> pa.Table:
    flat = pa.array(rows.reshape(-1), pa.int32())
    return pa.table({"tokens": pa.FixedSizeListArray.from_arrays(flat, rows.shape[1])})


def bucket_count(files: list[str]) -> int:
    """Hash buckets (a power of two) of about _BUCKET_DOCS documents each: one is in memory at a time."""
    docs = sum(parquet_rows(f) for f in files)
    return 1 << max(0, (docs // _BUCKET_DOCS).bit_length())


def pack(cfg: PackConfig, inputs: dict, ctx: StageContext) -> dict:
    tok_art = inputs["tokenizer"]
    specials = special_ids(tok_art)
    if BOS not in specials or PAD not in specials:
        raise StageError(f"pack: tokenizer {tok_art.key} has no {BOS} or {PAD} token (tokenizer.special_tokens)")
    bos_id, pad_id = specials[BOS], specials[PAD]
    files = document_shards(inputs["documents"], "pack")
    work = ctx.work_dir() / "pack"
    shutil.rmtree(work, ignore_errors=True)  # a killed run's buckets: recomputed
    buckets = bucket_count(files)

    start = time.monotonic()
    parts = ctx.map(tokenize_shard, list(enumerate(files)), tokenizer=tok_art.path, bos_id=bos_id,
                    seed=cfg.seed, n_shards=len(files), work=str(work), buckets=buckets)
    tokenize_seconds = time.monotonic() - start
    n_docs = sum(p["docs"] for p in parts)
    if n_docs < 2:
        raise StageError(f"pack: input 'documents' has {n_docs} documents; need 2 (train and val)")
    # below_fraction's rule, bucket by bucket: its "at least one" document is the smallest hash overall
    threshold = np.uint64(min(int(cfg.val_fraction * 2.0**64), 2**64 - 1))
    smallest = np.uint64(min(p["min_hash"] for p in parts if p["docs"]))
    if smallest >= threshold:
        threshold = smallest + np.uint64(1)
    if threshold > np.uint64(max(p["max_hash"] for p in parts if p["docs"])):
        raise StageError(f"pack.val_fraction: {cfg.val_fraction} leaves no training documents")

    metrics: dict[str, float] = {}
    rows_out: dict[str, int] = {}
    for split in SPLITS:
        writer = RowWriter(ctx.out / split, cfg.seq_len, pad_id, cfg.shard_rows)
        docs = nbytes = 0
        for bucket in ctx.progress(sorted(work.glob("b-*")), buckets, f"{split} hash buckets packed"):
            table = pq.read_table(bucket)
            hashes = table["hash"].to_numpy()
            mask = hashes < threshold if split == "val" else hashes >= threshold
            if not mask.any():
                continue
            chosen = np.flatnonzero(mask)[hash_order(hashes[mask], table["id"].filter(pa.array(mask)).to_pylist())]
            tokens = table["tokens"].take(pa.array(chosen))
            writer.add(pc.list_flatten(tokens).to_numpy().astype(np.int32))
            docs += len(chosen)
            nbytes += int(table["bytes"].to_numpy()[chosen].sum())
        rows = writer.close()
        rows_out[split] = rows
        metrics.update({
            f"{split}_docs": docs,
            f"{split}_rows": rows,
            f"{split}_tokens": writer.tokens,  # real tokens, <|bos|> included, padding excluded
            f"{split}_targets": writer.tokens - 1,  # non-pad targets (what a mean loss averages over)
            f"{split}_pad_tokens": rows * (cfg.seq_len + 1) - writer.tokens - max(0, rows - 1),  # rows overlap by one
            f"{split}_bytes": nbytes,
        })
    stored = sum(metrics[f"{s}_rows"] for s in SPLITS) * (cfg.seq_len + 1)
    pads = metrics["train_pad_tokens"] + metrics["val_pad_tokens"]
    tok_cfg = tok_art.manifest.get("config", {})
    same_docs = tok_art.manifest.get("inputs", {}).get("documents", {}).get("key") == inputs["documents"].key
    metrics.update({
        "seq_len": cfg.seq_len,
        "vocab_size": _plain_tokenizer(tok_art.path).get_vocab_size(),
        "bos_id": bos_id,
        "pad_id": pad_id,
        "padding_fraction": pads / max(1, stored),
        "tokens_per_byte": (metrics["train_tokens"] + metrics["val_tokens"])
        / max(1, metrics["train_bytes"] + metrics["val_bytes"]),
        "tokenize_seconds": round(tokenize_seconds, 3),
        # 1 when no val document was in the tokenizer's training sample (see the module docstring)
        "val_unseen_by_tokenizer": int(same_docs and tok_cfg.get("seed") == cfg.seed
                                       and cfg.val_fraction <= tok_cfg.get("heldout_fraction", 0)),
    })
    return {"rows": rows_out, "metrics": metrics}


STAGE = Stage("pack", VERSION, PackConfig, pack,
              report_metrics=("train_tokens", "val_tokens", "train_rows", "padding_fraction"))
