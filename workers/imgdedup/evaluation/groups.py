"""Duplicate groups from verdicts: connected components with a guard against chaining.

Near-duplicate links are not transitive: a crop of a crop of a crop ends up as a different picture,
and plain connected components glue such chains (and unrelated images that each resemble one
member) into one ever-growing blob. So an image joins a group only if it matches the group's
canonical original, or at least `min_share` of the group's members; otherwise it starts its own group
and the refused link is recorded, so a moderator can still see it."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

DUPLICATE_VERDICTS = ("exact_duplicate", "near_duplicate")


@dataclass
class Group:
    """One duplicate group: its canonical original (the first image seen) and its members in order."""

    canonical: str
    members: list[str] = field(default_factory=list)
    #: member -> the matches its verdict listed (signal and distance/similarity), for labels
    links: dict[str, list[dict]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.members)


@dataclass
class Grouping:
    groups: list[Group]
    #: links the guard refused: {"image_id", "group", "support", "share"}
    refused: list[dict]

    def duplicate_groups(self) -> list[Group]:
        """Groups with at least two members, largest first (ties by canonical id)."""
        return sorted((g for g in self.groups if g.size > 1), key=lambda g: (-g.size, g.canonical))

    def to_json(self) -> dict:
        dups = self.duplicate_groups()
        return {"groups": [{"canonical": g.canonical, "size": g.size, "members": g.members, "links": g.links}
                           for g in dups],
                "sizes": _size_histogram(dups), "images": sum(g.size for g in self.groups),
                "refused_links": self.refused}


def _size_histogram(groups: list[Group]) -> dict[str, int]:
    out: dict[str, int] = {}
    for g in groups:
        out[str(g.size)] = out.get(str(g.size), 0) + 1
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def read_jsonl(lines: Iterable[str]) -> Iterator[dict]:
    """Verdict dicts from JSON lines, skipping blank lines; a bad line raises with its number."""
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"line {number} is not JSON: {exc}") from None


def build_groups(verdicts: Iterable[dict], min_share: float = 0.6, max_matches: int = 10) -> Grouping:
    """Groups from verdicts in the order they were decided (the worker's order is the ground truth
    of which image came first). Dead letters are skipped; a 'deleted' verdict removes the image.

    A verdict lists at most `max_matches` matches (the worker's setting), so the share is taken of
    min(group size, max_matches): otherwise no image could ever join a large group by support."""
    if not 0.0 < min_share <= 1.0:
        raise ValueError("min_share must be in (0, 1]")
    groups: list[Group] = []
    where: dict[str, Group] = {}
    refused: list[dict] = []

    def new_group(image_id: str) -> Group:
        group = Group(image_id, [image_id])
        groups.append(group)
        where[image_id] = group
        return group

    for verdict in verdicts:
        image_id, kind = verdict.get("image_id"), verdict.get("verdict")
        if "error" in verdict or image_id is None or kind is None:
            continue
        if kind == "deleted":
            _remove(where.pop(image_id, None), image_id)
            continue
        if image_id in where:  # a replayed event: the first verdict stands
            continue
        if kind not in DUPLICATE_VERDICTS:
            new_group(image_id)
            continue
        matches = verdict.get("matches") or []
        # the images this one actually matched; duplicate_of alone is the worker's (transitive) choice
        # of original, so it counts only when the verdict lists no matches
        linked = {m["image_id"] for m in matches if m.get("image_id") and m["image_id"] != image_id}
        if not linked and verdict.get("duplicate_of"):
            linked.add(verdict["duplicate_of"])
        for other in linked - where.keys():  # matched an image decided before this input began
            new_group(other)
        target, best = _choose(linked, where, verdict.get("duplicate_of"), min_share, max_matches)
        if target is None:
            group = new_group(image_id)
            if best is not None:
                refused.append({"image_id": image_id, "group": best[0].canonical, "support": best[1],
                                "share": round(best[1] / min(best[0].size, max_matches), 3)})
        else:
            target.members.append(image_id)
            where[image_id] = target
            group = target
        group.links[image_id] = [m for m in matches if m.get("image_id") in group.members]
    return Grouping(groups, refused)


def _choose(linked: set[str], where: dict[str, Group], duplicate_of: str | None, min_share: float,
            max_matches: int):
    """The group the image may join (canonical match or enough support), preferring the group of
    `duplicate_of`, then the most supported; plus the best refused candidate for the record."""
    candidates: dict[int, tuple[Group, int]] = {}
    for other in linked:
        group = where[other]
        candidates[id(group)] = (group, len(linked.intersection(group.members)))
    allowed = [(g, s) for g, s in candidates.values()
               if g.canonical in linked or s / min(g.size, max_matches) >= min_share]
    if allowed:
        allowed.sort(key=lambda gs: (duplicate_of not in gs[0].members, -gs[1], gs[0].canonical))
        return allowed[0][0], None
    best = max(candidates.values(), key=lambda gs: (gs[1] / min(gs[0].size, max_matches), gs[1]), default=None)
    return None, best


def _remove(group: Group | None, image_id: str) -> None:
    if group is not None and image_id in group.members:
        group.members.remove(image_id)
        group.links.pop(image_id, None)


# --- images and contact sheets -----------------------------------------------------------------

def resolve_images(ids: Iterable[str], images_dir: Path | None = None,
                   mapping: dict[str, str] | None = None) -> dict[str, Path]:
    """image_id -> file, from an explicit mapping first, else `images_dir/<id>` or `<id>.<ext>`."""
    out: dict[str, Path] = {}
    for image_id in ids:
        if mapping and image_id in mapping:
            out[image_id] = Path(mapping[image_id])
        elif images_dir is not None:
            exact = images_dir / image_id
            found = [exact] if exact.is_file() else sorted(images_dir.glob(f"{_glob_escape(image_id)}.*"))
            if found:
                out[image_id] = found[0]
    return out


def _glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in text)


def link_label(links: list[dict]) -> str:
    """A short text for a member's best link: 'sscd 0.93', 'phash 4', 'sha256'."""
    if not links:
        return ""
    parts = []
    for m in links[:2]:
        if "distance" in m and m["distance"] is not None:
            parts.append(f"{m.get('signal', '?')} {m['distance']}")
        elif "similarity" in m and m["similarity"] is not None:
            parts.append(f"{m.get('signal', '?')} {m['similarity']:.3f}")
        else:
            parts.append(str(m.get("signal", "?")))
    return ", ".join(parts)


def contact_sheet(group: Group, paths: dict[str, Path], out: Path, thumb: int = 160, columns: int = 6) -> Path:
    """One PNG with the group's images in a grid, canonical first, each labelled with its id and link."""
    members = group.members
    rows = (len(members) + columns - 1) // columns
    cols = min(columns, len(members))
    label_h = 30
    sheet = Image.new("RGB", (cols * (thumb + 8) + 8, rows * (thumb + label_h + 8) + 8), (250, 250, 250))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=11)
    for i, image_id in enumerate(members):
        x, y = 8 + (i % cols) * (thumb + 8), 8 + (i // cols) * (thumb + label_h + 8)
        tile = _thumbnail(paths.get(image_id), thumb)
        sheet.paste(tile, (x + (thumb - tile.width) // 2, y + (thumb - tile.height) // 2))
        if image_id == group.canonical:
            draw.rectangle((x - 3, y - 3, x + thumb + 2, y + thumb + 2), outline=(30, 120, 220), width=3)
        draw.text((x, y + thumb + 2), _fit(image_id, 26), font=font, fill=(20, 20, 20))
        draw.text((x, y + thumb + 15), "original" if image_id == group.canonical
                  else link_label(group.links.get(image_id, [])), font=font, fill=(90, 90, 90))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, "PNG")
    return out


def _thumbnail(path: Path | None, size: int) -> Image.Image:
    """A thumbnail, or a grey tile saying the file is missing/unreadable (a sheet never fails on one file)."""
    try:
        with Image.open(path) as im:  # type: ignore[arg-type]
            im.draft("RGB", (size, size))
            tile = ImageOps.exif_transpose(im).convert("RGB")
            tile.thumbnail((size, size))
            return tile
    except Exception:  # noqa: BLE001 -- any unreadable file becomes a grey tile
        tile = Image.new("RGB", (size, size), (200, 200, 200))
        ImageDraw.Draw(tile).text((8, size // 2 - 6), "no image", fill=(60, 60, 60))
        return tile


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
