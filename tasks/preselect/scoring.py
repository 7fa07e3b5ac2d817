"""PreSelect's math ("The Data That Predicts Is the Data That Teaches"): normalized losses, predictive
strength, labels and the classifier's AUC. No I/O; the stage is `tasks.preselect`.

- bits_per_char: a document's total NLL under a model in bits per character, comparable
  across tokenizers (the paper's normalization).
- pairwise_concordance / rank_correlation / linear_correlation: how well a document's losses under K models
  order the models like their benchmark scores (the public code's pair count; Spearman is
  the rank version, Pearson the linear one).
- pick_labels: the strongest documents as positives, as many of the weakest as negatives.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

if TYPE_CHECKING:
    from tasks.core.model import GPT

IGNORE = -100


def document_nll(model: GPT, docs: list[list[int]], batch_size: int = 16) -> np.ndarray:
    """Total NLL (nats, float64) of each document's tokens after its first.

    docs[d][0] is context only (the BOS token); every later token is predicted from the ones
    before it in its window. A document longer than the model's context is cut into
    consecutive windows of max_seq_len predictions; each window starts from its first token
    with no earlier context (the cheap, non-overlapping evaluation). Windows are batched
    longest first and right-padded: causal attention means padding never reaches a real
    position, so SDPA's causal fast path applies and the padding is only masked out of the loss.
    """
    import torch  # here: the preselect stage's config and label math import without torch

    from tasks.core.model import token_loss

    L = model.dims.max_seq_len
    device = model.embed_tokens.weight.device
    windows = [(d, s, min(L, len(ids) - 1 - s)) for d, ids in enumerate(docs) for s in range(0, len(ids) - 1, L)]
    windows.sort(key=lambda w: -w[2])  # stable: equal lengths keep document order (deterministic batches)
    total = np.zeros(len(docs), np.float64)
    for b in range(0, len(windows), batch_size):
        batch = windows[b:b + batch_size]
        T = batch[0][2]
        x = torch.zeros(len(batch), T, dtype=torch.long)
        y = torch.full((len(batch), T), IGNORE, dtype=torch.long)
        for row, (d, s, n) in enumerate(batch):
            ids = torch.as_tensor(docs[d][s:s + n + 1], dtype=torch.long)
            x[row, :n], y[row, :n] = ids[:-1], ids[1:]
        with torch.no_grad():
            loss = token_loss(model(x.to(device)), y.to(device), IGNORE, reduction="none").sum(1)
        np.add.at(total, [d for d, _, _ in batch], loss.double().cpu().numpy())
    return total


def bits_per_char(model: GPT, docs: list[list[int]], chars, batch_size: int = 16) -> np.ndarray:
    """Total NLL / (characters * ln 2) per document; NaN for a document of no characters."""
    chars = np.asarray(chars, np.float64)
    nll = document_nll(model, docs, batch_size)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(chars > 0, nll / (chars * math.log(2)), np.nan)


def comparable_pairs(scores) -> int:
    """Model pairs (i < j) whose benchmark scores differ: the most concordance can count."""
    s = np.asarray(scores, np.float64)
    i, j = np.triu_indices(len(s), 1)
    return int((s[i] != s[j]).sum())


def pairwise_concordance(losses, scores) -> np.ndarray:
    """Per document (row of losses [docs, K]): model pairs i < j with different scores [K]
    where the lower-loss model has the higher score. Equal losses count as disagreement."""
    losses, s = np.asarray(losses, np.float64), np.asarray(scores, np.float64)
    i, j = np.triu_indices(len(s), 1)
    ds = np.sign(s[i] - s[j])
    dl = np.sign(losses[:, i] - losses[:, j])
    return ((dl == -ds) & (ds != 0)).sum(1).astype(np.int64)


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks along the last axis, ties sharing their mean rank (scipy's "average")."""
    below = (x[..., None, :] < x[..., :, None]).sum(-1)
    equal = (x[..., None, :] == x[..., :, None]).sum(-1)
    return below + (equal + 1) / 2.0


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of x with y; 0 where either is constant."""
    cx, cy = x - x.mean(-1, keepdims=True), y - y.mean()
    den = np.sqrt((cx**2).sum(-1) * (cy**2).sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, (cx * cy).sum(-1) / den, 0.0)


def rank_correlation(losses, scores) -> np.ndarray:
    """Per document: Spearman correlation between -loss and benchmark score across the K
    models (average ranks for ties); 0 where either side is constant (no ordering to agree with)."""
    return _pearson_rows(average_ranks(-np.asarray(losses, np.float64)), average_ranks(np.asarray(scores, np.float64)))


def linear_correlation(losses, scores) -> np.ndarray:
    """Per document: Pearson correlation between -loss and benchmark score across the K models;
    0 where either side is constant. Unlike the rank versions it is continuous in the losses, so
    a few references still order documents without ties."""
    return _pearson_rows(-np.asarray(losses, np.float64), np.asarray(scores, np.float64))


def id_ranks(ids) -> np.ndarray:
    """Each id's position in sorted order (for tie-breaking by id with numeric sorts)."""
    return np.unique(np.asarray(ids, dtype=str), return_inverse=True)[1].reshape(-1)


def pick_labels(strength, fraction: float, ids) -> tuple[np.ndarray, np.ndarray]:
    """(positives, negatives): indices of the floor(fraction * n) strongest documents and as
    many of the weakest (at most n // 2 each, so they never overlap). One total order, by
    strength descending then id ascending: positives are its head, negatives its tail."""
    strength = np.asarray(strength, np.float64)
    n = min(len(strength) // 2, int(math.floor(fraction * len(strength))))
    order = np.lexsort((id_ranks(ids), -strength))
    return order[:n], order[len(order) - n:][::-1]


def auc(scores, labels) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count half); NaN without both classes."""
    labels = np.asarray(labels, bool)
    pos, neg = int(labels.sum()), int((~labels).sum())
    if not pos or not neg:
        return float("nan")
    ranks = pl.Series(np.asarray(scores, np.float64)).rank("average").to_numpy()
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))
