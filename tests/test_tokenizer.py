"""The tokenizer stage: exact round trips, single-token specials, byte-identical retraining."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tasks.core.stage import StageError, run_stage
from tasks.core.store import Artifact, Store, write_parquet
from tasks.ingest import SCHEMA
from tasks.core.tokens import load_tokenizer, special_ids, tokenizer_path
from tasks.tokenizer import STAGE, TokenizerConfig

SMALL = TokenizerConfig(vocab_size=400)
SNIPPETS = [
    "def f(x):\n    return {'a': [x, x ** 2]}  # comment\n\n\n\tif x:\n\t\tpass\n",
    "for (int i = 0; i < n; ++i) { s += a[i]; }\r\n",
    "Café naïve façade résumé Ångström Øre ß",
    "漢字とかなカナ、한국어 텍스트。中文句子！",
    "emoji 🙂👍🏽🚀 and a family 👨‍👩‍👧 and flags 🇫🇷",
    "שלום مرحبا नमस्ते Привет Γειά",
    "   leading spaces, trailing spaces   ",
    "tabs\t\tand\n\n\n\nnewlines    and     runs",
    "numbers 3.14159 1e-9 0xFF 1,000,000",
    "zero width\u200bjoiner\u200d and nbsp\u00a0here, combining e\u0301",
]
WORDS = "the of and to in is for with on that this by from model data token text".split()


def corpus(n: int = 300, seed: int = 0) -> list[str]:
    """Distinct documents mixing prose, code and the snippets above."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS, rng.integers(5, 60)))
        parts = [words, SNIPPETS[i % len(SNIPPETS)], f"document {i}"]
        rng.shuffle(parts)
        docs.append(("\n" if i % 3 else " ").join(parts))
    return docs


def make_documents(root: Path, texts: list[str], shard_rows: int = 64, ids: list[str] | None = None,
                   key: str = "k") -> Artifact:
    """A fake dedup output: `documents` shards of (id, text, source)."""
    ids = ids or [f"doc-{i:04d}" for i in range(len(texts))]
    out = root / "dedup" / key
    for s in range(0, len(texts), shard_rows):
        rows = {"id": ids[s:s + shard_rows], "text": texts[s:s + shard_rows], "source": ["t"] * len(ids[s:s + shard_rows])}
        write_parquet(pa.table(rows, schema=SCHEMA), out / "documents" / f"part-{s // shard_rows:05d}.parquet")
    files = {f"documents/{p.name}": "" for p in sorted((out / "documents").iterdir())}
    return Artifact(stage="dedup", key=key, path=str(out), manifest={"files": files, "rows": {}})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    docs = make_documents(root / "in", corpus())
    return run_stage(STAGE, SMALL, {"documents": docs}, Store(root / "out")).artifact


def test_round_trip_exact(trained):
    tok = load_tokenizer(trained)
    extra = ["", " ", "  x", "x  ", "\n", "\x00\x01\x7f", "𠀋𪚥 unseen rare CJK", "a<|user|>b<|end|>", "<|bos", "ǅ ﬁ Ⅻ"]
    for text in corpus(60, seed=1) + SNIPPETS + extra:
        ids = tok.encode(text).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
    tok.encode_special_tokens = True  # documents as plain text: special strings are just bytes
    for text in SNIPPETS + extra:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


def test_special_tokens_are_single_ids(trained):
    tok = load_tokenizer(trained)
    ids = special_ids(trained)
    assert list(ids) == SMALL.special_tokens and list(ids.values()) == list(range(len(ids)))
    assert special_ids(tok) == ids
    assert json.loads((Path(trained.path) / "special_tokens.json").read_text()) == ids
    m = trained.manifest["metrics"]
    assert (m["bos_id"], m["pad_id"], m["user_id"], m["assistant_id"], m["end_id"]) == (0, 1, 3, 4, 5)
    for token, i in ids.items():
        assert tok.encode(token).ids == [i]
    chat = tok.encode("<|user|>hi there<|end|><|assistant|>").ids
    assert chat[0] == ids["<|user|>"] and chat[-2:] == [ids["<|end|>"], ids["<|assistant|>"]]
    tok.encode_special_tokens = True
    assert not set(tok.encode("<|user|> <|bos|>").ids) & set(ids.values())


def test_metrics_and_sample(trained):
    m = trained.manifest["metrics"]
    assert m["vocab_size"] == 400 == load_tokenizer(trained).get_vocab_size()
    assert m["train_docs"] + m["heldout_docs"] == m["documents"] == 300 and m["heldout_docs"] >= 1
    assert 1 < m["chars_per_token"] <= m["bytes_per_token"]
    assert m["heldout_tokens"] * m["bytes_per_token"] == pytest.approx(m["heldout_bytes"])


def test_deterministic_bytes(tmp_path, trained):
    texts = corpus()
    ref = (Path(trained.path) / "tokenizer.json").read_bytes()
    # Same documents, other sharding and order: the same sample and byte-identical output.
    perm = np.random.default_rng(5).permutation(len(texts))
    ids = [f"doc-{i:04d}" for i in range(len(texts))]
    shuffled = make_documents(tmp_path / "in", [texts[i] for i in perm], 17, [ids[i] for i in perm])
    again = run_stage(STAGE, SMALL, {"documents": shuffled}, Store(tmp_path / "a")).artifact
    assert (Path(again.path) / "tokenizer.json").read_bytes() == ref
    bigger = run_stage(STAGE, TokenizerConfig(vocab_size=450), {"documents": shuffled}, Store(tmp_path / "b")).artifact
    assert (Path(bigger.path) / "tokenizer.json").read_bytes() != ref
    assert bigger.manifest["metrics"]["vocab_size"] == 450


def test_max_train_chars_cuts_the_sample(tmp_path):
    docs = make_documents(tmp_path / "in", corpus(100))
    out = run_stage(STAGE, TokenizerConfig(vocab_size=300, max_train_chars=5000), {"documents": docs},
                    Store(tmp_path / "out")).artifact
    m = out.manifest["metrics"]
    assert m["train_chars"] == 5000 and m["train_docs"] < 100 - m["heldout_docs"]


@pytest.mark.parametrize("update, setting", [
    ({"vocab_size": 200}, "tokenizer.vocab_size"),
    ({"special_tokens": ["<|bos|>"]}, "tokenizer.special_tokens"),
    ({"special_tokens": ["<|bos|>", "<|pad|>", "<|bos|>"]}, "tokenizer.special_tokens"),
])
def test_bad_settings_name_the_setting(tmp_path, update, setting):
    docs = make_documents(tmp_path / "in", corpus(10))
    with pytest.raises(StageError, match=setting):
        run_stage(STAGE, SMALL.model_copy(update=update), {"documents": docs}, Store(tmp_path / "out"))
    assert not list((tmp_path / "out").rglob("manifest.json"))


def test_tokenizer_path(trained):
    path = Path(tokenizer_path(trained))
    assert path.read_bytes() == (Path(trained.path) / "tokenizer.json").read_bytes()
    assert load_tokenizer(trained.path).to_str() == load_tokenizer(trained).to_str()


def test_numbers_split_into_single_digits(tmp_path, trained):
    """With split_digits (the default) no token holds two digits, even for numbers the corpus repeats
    often enough to merge; without it BPE learns multi-digit tokens from the same documents."""
    numbers = [f"total 1024 and 2048 and 365 days, item {i}" for i in range(300)]
    docs = make_documents(tmp_path / "in", corpus() + numbers)
    tokens = {}
    for split in (True, False):
        art = run_stage(STAGE, TokenizerConfig(vocab_size=400, split_digits=split), {"documents": docs},
                        Store(tmp_path / f"out-{split}")).artifact
        tok = load_tokenizer(art)
        tokens[split] = {t for t in tok.get_vocab() if sum(c.isdigit() for c in t) >= 2}
        text = "Calculate 88 + 94.\nAnswer: 182 and 1024"
        assert tok.decode(tok.encode(text).ids) == text
    assert tokens[True] == set()
    assert {"1024", "2048"} <= {t.lstrip("Ġ") for t in tokens[False]}
