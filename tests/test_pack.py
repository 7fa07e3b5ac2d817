"""The pack stage: every document once in its split's stream, one-token row overlap, padding
only at the end, a split decided by document id alone, and the row arithmetic."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from tasks.core.stage import run_stage
from tasks.core.store import Store
from tasks.core.outputs import load_tokens
from tasks.core.tokens import load_tokenizer
import tasks.pack as pack_module
from tasks.pack import STAGE, PackConfig, RowWriter, pack_rows
from tasks.tokenizer import STAGE as TOKENIZER
from tasks.tokenizer import TokenizerConfig
from test_tokenizer import corpus, make_documents

SEQ = 32
CFG = PackConfig(seq_len=SEQ, val_fraction=0.1, shard_rows=50)
TEXTS = corpus(240, seed=3) + ["a document quoting <|bos|> and <|pad|> and <|end|> literally"]
IDS = [f"doc-{i:04d}" for i in range(len(TEXTS))]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack")
    docs = make_documents(root / "in", TEXTS, shard_rows=40)
    tok = run_stage(TOKENIZER, TokenizerConfig(vocab_size=350), {"documents": docs}, Store(root / "out")).artifact
    plain = load_tokenizer(tok)
    plain.encode_special_tokens = True
    doc_tokens = {i: tuple(plain.encode(t).ids) for i, t in zip(IDS, TEXTS)}
    assert len(set(doc_tokens.values())) == len(TEXTS)  # distinct, so a token run names its document
    return root, docs, tok, doc_tokens


def run(env, cfg=CFG, docs=None, store="out"):
    root, base_docs, tok, _ = env
    return run_stage(STAGE, cfg, {"documents": docs or base_docs, "tokenizer": tok}, Store(root / store)).artifact


def stream_docs(rows: np.ndarray, bos: int, pad: int) -> list[tuple[int, ...]]:
    """Undo the packing: the stream (rows overlap by one), trailing pad cut, split at <|bos|>."""
    stream = np.concatenate([rows[0], *[r[1:] for r in rows[1:]]]) if len(rows) else np.zeros(0, np.int32)
    stream = stream[: len(stream) - int(np.argmax(stream[::-1] != pad))]
    assert len(stream) and stream[0] == bos
    starts = np.flatnonzero(stream == bos)
    return [tuple(stream[a + 1:b]) for a, b in zip(starts, [*starts[1:], len(stream)])]


def split_ids(out, doc_tokens) -> dict[str, list[str]]:
    by_tokens = {v: k for k, v in doc_tokens.items()}
    m = out.manifest["metrics"]
    return {s: [by_tokens[t] for t in stream_docs(load_tokens(out, s), m["bos_id"], m["pad_id"])] for s in ("train", "val")}


def test_every_document_once_in_its_split(env):
    out = run(env)
    _, _, _, doc_tokens = env
    splits = split_ids(out, doc_tokens)
    seen = splits["train"] + splits["val"]
    assert sorted(seen) == sorted(IDS)  # each document exactly once, whole, after its <|bos|>
    m = out.manifest["metrics"]
    assert (m["train_docs"], m["val_docs"]) == (len(splits["train"]), len(splits["val"]))
    assert 0 < len(splits["val"]) < len(IDS) * 0.25
    val = set(splits["val"])
    for s in ("train", "val"):
        docs = [i for i in IDS if (i in val) == (s == "val")]
        assert m[f"{s}_tokens"] == sum(len(doc_tokens[i]) + 1 for i in docs)
        assert m[f"{s}_bytes"] == sum(len(TEXTS[IDS.index(i)].encode()) for i in docs)


def test_rows_overlap_and_only_last_row_padded(env):
    out = run(env)
    m = out.manifest["metrics"]
    pad = m["pad_id"]
    for split in ("train", "val"):
        rows = load_tokens(out, split)
        assert rows.dtype == np.int32 and rows.shape == (m[f"{split}_rows"], SEQ + 1)
        assert rows.shape[0] == out.manifest["rows"][split] == -(-(m[f"{split}_tokens"] - 1) // SEQ)
        assert (rows[:-1, -1] == rows[1:, 0]).all()
        assert not (rows[:-1] == pad).any()
        last = rows[-1]
        n_pad = int((last == pad).sum())
        assert (last[SEQ + 1 - n_pad:] == pad).all() and n_pad <= SEQ - 1
        assert m[f"{split}_pad_tokens"] == n_pad == rows.size - m[f"{split}_tokens"] - (len(rows) - 1)
        assert m[f"{split}_targets"] == m[f"{split}_tokens"] - 1 == int((rows[:, 1:] != pad).sum())
    assert len(out.files("train")) == -(-m["train_rows"] // 50)
    assert (m["seq_len"], m["vocab_size"], m["bos_id"]) == (SEQ, 350, 0)
    stored = (m["train_rows"] + m["val_rows"]) * (SEQ + 1)
    assert m["padding_fraction"] == pytest.approx((m["train_pad_tokens"] + m["val_pad_tokens"]) / stored)
    assert m["val_unseen_by_tokenizer"] == 0  # val_fraction 0.1 > the tokenizer's heldout_fraction 0.02


def test_special_strings_in_text_are_plain_text(env):
    out = run(env)
    _, _, _, doc_tokens = env
    splits = split_ids(out, doc_tokens)  # would fail to match if "<|bos|>" in the text became a bos
    assert IDS[-1] in splits["train"] + splits["val"]


def test_split_depends_on_id_only_and_output_on_nothing_else(env, tmp_path):
    root, _, _, doc_tokens = env
    full = split_ids(run(env), doc_tokens)
    # Every other document, resharded and reversed: the ones kept stay in their split.
    half = list(range(0, len(TEXTS), 2))[::-1]
    docs = make_documents(tmp_path / "half", [TEXTS[i] for i in half], 13, [IDS[i] for i in half], key="h")
    part = split_ids(run(env, docs=docs, store="half"), doc_tokens)
    for s in ("train", "val"):
        assert set(part[s]) == set(full[s]) & {IDS[i] for i in half}
    # Same documents, other sharding and order: byte-identical shards.
    perm = np.random.default_rng(1).permutation(len(TEXTS))
    docs = make_documents(tmp_path / "perm", [TEXTS[i] for i in perm], 29, [IDS[i] for i in perm], key="p")
    a, b = run(env), run(env, docs=docs, store="perm")
    assert {k: v for k, v in a.manifest["files"].items()} == b.manifest["files"]


def test_val_fraction_moves_documents_only_across_splits(env):
    _, _, _, doc_tokens = env
    small = split_ids(run(env, CFG.model_copy(update={"val_fraction": 0.05})), doc_tokens)
    big = split_ids(run(env, CFG.model_copy(update={"val_fraction": 0.3})), doc_tokens)
    assert set(small["val"]) < set(big["val"]) and set(big["train"]) < set(small["train"])
    assert set(small["val"]) | set(small["train"]) == set(big["val"]) | set(big["train"]) == set(IDS)
    tiny = run(env, CFG.model_copy(update={"val_fraction": 1e-9}))
    assert tiny.manifest["metrics"]["val_docs"] == 1  # at least one document


@pytest.mark.parametrize("length, seq_len, rows, pads", [
    (2, 4, 1, 3), (5, 4, 1, 0), (6, 4, 2, 3), (9, 4, 2, 0), (10, 1, 9, 0), (1, 4, 0, 0),
])
def test_pack_rows_arithmetic(length, seq_len, rows, pads):
    stream = np.arange(100, 100 + length, dtype=np.int32)
    out = pack_rows(stream, seq_len, pad_id=-1)
    assert out.shape == (rows, seq_len + 1) and int((out == -1).sum()) == pads
    if rows:
        assert (np.concatenate([out[0], *[r[1:] for r in out[1:]]])[:length] == stream).all()


@pytest.mark.parametrize("seq_len, shard_rows", [(4, 3), (7, 100), (1, 5)])
def test_row_writer_cuts_pieces_as_pack_rows_cuts_the_whole(tmp_path, seq_len, shard_rows):
    """Pieces of any length (empty, one token, longer than a row) give the rows and shards of the whole."""
    rng = np.random.default_rng(seq_len)
    pieces = [np.arange(n, dtype=np.int32) + 1000 * k for k, n in enumerate(rng.choice([0, 1, 2, 5, 9, 30], 40))]
    writer = RowWriter(tmp_path, seq_len, pad_id=-1, shard_rows=shard_rows)
    for piece in pieces:
        writer.add(piece)
    rows = writer.close()
    whole = pack_rows(np.concatenate(pieces), seq_len, pad_id=-1)
    written = [pq.read_table(p)["tokens"].to_numpy(zero_copy_only=False) for p in sorted(tmp_path.glob("*.parquet"))]
    assert [len(w) for w in written] == [min(shard_rows, len(whole) - s) for s in range(0, len(whole), shard_rows)]
    assert rows == len(whole) and np.array_equal(np.stack([r for w in written for r in w]), whole)


def test_hash_buckets_change_nothing(env, monkeypatch):
    """Many hash buckets (one in memory at a time) give the bytes of one bucket."""
    one = run(env, store="one_bucket")
    monkeypatch.setattr(pack_module, "_BUCKET_DOCS", 7)
    assert pack_module.bucket_count(one_files := [f for f in env[1].files("documents")]) == 64 and one_files
    many = run(env, store="many_buckets")
    assert one.manifest["files"] == many.manifest["files"]
    assert {k: v for k, v in one.manifest["metrics"].items() if k != "tokenize_seconds"} == \
        {k: v for k, v in many.manifest["metrics"].items() if k != "tokenize_seconds"}
