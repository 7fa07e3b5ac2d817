"""MinHash-LSH near-duplicate detection in plain numpy (+ pyarrow for UTF-8 lowercasing).

Pipeline (Broder's MinHash, LSH banding as in datatrove and text-dedup):
    word_shingle_hashes -> minhash_signatures -> lsh_candidate_pairs -> connected_components
and optionally shingle_jaccard to verify candidate pairs. The dedup stage runs the same steps out of
core: `band_keys` per shard to disk, `bucket_pairs` per key partition, `Components` over edge files.

Everything is vectorized over a whole shard; the only Python loops run over chunks, over
`ngram`/`rows`, over union-find rounds and over pairs (verification).
All hashes are fixed arithmetic on the UTF-8 bytes, so they are identical across runs,
processes, machines and library versions (no Python `hash()`, no polars/arrow hashing). Only the
word/non-word class of code points comes from the Unicode database of the running Python, so a
code point newly assigned in a later Unicode version could tokenize differently.
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_U64 = np.uint64
_BASE = _U64(0x100000001B3)          # odd multiplier of the per-word polynomial hash (FNV prime)
_BASE_INV = _U64(pow(0x100000001B3, -1, 1 << 64))   # its inverse mod 2^64 (exists: odd)
_SHINGLE_MUL = _U64(0x9E3779B97F4A7C15)  # odd multiplier folding word hashes into a shingle
_BYTE_CHUNK = 1 << 19                # bytes per polynomial-hash chunk (bounds temporaries)
_SIG_CHUNK_BYTES = 8 << 20           # uint64 work block per signature chunk (stays in L3 cache)
_EMPTY = np.uint32(0xFFFFFFFF)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer (in place on a fresh uint64 array): a bijection with full avalanche."""
    z ^= z >> _U64(30)
    z *= _U64(0xBF58476D1CE4E5B9)
    z ^= z >> _U64(27)
    z *= _U64(0x94D049BB133111EB)
    z ^= z >> _U64(31)
    return z


@lru_cache(maxsize=1)
def _word_table() -> np.ndarray:
    """Bool table over all code points: Python's `re` \\w (str.isalnum() or '_') plus Unicode
    marks (M*), as in Unicode TR#18 / the `regex` module, so that words of scripts written with
    combining marks (Devanagari, decomposed accents) are not cut apart. Built once (~50 ms)."""
    cps = np.arange(0x110000, dtype=np.uint32)
    cps[0xD800:0xE000] = 0                            # surrogates never occur in valid UTF-8
    chars = cps.view("<U1")
    table = np.char.isalnum(chars) | (chars == "_")
    # marks live below U+20000 and in U+E0100..E01EF: look up only non-alnum ones there
    cand = np.flatnonzero(~table[:0x20000]).tolist() + list(range(0xE0100, 0xE01F0))
    table[[c for c in cand if unicodedata.category(chr(c))[0] == "M"]] = True
    return table


@lru_cache(maxsize=1)
def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """BASE**k and BASE**-k mod 2^64 for k < n (n a power of two: the cache is rarely rebuilt)."""
    pw, ipw = np.full(n, _BASE), np.full(n, _BASE_INV)
    pw[0] = ipw[0] = 1
    return np.cumprod(pw), np.cumprod(ipw)            # uint64 products wrap = mod 2^64


# numbers in any script, with an optional decimal part (datatrove's NUMBERS_PATTERN, in RE2 syntax)
_NUMBER = r"\p{Nd}+([.,\x{060C}\x{066B}\x{2396}-\x{2398}]\p{Nd}+)?"


def simplify(texts: pa.Array) -> pa.Array:
    """datatrove's `simplify_text` before shingling: every number becomes "0", diacritics are
    stripped (NFD, then nonspacing marks dropped) and "_" separates words; punctuation and
    whitespace already separate words here. Near-copies that differ in numbers or accents then
    share more shingles (datatrove's recall), at the cost of matching templates that differ only in
    their numbers. Vectorized in Arrow's C++ kernels (RE2, utf8proc)."""
    texts = pc.replace_substring_regex(texts, _NUMBER, "0")
    texts = pc.replace_substring_regex(pc.utf8_normalize(texts, "NFD"), r"\p{Mn}+", "")
    return pc.replace_substring(texts, "_", " ")


def _utf8_buffers(texts, lowercase: bool, simplified: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(bytes uint8, doc byte offsets int64 of len n+1) of the (lowercased, simplified) shard, zero-copy."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    if not isinstance(texts, pa.Array):
        texts = pa.array(list(texts), type=pa.large_string())
    if texts.type not in (pa.string(), pa.large_string()):
        texts = texts.cast(pa.large_string())
    if texts.null_count:
        texts = pc.fill_null(texts, "")              # nulls count as empty documents
    if lowercase:
        texts = pc.utf8_lower(texts)                 # Unicode-aware, vectorized in C++
    if simplified:
        texts = simplify(texts)
    _, off_buf, data_buf = texts.buffers()
    off_type = np.int32 if texts.type == pa.string() else np.int64
    offsets = np.frombuffer(off_buf, off_type)[texts.offset:texts.offset + len(texts) + 1].astype(np.int64)
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    return data[offsets[0]:offsets[-1]], offsets - offsets[0]


def _word_spans(data: np.ndarray, doc_off: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Byte [start, end) of every word (maximal run of word characters inside one document)."""
    n = len(data)
    letter = data | np.uint8(0x20)                    # ASCII [A-Za-z0-9_] by arithmetic (no gather)
    letter -= np.uint8(ord("a"))
    is_word = letter < 26
    is_word |= (data - np.uint8(ord("0"))) < 10
    is_word |= data == ord("_")
    lead = np.flatnonzero(data >= 0xC0)               # non-ASCII: decode each code point
    if len(lead):
        b0, b1, b2, b3 = (data[np.minimum(lead + k, n - 1)].astype(np.int64) for k in range(4))
        width = 2 + (b0 >= 0xE0) + (b0 >= 0xF0)
        # decode as if 4 bytes long, then shift out the bytes that belong to the next character
        cp = (((b0 & (0x7F >> width)) << 18) | ((b1 & 0x3F) << 12) | ((b2 & 0x3F) << 6)
              | (b3 & 0x3F)) >> (6 * (4 - width))
        flag = _word_table()[np.minimum(cp, 0x10FFFF)]
        for k in range(4):                            # every byte of the sequence gets its flag
            m = width > k
            is_word[lead[m] + k] = flag[m]
    cont = np.zeros(n, bool)                          # byte continues the word before it ...
    cont[1:] = is_word[1:] & is_word[:-1]
    cont[doc_off[:-1][doc_off[:-1] < n]] = False      # ... unless it starts a document
    last = is_word.copy()                             # last byte of a word: next byte no `cont`
    last[:-1] &= ~cont[1:]
    return np.flatnonzero(is_word & ~cont), np.flatnonzero(last) + 1


def _word_hashes(data: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """64-bit hash per word: sum_k byte_k * BASE**k mod 2^64 from a prefix sum over the byte
    buffer, normalized by BASE**-start, then length-salted and splitmix64-finalized.
    Processed in word-aligned chunks of ~0.5 MiB so that position powers stay small."""
    out = np.empty(len(starts), _U64)
    cuts = np.unique(np.r_[0, np.searchsorted(starts, np.arange(0, len(data), _BYTE_CHUNK)), len(starts)])
    for w0, w1 in zip(cuts[:-1], cuts[1:]):
        lo, hi = starts[w0], ends[w1 - 1]
        pw, ipw = _powers(max(2 * _BYTE_CHUNK, 1 << int(hi - lo).bit_length()))
        prefix = np.zeros(hi - lo + 1, _U64)
        np.cumsum(data[lo:hi] * pw[:hi - lo], out=prefix[1:])
        s, e = starts[w0:w1] - lo, ends[w0:w1] - lo
        out[w0:w1] = (prefix[e] - prefix[s]) * ipw[s] + (e - s).astype(_U64)
    return _splitmix64(out)


def word_shingle_hashes(texts, ngram: int = 5, lowercase: bool = True,
                        simplified: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of the word `ngram`-shingles of every document.

    Returns (hashes uint64, offsets int64 of len n_docs+1): document d owns
    hashes[offsets[d]:offsets[d+1]], one per shingle position (duplicates kept).
    A document with 1..ngram-1 words gets one shingle of all its words; one with none gets none.
    `texts`: list[str] or pyarrow string/large_string array (nulls = empty); `simplified`: the
    words of `simplify(texts)`."""
    data, doc_off = _utf8_buffers(texts, lowercase, simplified)
    starts, ends = _word_spans(data, doc_off)
    word_h = _word_hashes(data, starts, ends)
    word_off = np.searchsorted(starts, doc_off)        # words of doc d: word_off[d]:word_off[d+1]
    n_words = np.diff(word_off)
    n_sh = np.where(n_words >= ngram, n_words - ngram + 1, np.minimum(n_words, 1))
    offsets = np.zeros(len(n_words) + 1, np.int64)
    np.cumsum(n_sh, out=offsets[1:])
    # first word of every shingle, and how many words it spans (ngram, or fewer in short docs)
    first = np.repeat(word_off[:-1] - offsets[:-1], n_sh) + np.arange(offsets[-1])
    length = np.repeat(np.minimum(n_words, ngram), n_sh).astype(_U64)
    # order-sensitive polynomial fold h = w0*M^(L-1) + ... + w(L-1), computed for every word
    # position at once with shifted slices (positions that would cross documents are never used)
    full = word_h[:max(len(word_h) - ngram + 1, 0)].copy()
    for k in range(1, ngram):
        full *= _SHINGLE_MUL
        full += word_h[k:k + len(full)]
    h = full[np.minimum(first, max(len(full) - 1, 0))] if len(full) else np.zeros(len(first), _U64)
    short = np.flatnonzero(length < ngram)              # documents with 1..ngram-1 words
    if len(short):
        hs, fs, ls = word_h[first[short]], first[short], length[short]
        for k in range(1, ngram):
            nxt = hs * _SHINGLE_MUL + word_h[np.minimum(fs + k, len(word_h) - 1)]
            hs = np.where(ls > k, nxt, hs)
        h[short] = hs
    return _splitmix64(h ^ length), offsets


def minhash_signatures(hashes: np.ndarray, offsets: np.ndarray, num_perm: int, seed: int) -> np.ndarray:
    """MinHash signatures uint32 (n_docs, num_perm), h_p(x) = ((a_p*x + b_p) mod 2^64) >> 32
    (multiply-shift, a_p odd). Rows of documents without shingles are all 0xFFFFFFFF.
    min(v >> 32) == min(v) >> 32, so the shift is applied once to the per-document minimum."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**64, num_perm, dtype=_U64) | _U64(1)
    b = rng.integers(0, 2**64, num_perm, dtype=_U64)
    hashes, offsets = np.asarray(hashes, _U64), np.asarray(offsets, np.int64)
    valid = np.flatnonzero(np.diff(offsets) > 0)
    v_start = offsets[valid]                           # strictly increasing
    acc = np.full((len(valid), num_perm), _EMPTY, np.uint32)
    chunk = max(1, _SIG_CHUNK_BYTES // (8 * num_perm))
    work = np.empty((num_perm, chunk), _U64)          # (perm, shingle): reduceat on contiguous rows
    for s in range(int(offsets[0]), int(offsets[-1]), chunk):
        e = min(s + chunk, int(offsets[-1]))
        j0 = np.searchsorted(v_start, s, "right") - 1  # doc holding shingle s (may start earlier)
        j1 = np.searchsorted(v_start, e, "left")
        seg = v_start[j0:j1] - s
        seg[0] = 0
        v = work[:, :e - s]
        np.multiply(a[:, None], hashes[s:e], out=v)
        np.add(v, b[:, None], out=v)
        mins = (np.minimum.reduceat(v, seg, axis=1) >> _U64(32)).astype(np.uint32)
        np.minimum(acc[j0:j1], mins.T, out=acc[j0:j1])  # docs split across chunks merge here
    if len(valid) == len(offsets) - 1:
        return acc
    sig = np.full((len(offsets) - 1, num_perm), _EMPTY, np.uint32)
    sig[valid] = acc
    return sig


def collision_probability(s, bands: int, rows: int):
    """P(two sets of Jaccard s share >= 1 band) = 1 - (1 - s^rows)^bands (the S-curve)."""
    return 1.0 - (1.0 - np.asarray(s, dtype=np.float64) ** rows) ** bands


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One random-like 64-bit key per (document, band) uint64 (n, bands): the band's `rows` values
    folded with a bijective mix, so equal keys mean equal bands (up to 2^-64 collisions)."""
    sig = np.asarray(signatures)
    if sig.shape[1] < bands * rows:
        raise ValueError(f"signatures have {sig.shape[1]} columns < bands*rows = {bands * rows}")
    sig = sig[:, :bands * rows].astype(_U64).reshape(len(sig), bands, rows)
    keys = np.full((len(sig), bands), _U64(0x243F6A8885A308D3))
    for k in range(rows):
        keys = _splitmix64(keys + sig[:, :, k])
    return keys


def bucket_pairs(band: np.ndarray, key: np.ndarray, doc: np.ndarray, max_bucket: int = 64) -> np.ndarray:
    """Candidate pairs int64 (m, 2), (i, j) with i < j, unsorted and possibly repeated: documents
    `doc` that share a bucket (equal `band` and `key`). Buckets larger than `max_bucket` would cost
    O(k^2) pairs, so they emit a star (each member with the bucket's smallest document) instead:
    the connected components are unchanged, only the explicit pair list is thinner."""
    if len(doc) < 2:
        return np.zeros((0, 2), np.int64)
    order = np.lexsort((doc, key, band))              # buckets, members in ascending document order
    b, k, d = band[order], key[order], np.asarray(doc, np.int64)[order]
    new = np.r_[True, (b[1:] != b[:-1]) | (k[1:] != k[:-1])]
    gid = np.cumsum(new) - 1
    gstart = np.flatnonzero(new)
    size = np.diff(np.r_[gstart, len(d)])[gid]
    big = size > max_bucket
    out = [np.zeros((0, 2), np.int64)]
    for dist in range(1, int(size[~big].max(initial=1))):   # all pairs in small buckets
        p = np.flatnonzero(~big[:-dist] & (gid[:-dist] == gid[dist:]))
        out.append(np.c_[d[p], d[p + dist]])
    p = np.flatnonzero(big & ~new)                      # star in big buckets
    out.append(np.c_[d[gstart[gid[p]]], d[p]])
    return np.concatenate(out)


def unique_pairs(pairs: np.ndarray, n_docs: int) -> np.ndarray:
    """Distinct pairs int64 (m, 2) with i < j, sorted."""
    n = np.int64(max(n_docs, 1))
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    code = np.unique(pairs.min(axis=1) * n + pairs.max(axis=1))   # i*n + j, i < j
    return np.c_[code // n, code % n].astype(np.int64)


def lsh_candidate_pairs(signatures: np.ndarray, bands: int, rows: int, valid=None,
                        max_bucket: int = 64) -> np.ndarray:
    """Unique candidate pairs int64 (m, 2), i < j, sorted: documents equal on all `rows` values
    of at least one of `bands` bands (first bands*rows columns), grouped by sorting band keys
    (`band_keys`, `bucket_pairs`). `valid` False rows (no shingles) join no band; default: rows
    not all 0xFFFFFFFF."""
    sig = np.asarray(signatures)
    if valid is None:
        valid = ~np.all(sig == _EMPTY, axis=1)
    docs = np.flatnonzero(valid)
    keys = band_keys(sig[docs], bands, rows)
    band = np.broadcast_to(np.arange(bands, dtype=np.uint8), keys.shape).ravel()
    pairs = bucket_pairs(band, keys.ravel(), np.repeat(docs, bands), max_bucket)
    return unique_pairs(pairs, len(sig))


class Components:
    """Union-find over n nodes in numpy, fed edges in chunks (memory: one int64 per node).

    Every union hooks the larger root under the smaller, so a parent is never larger than its
    child and each root is its component's smallest node. Each `add` repeats: find the roots of
    every edge's ends (pointer chasing, then path compression of those ends), hook each root to
    the smallest root it meets (`np.minimum.at`), until both ends of every edge share a root."""

    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)

    def _roots(self, x: np.ndarray) -> np.ndarray:
        p = self.parent
        r = p[x]
        while not np.array_equal(up := p[r], r):
            r = up
        p[x] = r                                         # compress the paths we walked from x
        return r

    def add(self, pairs: np.ndarray) -> None:
        pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
        u, v = pairs[:, 0], pairs[:, 1]
        while len(u):
            ru, rv = self._roots(u), self._roots(v)
            apart = ru != rv
            u, v, ru, rv = u[apart], v[apart], ru[apart], rv[apart]
            np.minimum.at(self.parent, np.maximum(ru, rv), np.minimum(ru, rv))

    def labels(self) -> np.ndarray:
        """Component label int64 per node = smallest node index in its component."""
        p = self.parent
        while not np.array_equal(up := p[p], p):
            p = up
        self.parent = p
        return p.copy()


def connected_components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Component label int64 per node = smallest node index in its component."""
    components = Components(n)
    components.add(pairs)
    return components.labels()


def shingle_jaccard(hashes: np.ndarray, offsets: np.ndarray, pairs: np.ndarray,
                    already_sets: bool = False) -> np.ndarray:
    """Exact Jaccard of the shingle SETS of each pair (float64; two empty sets give 1.0).
    already_sets: each document's hashes are unique already (used as they are, no copies)."""
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    docs = np.unique(pairs)
    unique = (lambda a: a) if already_sets else np.unique
    sets = {d: unique(hashes[offsets[d]:offsets[d + 1]]) for d in docs.tolist()}
    out = np.empty(len(pairs), np.float64)
    for k, (i, j) in enumerate(pairs.tolist()):
        inter = len(np.intersect1d(sets[i], sets[j], assume_unique=True))
        union = len(sets[i]) + len(sets[j]) - inter
        out[k] = inter / union if union else 1.0
    return out
