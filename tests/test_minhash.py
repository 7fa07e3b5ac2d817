"""Tests for tasks.dedup.minhash: S-curve, clusters vs scipy, brute-force LSH, hash stability."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components as scipy_components

from tasks.dedup import minhash as mh
from tasks.dedup.minhash import (
    Components,
    collision_probability,
    connected_components,
    lsh_candidate_pairs,
    minhash_signatures,
    shingle_jaccard,
    simplify,
    word_shingle_hashes,
)

M64 = (1 << 64) - 1


# ---------------------------------------------------------------- helpers
def _word(i: int) -> str:
    """Distinct synthetic word for every integer id (base-26 letters)."""
    s = ""
    while True:
        s += chr(97 + i % 26)
        i //= 26
        if i == 0:
            return "q" + s


def _zipf_corpus(rng, n_docs, n_words=60, vocab=500):
    ids = rng.zipf(1.3, size=(n_docs, n_words)) % vocab
    return [" ".join(_word(int(i)) for i in row) for row in ids]


def _edit(rng, text, n_edits, vocab=500):
    words = text.split()
    for _ in range(n_edits):
        pos = int(rng.integers(len(words)))
        words[pos] = _word(int(rng.integers(vocab, 2 * vocab)))
    return " ".join(words)


def _same_partition(a, b) -> bool:
    """Two labelings describe the same partition (label values may differ)."""
    a, b = np.asarray(a), np.asarray(b)
    pairs = np.unique(np.c_[a, b], axis=0)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


def _scipy_labels(n, pairs):
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return scipy_components(graph, directed=False)[1]


def _splitmix(z):
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & M64
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _reference_shingles(text, ngram=5):
    """Pure-Python statement of the documented hash (no numpy), for text without combining marks."""
    words = re.findall(r"\w+", (text or "").lower())
    wh = [_splitmix((sum(c * pow(0x100000001B3, k, 1 << 64) for k, c in enumerate(w.encode()))
                     + len(w.encode())) & M64) for w in words]
    starts = range(len(wh) - ngram + 1) if len(wh) >= ngram else range(min(len(wh), 1))
    out = []
    for s in starts:
        group = wh[s:s + ngram]
        h = group[0]
        for w in group[1:]:
            h = (h * 0x9E3779B97F4A7C15 + w) & M64
        out.append(_splitmix(h ^ len(group)))
    return out


# ---------------------------------------------------------------- S-curve
@pytest.fixture(scope="module")
def planted_pairs():
    """4200 pairs of 100-word documents of globally distinct words; partner B keeps the first m
    words of A and then has fresh words, so the shingle Jaccard spans 0.3..1.0."""
    rng = np.random.default_rng(7)
    n_pairs, length = 4200, 100
    target = rng.uniform(0.3, 1.0, n_pairs)
    shared = np.clip(np.round(2 * 96 * target / (1 + target)).astype(int) + 4, 5, length)
    next_id, docs = 0, []
    for m in shared:
        a = [_word(next_id + k) for k in range(length)]
        b = a[:m] + [_word(next_id + length + k) for k in range(length - m)]
        next_id += 2 * length
        docs += [" ".join(a), " ".join(b)]
    hashes, offsets = word_shingle_hashes(docs)
    pairs = np.c_[np.arange(0, 2 * n_pairs, 2), np.arange(1, 2 * n_pairs, 2)]
    true_j = shingle_jaccard(hashes, offsets, pairs)
    sig = minhash_signatures(hashes, offsets, num_perm=112, seed=3)
    return pairs, true_j, sig


@pytest.mark.parametrize("bands,rows", [(14, 8), (20, 5)])
def test_s_curve(planted_pairs, bands, rows):
    pairs, true_j, sig = planted_pairs
    assert true_j.min() < 0.32 and true_j.max() == 1.0
    cand = lsh_candidate_pairs(sig, bands, rows)
    n = len(sig)
    found = np.isin(pairs[:, 0] * n + pairs[:, 1], cand[:, 0] * n + cand[:, 1])
    labels = connected_components(n, cand)
    assert np.array_equal(found, labels[pairs[:, 0]] == labels[pairs[:, 1]])
    edges = np.arange(0.3, 1.0001, 0.1)
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (true_j >= lo) & ((true_j < hi) | (hi > 1.0))
        assert in_bin.sum() >= 400, (lo, in_bin.sum())
        expected = collision_probability(true_j[in_bin], bands, rows).mean()
        assert abs(found[in_bin].mean() - expected) <= 0.07, (lo, found[in_bin].mean(), expected)
    # words are distinct across pairs, so any other candidate pair is a false collision
    spurious = len(cand) - found.sum()
    assert spurious <= 2, spurious


# ---------------------------------------------------------------- clusters and LSH
def _clustered_corpus(seed, n_base=300, n_clusters=60):
    rng = np.random.default_rng(seed)
    docs = _zipf_corpus(rng, n_base)
    for _ in range(n_clusters):                         # chains of edited copies, sizes 2..5
        src = docs[int(rng.integers(n_base))]
        for _ in range(int(rng.integers(1, 5))):
            src = _edit(rng, src, int(rng.integers(1, 6)))
            docs.append(src)
    return docs


def test_components_match_scipy_oracle():
    docs = _clustered_corpus(11)
    hashes, offsets = word_shingle_hashes(docs)
    sig = minhash_signatures(hashes, offsets, 112, seed=5)
    cand = lsh_candidate_pairs(sig, 14, 8)
    assert len(cand) > 50
    labels = connected_components(len(docs), cand)
    assert _same_partition(labels, _scipy_labels(len(docs), cand))
    # label = smallest index of the component
    for lab in np.unique(labels):
        assert lab == np.flatnonzero(labels == lab).min()


def test_components_random_graph():
    rng = np.random.default_rng(0)
    n = 3000
    pairs = rng.integers(0, n, size=(2500, 2))
    labels = connected_components(n, pairs)
    assert _same_partition(labels, _scipy_labels(n, pairs))
    assert np.array_equal(connected_components(4, np.zeros((0, 2), np.int64)), np.arange(4))


def test_components_fed_in_chunks_equal_one_pass():
    """The stage feeds union-find one edge file at a time: any chunking gives the same labels,
    each the smallest node of its component, also on long chains (the templated-text case)."""
    rng = np.random.default_rng(1)
    n = 5000
    chain = np.c_[np.arange(1000, 1999), np.arange(1001, 2000)][::-1]   # one long path, fed backwards
    pairs = np.concatenate([rng.integers(0, n, size=(3000, 2)), chain])
    rng.shuffle(pairs)
    whole = connected_components(n, pairs)
    union = Components(n)
    for chunk in np.array_split(pairs, 17):
        union.add(chunk)
    assert np.array_equal(union.labels(), whole)
    assert _same_partition(whole, _scipy_labels(n, pairs))
    assert np.all(whole <= np.arange(n)) and np.array_equal(whole[whole], whole)


def _bruteforce_pairs(sig, bands, rows, valid):
    out = set()
    for b in range(bands):
        band = sig[:, b * rows:(b + 1) * rows]
        eq = (band[:, None, :] == band[None, :, :]).all(axis=2) & valid[:, None] & valid[None, :]
        i, j = np.nonzero(np.triu(eq, 1))
        out |= set(zip(i.tolist(), j.tolist()))
    return np.array(sorted(out), np.int64).reshape(-1, 2)


def test_lsh_matches_bruteforce():
    docs = _clustered_corpus(3, n_base=150, n_clusters=40) + ["", "!!", None]
    hashes, offsets = word_shingle_hashes(docs)
    sig = minhash_signatures(hashes, offsets, 120, seed=2)
    valid = np.diff(offsets) > 0
    for bands, rows in [(14, 8), (20, 5), (40, 2)]:     # (40, 2): many low-threshold collisions
        cand = lsh_candidate_pairs(sig, bands, rows, valid=valid)
        assert np.array_equal(cand, _bruteforce_pairs(sig, bands, rows, valid)), (bands, rows)
    assert (cand[:, 0] < cand[:, 1]).all()
    with pytest.raises(ValueError):
        lsh_candidate_pairs(sig, 16, 8)


def test_big_bucket_star_keeps_components():
    rng = np.random.default_rng(4)
    docs = _zipf_corpus(rng, 100) + ["the same text repeated " * 10] * 150
    order = rng.permutation(len(docs))
    docs = [docs[k] for k in order]
    hashes, offsets = word_shingle_hashes(docs)
    sig = minhash_signatures(hashes, offsets, 112, seed=1)
    full = _bruteforce_pairs(sig, 14, 8, np.ones(len(docs), bool))
    star = lsh_candidate_pairs(sig, 14, 8)               # bucket of 150 > 64: star
    assert np.array_equal(lsh_candidate_pairs(sig, 14, 8, max_bucket=1000), full)
    assert len(star) < len(full) and len(full) >= 150 * 149 // 2
    assert _same_partition(connected_components(len(docs), star), _scipy_labels(len(docs), full))


# ---------------------------------------------------------------- hashing
PINNED_TEXT = "The quick brown fox jumps over the lazy dog. Ünïcödé café 東京 2024!"
PINNED = [0x0C2F858553001EE2, 0x6A7E7EB522A2280E, 0x64A49381B4F492E7, 0xF2AE0F115ACAC30F,
          0x571F081B964C6027, 0x6F573841DC471EB5, 0xEC6CF7C19C88F62A, 0xA48F303FD74571D0,
          0xDD916BE910FBC37B]


def test_pinned_hashes():
    hashes, offsets = word_shingle_hashes([PINNED_TEXT])
    assert offsets.tolist() == [0, 9] and hashes.dtype == np.uint64
    assert hashes.tolist() == PINNED
    assert word_shingle_hashes(["Hello world"])[0].tolist() == [0xFA3FA11C1D918BF7]


def test_matches_pure_python_reference(monkeypatch):
    rng = np.random.default_rng(9)
    pieces = ["Ab", "cd_e", "ÄÖü", "naïve", "東京", "x2", "42", "...", ", ", "  ", "\n", "—", "ß", "É"]
    texts = ["".join(rng.choice(pieces, int(rng.integers(0, 40)))) for _ in range(300)] + [None, ""]
    expected = [_reference_shingles(t) for t in texts]
    for chunk in (mh._BYTE_CHUNK, 64):                   # tiny chunks: words across chunk cuts
        monkeypatch.setattr(mh, "_BYTE_CHUNK", chunk)
        hashes, offsets = word_shingle_hashes(texts)
        got = [hashes[offsets[d]:offsets[d + 1]].tolist() for d in range(len(texts))]
        assert got == expected


def test_no_shingle_crosses_documents():
    a, b = "alpha beta gamma delta eps zeta", "eta theta iota kappa lam mu"
    two, off = word_shingle_hashes([a, b])
    assert off.tolist() == [0, 2, 4]
    one, _ = word_shingle_hashes([a + " " + b])
    assert set(two.tolist()) < set(one.tolist()) and len(one) == 8
    assert two.tolist() == word_shingle_hashes([a])[0].tolist() + word_shingle_hashes([b])[0].tolist()
    # adjacent documents never fuse into one word ("foo" + "bar" != "foobar")
    fused, _ = word_shingle_hashes(["foo", "bar"])
    assert fused.tolist() == word_shingle_hashes(["foo"])[0].tolist() + word_shingle_hashes(["bar"])[0].tolist()


def test_short_and_empty_documents():
    texts = ["", None, "  ...!? ", "one", "one two three", "a b c d e", "a b c d e f", "A, b; C. d e"]
    hashes, offsets = word_shingle_hashes(texts)
    assert np.diff(offsets).tolist() == [0, 0, 0, 1, 1, 1, 2, 1]
    assert hashes[offsets[5]] == hashes[offsets[7]]      # lowercased, punctuation ignored
    h3 = hashes[offsets[4]]
    assert h3 not in word_shingle_hashes(["one two three four five"])[0]
    assert word_shingle_hashes(["A b c d e"], lowercase=False)[0][0] != hashes[offsets[5]]
    # combining marks stay inside words (decomposed "café" is one word)
    assert np.diff(word_shingle_hashes(["cafe\u0301 au lait"], ngram=1)[1]).tolist() == [3]
    assert len(word_shingle_hashes([])[0]) == 0 and word_shingle_hashes([])[1].tolist() == [0]
    sig = minhash_signatures(hashes, offsets, 16, seed=0)
    assert (sig[:3] == 0xFFFFFFFF).all() and not (sig[3:] == 0xFFFFFFFF).all(axis=1).any()


def test_simplify_is_datatrove_simplify_text():
    # expected: datatrove 0.10's simplify_text of the same inputs, split at spaces (it turns
    # punctuation into spaces; here punctuation separates words at shingling)
    texts = ["Costs 3.50, or 1,000 in 2024!", "Café naïve ĉu", "snake_case x٣٤y", "v1.2.3 ok", None]
    got = simplify(pc.utf8_lower(pa.array(texts))).to_pylist()
    assert [re.findall(r"\w+", t) for t in got[:-1]] == [
        "costs 0 or 0 in 0".split(), "cafe naive cu".split(), "snake case x0y".split(), "v0 0 ok".split()]
    assert got[-1] is None
    plain = ["Paid 17 dollars on 2024-03-05 for the café", "Paid 23 dollars on 2023-11-30 for the cafe"]
    hashes, offsets = word_shingle_hashes(plain, ngram=2, simplified=True)
    a, b = hashes[offsets[0]:offsets[1]], hashes[offsets[1]:offsets[2]]
    assert a.tolist() == b.tolist()                       # they differ only in numbers and an accent
    hashes, offsets = word_shingle_hashes(plain, ngram=2)
    assert shingle_jaccard(hashes, offsets, np.array([[0, 1]]))[0] < 0.5


def test_list_and_arrow_inputs_agree():
    rng = np.random.default_rng(1)
    texts = _zipf_corpus(rng, 50) + [None, "", "Ünïcödé ok"]
    ref_h, ref_o = word_shingle_hashes(texts)
    padded = pa.array(["x y z w v u"] * 3 + texts, type=pa.string()).slice(3)   # offset != 0
    for arr in (pa.array(texts), pa.array(texts, type=pa.large_string()), padded,
                pa.chunked_array([pa.array(texts[:20]), pa.array(texts[20:])])):
        h, o = word_shingle_hashes(arr)
        assert np.array_equal(h, ref_h) and np.array_equal(o, ref_o)


def test_signatures_deterministic_and_chunk_invariant(monkeypatch):
    rng = np.random.default_rng(2)
    hashes, offsets = word_shingle_hashes(_zipf_corpus(rng, 40, n_words=200) + [""])
    s1 = minhash_signatures(hashes, offsets, 64, seed=123)
    assert s1.dtype == np.uint32 and s1.shape == (41, 64)
    assert np.array_equal(s1, minhash_signatures(hashes.copy(), offsets.copy(), 64, seed=123))
    assert (s1 != minhash_signatures(hashes, offsets, 64, seed=124)).mean() > 0.9
    # the documented formula, computed naively
    g = np.random.default_rng(123)
    a = g.integers(0, 2**64, 64, dtype=np.uint64) | np.uint64(1)
    b = g.integers(0, 2**64, 64, dtype=np.uint64)
    for d in (0, 17, 39):
        x = hashes[offsets[d]:offsets[d + 1], None]
        assert np.array_equal(s1[d], ((x * a + b) >> np.uint64(32)).min(axis=0).astype(np.uint32))
    monkeypatch.setattr(mh, "_SIG_CHUNK_BYTES", 8 * 64 * 37)   # 37 shingles/chunk: docs split
    assert np.array_equal(s1, minhash_signatures(hashes, offsets, 64, seed=123))


def test_minhash_estimates_jaccard():
    rng = np.random.default_rng(5)
    base = [_word(k) for k in range(600)]
    docs, pairs = [], []
    for m in [150, 300, 450] + [300] * 200:             # a few pairs, then 200 for the mean bias
        start = int(rng.integers(0, 150))
        a = base[start:start + 400] if m else base
        b = a[:m] + [_word(10_000 + len(docs) * 1000 + k) for k in range(400 - m)]
        docs += [" ".join(a), " ".join(b)]
        pairs.append((len(docs) - 2, len(docs) - 1))
    pairs = np.array(pairs)
    hashes, offsets = word_shingle_hashes(docs)
    true_j = shingle_jaccard(hashes, offsets, pairs)
    sig = minhash_signatures(hashes, offsets, 256, seed=8)
    est = (sig[pairs[:, 0]] == sig[pairs[:, 1]]).mean(axis=1)
    assert np.all(np.abs(est[:3] - true_j[:3]) <= 0.07), (est[:3], true_j[:3])
    assert abs(est[3:].mean() - true_j[3:].mean()) <= 0.01


def test_shingle_jaccard_matches_python_sets():
    rng = np.random.default_rng(6)
    docs = _zipf_corpus(rng, 30, n_words=30, vocab=40)
    docs += [_edit(rng, d, int(rng.integers(1, 6))) for d in docs] + ["", "one two"]
    hashes, offsets = word_shingle_hashes(docs)
    pairs = np.array([(i, j) for i in range(len(docs)) for j in range(i + 1, len(docs))])

    def shingle_set(text):
        w = re.findall(r"\w+", text.lower())
        return {tuple(w[k:k + 5]) for k in range(len(w) - 4)} if len(w) >= 5 else ({tuple(w)} if w else set())

    sets = [shingle_set(t) for t in docs]
    expected = [len(sets[i] & sets[j]) / len(sets[i] | sets[j]) if sets[i] | sets[j] else 1.0
                for i, j in pairs]
    assert np.allclose(shingle_jaccard(hashes, offsets, pairs), expected)
    assert max(expected) > 0.1                            # the test sees real overlaps


def test_collision_probability():
    assert collision_probability(0.0, 14, 8) == 0.0 and collision_probability(1.0, 14, 8) == 1.0
    s = np.array([0.5, 0.75, 0.9])
    assert np.allclose(collision_probability(s, 14, 8), 1 - (1 - s**8) ** 14)
    assert 0.7 < collision_probability(0.75, 14, 8) < 0.8   # the knee datatrove quotes for 14 x 8
