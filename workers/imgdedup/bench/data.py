"""The images the throughput benches run on: the shared corpus plus generated variants, each a distinct
file, so a run of N events never sends the same picture twice.

Variants come from the evaluation's generator (one list of transforms for the whole project) and
are cached on disk: generating them costs more than benching them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from imgdedup.evaluation import variants

#: Transforms used, in order; ``--events`` takes bases x the first k of them. PNG and upscaling are
#: left out: their files exceed what an inline event may carry and are rare in a listing feed.
TRANSFORMS = (
    "jpeg_q75",
    "resize_50",
    "crop_90",
    "flip_h",
    "jpeg_q50",
    "rotate_3",
    "caption",
    "webp",
    "grayscale",
    "crop_80",
    "brightness_130",
    "noise",
    "logo",
    "border_10",
    "resize_25",
    "letterbox_16x9",
    "squash_70",
    "rotate_90",
    "contrast_60",
    "blur",
    "crop_offcentre_80",
    "saturation_150",
    "rotate_10",
    "crop_70",
    "brightness_70",
    "rotate_180",
    "screenshot",
    "jpeg_q30",
    "crop_50",
    "crop_90+resize_50+jpeg_q50",
)


def corpus_dir(repo: Path | None = None) -> Path:
    """The shared corpus beside the repository (``<repo>/../shared/corpus/base``)."""
    repo = repo or Path(__file__).resolve().parents[3]
    return (repo / ".." / "shared" / "corpus" / "base").resolve()


def bench_files(bases: list[Path], count: int, cache_dir: Path, seed: int = 0) -> list[Path]:
    """``count`` distinct image files: every base first, then variants transform by transform.

    Cached in ``cache_dir`` (keyed by the seed, so another seed regenerates).
    """
    files = list(bases[:count])
    needed = count - len(files)
    if needed <= 0:
        return files
    rounds = -(-needed // len(bases))
    if rounds > len(TRANSFORMS):
        raise ValueError(
            f"at most {len(bases) * (len(TRANSFORMS) + 1)} distinct files from {len(bases)} bases"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    stamp = cache_dir / "seed.json"
    if not stamp.exists() or json.loads(stamp.read_text()).get("seed") != seed:
        for old in cache_dir.glob("*__*"):
            old.unlink()
        stamp.write_text(json.dumps({"seed": seed}))
    for name in TRANSFORMS[:rounds]:
        transform = variants.BY_NAME[name]
        ext = transform.encoding[2]
        for base in bases:
            path = cache_dir / f"{base.stem}__{name}.{ext}"
            if not path.exists():
                rng = np.random.default_rng(variants.variant_seed(seed, base.stem, name))
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(variants.apply(transform, base.read_bytes(), rng))
                tmp.replace(path)
            files.append(path)
            if len(files) == count:
                return files
    return files
