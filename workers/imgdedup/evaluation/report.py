"""The report of an evaluation: report.json (every number), report.md (the tables people read) and
PNG plots (PR curves, per-transform score distributions, threshold sweeps)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SIGNAL_LABELS = {"phash": "pHash", "sha256": "SHA-256", "sscd": "SSCD", "clip": "CLIP"}


def _label(name: str) -> str:
    return SIGNAL_LABELS.get(name, name)


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not float(value).is_integer():
        return f"{value:.{digits}f}"
    return str(int(value)) if isinstance(value, (int, float)) else str(value)


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.0f} %"


def _cmp(sig: dict) -> str:
    return "≥" if sig["unit"] == "cosine" else "≤"


def write_json(results: dict, path: Path) -> Path:
    path.write_text(json.dumps(results, indent=1, default=_json_default))
    return path


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def transform_markdown(results: dict) -> list[str]:
    """The per-transform table: recall per signal at the configured threshold with min/median/max of
    the variant-to-base score, the recall any deciding signal gives, and the fused verdict's recall."""
    signals = results["signals"]
    has_verdict = results.get("verdict") is not None
    head = ["transform", "n", "SHA-256"]
    for name, sig in signals.items():
        head.append(f"{_label(name)} {_cmp(sig)} {_fmt(sig['configured'])}: recall (min / median / max)")
    head += ["any signal"] + (["**verdict**"] if has_verdict else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results["transforms"]:
        cells = [f"`{row['transform']}`", str(row["n"]), _pct(row["signals"]["sha256"]["recall"])]
        for name in signals:
            s = row["signals"][name]
            cells.append(f"{_pct(s['recall'])} ({_fmt(s['min'], 2)} / {_fmt(s['median'], 2)} / {_fmt(s['max'], 2)})")
        cells.append(_pct(row["any_signal_recall"]))
        if has_verdict:
            v = row["verdict"]
            extra = f", {_pct(v['wrong_family'])} wrong" if v["wrong_family"] else ""
            cells.append(f"**{_pct(v['recall'])}**{extra}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def signal_markdown(results: dict) -> list[str]:
    """One row per signal: pairwise quality at the configured threshold, false-positive rates,
    the safety margin, mAP/NDCG, and the threshold sweep's answer."""
    target = results["meta"]["target_precision"]
    head = ["signal", "configured", "pairwise P / R / F1", "FPR base pairs", "FPR variant vs other base",
            "closest distinct bases", "closest to an original", "closest distinct (any)", "mAP / NDCG at threshold",
            "mAP / NDCG full ranking", f"loosest threshold with precision ≥ {target} vs originals",
            "recommended (recall vs originals)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, sig in results["signals"].items():
        p = sig["pairs"]
        at, rec = sig["at_target"], sig["recommended"]
        r_thr, r_full = sig["ranking_at_threshold"], sig["ranking_full"]
        cells = [
            _label(name), f"{_cmp(sig)} {_fmt(sig['configured'])}",
            f"{p['precision']:.3f} / {p['recall']:.3f} / {p['f1']:.3f}",
            f"{sig['base_pairs']['false_positives']} / {sig['base_pairs']['pairs']} ({sig['base_pairs']['fpr']:.2e})",
            (f"{sig['variant_other_base']['false_positives']} / {sig['variant_other_base']['pairs']} "
            f"({sig['variant_other_base']['fpr']:.2e})"),
            _closest(sig["base_pairs"]["closest"]), _closest(sig["distinct_with_original"]["closest"]),
            _closest(sig["cross_family"]["closest"]),
            f"{_fmt(r_thr['map'])} / {_fmt(r_thr['ndcg'])}", f"{_fmt(r_full['map'])} / {_fmt(r_full['ndcg'])}",
            "none" if at is None else f"{_cmp(sig)} {_fmt(at['threshold'])} (recall {at['recall']:.3f})",
            "–" if rec is None else f"**{_cmp(sig)} {_fmt(rec['threshold'])}** ({rec['recall']:.3f})",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def candidates_markdown(results: dict) -> list[str]:
    """Per signal, a ladder of thresholds: recall of copies vs their original and the false pairs."""
    lines = []
    for name, sig in results["signals"].items():
        lines += [f"**{_label(name)}** ({sig['unit']})", "",
                  ("| threshold | recall of copies vs their original | false pairs with an original | "
                  "false pairs (any two different pictures) |"), "|---|---|---|---|"]
        for c in sig.get("candidates", []):
            mark = " (configured)" if c["threshold"] == sig["configured"] else ""
            lines.append(f"| {_cmp(sig)} {_fmt(c['threshold'], 2)}{mark} | {c['recall_vs_original']:.3f} | "
                         f"{c['false_pairs_with_original']} | {c['false_pairs_any']} |")
        lines.append("")
    return lines


def _closest(c: dict | None) -> str:
    return "–" if c is None else f"{_fmt(c['score'])} (`{c['a']}` vs `{c['b']}`)"


def verdict_markdown(v: dict) -> list[str]:
    g = v["group_pairs"]
    lines = [
        f"- images: {v['images']}; verdicts: " + ", ".join(f"{k} {n}" for k, n in v["verdicts"].items())
        + f"; dead letters: {v['dead_letters']}",
        f"- **false duplicate verdicts among distinct bases: {len(v['false_duplicate_bases'])}**"
        + (f" ({', '.join(v['false_duplicate_bases'][:10])})" if v["false_duplicate_bases"] else ""),
        f"- variants called a duplicate of another base: {len(v['false_duplicate_variants'])}"
        + (" (" + ", ".join(f"{x['image_id']} → {x['duplicate_of']}" for x in v["false_duplicate_variants"][:10])
           + ")" if v["false_duplicate_variants"] else ""),
        (f"- verdict precision (duplicate verdicts naming the right original): {v['verdict_precision']:.4f}; "
        f"variant recall: {_fmt(v['variant_recall'])}"),
        (f"- duplicate groups (anti-chaining, min share {v.get('min_share', '')}): {len(v['groups']['groups'])} "
        f"groups, sizes {v['groups']['sizes']}; pairwise precision / recall / F1 of the groups: "
        f"{g['precision']:.3f} / {g['recall']:.3f} / {g['f1']:.3f}"),
    ]
    return lines


def write_markdown(results: dict, path: Path, plots: list[Path]) -> Path:
    meta = results["meta"]
    lines = [
        "# imgdedup evaluation", "",
        f"- date: {meta['date']}; machine: {meta['machine']}",
        f"- corpus: `{meta['corpus']}` ({meta['source']}): {meta['bases']} bases, {meta['variants']} variants, "
        f"seed {meta['seed']}" + ("; through Kafka" if meta["through_kafka"] else "; pipeline in-process"),
        f"- command: `{meta['command']}`",
        f"- thresholds: {meta['thresholds']}; features: {meta['versions']}",
        f"- low-detail images (pHash matching skipped by the worker): {len(meta.get('low_detail_images', []))}",
        f"- seconds: {meta.get('seconds', {})}",
        f"- images left out because the feature code rejected them: {len(results.get('dropped') or [])}"
        + "".join(f"; `{d['image_id']}` {d['code']}" for d in (results.get("dropped") or [])[:5]), "",
        "## Recall per transform", "",
        ("Recall = share of the variants found as duplicates of their own base. Signal columns use the raw "
        "score between variant and base at the configured threshold (min / median / max of the score); "
        "**verdict** is the worker's real decision (duplicate of the right original)."), "",
        *transform_markdown(results), "",
        "## Signals over all pairs", "",
        ("Pairwise P/R/F1 and mAP/NDCG count all pairs (every image is a query, its true duplicates the "
        "relevant items). FPR = false-positive rate at the configured threshold. Closest = the smallest "
        "distance / largest similarity between two different pictures (the safety margin): between two "
        "originals, between a copy and another original, and between any two images (including two copies "
        "of different originals, e.g. both pasted into the same screenshot frame). The recommendation is "
        "taken on pairs that contain an original: it reaches the target precision there and keeps the "
        "margin from the closest such distinct pair."), "",
        *signal_markdown(results), "",
        "## Threshold ladder", "", *candidates_markdown(results),
    ]
    if results.get("verdict"):
        lines += ["## Verdicts (the real pipeline)", "", *verdict_markdown(results["verdict"]), ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    path.write_text("\n".join(lines))
    return path


# --- plots ---------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pr_curves(results: dict, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for name, sig in results["signals"].items():
        sw = sig["sweep"]
        ax.plot(sw["recall"], sw["precision"], label=_label(name), drawstyle="steps-post")
        ax.plot([sig["pairs"]["recall"]], [sig["pairs"]["precision"]], "o",
                color=ax.lines[-1].get_color(), label=f"{_label(name)} at {_cmp(sig)} {_fmt(sig['configured'])}")
    ax.set_xlabel("recall (duplicate pairs found)")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.01)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title("Pairwise precision-recall per signal")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _horizontal() -> dict:
    import matplotlib

    major, minor = (int(x) for x in matplotlib.__version__.split(".")[:2])
    return {"orientation": "horizontal"} if (major, minor) >= (3, 10) else {"vert": False}


def plot_distributions(results: dict, matrices_by_transform: dict[str, dict[str, np.ndarray]], path: Path) -> Path:
    """Per signal: the variant-to-base scores of each transform as a box, the configured threshold
    and the closest distinct pair as vertical lines."""
    plt = _pyplot()
    names = list(results["signals"])
    transforms = list(matrices_by_transform)
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 0.28 * len(transforms) + 1.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        sig = results["signals"][name]
        data = [matrices_by_transform[t][name] for t in transforms]
        ax.boxplot(data, whis=(0, 100), widths=0.6, **_horizontal())
        ax.set_yticks(range(1, len(transforms) + 1), transforms if ax is axes[0][0] else [""] * len(transforms),
                      fontsize=7)
        ax.axvline(sig["configured"], color="tab:green", label=f"configured {_fmt(sig['configured'])}")
        closest = sig["cross_family"]["closest"]
        if closest:
            ax.axvline(closest["score"], color="tab:red", ls="--", label=f"closest distinct {_fmt(closest['score'])}")
        ax.invert_yaxis()
        ax.set_title(f"{_label(name)} ({sig['unit']}) variant vs base", fontsize=9)
        ax.legend(fontsize=7, loc="lower right" if sig["unit"] == "cosine" else "upper right")
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_sweeps(results: dict, path: Path) -> Path:
    plt = _pyplot()
    names = list(results["signals"])
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        sig, sw = results["signals"][name], results["signals"][name]["sweep"]
        ax.plot(sw["thresholds"], sw["precision"], label="precision")
        ax.plot(sw["thresholds"], sw["recall"], label="recall")
        ax.plot(sw["thresholds"], sw["fpr"], label="FPR")
        ax.axvline(sig["configured"], color="tab:green", ls=":", label="configured")
        if sig["recommended"]:
            ax.axvline(sig["recommended"]["threshold"], color="tab:purple", ls="--", label="recommended")
        if sig["unit"] == "bits":
            ax.set_xlim(0, 32)
        else:
            ax.set_xlim(max(0.0, min(sw["thresholds"][-1] if sw["thresholds"] else 0, 1)), 1.0)
        ax.set_xlabel("Hamming radius" if sig["unit"] == "bits" else "cosine threshold")
        ax.set_title(f"{_label(name)} threshold sweep", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_all(run, out_dir: Path) -> dict[str, Path]:
    """report.json, report.md and the PNGs into out_dir; returns their paths by name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if run.results.get("verdict") is not None:
        run.results["verdict"]["min_share"] = run.results["meta"].get("min_share")
    by_transform = _scores_by_transform(run)
    plots = [plot_pr_curves(run.results, out_dir / "pr_curves.png"),
             plot_distributions(run.results, by_transform, out_dir / "distributions.png"),
             plot_sweeps(run.results, out_dir / "threshold_sweeps.png")]
    return {"json": write_json(run.results, out_dir / "report.json"),
            "markdown": write_markdown(run.results, out_dir / "report.md", plots),
            **{p.stem: p for p in plots}}


def _scores_by_transform(run) -> dict[str, dict[str, np.ndarray]]:
    ds = run.dataset
    base_of = ds.base_index()
    out: dict[str, dict[str, np.ndarray]] = {}
    for t in dict.fromkeys(it.transform for it in ds.items if not it.is_base):
        idx = np.array([i for i, it in enumerate(ds.items) if it.transform == t])
        out[t] = {s.name: run.matrices[s.name][idx, base_of[idx]] for s in run.signals}
    return out
