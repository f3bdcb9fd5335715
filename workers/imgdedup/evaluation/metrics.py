"""Quality metrics as pure NumPy functions: nothing here knows about images, Redis or files, so each
number in a report can be checked on a hand-made case (tests/test_eval_metrics.py).

Conventions used everywhere:

- A *score* is a pHash Hamming distance (lower = closer) or a cosine similarity (higher = closer);
  ``higher_is_closer`` says which. A pair is *predicted* a duplicate when its score is at least as
  close as the threshold (distance <= radius, similarity >= threshold), exactly as the worker decides.
- Precision with no predicted pairs is 1.0 (no false positive was made); recall with no true pairs is 1.0.
- Ranking ties are broken pessimistically (non-duplicates first), so a coarse signal such as a 64-bit
  Hamming distance cannot gain mAP from the order the files happened to be listed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def closeness(scores: np.ndarray, higher_is_closer: bool) -> np.ndarray:
    """Scores turned so that larger always means closer (distances are negated)."""
    scores = np.asarray(scores, dtype=np.float64)
    return scores if higher_is_closer else -scores


def predicted(scores: np.ndarray, threshold: float, higher_is_closer: bool) -> np.ndarray:
    """Boolean mask of the pairs the threshold calls duplicates."""
    scores = np.asarray(scores)
    return scores >= threshold if higher_is_closer else scores <= threshold


def prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """(precision, recall, F1) from counts, with the conventions in the module docstring."""
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def confusion(scores: np.ndarray, labels: np.ndarray, threshold: float, higher_is_closer: bool) -> dict:
    """Pair counts and rates at one threshold; `labels` is True for pairs that are duplicates."""
    labels = np.asarray(labels, dtype=bool)
    hit = predicted(scores, threshold, higher_is_closer)
    tp, fp = int(np.sum(hit & labels)), int(np.sum(hit & ~labels))
    fn, tn = int(np.sum(~hit & labels)), int(np.sum(~hit & ~labels))
    precision, recall, f1 = prf(tp, fp, fn)
    return {"threshold": threshold, "tp": tp, "fp": fp, "fn": fn, "tn": tn, "precision": precision,
            "recall": recall, "f1": f1, "fpr": fp / (fp + tn) if fp + tn else 0.0}


@dataclass(frozen=True)
class Sweep:
    """Counts at every distinct threshold, from the strictest to the loosest."""

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    positives: int
    negatives: int

    @property
    def precision(self) -> np.ndarray:
        total = self.tp + self.fp
        return np.where(total > 0, self.tp / np.maximum(total, 1), 1.0)

    @property
    def recall(self) -> np.ndarray:
        return self.tp / self.positives if self.positives else np.ones(len(self.tp))

    @property
    def fpr(self) -> np.ndarray:
        return self.fp / self.negatives if self.negatives else np.zeros(len(self.fp))


def sweep(scores: np.ndarray, labels: np.ndarray, higher_is_closer: bool) -> Sweep:
    """Every threshold that changes the prediction, with cumulative TP/FP (one sort, no loop)."""
    labels = np.asarray(labels, dtype=bool)
    close = closeness(scores, higher_is_closer)
    order = np.argsort(-close, kind="stable")
    close, lab = close[order], labels[order]
    tp, fp = np.cumsum(lab), np.cumsum(~lab)
    # keep the last index of each run of equal scores: a threshold takes all ties at once
    last = np.r_[np.flatnonzero(np.diff(close) != 0), len(close) - 1] if len(close) else np.array([], int)
    thresholds = close[last] if higher_is_closer else -close[last]
    return Sweep(thresholds, tp[last], fp[last], int(labels.sum()), int((~labels).sum()))


def threshold_at_precision(result: Sweep, target: float) -> dict | None:
    """The loosest threshold whose precision is still >= target (the most recall it allows), or None.

    `fails_at` is the next looser score, where precision drops below the target for good: any
    threshold between the two behaves the same on this data, and a margin is kept from `fails_at`."""
    ok = np.flatnonzero(result.precision >= target - 1e-12)
    if not len(ok):
        return None
    best = ok[-1]  # recall only grows with looser thresholds
    fails = float(result.thresholds[best + 1]) if best + 1 < len(result.thresholds) else None
    return {"threshold": float(result.thresholds[best]), "precision": float(result.precision[best]),
            "recall": float(result.recall[best]), "fpr": float(result.fpr[best]), "fails_at": fails}


def closest_negative(scores: np.ndarray, labels: np.ndarray, higher_is_closer: bool) -> float | None:
    """Score of the closest pair that is NOT a duplicate: the safety margin any threshold must keep."""
    negatives = np.asarray(scores)[~np.asarray(labels, dtype=bool)]
    if not len(negatives):
        return None
    return float(negatives.max() if higher_is_closer else negatives.min())


def distribution(values: np.ndarray) -> dict:
    """min / median / max / mean of a set of scores (empty -> all None)."""
    values = np.asarray(values, dtype=np.float64)
    if not len(values):
        return {"n": 0, "min": None, "median": None, "max": None, "mean": None}
    return {"n": len(values), "min": float(values.min()), "median": float(np.median(values)),
            "max": float(values.max()), "mean": float(values.mean())}


# --- ranking metrics over queries (imagededup-style mAP and NDCG) -------------------------------

def average_precision(relevance: np.ndarray, n_relevant: int) -> float:
    """AP of one ranked result list: mean over ALL relevant items of precision at their rank
    (relevant items never retrieved contribute 0). `relevance` is 0/1 in rank order."""
    relevance = np.asarray(relevance, dtype=np.float64)
    if n_relevant <= 0:
        raise ValueError("AP is undefined for a query without relevant items")
    ranks = np.arange(1, len(relevance) + 1)
    return float(np.sum(relevance * np.cumsum(relevance) / ranks) / n_relevant)


def ndcg(relevance: np.ndarray, n_relevant: int) -> float:
    """NDCG with binary gains; the ideal list holds all `n_relevant` items at the top, so misses
    lower it (imagededup's ideal is the retrieved list re-sorted, which ignores misses)."""
    relevance = np.asarray(relevance, dtype=np.float64)
    if n_relevant <= 0:
        raise ValueError("NDCG is undefined for a query without relevant items")
    dcg = np.sum(relevance / np.log2(np.arange(2, len(relevance) + 2)))
    ideal = np.sum(1.0 / np.log2(np.arange(2, n_relevant + 2)))
    return float(dcg / ideal)


def ranking_metrics(score_matrix: np.ndarray, same: np.ndarray, higher_is_closer: bool,
                    threshold: float | None = None) -> dict:
    """Mean AP and NDCG with every row as a query against all other columns.

    `same[i, j]` is True when j is a true duplicate of query i; the diagonal is ignored. With a
    threshold, only items within it are retrieved (as imagededup's find_duplicates returns them);
    without, the whole ranking counts. Queries without any true duplicate are skipped and counted."""
    scores = np.asarray(score_matrix, dtype=np.float64)
    same = np.asarray(same, dtype=bool).copy()
    n = scores.shape[0]
    close = closeness(scores, higher_is_closer)
    np.fill_diagonal(close, -np.inf)
    np.fill_diagonal(same, False)
    n_rel = same.sum(axis=1)
    queries = np.flatnonzero(n_rel > 0)
    if not len(queries):
        return {"map": None, "ndcg": None, "queries": 0, "skipped": int(n)}
    close, same, n_rel = close[queries], same[queries], n_rel[queries]
    # sort by closeness descending, ties with non-duplicates first (pessimistic)
    order = _rank_order(close, same)
    rel = np.take_along_axis(same, order, axis=1).astype(np.float64)
    retrieved = np.ones_like(rel, dtype=bool)
    retrieved[:, -1] = False  # the last column is the query itself (closeness -inf)
    if threshold is not None:
        limit = threshold if higher_is_closer else -threshold
        retrieved &= np.take_along_axis(close, order, axis=1) >= limit
    rel *= retrieved
    ranks = np.arange(1, n + 1)
    ap = np.sum(rel * np.cumsum(rel, axis=1) / ranks, axis=1) / n_rel
    ideal = np.cumsum(1.0 / np.log2(np.arange(2, n + 2)))[n_rel - 1]
    dcg = np.sum(rel / np.log2(ranks + 1), axis=1)
    return {"map": float(ap.mean()), "ndcg": float((dcg / ideal).mean()), "queries": len(queries),
            "skipped": int(n - len(queries))}


def _rank_order(close: np.ndarray, same: np.ndarray) -> np.ndarray:
    """Per-row column order: closest first; among equal scores, non-duplicates first."""
    key = np.argsort(same, axis=1, kind="stable")  # False (non-duplicates) first
    close_k = np.take_along_axis(close, key, axis=1)
    second = np.argsort(-close_k, axis=1, kind="stable")
    return np.take_along_axis(key, second, axis=1)
