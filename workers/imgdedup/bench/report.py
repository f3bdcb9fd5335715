"""Bench results as one list of rows: a measure, its baseline measured in the same run, the ratio and
the target. The same rows become the stdout table, the markdown table and the JSON file, so the three
never disagree."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass
class Row:
    """One line of the report.

    ``ratio`` is always "how many times better than the baseline": value / baseline for rates,
    baseline / value for latencies and sizes (``lower_is_better``), so > 1 means faster or smaller.
    ``target`` is text such as ">= 0.9x" or "<= 50 ms"; ``met`` is None when there is no target.
    """

    section: str
    measure: str
    value: float | None
    unit: str
    baseline: str = ""
    baseline_value: float | None = None
    ratio: float | None = None
    target: str = ""
    met: bool | None = None


def rate_row(
    section: str,
    measure: str,
    value: float,
    unit: str,
    baseline: str,
    baseline_value: float,
    min_ratio: float | None = None,
) -> Row:
    ratio = value / baseline_value if baseline_value else None
    met = None if min_ratio is None or ratio is None else ratio >= min_ratio
    return Row(
        section,
        measure,
        value,
        unit,
        baseline,
        baseline_value,
        ratio,
        f">= {min_ratio:g}x" if min_ratio is not None else "",
        met,
    )


def cost_row(section: str, measure: str, value: float, unit: str, baseline: str, baseline_value: float) -> Row:
    """A lower-is-better measure (CPU per query or per image) against the same work done another way."""
    ratio = baseline_value / value if baseline_value and value else None
    return Row(section, measure, value, unit, baseline, baseline_value, ratio)


def latency_row(
    section: str,
    measure: str,
    value_ms: float,
    baseline: str = "",
    baseline_ms: float | None = None,
    max_ms: float | None = None,
) -> Row:
    ratio = baseline_ms / value_ms if baseline_ms and value_ms else None
    met = None if max_ms is None else value_ms <= max_ms
    return Row(
        section,
        measure,
        value_ms,
        "ms",
        baseline,
        baseline_ms,
        ratio,
        f"<= {max_ms:g} ms" if max_ms is not None else "",
        met,
    )


def percentiles_ms(seconds) -> dict[str, float]:
    """p50, p99, max and mean of durations given in seconds, in milliseconds."""
    arr = np.asarray(seconds, dtype=float) * 1000
    if arr.size == 0:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan"), "mean": float("nan"), "n": 0}
    return {
        "p50": float(np.percentile(arr, 50)),
        "p99": float(np.percentile(arr, 99)),
        "max": float(arr.max()),
        "mean": float(arr.mean()),
        "n": int(arr.size),
    }


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def revision() -> str:
    """The repository's commit, with "+dirty" if the working tree has changes (what the numbers ran on)."""
    repo = Path(__file__).resolve().parents[3]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "revision": revision(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _num(value: float | None, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    if unit == "ms" and abs(value) < 10:
        return f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}"
    if abs(value) >= 100 or float(value).is_integer():
        return f"{value:,.0f}"
    return f"{value:.2f}"


def _cells(row: Row) -> list[str]:
    met = {True: "yes", False: "NO", None: ""}[row.met]
    return [
        row.section,
        row.measure,
        f"{_num(row.value, row.unit)} {row.unit}".strip(),
        row.baseline,
        _num(row.baseline_value, row.unit) if row.baseline else "",
        f"{row.ratio:.2f}x" if row.ratio is not None else "",
        row.target,
        met,
    ]


HEADER = [
    "section",
    "measure",
    "value",
    "baseline (same run)",
    "baseline value",
    "vs baseline",
    "target",
    "met",
]


def text_table(rows: list[Row]) -> str:
    cells = [HEADER] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    right = {2, 4, 5}
    lines = []
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|---|---|---:|---|---:|---:|---|---|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def write(out_dir: Path, rows: list[Row], details: dict, meta: dict) -> tuple[Path, Path]:
    """bench.json (meta, rows, every raw number) and bench.md (the table plus the conditions)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "rows": [asdict(r) for r in rows], "details": details}
    json_path, md_path = out_dir / "bench.json", out_dir / "bench.md"
    json_path.write_text(json.dumps(doc, indent=2, default=_jsonable) + "\n")
    conditions = (
        f"{meta['machine']['date']}, {meta['machine']['cpu']} ({meta['machine']['cores']} cores), "
        f"revision {meta['machine']['revision']}, load average {meta['load_before']} before / {meta['load_after']} after; `{meta['command']}`"
    )
    md_path.write_text(f"# imgdedup bench\n\n{conditions}\n\n{markdown_table(rows)}\n")
    return json_path, md_path


def _jsonable(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
