"""Hash-tier cost and draft-decoding accuracy on the shared corpus.

Run ``python -m imgdedup.bench.decode_bench`` (``--help`` for options). It prints two tables:

1. per draft policy (the shorter side JPEG draft decoding may not go below; "full" = no draft):
   how many corpus images and variants get a pHash different from the full decode, by how many
   bits at most, and single-thread images/s of decode + hash_features on the corpus;
2. batch throughput of full and draft decoding on 1 thread, 2 threads and 2 processes.

Numbers vary with machine load; each speed is the best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import functools
import io
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import imagehash
from PIL import Image

from imgdedup.config import Settings, load_settings
from imgdedup.decode import DRAFT_MIN_SIDE, decode
from imgdedup.features import hash_features, phash64

CORPUS = Path(__file__).resolve().parents[3].parent / "shared" / "corpus" / "base"
#: Draft floors compared (None = full decode).
POLICIES = (None, 512, 256, 128, 64, 32)
#: Variants of each corpus JPEG (name -> resize factor, JPEG options).
VARIANTS = {
    "q75": (1.0, {"quality": 75}),
    "prog444": (1.0, {"quality": 90, "subsampling": 0, "progressive": True}),
    "x0.6": (0.6, {"quality": 85}),
    "x1.7": (1.7, {"quality": 85}),
    "x2.5": (2.5, {"quality": 85}),
}


def make_variants(data: bytes, names: tuple[str, ...] = tuple(VARIANTS)) -> dict[str, bytes]:
    """Deterministic re-encodings and resizes of one JPEG (plus the original as "orig")."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    out = {"orig": data}
    for name in names:
        factor, options = VARIANTS[name]
        im = image if factor == 1.0 else image.resize(
            (round(image.width * factor), round(image.height * factor)), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "JPEG", **options)
        out[name] = buf.getvalue()
    return out


def draft_deviation(blobs: list[bytes], settings: Settings, floor: int | None) -> list[int]:
    """pHash bits changed by draft decoding at ``floor`` versus imagehash on the full decode, per blob."""
    out = []
    for data in blobs:
        exact = int(str(imagehash.phash(Image.open(io.BytesIO(data)).convert("RGB"))), 16)
        out.append((exact ^ _phash(data, settings, floor)).bit_count())
    return out


def _phash(data: bytes, settings: Settings, floor: int | None) -> int:
    if floor is None:
        return phash64(decode(data, settings.model_copy(update={"draft_decode": False})).image)
    return phash64(decode(data, settings, draft_min_side=floor).image)


def _work(args: tuple[bytes, bool, int]) -> int:
    """One image through decode + hash_features (module level so a process pool can pickle it)."""
    data, draft, floor = args
    settings = _settings(draft)
    return hash_features(data, decode(data, settings, draft_min_side=floor), settings).phash


@functools.cache
def _settings(draft: bool) -> Settings:
    return load_settings(draft_decode=draft)


def _best_rates(runs: dict[str, Callable[[], int]], repeat: int) -> dict[str, float]:
    """Images/s of each run, best of ``repeat`` rounds; rounds interleave the runs so a burst of load
    from other processes hits them alike."""
    best = dict.fromkeys(runs, 0.0)
    for _ in range(repeat):
        for name, run in runs.items():
            start = time.perf_counter()
            n = run()
            best[name] = max(best[name], n / (time.perf_counter() - start))
    return best


def policy_table(blobs: list[bytes], repeat: int) -> list[tuple]:
    settings = load_settings()
    variant_sets = {name: [make_variants(b, (name,))[name] for b in blobs] for name in VARIANTS}
    runs = {"definition": lambda: sum(1 for b in blobs if imagehash.phash(Image.open(io.BytesIO(b)).convert("RGB")))}
    accuracy = {}
    for floor in POLICIES:
        diffs = draft_deviation(blobs, settings, floor)
        for vblobs in variant_sets.values():
            diffs += draft_deviation(vblobs, settings, floor)
        accuracy[floor] = (len(diffs), sum(d > 0 for d in diffs), max(diffs))
        args = [(b, floor is not None, floor or 0) for b in blobs]
        runs[str(floor)] = lambda args=args: len([_work(a) for a in args])
    speed = _best_rates(runs, repeat)
    rows = [("imagehash.phash(Image.open) (definition)", "", "", "", speed["definition"])]
    for floor in POLICIES:
        label = "full decode" if floor is None else f"draft, shorter side >= {floor}"
        rows.append((label, *accuracy[floor], speed[str(floor)]))
    return rows


def parallel_table(blobs: list[bytes], repeat: int, copies: int = 4) -> list[tuple]:
    threads, procs = ThreadPoolExecutor(2), ProcessPoolExecutor(2)
    with threads, procs:
        for pool in (threads, procs):
            list(pool.map(_work, [(blobs[0], d, DRAFT_MIN_SIDE) for d in (False, True)] * 4))  # warm up
        runs = {}
        for draft in (False, True):
            args = [(b, draft, DRAFT_MIN_SIDE) for b in blobs] * copies
            runs[(draft, "serial")] = lambda args=args: len([_work(a) for a in args])
            for name, pool in (("threads", threads), ("procs", procs)):
                runs[(draft, name)] = lambda args=args, pool=pool: len(_map(pool, args))
        speed = _best_rates(runs, repeat)
    return [("draft" if d else "full", speed[(d, "serial")], speed[(d, "threads")], speed[(d, "procs")])
            for d in (False, True)]


def _map(pool: Executor, args: list) -> list:
    chunk = 8 if isinstance(pool, ProcessPoolExecutor) else 1
    return list(pool.map(_work, args, chunksize=chunk))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="directory of *.jpg (default: shared corpus)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per speed, best kept")
    args = parser.parse_args(argv)
    blobs = [p.read_bytes() for p in sorted(args.corpus.glob("*.jpg"))]
    print(f"{len(blobs)} corpus images; variants: orig + {', '.join(VARIANTS)}\n")
    print(f"{'policy':<38} {'images':>6} {'differ':>6} {'max bits':>8} {'img/s (1 thread)':>17}")
    for label, n, differ, worst, speed in policy_table(blobs, args.repeat):
        print(f"{label:<38} {n!s:>6} {differ!s:>6} {worst!s:>8} {speed:>17.0f}")
    print(f"\nbatch of {len(blobs) * 4} images, decode + hash_features, images/s (draft floor {DRAFT_MIN_SIDE})")
    print(f"{'decode':<8} {'1 thread':>9} {'2 threads':>10} {'2 procs':>8} {'thr/1':>6} {'proc/thr':>9}")
    for label, serial, threads, procs in parallel_table(blobs, args.repeat):
        print(f"{label:<8} {serial:>9.0f} {threads:>10.0f} {procs:>8.0f} {threads / serial:>6.2f} {procs / threads:>9.2f}")


if __name__ == "__main__":
    main()
