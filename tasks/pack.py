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

Output tables `train` and `val`: Parquet shards `part-*.parquet` of one column `tokens`,
fixed_size_list<int32>[seq_len + 1]; `tasks.core.outputs.load_tokens` reads one split as an int32 array
(n_rows, seq_len + 1). Metrics give what a trainer needs from the manifest: `seq_len`,
`vocab_size`, `bos_id`, `pad_id`, and for bits per byte on val,
`val_targets` (non-pad targets = val_tokens - 1) and `val_bytes` (UTF-8 bytes of the val
documents' text): bpb = mean_val_loss_nats * val_targets / (val_bytes * ln 2).
"""

from __future__ import annotations

import functools
import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field
from tokenizers import Tokenizer

from tasks.core.orchestration import stage_task
from tasks.core.outputs import TOKEN_SPLITS as SPLITS
from tasks.core.outputs import document_shards
from tasks.core.stage import Stage, StageConfig, StageContext, StageError
from tasks.core.store import read_table, write_parquet
from tasks.core.tokens import BOS, PAD, below_fraction, doc_hash, hash_order, load_tokenizer, special_ids

VERSION = 1
log = logging.getLogger("slmflow")
_BATCH = 1024  # documents per encode_batch call (each call is multi-threaded)


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


def tokenize_shard(item: tuple[int, str], tokenizer: str, bos_id: int, seed: int, n_shards: int) -> dict:
    """One documents shard: ids, hashes, UTF-8 bytes and tokens (`<|bos|>` + text) per document."""
    index, path = item
    start = time.monotonic()
    tok = _plain_tokenizer(tokenizer)
    table = read_table(path, columns=["id", "text"])
    ids = table["id"].to_pylist()
    texts = table["text"].to_pylist()
    lengths = np.empty(len(texts), np.int64)
    chunks: list[np.ndarray] = []
    for s in range(0, len(texts), _BATCH):
        for j, enc in enumerate(tok.encode_batch_fast(texts[s:s + _BATCH]), s):
            ids_j = enc.ids
            lengths[j] = len(ids_j) + 1
            chunks.append(np.array([bos_id, *ids_j], np.int32))
    offsets = np.zeros(len(texts) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, np.int32)
    log.info("pack: shard %d/%d (%s): %d documents, %d tokens in %.1fs",
             index + 1, n_shards, path.rsplit("/", 1)[-1], len(ids), len(tokens), time.monotonic() - start)
    return {"id": ids, "hash": doc_hash(ids, seed), "bytes": pc.binary_length(table["text"]).to_numpy().astype(np.int64),
            "tokens": tokens, "offsets": offsets}


def pack_rows(stream: np.ndarray, seq_len: int, pad_id: int) -> np.ndarray:
    """Rows of seq_len + 1 tokens, stride seq_len (one-token overlap); the last row padded."""
    if len(stream) < 2:
        return np.zeros((0, seq_len + 1), np.int32)
    n_rows = -(-(len(stream) - 1) // seq_len)
    buf = np.full(n_rows * seq_len + 1, pad_id, np.int32)
    buf[: len(stream)] = stream
    return np.lib.stride_tricks.sliding_window_view(buf, seq_len + 1)[::seq_len].copy()


def rows_table(rows: np.ndarray) -> pa.Table:
    flat = pa.array(rows.reshape(-1), pa.int32())
    return pa.table({"tokens": pa.FixedSizeListArray.from_arrays(flat, rows.shape[1])})


def pack(cfg: PackConfig, inputs: dict, ctx: StageContext) -> dict:
    tok_art = inputs["tokenizer"]
    specials = special_ids(tok_art)
    if BOS not in specials or PAD not in specials:
        raise StageError(f"pack: tokenizer {tok_art.key} has no {BOS} or {PAD} token (tokenizer.special_tokens)")
    bos_id, pad_id = specials[BOS], specials[PAD]
    files = document_shards(inputs["documents"], "pack")

    start = time.monotonic()
    parts = ctx.map(tokenize_shard, list(enumerate(files)), tokenizer=tok_art.path, bos_id=bos_id,
                    seed=cfg.seed, n_shards=len(files))
    tokenize_seconds = time.monotonic() - start
    ids = [i for p in parts for i in p["id"]]
    hashes = np.concatenate([p["hash"] for p in parts])
    nbytes = np.concatenate([p["bytes"] for p in parts])
    # Per document: its tokens as a view into its shard's array, in global document order.
    docs = [p["tokens"][p["offsets"][k]:p["offsets"][k + 1]] for p in parts for k in range(len(p["id"]))]
    if len(ids) < 2:
        raise StageError(f"pack: input 'documents' has {len(ids)} documents; need 2 (train and val)")

    in_val = below_fraction(hashes, cfg.val_fraction)
    if in_val.all():
        raise StageError(f"pack.val_fraction: {cfg.val_fraction} leaves no training documents")
    order = hash_order(hashes, ids)
    metrics: dict[str, float] = {}
    rows_out: dict[str, int] = {}
    for split, mask in (("train", ~in_val), ("val", in_val)):
        chosen = order[mask[order]]
        stream = np.concatenate([docs[i] for i in chosen])
        rows = pack_rows(stream, cfg.seq_len, pad_id)
        n_shards = -(-len(rows) // cfg.shard_rows)
        for s in ctx.progress(range(n_shards), n_shards, f"{split} shards written"):
            write_parquet(rows_table(rows[s * cfg.shard_rows:(s + 1) * cfg.shard_rows]),
                          ctx.out / split / f"part-{s:05d}.parquet")
        rows_out[split] = len(rows)
        metrics.update({
            f"{split}_docs": len(chosen),
            f"{split}_rows": len(rows),
            f"{split}_tokens": len(stream),  # real tokens, <|bos|> included, padding excluded
            f"{split}_targets": len(stream) - 1,  # non-pad targets (what a mean loss averages over)
            f"{split}_pad_tokens": rows.size - len(stream) - max(0, len(rows) - 1),  # rows overlap by one
            f"{split}_bytes": int(nbytes[chosen].sum()),
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
        "tokens_per_byte": (metrics["train_tokens"] + metrics["val_tokens"]) / max(1, int(nbytes.sum())),
        "tokenize_seconds": round(tokenize_seconds, 3),
        # 1 when no val document was in the tokenizer's training sample (see the module docstring)
        "val_unseen_by_tokenizer": int(same_docs and tok_cfg.get("seed") == cfg.seed
                                       and cfg.val_fraction <= tok_cfg.get("heldout_fraction", 0)),
    })
    return {"rows": rows_out, "metrics": metrics}


STAGE = Stage("pack", VERSION, PackConfig, pack,
              report_metrics=("train_tokens", "val_tokens", "train_rows", "padding_fraction"))
pack_task = stage_task(STAGE)
