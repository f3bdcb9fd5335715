"""From features and verdicts to the numbers of the report. Pure computation on arrays and dicts:
run.py gathers the inputs, report.py renders the output."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from imgdedup.evaluation import metrics as M
from imgdedup.evaluation.dataset import Dataset
from imgdedup.evaluation.groups import DUPLICATE_VERDICTS, build_groups


@dataclass(frozen=True)
class Signal:
    """One duplicate signal as the worker uses it: its configured threshold and its direction."""

    name: str  # "phash", "sscd", "clip"
    threshold: float
    higher_is_closer: bool
    decides: bool  # True if this signal alone can make a near duplicate (CLIP may only be evidence)

    @property
    def unit(self) -> str:
        return "cosine" if self.higher_is_closer else "bits"


def signals_for(settings, vector_names: list[str]) -> list[Signal]:
    """The signals present, with the thresholds of the given settings."""
    out = [Signal("phash", settings.phash_radius, False, True)]
    for name in vector_names:
        if name.startswith("sscd"):
            out.append(Signal(name, settings.sscd_threshold, True, True))
        elif name.startswith("clip"):
            out.append(Signal(name, settings.clip_threshold, True, settings.clip_is_duplicate_signal))
        else:
            out.append(Signal(name, getattr(settings, f"{name}_threshold", 0.9), True, True))
    return out


def score_matrices(features: list, signals: list[Signal]) -> dict[str, np.ndarray]:
    """All-pairs scores per signal: Hamming distances of the 64-bit pHashes, cosines of the vectors
    (they are L2-normalised, so a matrix product)."""
    out: dict[str, np.ndarray] = {}
    for sig in signals:
        if sig.name == "phash":
            h = np.array([f.phash for f in features], dtype=np.uint64)
            out["phash"] = np.bitwise_count(h[:, None] ^ h[None, :]).astype(np.int16)
        else:
            v = np.stack([np.asarray(f.vectors[sig.name], dtype=np.float32) for f in features])
            out[sig.name] = np.clip(v @ v.T, -1.0, 1.0)
    sha = np.array([f.sha256 for f in features])
    out["sha256"] = sha[:, None] == sha[None, :]
    return out


def _pair_masks(ds: Dataset) -> dict[str, np.ndarray]:
    """Upper-triangle masks of the pair populations the report counts separately."""
    n = len(ds)
    upper = np.triu(np.ones((n, n), dtype=bool), 1)
    is_base = np.array([it.is_base for it in ds.items])
    family = np.array([it.family for it in ds.items])
    other = family[:, None] != family[None, :]
    with_base = upper & (is_base[:, None] | is_base[None, :])
    return {
        "all": upper,
        "base_pairs": upper & is_base[:, None] & is_base[None, :] & other,
        "variant_other_base": upper & (is_base[:, None] ^ is_base[None, :]) & other,
        "cross_family": upper & other,
        # calibration: "is this image a copy of that original?" - every pair with an original in it
        "with_original": with_base,
        "distinct_with_original": with_base & other,
    }


def signal_report(ds: Dataset, scores: np.ndarray, sig: Signal, target_precision: float,
                  margin: float) -> dict:
    """Everything about one signal over all pairs: confusion at the configured threshold, FPR per
    pair population, safety margin, sweep, threshold for the target precision, mAP and NDCG."""
    masks = _pair_masks(ds)
    labels = ds.same[masks["all"]]
    flat = scores[masks["all"]]
    out: dict = {"signal": sig.name, "unit": sig.unit, "configured": sig.threshold, "decides": sig.decides,
                 "pairs": M.confusion(flat, labels, sig.threshold, sig.higher_is_closer)}
    for population in ("base_pairs", "variant_other_base", "cross_family", "distinct_with_original"):
        vals = scores[masks[population]]
        hit = M.predicted(vals, sig.threshold, sig.higher_is_closer)
        out[population] = {"pairs": len(vals), "false_positives": int(hit.sum()),
                           "fpr": float(hit.mean()) if len(vals) else 0.0,
                           "closest": _closest_pair(ds, scores, masks[population], sig.higher_is_closer)}
    result = M.sweep(flat, labels, sig.higher_is_closer)
    keep = _thin(len(result.thresholds))
    out["sweep"] = {"thresholds": result.thresholds[keep].tolist(), "precision": result.precision[keep].tolist(),
                    "recall": result.recall[keep].tolist(), "fpr": result.fpr[keep].tolist()}
    calibration = M.sweep(scores[masks["with_original"]], ds.same[masks["with_original"]], sig.higher_is_closer)
    out["at_target"] = M.threshold_at_precision(calibration, target_precision)
    out["recommended"] = _recommend(out, calibration, sig, margin)
    out["candidates"] = candidate_table(ds, scores, sig, masks)
    out["ranking_at_threshold"] = M.ranking_metrics(scores, ds.same, sig.higher_is_closer, sig.threshold)
    out["ranking_full"] = M.ranking_metrics(scores, ds.same, sig.higher_is_closer)
    return out


def _thin(n: int, points: int = 600) -> np.ndarray:
    """Indices of at most `points` sweep rows, ends included: cosine sweeps have a row per distinct
    pair score (millions), far more than a curve or a JSON file needs."""
    if n <= points:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, points).round().astype(int))


def candidate_table(ds: Dataset, scores: np.ndarray, sig: Signal, masks: dict) -> list[dict]:
    """Recall of copies against their own original, and false pairs (with an original / any), at a
    ladder of thresholds around the configured one: the table a threshold is chosen from."""
    if sig.higher_is_closer:
        ladder = sorted({round(t, 2) for t in np.arange(0.5, 0.96, 0.05)} | {sig.threshold})
    else:
        ladder = sorted(set(range(0, 17, 2)) | {int(sig.threshold)})
    copies = masks["with_original"] & ds.same
    copy_scores = scores[copies]
    with_orig, anywhere = scores[masks["distinct_with_original"]], scores[masks["cross_family"]]
    return [{"threshold": t,
             "recall_vs_original": float(M.predicted(copy_scores, t, sig.higher_is_closer).mean()),
             "false_pairs_with_original": int(M.predicted(with_orig, t, sig.higher_is_closer).sum()),
             "false_pairs_any": int(M.predicted(anywhere, t, sig.higher_is_closer).sum())}
            for t in ladder]


def _closest_pair(ds: Dataset, scores: np.ndarray, mask: np.ndarray, higher_is_closer: bool) -> dict | None:
    rows, cols = np.nonzero(mask)
    if not len(rows):
        return None
    vals = scores[rows, cols]
    k = int(np.argmax(vals) if higher_is_closer else np.argmin(vals))
    return {"score": float(vals[k]), "a": ds.items[rows[k]].image_id, "b": ds.items[cols[k]].image_id}


def _recommend(out: dict, result: M.Sweep, sig: Signal, margin: float) -> dict | None:
    """The threshold to configure, from the pairs that contain an original (copy vs original,
    original vs original, copy vs another original): `margin` (bits or cosine) stricter than the
    score where precision there falls below the target for good (with target 1.0: the closest
    distinct pair). Reported with its recall of copies vs their original.

    Pairs of two copies of different originals (two pictures in the same screenshot frame) are
    left out of this choice on purpose: the report shows them separately as 'closest distinct (any)'."""
    at = out["at_target"]
    if at is None:
        return None
    fails = at["fails_at"]
    if fails is None:  # the target holds at every threshold seen: nothing to keep a margin from
        safe = at["threshold"]
    elif sig.higher_is_closer:
        safe = round(min(fails + margin, 1.0), 3)
    else:
        safe = max(int(fails) - 1 - int(margin), 0)
    hit = M.predicted(result.thresholds, safe, sig.higher_is_closer)
    recall = float(result.recall[hit].max()) if hit.any() else 0.0
    return {"threshold": safe, "margin": margin, "recall": recall}


def transform_table(ds: Dataset, matrices: dict[str, np.ndarray], signals: list[Signal],
                    verdicts: list[dict] | None) -> list[dict]:
    """Per transform: each signal's recall at its configured threshold and the score distribution
    between variant and its own base, the recall any deciding signal would give, and the fused
    verdict's recall (duplicate of the right family)."""
    base_of = ds.base_index()
    verdict_ok = _verdict_correct(ds, verdicts) if verdicts is not None else None
    rows = []
    for transform in dict.fromkeys(it.transform for it in ds.items if not it.is_base):
        idx = np.array([i for i, it in enumerate(ds.items) if it.transform == transform])
        row: dict = {"transform": transform, "n": len(idx), "signals": {}}
        sha = matrices["sha256"][idx, base_of[idx]]
        row["signals"]["sha256"] = {"recall": float(sha.mean())}
        any_hit = sha.copy()
        for sig in signals:
            vals = matrices[sig.name][idx, base_of[idx]]
            hit = M.predicted(vals, sig.threshold, sig.higher_is_closer)
            row["signals"][sig.name] = {"recall": float(hit.mean()), **M.distribution(vals)}
            if sig.decides:
                any_hit |= hit
        row["any_signal_recall"] = float(any_hit.mean())
        if verdict_ok is not None:
            row["verdict"] = {k: float(np.mean([verdict_ok[i][k] for i in idx]))
                              for k in ("detected", "wrong_family", "dead_letter")}
            row["verdict"]["recall"] = row["verdict"].pop("detected")
        rows.append(row)
    return rows


def _verdict_correct(ds: Dataset, verdicts: list[dict]) -> list[dict]:
    """Per item: duplicate of its own family / of another family / dead-lettered / no verdict."""
    family = {it.image_id: it.family for it in ds.items}
    out = []
    for it, v in zip(ds.items, verdicts):
        dup = v is not None and v.get("verdict") in DUPLICATE_VERDICTS
        target = family.get(v.get("duplicate_of")) if dup else None
        out.append({"detected": dup and target == it.family, "wrong_family": dup and target != it.family,
                    "dead_letter": v is None or "error" in v, "verdict": None if v is None else v.get("verdict")})
    return out


def verdict_report(ds: Dataset, verdicts: list[dict], min_share: float, max_matches: int = 10) -> dict:
    """The fused verdict's numbers: false duplicates among distinct bases, verdict precision, and
    pairwise precision/recall/F1 of the duplicate groups built from the verdicts."""
    checks = _verdict_correct(ds, verdicts)
    dup = [c["detected"] or c["wrong_family"] for c in checks]
    base = [i for i, it in enumerate(ds.items) if it.is_base]
    variants = [i for i, it in enumerate(ds.items) if not it.is_base]
    false_bases = [ds.items[i].image_id for i in base if checks[i]["wrong_family"]]
    false_variants = [{"image_id": ds.items[i].image_id, "duplicate_of": verdicts[i].get("duplicate_of")}
                      for i in variants if checks[i]["wrong_family"]]
    grouping = build_groups([v for v in verdicts if v is not None], min_share, max_matches)
    index = {it.image_id: i for i, it in enumerate(ds.items)}
    label = np.arange(len(ds))
    for g_id, group in enumerate(grouping.groups):
        for member in group.members:
            if member in index:
                label[index[member]] = len(ds) + g_id
    grouped = label[:, None] == label[None, :]
    upper = np.triu(np.ones((len(ds), len(ds)), dtype=bool), 1)
    tp = int(np.sum(grouped & ds.same & upper))
    fp = int(np.sum(grouped & ~ds.same & upper))
    fn = int(np.sum(~grouped & ds.same & upper))
    precision, recall, f1 = M.prf(tp, fp, fn)
    n_dup = sum(dup)
    return {
        "images": len(ds), "duplicate_verdicts": n_dup,
        "verdicts": {k: sum(1 for c in checks if c["verdict"] == k)
                     for k in ("unique", "exact_duplicate", "near_duplicate")},
        "dead_letters": sum(c["dead_letter"] for c in checks),
        "verdict_precision": (n_dup - len(false_bases) - len(false_variants)) / n_dup if n_dup else 1.0,
        "variant_recall": float(np.mean([checks[i]["detected"] for i in variants])) if variants else None,
        "false_duplicate_bases": false_bases, "false_duplicate_variants": false_variants,
        "group_pairs": {"tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall, "f1": f1},
        "groups": grouping.to_json(),
    }
