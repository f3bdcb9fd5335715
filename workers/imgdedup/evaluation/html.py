"""`--report-html`: one page a moderator or an engineer can read — every duplicate group, every
miss and every false positive, with the images side by side and the scores between them.
Thumbnails are small JPEG files in ``thumbs/`` next to the page (each image written once)."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from imgdedup.evaluation.groups import DUPLICATE_VERDICTS, link_label
from imgdedup.evaluation.report import _cmp, _fmt, _label, transform_markdown

THUMB = 150
MAX_FALSE_PAIRS = 300

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
.row{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start;margin:.6em 0 1.2em}
figure{margin:0;width:160px;font-size:11px;word-break:break-all}
figure img{max-width:150px;max-height:150px;display:block;border:1px solid #ddd}
figure.orig img{border:3px solid #1e78dc}
.pair{border:1px solid #eee;padding:6px;border-radius:6px}
.scores{font-size:12px;color:#444;align-self:center;min-width:12em}
.bad{color:#b00020;font-weight:bold}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ddd;padding:2px 6px}
"""


class _Thumbs:
    """Writes each image's thumbnail once and returns its relative path."""

    def __init__(self, out_dir: Path, paths: dict[str, Path]):
        self.dir = out_dir / "thumbs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.paths = paths
        self.done: dict[str, str] = {}

    def __call__(self, image_id: str) -> str:
        if image_id not in self.done:
            name = "".join(c if c.isalnum() or c in "-_." else "_" for c in image_id) + ".jpg"
            try:
                with Image.open(self.paths[image_id]) as im:
                    im.draft("RGB", (THUMB, THUMB))
                    tile = ImageOps.exif_transpose(im).convert("RGB")
                tile.thumbnail((THUMB, THUMB))
                tile.save(self.dir / name, "JPEG", quality=80)
            except Exception:  # noqa: BLE001, S110 -- a missing file: a broken image, the page renders
                pass
            self.done[image_id] = f"thumbs/{name}"
        return self.done[image_id]


def _figure(thumbs: _Thumbs, image_id: str, caption: str = "", original: bool = False) -> str:
    cls = ' class="orig"' if original else ""
    return (f'<figure{cls}><img loading="lazy" src="{html.escape(thumbs(image_id))}" alt="">'
            f"<figcaption><b>{html.escape(image_id)}</b><br>{html.escape(caption)}</figcaption></figure>")


def _scores(run, i: int, j: int) -> str:
    parts = []
    for sig in run.signals:
        value = run.matrices[sig.name][i, j]
        ok = value >= sig.threshold if sig.higher_is_closer else value <= sig.threshold
        text = f"{_label(sig.name)} {_fmt(float(value))} ({_cmp({'unit': sig.unit})} {_fmt(sig.threshold)})"
        parts.append(f"<b>{html.escape(text)}</b>" if ok else html.escape(text))
    if run.matrices["sha256"][i, j]:
        parts.insert(0, "SHA-256 identical")
    return "<br>".join(parts)


def _groups_section(run, thumbs: _Thumbs) -> list[str]:
    verdict = run.results.get("verdict")
    if not verdict:
        return []
    index = {it.image_id: it for it in run.dataset.items}
    out = [f"<h2>Duplicate groups ({len(verdict['groups']['groups'])})</h2>"]
    for group in verdict["groups"]["groups"]:
        families = {index[m].family for m in group["members"] if m in index}
        warn = ' <span class="bad">mixes different pictures</span>' if len(families) > 1 else ""
        out.append(f"<h3>{html.escape(group['canonical'])} — {group['size']} images{warn}</h3><div class=row>")
        for member in group["members"]:
            caption = "original" if member == group["canonical"] else link_label(group["links"].get(member, []))
            transform = index[member].transform if member in index else ""
            out.append(_figure(thumbs, member, f"{transform}; {caption}", member == group["canonical"]))
        out.append("</div>")
    return out


def _misses_section(run, thumbs: _Thumbs) -> list[str]:
    """Variants the verdict did not call a duplicate of their own base (or, without verdicts,
    that no deciding signal caught), each beside its base with the raw scores (bold: within threshold)."""
    ds, base_of = run.dataset, run.dataset.base_index()
    misses = []
    family = {x.image_id: x.family for x in ds.items}
    for i, it in enumerate(ds.items):
        if it.is_base:
            continue
        if run.verdicts is not None:
            v = run.verdicts[i]
            hit = v is not None and v.get("verdict") in DUPLICATE_VERDICTS and family.get(v.get("duplicate_of")) == it.family
            what = "no verdict" if v is None else v.get("verdict", v.get("error", {}).get("code", "?"))
        else:
            b = base_of[i]
            hit = bool(run.matrices["sha256"][i, b]) or any(
                (run.matrices[s.name][i, b] >= s.threshold if s.higher_is_closer else run.matrices[s.name][i, b] <= s.threshold)
                for s in run.signals if s.decides)
            what = "no signal within threshold"
        if not hit:
            misses.append((i, what))
    out = [f"<h2>Misses ({len(misses)})</h2>"]
    for transform in dict.fromkeys(ds.items[i].transform for i, _ in misses):
        rows = [(i, w) for i, w in misses if ds.items[i].transform == transform]
        out.append(f"<h3>{html.escape(transform)} ({len(rows)})</h3><div class=row>")
        for i, what in rows:
            b = base_of[i]
            out.append(f'<div class="row pair">{_figure(thumbs, ds.items[b].image_id, "base", True)}'
                       f"{_figure(thumbs, ds.items[i].image_id, 'verdict: ' + what)}"
                       f'<div class="scores">{_scores(run, i, b)}</div></div>')
        out.append("</div>")
    return out


def _false_positive_section(run, thumbs: _Thumbs) -> list[str]:
    """False duplicate verdicts, then pairs of different pictures that a deciding signal puts within
    its threshold (closest first, at most MAX_FALSE_PAIRS)."""
    ds = run.dataset
    index = {it.image_id: k for k, it in enumerate(ds.items)}
    out = []
    verdict = run.results.get("verdict")
    if verdict:
        wrong = [(x, index.get(x)) for x in verdict["false_duplicate_bases"]]
        wrong_pairs = [(index[x], index.get(run.verdicts[index[x]].get("duplicate_of"))) for x, _ in wrong]
        wrong_pairs += [(index[x["image_id"]], index.get(x["duplicate_of"])) for x in verdict["false_duplicate_variants"]]
        out.append(f"<h2>False duplicate verdicts ({len(wrong_pairs)})</h2><div class=row>")
        for i, j in wrong_pairs:
            if j is None:
                continue
            out.append(f'<div class="row pair">{_figure(thumbs, ds.items[j].image_id, "named original", True)}'
                       f"{_figure(thumbs, ds.items[i].image_id, ds.items[i].transform)}"
                       f'<div class="scores">{_scores(run, i, j)}</div></div>')
        out.append("</div>")
    pairs = _signal_false_pairs(run)
    out.append(f"<h2>Signal false positives: different pictures within a threshold ({len(pairs)}"
               f"{', closest ' + str(MAX_FALSE_PAIRS) + ' shown' if len(pairs) > MAX_FALSE_PAIRS else ''})</h2>"
               "<div class=row>")
    for i, j in pairs[:MAX_FALSE_PAIRS]:
        out.append(f'<div class="row pair">{_figure(thumbs, ds.items[i].image_id, ds.items[i].transform)}'
                   f"{_figure(thumbs, ds.items[j].image_id, ds.items[j].transform)}"
                   f'<div class="scores">{_scores(run, i, j)}</div></div>')
    out.append("</div>")
    return out


def _signal_false_pairs(run) -> list[tuple[int, int]]:
    ds = run.dataset
    n = len(ds)
    cross = np.triu(~ds.same, 1)
    hit = np.zeros((n, n), dtype=bool)
    badness = np.zeros((n, n))
    for s in run.signals:
        if not s.decides:
            continue
        m = run.matrices[s.name]
        sig_hit = (m >= s.threshold) if s.higher_is_closer else (m <= s.threshold)
        hit |= sig_hit
        # how far inside the threshold the pair is, in units of the threshold scale
        depth = (m - s.threshold) if s.higher_is_closer else (s.threshold - m) / 64.0
        badness = np.maximum(badness, np.where(sig_hit, depth + 1.0, 0.0))
    rows, cols = np.nonzero(hit & cross)
    order = np.argsort(-badness[rows, cols], kind="stable")
    return [(int(rows[k]), int(cols[k])) for k in order]


def write_html(run, out_dir: Path) -> Path:
    """report.html (and thumbs/) in out_dir."""
    thumbs = _Thumbs(out_dir, {it.image_id: it.path for it in run.dataset.items})
    meta = run.results["meta"]
    table = "\n".join(transform_markdown(run.results))
    body = [
        "<!doctype html><meta charset=utf-8><title>imgdedup evaluation</title>", f"<style>{_CSS}</style>",
        "<h1>imgdedup evaluation</h1>",
        (f"<p>{html.escape(meta['date'])} · {html.escape(meta['machine'])} · {meta['bases']} bases, "
        f"{meta['variants']} variants · thresholds {html.escape(str(meta['thresholds']))}<br>"
        f"<code>{html.escape(meta['command'])}</code></p>"),
        "<h2>Recall per transform</h2>", _markdown_table_to_html(table),
        *_false_positive_section(run, thumbs), *_misses_section(run, thumbs), *_groups_section(run, thumbs),
    ]
    path = out_dir / "report.html"
    path.write_text("\n".join(body))
    return path


def _markdown_table_to_html(table: str) -> str:
    rows = [line.strip("|").split(" | ") for line in table.splitlines() if not line.startswith("|---")]
    head, *rest = rows
    cell = lambda c: html.escape(c.strip().strip("`").replace("**", ""))
    return ("<table><tr>" + "".join(f"<th>{cell(c)}</th>" for c in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>" for r in rest) + "</table>")
