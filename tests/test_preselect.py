"""PreSelect: bits per character against an explicit loop, concordance and Spearman on hand
tables, labels, AUC, the fastText classifier on a planted signal, and the stage end to end."""

from __future__ import annotations

import math
from itertools import combinations

import fasttext
import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import torch
from scipy.stats import spearmanr
from tokenizers import pre_tokenizers, trainers

from tasks import preselect as S
from tasks.core.model import GPT, ModelConfig, save_model
from tasks.preselect.scoring import (
    auc,
    bits_per_char,
    comparable_pairs,
    document_nll,
    linear_correlation,
    pairwise_concordance,
    pick_labels,
    rank_correlation,
)
from tasks.core.stage import StageError, run_stage
from tasks.core.store import Artifact, Store, write_parquet
from tasks.ingest import SCHEMA
from tasks.tokenizer import TokenizerConfig, new_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------
# bits per character


def explicit_nll(model: GPT, ids: list[int]) -> float:
    """One forward per predicted token over its window's prefix: no batching, no padding."""
    L, total = model.dims.max_seq_len, 0.0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, L):
            for j in range(s, min(s + L, len(ids) - 1)):
                logits = model(torch.tensor([ids[s:j + 1]]))[0, -1]
                total -= torch.log_softmax(logits.double(), -1)[ids[j + 1]].item()
    return total


def test_bits_per_char_matches_an_explicit_loop():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, depth=1, width=32, max_seq_len=8)).eval()
    rng = np.random.default_rng(0)
    docs = [[0] + rng.integers(1, 50, n).tolist() for n in (0, 4, 8, 9, 23, 16)]  # window edges: 8, 9, 16 predictions
    chars = [3, 10, 17, 20, 51, 40]
    bpc = bits_per_char(model, docs, chars, batch_size=3)
    want = [explicit_nll(model, d) / (c * math.log(2)) for d, c in zip(docs, chars)]
    assert bpc == pytest.approx(want, rel=1e-5)
    assert bpc[0] == 0.0  # only the BOS: nothing predicted
    assert np.isnan(bits_per_char(model, [[0, 1]], [0])[0])
    # batching does not change the sums (beyond float noise)
    assert document_nll(model, docs, batch_size=1) == pytest.approx(document_nll(model, docs, batch_size=64), rel=1e-5)


# ------------------------------------------------------------------------------------------
# predictive strength, labels, AUC


def test_concordance_on_a_hand_table():
    scores = [0.1, 0.5, 0.5]  # models 1 and 2 tie: only pairs (0,1) and (0,2) count
    losses = [[3, 2, 1], [1, 2, 3], [2, 2, 1], [2, 1, 3], [1, 1, 1]]
    assert comparable_pairs(scores) == 2
    assert pairwise_concordance(losses, scores).tolist() == [2, 0, 1, 1, 0]  # equal losses never agree
    assert pairwise_concordance([[3, 2, 1], [1, 2, 3], [2, 1, 3]], [1, 2, 3]).tolist() == [3, 0, 1]


def test_concordance_and_spearman_match_brute_force():
    rng = np.random.default_rng(1)
    scores = np.array([0.2, 0.5, 0.5, 0.9, 0.1])
    losses = rng.integers(0, 4, (200, 5)).astype(float)  # many ties
    brute = [sum((scores[i] - scores[j]) * (row[i] - row[j]) < 0 for i, j in combinations(range(5), 2)) for row in losses]
    assert pairwise_concordance(losses, scores).tolist() == brute
    rho = rank_correlation(losses, scores)
    for row, r in zip(losses, rho):
        want = spearmanr(-row, scores).statistic
        assert r == pytest.approx(0.0 if np.isnan(want) else want, abs=1e-12)
    assert rank_correlation([[1.0, 1.0, 1.0, 1.0, 1.0]], scores).tolist() == [0.0]
    assert rank_correlation([[3.0, 2.0, 1.0]], [1.0, 2.0, 3.0]).tolist() == [pytest.approx(1.0)]


def test_pearson_matches_numpy():
    rng = np.random.default_rng(2)
    scores = np.array([0.2, 0.5, 0.4, 0.9])
    losses = rng.random((50, 4))
    r = linear_correlation(losses, scores)
    assert r == pytest.approx([np.corrcoef(-row, scores)[0, 1] for row in losses], abs=1e-12)
    assert linear_correlation([[1.0, 1.0, 1.0, 1.0]], scores).tolist() == [0.0]  # constant: no ordering
    assert linear_correlation([[3.0, 2.0, 1.0, 0.0]], [1.0, 2.0, 3.0, 4.0]).tolist() == [pytest.approx(1.0)]


def test_pick_labels_top_and_bottom_with_ties_by_id():
    strength = [3, 1, 2, 2, 0, 2]
    ids = ["f", "e", "d", "c", "b", "a"]
    pos, neg = pick_labels(strength, 0.34, ids)  # floor(0.34 * 6) = 2 each
    # order (strength desc, id asc): f(0) a(5) c(3) d(2) e(1) b(4)
    assert pos.tolist() == [0, 5] and neg.tolist() == [4, 1]
    pos, neg = pick_labels([1.0] * 5, 0.5, list("edcba"))  # all tied: at most n // 2 each, never overlapping
    assert pos.tolist() == [4, 3] and neg.tolist() == [0, 1]


def test_auc_by_hand():
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auc([0.5, 0.5, 0.9], [1, 0, 1]) == 0.75  # a tie counts half
    assert math.isnan(auc([0.1, 0.2], [1, 1]))


# ------------------------------------------------------------------------------------------
# the classifier


def planted_corpus(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Random-word documents; the positive half also uses words from a small marker vocabulary."""
    rng = np.random.default_rng(seed)
    common = [f"w{i}" for i in range(2000)]
    marker = [f"m{i}" for i in range(30)]
    texts, positive = [], np.arange(n) % 2 == 1
    for p in positive:
        ws = list(rng.choice(common, 60))
        if p:
            ws += list(rng.choice(marker, 6))
            rng.shuffle(ws)
        texts.append(" ".join(ws))
    return texts, positive


def test_classifier_separates_a_planted_signal(tmp_path):
    """Default settings (epoch 25, lr 0.5): PreSelect's epoch 3, lr 0.1 reach only ~0.7 AUC on 300 lines."""
    texts, positive = planted_corpus(400, 0)
    train, held = slice(0, 300), slice(300, 400)
    path = S.train_classifier(texts[train], positive[train].tolist(), tmp_path / "c.bin")
    p = S.predict_positive(fasttext.load_model(str(path)), texts[held])
    assert auc(p, positive[held]) > 0.9
    again = S.train_classifier(texts[train], positive[train].tolist(), tmp_path / "d.bin")
    assert again.read_bytes() == path.read_bytes()  # thread=1 + seed, a fresh process per training


# ------------------------------------------------------------------------------------------
# the stage


SENTENCES = ["the cat sat on the mat", "def add(a, b):\n    return a + b", "What is 3 + 4? Answer: 7",
             "import os\nprint(os.getcwd())", "a quick brown fox jumps over the lazy dog"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Documents (3 shards, one empty document), a tokenizer output and three random-init references."""
    root = tmp_path_factory.mktemp("preselect")
    store = Store(root / "store")
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(SENTENCES, rng.integers(1, 6))) + f" #{i}" for i in range(47)] + [""]
    ids = [f"doc{i:03d}" for i in range(len(texts))]
    out = root / "store" / "dedup" / "k"
    for s in range(0, len(texts), 20):
        write_parquet(pa.table({"id": ids[s:s + 20], "text": texts[s:s + 20], "source": ["t"] * len(texts[s:s + 20])},
                               schema=SCHEMA), out / "documents" / f"part-{s // 20:05d}.parquet")
    docs = Artifact(stage="dedup", key="k", path=str(out),
                    manifest={"files": {f"documents/{p.name}": "" for p in sorted((out / "documents").iterdir())}})

    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=300, min_frequency=2, special_tokens=TokenizerConfig().special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES * 3, trainer)
    scratch = store.scratch("tokenizer")
    tok.save(str(scratch / "tokenizer.json"))
    (scratch / "special_tokens.json").write_text('{"<|bos|>": 0, "<|pad|>": 1}')
    tokenizer = store.commit(scratch, "tokenizer", "tok", {"stage": "tokenizer"})

    refs, models = {}, []
    for i, val_loss in enumerate([3.0, 2.5, 2.0]):
        torch.manual_seed(i)
        gpt = GPT(ModelConfig(vocab_size=tok.get_vocab_size(), depth=1, width=32, max_seq_len=16)).eval()
        scratch = store.scratch("pretrain")
        save_model(gpt, scratch / "model")
        if i == 2:  # a reference carrying its own tokenizer (what training stages write)
            tok.save(str(scratch / "model" / "tokenizer.json"))
        refs[f"ref_{i}"] = store.commit(scratch, "pretrain", f"m{i}", {"stage": "pretrain", "metrics": {"val_loss": val_loss}})
        models.append(gpt)
    return {"store": store, "docs": docs, "tokenizer": tokenizer, "refs": refs, "models": models, "tok": tok,
            "texts": dict(zip(ids, texts))}


CFG = S.PreselectConfig(benchmark="val_loss", strength="concordance", sample_docs=40, max_chars=60, label_fraction=0.25,
                        heldout_fraction=0.2, bucket=1000, dim=16, device="cpu")


def run(env, cfg=CFG, store=None, **extra):
    inputs = {"documents": env["docs"], "tokenizer": env["tokenizer"], **env["refs"], **extra}
    return run_stage(S.STAGE, cfg, inputs, store or env["store"], force=True).artifact


def table(art, name) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(f) for f in art.files(name)])


def test_preselect_stage_end_to_end(env, tmp_path):
    art = run(env)
    sample = table(art, "sample")
    # the 40 non-empty documents of lowest hash, by id; their first 60 characters
    assert len(sample) == 40 and sample["doc_id"].to_list() == sorted(sample["doc_id"])
    assert "doc047" not in sample["doc_id"].to_list()  # the empty one is never sampled
    assert sample["chars"].to_list() == [min(60, len(env["texts"][d])) for d in sample["doc_id"]]
    # bpc of each reference, recomputed by hand
    tok = env["tok"]
    tok.encode_special_tokens = True
    texts = [env["texts"][d][:60] for d in sample["doc_id"]]
    docs = [[0, *tok.encode(t).ids] for t in texts]
    for i, gpt in enumerate(env["models"]):
        assert sample[f"bpc_ref_{i}"].to_numpy() == pytest.approx(bits_per_char(gpt, docs, [len(t) for t in texts]), rel=1e-5)
    bpc = sample.select([f"bpc_ref_{i}" for i in range(3)]).to_numpy()
    assert sample["strength"].to_numpy() == pytest.approx(pairwise_concordance(bpc, [-3.0, -2.5, -2.0]) / 3)
    # labels: 10 positives, 10 negatives; no negative is stronger than a positive; 2 of each held out
    labels = sample["label"].value_counts().sort("label")
    assert dict(labels.iter_rows()) == {None: 20, "neg": 10, "pos": 10}
    pos, neg = sample.filter(pl.col("label") == "pos"), sample.filter(pl.col("label") == "neg")
    assert pos["strength"].min() >= neg["strength"].max()
    assert dict(sample.group_by("label", "split").len().filter(pl.col("split") == "heldout").select("label", "len").iter_rows()) \
        == {"pos": 2, "neg": 2}

    scores = table(art, "scores")
    assert scores["doc_id"].to_list() == list(env["texts"])  # every document, in input order
    assert scores["chars"].to_list() == [len(t) for t in env["texts"].values()]
    assert ((scores["preselect_score"] >= 0) & (scores["preselect_score"] <= 1)).all()
    assert [f.rsplit("/", 1)[-1] for f in art.files("scores")] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    clf = fasttext.load_model(f"{art.path}/classifier.bin")
    first = S.classifier_text(env["texts"]["doc000"], 60)
    assert scores["preselect_score"][0] == pytest.approx(S.predict_positive(clf, [first])[0])

    m = art.manifest["metrics"]
    assert (m["sample_docs"], m["positives"], m["negatives"], m["refs"], m["comparable_pairs"]) == (40, 10, 10, 3, 3)
    assert (m["train_examples"], m["heldout_examples"]) == (16, 4)
    assert 0 <= m["heldout_auc"] <= 1
    assert [m[f"bpc.ref_{i}"] for i in range(3)] == pytest.approx(bpc.mean(0).tolist())
    assert [m[f"benchmark.ref_{i}"] for i in range(3)] == [-3.0, -2.5, -2.0]
    again = run(env, store=Store(tmp_path / "again"))
    assert again.manifest["files"] == art.manifest["files"]  # same bytes, classifier included


def test_preselect_benchmark_inputs_and_errors(env):
    evals = {f"eval_ref_{i}": Artifact(stage="eval", key=f"e{i}", path="-", manifest={
        "metrics": {"pass_at_1": p}, "inputs": {"model": {"stage": "pretrain", "key": f"m{i}"}}})
        for i, p in enumerate([0.1, 0.3, 0.2])}
    cfg = CFG.model_copy(update={"benchmark": "eval_pass_at_1", "strength": "spearman"})
    assert S.benchmark_scores(cfg, {**env["refs"], **evals}, 3).tolist() == [0.1, 0.3, 0.2]
    with pytest.raises(StageError, match="needs input 'eval_ref_1'"):
        S.benchmark_scores(cfg, {**env["refs"], "eval_ref_0": evals["eval_ref_0"]}, 3)
    swapped = {**evals, "eval_ref_0": evals["eval_ref_1"]}
    with pytest.raises(StageError, match="eval_ref_0 evaluated model m1, not ref_0"):
        S.benchmark_scores(cfg, {**env["refs"], **swapped}, 3)
    flat = {k: v.model_copy(update={"manifest": {"metrics": {"pass_at_1": 0.0}}}) for k, v in evals.items()}
    with pytest.raises(StageError, match="same eval_pass_at_1"):
        S.benchmark_scores(cfg, {**env["refs"], **flat}, 3)
    with pytest.raises(StageError, match="unknown input 'ref0'"):
        S.reference_count({"documents": env["docs"], "ref0": env["refs"]["ref_0"]})
    with pytest.raises(StageError, match="K >= 2"):
        S.reference_count({"documents": env["docs"], "ref_0": env["refs"]["ref_0"], "ref_2": env["refs"]["ref_2"]})
    art = run(env, cfg, **evals)
    sample = table(art, "sample")
    bpc = sample.select([f"bpc_ref_{i}" for i in range(3)]).to_numpy()
    assert sample["strength"].to_numpy() == pytest.approx(rank_correlation(bpc, [0.1, 0.3, 0.2]))


def test_target_bpc_benchmark(env, tmp_path):
    """benchmark target_bpc: each reference's total bits / total characters on the target prompts."""
    from tasks.prompts import SCHEMA as PROMPTS

    rows = [{"id": f"p{i}", "task": "t", "difficulty": "{}", "question": f"What is {i} + {i}?", "answer": str(2 * i),
             "solution": None, "metadata": "{}"} for i in range(12)]
    out = tmp_path / "prompts"
    write_parquet(pa.Table.from_pylist(rows, schema=PROMPTS), out / "train" / "part-00000.parquet")
    target = Artifact(stage="prompts", key="p", path=str(out), manifest={"files": {"train/part-00000.parquet": ""}})
    cfg = CFG.model_copy(update={"benchmark": "target_bpc", "strength": "pearson", "target_prompts": 5})
    texts = S.target_texts(cfg, {"target": target})
    assert len(texts) == 5 and all(t.startswith("What is ") and "\nAnswer: " in t for t in texts)
    assert texts == S.target_texts(cfg, {"target": target})
    art = run(env, cfg, target=target)
    m = art.manifest["metrics"]
    tok = env["tok"]
    tok.encode_special_tokens = True
    chars = np.array([len(t) for t in texts])
    for i, gpt in enumerate(env["models"]):
        bpc = bits_per_char(gpt, [[0, *tok.encode(t).ids] for t in texts], chars)
        assert m[f"target_bpc.ref_{i}"] == pytest.approx((bpc * chars).sum() / chars.sum(), rel=1e-5)
        assert m[f"benchmark.ref_{i}"] == -m[f"target_bpc.ref_{i}"]
    sample = table(art, "sample")
    bpc = sample.select([f"bpc_ref_{i}" for i in range(3)]).to_numpy()
    assert sample["strength"].to_numpy() == pytest.approx(linear_correlation(bpc, [m[f"benchmark.ref_{i}"] for i in range(3)]))
    with pytest.raises(StageError, match="target_bpc needs input 'target'"):
        run(env, cfg)
