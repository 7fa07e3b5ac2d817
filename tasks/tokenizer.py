"""Tokenizer: a byte-level BPE trained on a deterministic sample of the documents.

The pre-tokenizer is GPT-2's byte-level one (regex split, no prefix space), followed, with
`split_digits` (the default), by a rule that cuts every run of digits into single digits (as Llama
and nanochat do): BPE then never merges "182" into one opaque token, so a number's digits, and the
place-value structure arithmetic needs, stay visible to the model; on the default corpus it costs
1.5% of the characters per token (3.55 -> 3.50 on the held-out documents, vocab 4096). The initial alphabet is all 256 byte symbols, so every string
is representable and decode(encode(x)) == x exactly (no normalizer). Special tokens take ids 0..k-1 in config order (the chat and
document tokens of `tasks.core.tokens`).

Sampling: each document gets a 64-bit hash of (seed, id) (`tasks.core.tokens.doc_hash`).
Documents whose hash falls in the lowest `heldout_fraction` of the range (at least one
document) are held out: never trained on, used to measure compression. The rest are taken in
hash order until `max_train_chars` characters (the last one cut to fit), so the sample depends
on ids and the seed only, never on sharding or input order. pack splits val by the same hash
and threshold rule, so with equal seeds and `pack.val_fraction <= heldout_fraction` pack's val
documents are among the ones held out here and the tokenizer never saw them.

Determinism: the BPE trainer's result depends only on word counts (ties broken by pair
ids), so the same sample gives a byte-identical tokenizer.json whatever the thread count
(RAYON_NUM_THREADS 1, 2, 8), process (hash seeds) or input order: checked on the default
corpus and in tests/test_tokenizer.py; nothing needs pinning.

Outputs: `tokenizer.json` (the `tokenizers` serialization) and `special_tokens.json`
({token: id}); their ids are also metrics (`bos_id`, `pad_id`, ...).
"""

from __future__ import annotations

import json
import re
import time
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tasks.core.base import log
from tasks.core.outputs import document_shards
from tasks.core.stage import Stage, StageConfig, StageContext, StageError
from tasks.core.store import read_table
from tasks.core.tokens import (
    BOS,
    PAD,
    SPECIAL_FILE,
    SPECIAL_TOKENS,
    TOKENIZER_FILE,
    below_fraction,
    doc_hash,
    hash_order,
)

VERSION = 1

BYTE_ALPHABET = 256
_BATCH = 512  # documents per batch handed to the trainer / encoder


class TokenizerConfig(StageConfig):
    vocab_size: int = Field(4096, gt=0, description="vocabulary size including the 256 bytes and the special tokens")
    min_frequency: int = Field(2, ge=1, description="a pair must occur this often to be merged")
    max_train_chars: int = Field(20_000_000, gt=0, description="train on documents in hash order up to this many characters")
    heldout_fraction: float = Field(0.02, gt=0, lt=1, description="documents (by hash) never trained on; compression is measured on them")
    special_tokens: list[str] = Field(list(SPECIAL_TOKENS), description="ids 0..k-1 in this order; must include <|bos|> and <|pad|>")
    split_digits: bool = Field(True, description="split numbers into single digits before BPE (no multi-digit tokens)")
    seed: int = Field(0, description="seed of the document hash; keep equal to pack.seed")


def check(cfg: TokenizerConfig) -> None:
    missing = [t for t in (BOS, PAD) if t not in cfg.special_tokens]
    if missing:
        raise StageError(f"tokenizer.special_tokens: must include {', '.join(missing)} (pack needs them)")
    if len(set(cfg.special_tokens)) != len(cfg.special_tokens) or any(not t for t in cfg.special_tokens):
        raise StageError("tokenizer.special_tokens: tokens must be distinct and non-empty")
    least = BYTE_ALPHABET + len(cfg.special_tokens)
    if cfg.vocab_size < least:
        raise StageError(f"tokenizer.vocab_size: {cfg.vocab_size} < {least} (256 bytes + {len(cfg.special_tokens)} special tokens)")


def _shard_index(path: str, seed: int) -> dict:
    """One shard: ids, hashes, characters and UTF-8 bytes per document (mapped over workers)."""
    table = read_table(path, columns=["id", "text"])
    ids = table["id"].to_pylist()
    return {
        "path": path,
        "id": ids,
        "hash": doc_hash(ids, seed),
        "chars": pc.utf8_length(table["text"]).to_numpy().astype(np.int64),
        "bytes": pc.binary_length(table["text"]).to_numpy().astype(np.int64),
    }


def metric_name(token: str) -> str:
    """`<|bos|>` -> `bos_id` (MLflow metric names allow no `<|>`)."""
    return (re.sub(r"[^A-Za-z0-9_]+", "", token) or "special") + "_id"


# ---------------------------------------------------------------------------------------
# The stage


def new_tokenizer(split_digits: bool = True) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # digits map to themselves in the byte-level alphabet, so splitting after it cuts the same runs
    tok.pre_tokenizer = (pre_tokenizers.Sequence([byte_level, pre_tokenizers.Digits(individual_digits=True)])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    return tok


def _batches(texts: Iterator[str], size: int = _BATCH) -> Iterator[list[str]]:
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def train_tokenizer(cfg: TokenizerConfig, inputs: dict, ctx: StageContext) -> dict:
    files = document_shards(inputs["documents"], "tokenizer")
    parts = ctx.map(_shard_index, files, seed=cfg.seed)
    ids = [i for p in parts for i in p["id"]]
    hashes = np.concatenate([p["hash"] for p in parts])
    chars = np.concatenate([p["chars"] for p in parts])
    nbytes = np.concatenate([p["bytes"] for p in parts])
    if len(ids) < 2:
        raise StageError(f"tokenizer: input 'documents' has {len(ids)} documents; need 2 (one is held out)")

    heldout = below_fraction(hashes, cfg.heldout_fraction)
    candidates = hash_order(hashes, ids)
    candidates = candidates[~heldout[candidates]]
    before = np.cumsum(chars[candidates]) - chars[candidates]  # characters taken before each candidate
    taken = candidates[before < cfg.max_train_chars]
    if len(taken) == 0:
        raise StageError("tokenizer: every document is held out; lower tokenizer.heldout_fraction")
    # {id: characters to keep}: all of each taken document, the last one cut at max_train_chars.
    budget = {ids[i]: None for i in taken}
    last = taken[-1]
    cut = int(cfg.max_train_chars - before[len(taken) - 1])
    if cut < chars[last]:
        budget[ids[last]] = cut
    train_chars = train_bytes = 0

    def train_texts() -> Iterator[str]:
        nonlocal train_chars, train_bytes
        for path in ctx.progress(files, len(files), "shards read for training"):
            table = read_table(path, columns=["id", "text"])
            for doc, text in zip(table["id"].to_pylist(), table["text"].to_pylist()):
                if doc in budget:
                    if budget[doc] is not None:
                        text = text[: budget[doc]]
                    train_chars += len(text)
                    train_bytes += len(text.encode())
                    yield text

    tok = new_tokenizer(cfg.split_digits)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=list(cfg.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    start = time.monotonic()
    tok.train_from_iterator(_batches(train_texts()), trainer, length=len(taken))
    train_seconds = time.monotonic() - start
    log.info("tokenizer: trained vocab %d on %d documents, %d chars in %.1fs",
             tok.get_vocab_size(), len(taken), train_chars, train_seconds)

    specials = {t: tok.token_to_id(t) for t in cfg.special_tokens}
    if list(specials.values()) != list(range(len(specials))):  # the trainer's documented layout
        raise StageError(f"tokenizer: special tokens got ids {specials}, expected 0..{len(specials) - 1}")
    tok.save(str(ctx.out / TOKENIZER_FILE))
    (ctx.out / SPECIAL_FILE).write_text(json.dumps(specials, indent=2, ensure_ascii=False) + "\n")

    # Compression on the held-out documents, encoded as plain text (specials not matched).
    tok.encode_special_tokens = True
    heldout_tokens = 0
    starts = np.cumsum([0] + [len(p["id"]) for p in parts])
    for path, start, stop in zip(files, starts[:-1], starts[1:]):  # shard by shard: memory is one shard
        rows = np.flatnonzero(heldout[start:stop])
        if len(rows):
            texts = read_table(path, columns=["text"])["text"].take(pa.array(rows, pa.int64())).to_pylist()
            heldout_tokens += sum(len(e.ids) for b in _batches(iter(texts)) for e in tok.encode_batch_fast(b))
    held = np.flatnonzero(heldout)
    held_chars, held_bytes = int(chars[held].sum()), int(nbytes[held].sum())
    metrics = {
        "vocab_size": tok.get_vocab_size(),
        "merges": tok.get_vocab_size() - BYTE_ALPHABET - len(specials),
        "documents": len(ids),
        "train_docs": len(taken),
        "train_chars": train_chars,
        "train_bytes": train_bytes,
        "train_seconds": round(train_seconds, 3),
        "heldout_docs": len(held),
        "heldout_chars": held_chars,
        "heldout_bytes": held_bytes,
        "heldout_tokens": heldout_tokens,
        "chars_per_token": held_chars / max(1, heldout_tokens),
        "bytes_per_token": held_bytes / max(1, heldout_tokens),
        **{metric_name(t): i for t, i in specials.items()},
    }
    return {"rows": {}, "metrics": metrics}


STAGE = Stage("tokenizer", VERSION, TokenizerConfig, train_tokenizer, check=check,
              report_metrics=("vocab_size", "train_chars", "chars_per_token", "bytes_per_token"))
