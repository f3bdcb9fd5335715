"""What an evaluation runs on: a list of images with the truth about which pairs are duplicates.

Two sources: the generated set (distinct bases plus their variants; duplicates = same base) or a
user's labels in imagededup's ground-truth format ``{"a.jpg": ["a_copy.jpg", ...], ...}``."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgdedup.evaluation import variants as V

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
BASE = "base"  # the transform name of an original
LABELLED = "labelled"  # the transform name of a user-labelled duplicate


@dataclass(frozen=True)
class Item:
    image_id: str
    path: Path
    family: str  # duplicates share a family: the base id, or a connected component of the labels
    transform: str  # BASE, a transform name, or LABELLED
    is_base: bool  # one image per family; pairs of bases are all distinct pictures


@dataclass
class Dataset:
    items: list[Item]
    same: np.ndarray  # N x N bool: True where the two images are duplicates (diagonal True)
    source: str  # "generated" or "ground_truth"

    def __len__(self) -> int:
        return len(self.items)

    def base_index(self) -> np.ndarray:
        """For each item, the index of its family's base (itself for a base)."""
        first = {it.family: i for i, it in enumerate(self.items) if it.is_base}
        return np.array([first[it.family] for it in self.items])

    def subset(self, keep: Sequence[int]) -> Dataset:
        keep = np.asarray(keep, dtype=int)
        return Dataset([self.items[i] for i in keep], self.same[np.ix_(keep, keep)], self.source)


def default_bases_dir() -> Path:
    """The shared corpus beside the repository (or beside the working directory), wherever run from."""
    repo = Path(__file__).resolve().parents[3]
    for candidate in (repo.parent / "shared" / "corpus" / "base", Path.cwd().parent / "shared" / "corpus" / "base",
                      Path.cwd() / "shared" / "corpus" / "base"):
        if candidate.is_dir():
            return candidate
    return repo.parent / "shared" / "corpus" / "base"


def list_images(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def generated(bases: Sequence[Path], out_dir: Path, seed: int, transforms: Sequence[V.Transform],
              progress=None, threads: int = 2) -> Dataset:
    """Bases plus every variant (written to out_dir); duplicates are exactly the pairs of one family.

    Files are reused when out_dir/manifest.json says they came from the same bases (by SHA-256),
    seed, transforms, generator source and Pillow: generation is deterministic, so they are equal."""
    key = _generation_key(bases, seed, transforms)
    manifest = out_dir / "manifest.json"
    cached = manifest.is_file() and json.loads(manifest.read_text()).get("key") == key
    per_base = None
    if cached:
        per_base = [[V.Variant(f"{b.stem}__{t.name}", b.stem, t.name, out_dir / f"{b.stem}__{t.name}.{t.encoding[2]}")
                     for t in transforms] for b in bases]
        if not all(v.path.is_file() for vs in per_base for v in vs):
            per_base = None
        elif progress:
            progress(sum(len(vs) for vs in per_base))
    if per_base is None:
        manifest.unlink(missing_ok=True)
        with ThreadPoolExecutor(threads) as pool:  # Pillow releases the GIL while resizing and encoding
            per_base = list(pool.map(lambda b: V.generate([b], out_dir, seed, transforms, progress), bases))
        manifest.write_text(json.dumps({"key": key}))
    items = [Item(b.stem, b, b.stem, BASE, True) for b in bases]
    items += [Item(v.image_id, v.path, v.base_id, v.transform, False) for vs in per_base for v in vs]
    if len({it.image_id for it in items}) != len(items):
        raise ValueError("two bases share a file stem; rename them so image ids are unique")
    family = np.array([it.family for it in items])
    return Dataset(items, family[:, None] == family[None, :], "generated")


def _generation_key(bases: Sequence[Path], seed: int, transforms: Sequence[V.Transform]) -> str:
    import PIL

    h = hashlib.sha256(f"{seed}|{PIL.__version__}|{[t.name for t in transforms]}".encode())
    h.update(Path(V.__file__).read_bytes())
    for b in bases:
        h.update(b.name.encode() + hashlib.sha256(b.read_bytes()).digest())
    return h.hexdigest()


def from_ground_truth(images_dir: Path, truth_file: Path) -> Dataset:
    """Every image in images_dir plus the labels: a file's listed duplicates, made symmetric.

    Families are the connected components of the labels; the first file of each (sorted) plays the
    base, so "pairs of bases" are pairs of different labelled pictures."""
    truth = json.loads(truth_file.read_text())
    if not isinstance(truth, dict) or not all(isinstance(v, list) for v in truth.values()):
        raise ValueError(f"{truth_file}: expected {{file: [duplicate files]}} (imagededup's format)")
    names = sorted({p.name for p in list_images(images_dir)} | set(truth) | {d for v in truth.values() for d in v})
    missing = [n for n in names if not (images_dir / n).is_file()]
    if missing:
        raise ValueError(f"{len(missing)} labelled files are not in {images_dir}: {missing[:5]}")
    index = {n: i for i, n in enumerate(names)}
    same = np.eye(len(names), dtype=bool)
    for name, dups in truth.items():
        for dup in dups:
            same[index[name], index[dup]] = same[index[dup], index[name]] = True
    family = _components(same)
    firsts = {}
    for i, f in enumerate(family):
        firsts.setdefault(f, i)
    items = [Item(n, images_dir / n, names[firsts[family[i]]], BASE if firsts[family[i]] == i else LABELLED,
                  firsts[family[i]] == i) for i, n in enumerate(names)]
    return Dataset(items, same, "ground_truth")


def _components(adjacency: np.ndarray) -> list[int]:
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    _, labels = connected_components(csr_matrix(adjacency), directed=False)
    return labels.tolist()
