"""The vocabulary stages share: special tokens, tokenizer loading, document hashing, text normalization.

Special tokens take ids 0..k-1 in the tokenizer config's order: `<|bos|>` starts every document,
`<|pad|>` fills the last packed row, and the chat roles `<|system|>`, `<|user|>`, `<|assistant|>`
and `<|end|>` (end of turn) frame SFT, RL and evaluation prompts.

Document hashing: each document gets a 64-bit hash of (seed, id) (`doc_hash`). The tokenizer holds
out the documents whose hash falls in the lowest `heldout_fraction` of the range and pack puts the
lowest `val_fraction` in val (`below_fraction`), so with equal seeds and `val_fraction <=
heldout_fraction` the tokenizer never saw a val document; both take documents in (hash, id) order
(`hash_order`), which depends on ids and the seed only, never on sharding or input order.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from pathlib import Path

import fsspec
import numpy as np
from tokenizers import Tokenizer

from tasks.core.store import Artifact

BOS, PAD, SYSTEM, USER, ASSISTANT, END = "<|bos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = (BOS, PAD, SYSTEM, USER, ASSISTANT, END)
TOKENIZER_FILE = "tokenizer.json"
SPECIAL_FILE = "special_tokens.json"
_SPACE = re.compile(r"\s+")


def normalize(text: str, lowercase: bool = True) -> str:
    """The comparison form of a text (exact dedup, decontamination, prompt dedup): NFC, whitespace
    folded to single spaces and stripped, lowercased unless `lowercase` is False."""
    text = _SPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()
    return text.lower() if lowercase else text


def doc_hash(ids: list[str], seed: int) -> np.ndarray:
    """A stable uint64 per document id: blake2b of (seed, id)."""
    prefix = f"{seed}\0".encode()
    return np.array([int.from_bytes(hashlib.blake2b(prefix + i.encode(), digest_size=8).digest(), "big") for i in ids],
                    dtype=np.uint64)


def below_fraction(hashes: np.ndarray, fraction: float) -> np.ndarray:
    """Mask of documents whose hash lies in the lowest `fraction` of the range; at least one
    (the smallest hash) when there are documents. Growing `fraction` only adds documents."""
    threshold = np.uint64(min(int(fraction * 2.0**64), 2**64 - 1))
    mask = hashes < threshold
    if len(hashes) and not mask.any():
        mask[np.argmin(hashes)] = True
    return mask


def hash_order(hashes: np.ndarray, ids: list[str]) -> np.ndarray:
    """Indices sorted by (hash, id): independent of input order and sharding."""
    return np.lexsort((np.array(ids, dtype=object), hashes)) if len(ids) else np.zeros(0, np.int64)


def _file(artifact_or_dir: Artifact | str | Path, name: str) -> str:
    base = artifact_or_dir.path if isinstance(artifact_or_dir, Artifact) else str(artifact_or_dir)
    return f"{base.rstrip('/')}/{name}"


def _read_text(artifact_or_dir: Artifact | str | Path, name: str) -> str:
    with fsspec.open(_file(artifact_or_dir, name), "r", encoding="utf-8") as f:
        return f.read()


def tokenizer_path(artifact_or_dir: Artifact | str | Path) -> str:
    """Where a tokenizer output's `tokenizer.json` is (a local path for a local store, else a URI)."""
    return _file(artifact_or_dir, TOKENIZER_FILE)


def load_tokenizer(artifact_or_dir: Artifact | str | Path) -> Tokenizer:
    """The trained tokenizer of a tokenizer-stage output (an Artifact, or its directory/URI), or of a
    model directory (training stages copy it beside the weights).

    Special-token strings in the input are matched as special tokens (what chat templates want);
    set `tok.encode_special_tokens = True` to encode them as plain text (pack does, for raw documents).
    """
    return Tokenizer.from_str(_read_text(artifact_or_dir, TOKENIZER_FILE))


def special_ids(source: Artifact | str | Path | Tokenizer) -> dict[str, int]:
    """{special token: id}, from an output (its special_tokens.json) or a loaded Tokenizer."""
    if isinstance(source, Tokenizer):
        return {t.content: i for i, t in sorted(source.get_added_tokens_decoder().items()) if t.special}
    return json.loads(_read_text(source, SPECIAL_FILE))
