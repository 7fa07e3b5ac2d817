"""PreSelect scorer: learn which documents "predict" model ability, then score every document.

"The Data That Predicts Is the Data That Teaches" (PreSelect). Inputs:
- `documents`: a documents output (`documents/part-*.parquet`: id, text, ...), e.g. dedup,
  decontaminate or quality.
- `ref_0`, `ref_1`, ... (at least two): model-stage outputs (`model/` with model.safetensors
  and config.json) of different ability.
- the benchmark score of each reference (config `benchmark`), read from manifests:
  `eval_pass_at_1` = metric `pass_at_1` of input `eval_ref_<i>` (an eval-stage output of
  ref_i; checked to be of that model when its manifest says), the paper's choice of a
  downstream benchmark; `val_loss` / `val_bpb` = that metric of ref_i's own manifest,
  negated (lower loss = better). Use val_bpb across tokenizers; val_loss only when the
  references share a tokenizer and a validation set (e.g. pretrain checkpoints);
  `target_bpc` = bits per character of each reference on a target text set, negated: the
  `target_prompts` training prompts of lowest hash in input `target` (a prompts output),
  each rendered as question + "\nAnswer: " + answer (`target_text`), total bits over total
  characters. Pretrained-only small models all score 0 pass@1 on the reasoning eval, so this
  is the default pipeline's benchmark: how well a model predicts the task text.
- `tokenizer` (optional): a tokenizer output, used for a reference whose `model/` has no
  `tokenizer.json` (training stages copy theirs there; a reference's own tokenizer wins,
  so references with different tokenizers are each scored with theirs).

Steps: sample `sample_docs` non-empty documents (the lowest doc_hash(seed, id): independent of
sharding); bits per character of each one's first `max_chars` characters under each
reference (tasks.preselect.scoring); predictive strength per document = the fraction of
comparable reference pairs whose loss order agrees with the benchmark order
(`concordance`, the public code), Spearman(-bpc, score) (`spearman`) or Pearson(-bpc, score)
(`pearson`: continuous, so K = 3-4 references still rank documents without mass ties); positives = the
`label_fraction` strongest, negatives as many of the weakest (ties by id). The labeled
documents are split per class by a second hash: `heldout_fraction` of each class is held
out and the classifier's AUC on it is a metric; a fastText classifier is trained on the
rest (word bigrams, softmax, thread 1 and a seed) and scores every document shard by
shard: `preselect_score` = P(positive) of its first `max_chars` characters, whitespace
folded to single spaces (fastText reads one line per example).

Outputs: `scores` (doc_id, preselect_score, chars: one shard per input shard, same names),
`sample` (doc_id, chars, bpc_ref_<i>..., strength, label pos/neg/null, split
train/heldout/null), `classifier.bin` (fastText's binary format, not a pickle; load with
`fasttext.load_model`).

fastText settings: PreSelect's public ones are epoch 3, lr 0.1, wordNgrams 2. They need many
labels: measured on a planted marker vocabulary (tests/test_preselect.py's corpus), they reach
held-out AUC 0.73 with 1000 training lines and 0.97 with 4000, every probability within 3e-5
of 0.5. The default sample here labels 1000 documents (800 trained on), so the defaults are
fastText's small-data regime, epoch 25 and lr 0.5 (AUC 1.0 from 300 lines); set epoch 3 and
lr 0.1 for paper-scale label sets.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import fsspec
import numpy as np
import polars as pl
import pyarrow.compute as pc
from pydantic import Field
from tokenizers import Tokenizer

from tasks.core.base import log
from tasks.core.chat import answer_line
from tasks.core.outputs import document_shards, local_model_dir, model_dir
from tasks.preselect.scoring import (
    auc,
    bits_per_char,
    comparable_pairs,
    linear_correlation,
    pairwise_concordance,
    pick_labels,
    rank_correlation,
)
from tasks.core.rollout import load_policy, resolve_device
from tasks.core.settings import Device, device_setting
from tasks.core.stage import Stage, StageConfig, StageContext, StageError
from tasks.core.store import Artifact, read_table, write_parquet
from tasks.core.tokens import BOS, TOKENIZER_FILE, doc_hash, hash_order, load_tokenizer, special_ids

if TYPE_CHECKING:  # torch comes with the reference models (load_reference): the config imports without it
    import torch

VERSION = 1
POS, NEG = "__label__pos", "__label__neg"
_REF = re.compile(r"(eval_)?ref_(\d+)$")
_SPACE = re.compile(r"\s+")
# fastText's trainer keeps state between trainings in one process: measured here, a second
# training with identical settings sometimes ends in "Encountered NaN" or other weights,
# while the first in a fresh interpreter is byte-reproducible. So each training is a child process.
_TRAIN = ("import fasttext, json, sys; a = json.loads(sys.argv[1]); "
          "fasttext.train_supervised(**a).save_model(sys.argv[2])")


class PreselectConfig(StageConfig):
    benchmark: Literal["eval_pass_at_1", "val_loss", "val_bpb", "target_bpc"] = Field(
        "target_bpc", description="each reference's score: eval_ref_<i>'s pass_at_1, -(ref_<i>'s val_loss/val_bpb), "
                                      "or -(its bits per character on the target prompts)")
    target_prompts: int = Field(500, ge=1, description="target_bpc: this many training prompts of input 'target' (lowest hash)")
    strength: Literal["concordance", "spearman", "pearson"] = Field(
        "pearson", description="agreement of a document's losses with the benchmark: pair count, rank or linear correlation")
    sample_docs: int = Field(1500, ge=4, description="documents scored by the references (the expensive part)")
    max_chars: int = Field(2000, ge=1, description="a document's first max_chars characters stand for it (bpc and classifier)")
    label_fraction: float = Field(0.25, gt=0, le=0.5, description="positives = this share of the sample; as many negatives")
    heldout_fraction: float = Field(0.2, ge=0, lt=1, description="share of each class held out to measure the classifier's AUC")
    epoch: int = Field(25, ge=1, description="fastText epochs (PreSelect's public setting: 3, for far more labels)")
    lr: float = Field(0.5, gt=0, description="fastText learning rate (PreSelect's public setting: 0.1)")
    word_ngrams: int = Field(2, ge=1, description="fastText word n-grams (PreSelect: 2)")
    dim: int = Field(64, ge=1, description="fastText vector size (smaller than its 100: our label sets are small)")
    bucket: int = Field(100_000, ge=1, description="fastText n-gram hash buckets (its 2M would make a ~800 MB file)")
    batch_size: int = Field(16, ge=1, description="reference windows per forward pass")
    device: Device = device_setting()
    seed: int = Field(0, description="seed of the sample and split hashes and of fastText")


# ---------------------------------------------------------------------------------------
# Inputs


def reference_count(inputs: dict[str, Artifact]) -> int:
    """K, checking the input names: documents, tokenizer, ref_0..ref_{K-1}, eval_ref_<i>."""
    refs, evals = set(), set()
    for name in inputs:
        m = _REF.match(name)
        if m:
            (evals if m.group(1) else refs).add(int(m.group(2)))
        elif name not in ("documents", "tokenizer", "target"):
            raise StageError(f"preselect: unknown input {name!r} (documents, tokenizer, target, ref_<i>, eval_ref_<i>)")
    k = len(refs)
    if refs != set(range(k)) or k < 2:
        raise StageError(f"preselect: need inputs ref_0..ref_<K-1>, K >= 2; got {sorted(refs)}")
    if evals - refs:
        raise StageError(f"preselect: input eval_ref_{min(evals - refs)} has no ref_{min(evals - refs)}")
    return k


def benchmark_scores(cfg: PreselectConfig, inputs: dict[str, Artifact], k: int,
                     target_bpc: np.ndarray | None = None) -> np.ndarray:
    """Each reference's score, higher = better (for target_bpc: -target_bpc, measured by the caller)."""
    if cfg.benchmark == "target_bpc":
        return distinct_scores(cfg, -np.asarray(target_bpc, np.float64))
    scores = []
    for i in range(k):
        if cfg.benchmark == "eval_pass_at_1":
            name, metric, sign = f"eval_ref_{i}", "pass_at_1", 1.0
        else:
            name, metric, sign = f"ref_{i}", cfg.benchmark, -1.0
        art = inputs.get(name)
        if art is None:
            raise StageError(f"preselect: benchmark {cfg.benchmark} needs input {name!r}"
                             f"{' (an eval output of ref_%d)' % i if name.startswith('eval') else ''}")
        of = art.manifest.get("inputs", {}).get("model", {}).get("key")
        if name.startswith("eval") and of is not None and of != inputs[f"ref_{i}"].key:
            raise StageError(f"preselect: {name} evaluated model {of}, not ref_{i} ({inputs[f'ref_{i}'].key})")
        value = art.manifest.get("metrics", {}).get(metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise StageError(f"preselect: input {name!r} ({art.stage}/{art.key}) has no finite metric {metric!r}")
        scores.append(sign * float(value))
    return distinct_scores(cfg, np.array(scores))


def distinct_scores(cfg: PreselectConfig, scores: np.ndarray) -> np.ndarray:
    if comparable_pairs(scores) == 0:
        raise StageError(f"preselect: every reference has the same {cfg.benchmark} ({scores[0]:g}): "
                         "nothing to predict; use references of different ability or another benchmark")
    return scores


def target_text(row: dict) -> str:
    """A target prompt as text: the question and its answer, as a document would state them."""
    return f"{row['question']}\n{answer_line(row['answer'])}"


def target_texts(cfg: PreselectConfig, inputs: dict[str, Artifact], split: str = "train") -> list[str]:
    """The target_prompts prompts of lowest hash in a split of input 'target' (independent of task order), as text."""
    if "target" not in inputs:
        raise StageError("preselect: benchmark target_bpc needs input 'target' (a prompts output)")
    files = inputs["target"].files(split)
    if not files:
        raise StageError(f"preselect: input 'target' ({inputs['target'].key}) has no {split}/*.parquet shards")
    rows = [r for f in files for r in read_table(f, columns=["id", "question", "answer"]).to_pylist()]
    ids = [r["id"] for r in rows]
    order = hash_order(doc_hash(ids, cfg.seed), ids)[: cfg.target_prompts]
    return [target_text(rows[i]) for i in order]


def corpus_bpc(model, tok: Tokenizer, texts: list[str], batch_size: int, name: str) -> float:
    """Total bits over total characters of texts under one model (e.g. a reference on the target)."""
    chars = np.array([len(t) for t in texts], np.float64)
    return float((reference_bpc(model, tok, texts, batch_size, name) * chars).sum() / chars.sum())


def load_reference(art: Artifact, tokenizer: Artifact | None, device, name: str) -> tuple[torch.nn.Module, Tokenizer]:
    """(model in eval mode, its tokenizer encoding special-token strings as plain text)."""
    from tasks.core.model import CONFIG, load_model

    directory = model_dir(art)
    fs, path = fsspec.core.url_to_fs(directory)
    if not fs.exists(f"{path}/{CONFIG}"):
        raise StageError(f"preselect: input {name!r} has no model/{CONFIG} ({directory})")
    if fs.exists(f"{path}/{TOKENIZER_FILE}"):
        model, tok = load_policy(art, device)
    elif tokenizer is not None:
        model, tok = load_model(local_model_dir(art), device).eval(), load_tokenizer(tokenizer)
    else:
        raise StageError(f"preselect: {name} has no model/tokenizer.json; give a 'tokenizer' input")
    tok.encode_special_tokens = True  # documents are plain text (pack does the same)
    return model, tok


# ---------------------------------------------------------------------------------------
# Sampling and reference losses


def _shard_index(path: str, seed: int) -> dict:
    table = read_table(path, columns=["id", "text"])
    ids = table["id"].to_pylist()
    return {"id": ids, "hash": doc_hash(ids, seed), "chars": pc.utf8_length(table["text"]).to_numpy().astype(np.int64)}


def sample_texts(files: list[str], parts: list[dict], n: int, max_chars: int) -> tuple[list[str], list[str]]:
    """(ids sorted, their texts cut to max_chars) of the n non-empty documents of lowest hash."""
    ids = [i for p in parts for i in p["id"]]
    hashes = np.concatenate([p["hash"] for p in parts])
    chars = np.concatenate([p["chars"] for p in parts])
    order = hash_order(hashes, ids)
    chosen = {ids[i] for i in order[chars[order] > 0][:n]}
    texts: dict[str, str] = {}
    for path in files:
        table = read_table(path, columns=["id", "text"])
        for doc, text in zip(table["id"].to_pylist(), table["text"].to_pylist()):
            if doc in chosen:
                texts[doc] = text[:max_chars]
    picked = sorted(texts)
    return picked, [texts[d] for d in picked]


def reference_bpc(model, tok: Tokenizer, texts: list[str], batch_size: int, name: str) -> np.ndarray:
    bos = special_ids(tok).get(BOS)
    if bos is None:
        raise StageError(f"preselect: the tokenizer of {name} has no {BOS} token")
    docs = [[bos, *e.ids] for e in tok.encode_batch_fast(texts)]
    top = max(max(d) for d in docs)
    if top >= model.dims.vocab_size:
        raise StageError(f"preselect: {name}'s tokenizer gives id {top} >= its model's vocab_size {model.dims.vocab_size}")
    return bits_per_char(model, docs, [len(t) for t in texts], batch_size)


# ---------------------------------------------------------------------------------------
# The classifier


def classifier_text(text: str, max_chars: int) -> str:
    """What fastText sees of a document: its first max_chars characters on one line."""
    return _SPACE.sub(" ", text[:max_chars]).strip()


def train_classifier(texts: list[str], positive: list[bool], path: Path, cfg: PreselectConfig | None = None) -> Path:
    """Train a fastText pos/neg classifier on (one-line) texts in this order with cfg's fastText
    settings (default: PreselectConfig()); save it at `path`."""
    cfg = cfg or PreselectConfig()
    with tempfile.TemporaryDirectory(prefix="slmflow-fasttext-") as tmp:
        train = Path(tmp) / "train.txt"
        train.write_text("".join(f"{POS if p else NEG} {t}\n" for t, p in zip(texts, positive)), encoding="utf-8")
        args = dict(input=str(train), epoch=cfg.epoch, lr=cfg.lr, wordNgrams=cfg.word_ngrams, dim=cfg.dim,
                    bucket=cfg.bucket, minCount=1, loss="softmax", thread=1, seed=cfg.seed, verbose=0)
        run = subprocess.run([sys.executable, "-c", _TRAIN, json.dumps(args), str(path)], capture_output=True, text=True)
    if run.returncode:
        last = (run.stderr.strip().splitlines() or ["no message"])[-1]
        raise StageError(f"preselect: fastText training failed ({last}); try a lower preselect.lr")
    return path


def predict_positive(model, texts: list[str]) -> np.ndarray:
    """P(positive) per one-line text under a loaded fastText classifier."""
    if not texts:
        return np.zeros(0)
    labels, probs = model.predict(texts, k=-1)
    p = [float(pr[list(lb).index(POS)]) if POS in lb else 0.0 for lb, pr in zip(labels, probs)]
    return np.clip(np.array(p), 0.0, 1.0)


def score_shard(path: str, classifier: str, max_chars: int) -> dict:
    """One shard (mapped over workers): doc ids, P(positive), characters."""
    import fasttext

    model = fasttext.load_model(classifier)
    table = read_table(path, columns=["id", "text"])
    texts = [classifier_text(t, max_chars) for t in table["text"].to_pylist()]
    return {"doc_id": table["id"].to_pylist(), "preselect_score": predict_positive(model, texts),
            "chars": pc.utf8_length(table["text"]).to_numpy().astype(np.int64)}


def heldout_mask(ids: list[str], positive: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Per class, the round(fraction * n) documents of lowest hash (at least one when fraction > 0,
    at most n - 1: the classifier needs both classes)."""
    held = np.zeros(len(ids), bool)
    if fraction <= 0:
        return held
    hashes = doc_hash(ids, seed + 1)  # another hash than the sample's: held-out is not "the first sampled"
    for cls in (True, False):
        members = np.flatnonzero(positive == cls)
        order = members[hash_order(hashes[members], [ids[i] for i in members])]
        held[order[: min(len(members) - 1, max(1, round(fraction * len(members))))]] = True  # keep one to train on
    return held


# ---------------------------------------------------------------------------------------
# The stage


def preselect(cfg: PreselectConfig, inputs: dict[str, Artifact], ctx: StageContext) -> dict:
    k = reference_count(inputs)
    if "documents" not in inputs:
        raise StageError("preselect: missing input 'documents'")
    files = document_shards(inputs["documents"], "preselect")
    target = target_texts(cfg, inputs) if cfg.benchmark == "target_bpc" else []
    if not target:  # a benchmark read from manifests: fail before the expensive part
        scores = benchmark_scores(cfg, inputs, k)
    device = resolve_device(cfg.device)

    parts = ctx.map(_shard_index, files, seed=cfg.seed)
    ids, texts = sample_texts(files, parts, cfg.sample_docs, cfg.max_chars)
    if len(ids) < 4:
        raise StageError(f"preselect: input 'documents' has {len(ids)} non-empty documents; need 4")

    bpc, target_bpc = np.zeros((len(ids), k)), np.zeros(k)
    start = time.monotonic()
    for i in range(k):
        model, tok = load_reference(inputs[f"ref_{i}"], inputs.get("tokenizer"), device, f"ref_{i}")
        bpc[:, i] = reference_bpc(model, tok, texts, cfg.batch_size, f"ref_{i}")
        if target:
            target_bpc[i] = corpus_bpc(model, tok, target, cfg.batch_size, f"ref_{i}")
        log.info("preselect: ref_%d: mean %.4f bits/char on %d documents%s", i, bpc[:, i].mean(), len(ids),
                 f", {target_bpc[i]:.4f} on the target" if target else "")
        del model
    bpc_seconds = time.monotonic() - start
    if target:
        scores = benchmark_scores(cfg, inputs, k, target_bpc)

    pairs = comparable_pairs(scores)
    strength = {"concordance": lambda: pairwise_concordance(bpc, scores) / pairs,
                "spearman": lambda: rank_correlation(bpc, scores),
                "pearson": lambda: linear_correlation(bpc, scores)}[cfg.strength]()
    pos, neg = pick_labels(strength, cfg.label_fraction, ids)
    if len(pos) < 2:
        raise StageError(f"preselect: label_fraction {cfg.label_fraction} of {len(ids)} sampled documents "
                         "gives fewer than 2 positives; raise sample_docs or label_fraction")
    labeled = np.concatenate([pos, neg])
    positive = np.arange(len(labeled)) < len(pos)
    lab_ids = [ids[i] for i in labeled]
    held = heldout_mask(lab_ids, positive, cfg.heldout_fraction, cfg.seed)
    train = np.flatnonzero(~held)
    train = train[hash_order(doc_hash([lab_ids[i] for i in train], cfg.seed), [lab_ids[i] for i in train])]  # classes mixed

    line = [classifier_text(texts[i], cfg.max_chars) for i in labeled]
    classifier = ctx.out / "classifier.bin"
    train_classifier([line[i] for i in train], positive[train].tolist(), classifier, cfg)
    metrics: dict[str, float] = {}
    if held.any():
        import fasttext

        p_held = predict_positive(fasttext.load_model(str(classifier)), [line[i] for i in np.flatnonzero(held)])
        metrics["heldout_auc"] = auc(p_held, positive[held])

    label = np.full(len(ids), None, dtype=object)
    split = np.full(len(ids), None, dtype=object)
    label[pos], label[neg] = "pos", "neg"
    split[labeled] = np.where(held, "heldout", "train")
    sample = pl.DataFrame({
        "doc_id": ids, "chars": [len(t) for t in texts],
        **{f"bpc_ref_{i}": bpc[:, i] for i in range(k)},
        "strength": strength.astype(np.float64), "label": label.tolist(), "split": split.tolist(),
    }, schema_overrides={"chars": pl.Int64, "label": pl.String, "split": pl.String})
    write_parquet(sample.to_arrow(), ctx.out / "sample" / "part-00000.parquet")

    scored = ctx.map(score_shard, files, classifier=str(classifier), max_chars=cfg.max_chars)
    for path, part in zip(files, scored):
        table = pl.DataFrame(part, schema={"doc_id": pl.String, "preselect_score": pl.Float64, "chars": pl.Int64})
        write_parquet(table.to_arrow(), ctx.out / "scores" / path.rsplit("/", 1)[-1])
    all_scores = np.concatenate([p["preselect_score"] for p in scored])

    pos_strength, neg_strength = strength[pos], strength[neg]
    metrics.update({
        "sample_docs": len(ids), "sample_chars": int(sample["chars"].sum()), "refs": k, "comparable_pairs": pairs,
        "positives": len(pos), "negatives": len(neg),
        "train_examples": len(train), "heldout_examples": int(held.sum()),
        "label_gap": float(pos_strength.min() - neg_strength.max()),  # <= 0: ties straddle the labels
        "mean_strength": float(strength.mean()),
        "benchmark_range": float(scores.max() - scores.min()),  # how different the references are on the benchmark
        "docs_scored": len(all_scores), "mean_score": float(all_scores.mean()),
        "bpc_seconds": round(bpc_seconds, 3),
        **{f"bpc.ref_{i}": float(bpc[:, i].mean()) for i in range(k)},
        **{f"benchmark.ref_{i}": float(scores[i]) for i in range(k)},
    })
    if target:
        metrics.update({"target_prompts": len(target), **{f"target_bpc.ref_{i}": float(target_bpc[i]) for i in range(k)}})
    return {"rows": {"scores": len(all_scores), "sample": len(ids)}, "metrics": metrics}


STAGE = Stage("preselect", VERSION, PreselectConfig, preselect,
              report_metrics=("heldout_auc", "positives", "label_gap", "benchmark_range", "docs_scored"))
