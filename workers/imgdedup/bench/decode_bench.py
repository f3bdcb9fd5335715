"""Hash-tier cost and draft-decoding accuracy on the shared corpus.

Run ``python -m imgdedup.bench.decode_bench`` (``--help`` for options). It prints two tables:

1. per draft policy (the shorter side JPEG draft decoding may not go below; "full" = no draft; "luma":
   the JPEG's luma plane only, as in a worker without embedders, also compared with the RGB draft):
   how many corpus images and variants get a pHash different from the full decode, by how many
   bits at most; the mean and max Hamming distance between an original and its variants when both
   are hashed under the policy (does drafting hurt near-duplicate matching?); and single-thread
   images/s of decode + hash_features on the corpus;
2. batch throughput of full and draft decoding on 1 thread, 2 threads and 2 processes;
3. (``--only child``) CPU per image of the worker's decoder process, fed ``file://`` sources in chunks
   as a saturated worker feeds it, against the decode floor's loop on the same files in this process.

Numbers vary with machine load; each speed is the best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image, ImageOps

from imgdedup.bench.stream import cpu_seconds
from imgdedup.config import Settings, load_settings
from imgdedup.decode import DRAFT_MIN_SIDE, FORMATS, decode, draft_scale, plain_grey, to_rgb
from imgdedup.errors import DeadLetterError
from imgdedup.extract import DecodeProcesses
from imgdedup.features import (
    detail_from_dct,
    grey32,
    hash_features,
    low_dct,
    phash64,
    phash_from_dct,
    sha256_hex,
)
from imgdedup.resample import one_blas_thread

CORPUS = Path(__file__).resolve().parents[3].parent / "shared" / "corpus" / "base"
#: Draft policies compared: (floor, luma only); floor None = full decode.
POLICIES = ((None, False), (512, False), (256, False), (256, True), (128, False), (64, False), (32, False))
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


def _definition(data: bytes) -> int:
    """imagehash.phash of the full decode: the pHash's definition (corpus files carry no EXIF orientation)."""
    return int(str(imagehash.phash(Image.open(io.BytesIO(data)).convert("RGB"))), 16)


def draft_deviation(blobs: list[bytes], settings: Settings, floor: int | None) -> list[int]:
    """pHash bits changed by draft decoding at ``floor`` versus imagehash on the full decode, per blob."""
    return [(_definition(data) ^ _phash(data, settings, floor)).bit_count() for data in blobs]


def _phash(data: bytes, settings: Settings, floor: int | None, luma: bool = False) -> int:
    if floor is None:
        return phash64(decode(data, settings.model_copy(update={"draft_decode": False})).image)
    return phash64(decode(data, settings, draft_min_side=floor, luma_only=luma).image)


def _work(args: tuple[bytes, bool, int, bool]) -> int:
    """One image through decode + hash_features (module level so a process pool can pickle it)."""
    data, draft, floor, luma = args
    settings = _settings(draft)
    return hash_features(data, decode(data, settings, draft_min_side=floor, luma_only=luma), settings).phash


@functools.cache
def _settings(draft: bool) -> Settings:
    return load_settings(draft_decode=draft)


def _best_rates(runs: dict[str, Callable[[], int]], repeat: int) -> dict[str, tuple[float, float]]:
    """(images per wall second, images per CPU second of this process) of each run, best of ``repeat``.

    Rounds interleave the runs so a burst of load from other processes hits them alike; the CPU rate
    is what a single thread gets on an idle core (it ignores time spent waiting for one), and is
    meaningless for the process pool, whose work is done in its children. BLAS gets one thread, as in
    the worker's decoder processes.
    """
    best = {name: (0.0, 0.0) for name in runs}
    with one_blas_thread():
        for _ in range(repeat):
            for name, run in runs.items():
                wall, cpu = time.perf_counter(), time.process_time()
                n = run()
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                best[name] = (max(best[name][0], n / wall), max(best[name][1], n / max(cpu, 1e-9)))
    return best


def policy_table(blobs: list[bytes], repeat: int) -> list[tuple]:
    """Per policy: images, how many differ from the definition, max bits, mean and max distance between
    each original and its variants (both hashed under the policy), and speeds."""
    settings = load_settings()
    variant_sets = {name: [make_variants(b, (name,))[name] for b in blobs] for name in VARIANTS}
    runs = {"definition": lambda: sum(1 for b in blobs if _definition(b) >= 0)}
    accuracy = {}
    for floor, luma in POLICIES:
        base = [_phash(b, settings, floor, luma) for b in blobs]
        diffs = [(h ^ _definition(b)).bit_count() for h, b in zip(base, blobs)]
        pairs = []
        for vblobs in variant_sets.values():
            hashes = [_phash(b, settings, floor, luma) for b in vblobs]
            diffs += [(h ^ _definition(b)).bit_count() for h, b in zip(hashes, vblobs)]
            pairs += [(h ^ o).bit_count() for h, o in zip(hashes, base)]
        accuracy[floor, luma] = (len(diffs), sum(d > 0 for d in diffs), max(diffs), sum(pairs) / len(pairs),
                                 max(pairs))
        args = [(b, floor is not None, floor or 0, luma) for b in blobs]
        runs[floor, luma] = lambda args=args: len([_work(a) for a in args])
    speed = _best_rates(runs, repeat)
    rows = [("imagehash.phash(Image.open) (definition)", "", "", "", "", "", *speed["definition"])]
    for floor, luma in POLICIES:
        label = "full decode" if floor is None else f"draft, shorter side >= {floor}" + (", luma" if luma else "")
        rows.append((label, *accuracy[floor, luma], *speed[floor, luma]))
    return rows


def luma_shift(blobs: list[bytes]) -> tuple[int, int, int]:
    """(images, how many of them change pHash, max bits) between the RGB draft and luma only at the
    chosen floor, on the originals and every variant: what turning the embedders on or off moves."""
    settings = load_settings()
    images = blobs + [v for b in blobs for name, v in make_variants(b).items() if name != "orig"]
    bits = [(_phash(b, settings, DRAFT_MIN_SIDE) ^ _phash(b, settings, DRAFT_MIN_SIDE, luma=True)).bit_count()
            for b in images]
    return len(images), sum(b > 0 for b in bits), max(bits)


def parallel_table(blobs: list[bytes], repeat: int, copies: int = 4) -> list[tuple]:
    threads, procs = ThreadPoolExecutor(2), ProcessPoolExecutor(2)
    with threads, procs:
        for pool in (threads, procs):
            list(pool.map(_work, [(blobs[0], d, DRAFT_MIN_SIDE, False) for d in (False, True)] * 4))  # warm up
        runs = {}
        for draft in (False, True):
            args = [(b, draft, DRAFT_MIN_SIDE, False) for b in blobs] * copies
            runs[(draft, "serial")] = lambda args=args: len([_work(a) for a in args])
            for name, pool in (("threads", threads), ("procs", procs)):
                runs[(draft, name)] = lambda args=args, pool=pool: len(_map(pool, args))
        speed = _best_rates(runs, repeat)
    return [("draft" if d else "full", speed[(d, "serial")][0], speed[(d, "threads")][0], speed[(d, "procs")][0])
            for d in (False, True)]


def gil_table(blobs: list[bytes], repeat: int) -> list[tuple[str, float, float]]:
    """CPU ms per image of each step of decode + hash_features, and whether it holds the GIL.

    Thread CPU time does not count time spent waiting for a core, so this holds on a busy machine
    too. The steps mirror ``decode``/``hash_features``; Pillow's decoders, ``convert`` and ``resize``
    and hashlib (on large buffers) run without the GIL. With ``held`` ms of GIL-bound work out of
    ``total``, two threads can reach at most min(2, total / held) times one thread.
    """
    steps = ("open header", "decode pixels", "orient + RGB", "grey 32x32", "DCT + median", "sha256")
    held_steps = ("open header", "DCT + median")
    rows = []
    for mode in ("full", "draft", "luma"):
        best = dict.fromkeys(steps, float("inf"))
        for _ in range(repeat):
            spent = np.zeros(len(steps))
            for data in blobs:
                spent += np.diff(_timed_steps(data, mode))
            best = {k: min(best[k], v * 1000 / len(blobs)) for k, v in zip(steps, spent)}
        total, held = sum(best.values()), sum(best[k] for k in held_steps)
        rows += [(mode, k + (" (GIL)" if k in held_steps else ""), v) for k, v in best.items()]
        rows.append((mode, f"total; 2-thread bound min(2, total/GIL) = {min(2.0, total / held):.2f}", total))
    return rows


def _timed_steps(data: bytes, mode: str) -> list[float]:
    """Thread CPU clock before and after each step of decode + hash_features on one image; ``mode`` is
    "full", "draft" or "luma" (draft, and the luma plane only: the step "orient + RGB" is then orient only)."""
    marks = [time.thread_time()]
    im = Image.open(io.BytesIO(data), formats=FORMATS)
    scale = draft_scale(*im.size, DRAFT_MIN_SIDE) if mode != "full" else 1
    if scale > 1 or mode == "luma":
        im.draft("L" if mode == "luma" else "RGB", (im.width // scale, im.height // scale))
    marks.append(time.thread_time())
    im.load()
    marks.append(time.thread_time())
    oriented = ImageOps.exif_transpose(im)
    rgb = oriented if mode == "luma" and plain_grey(oriented) else to_rgb(oriented)
    marks.append(time.thread_time())
    grey = grey32(rgb)
    marks.append(time.thread_time())
    low = low_dct(grey)
    phash_from_dct(low), detail_from_dct(low)
    marks.append(time.thread_time())
    sha256_hex(data)
    marks.append(time.thread_time())
    return marks


#: Images handed to the one decoder process at a time: chunks of 8, as a saturated worker's 64-event
#: batch is cut for two processes (``extract.chunk_size``).
CHILD_SUBMIT = 32


#: Passes over the files per run of ``child_table``: enough CPU time per run for /proc's 10 ms ticks.
CHILD_COPIES = 4


def child_table(paths: list[Path], repeat: int, copies: int = CHILD_COPIES) -> dict[str, float]:
    """Least CPU ms per image of one decoder process and of the floor loop, alternating runs.

    Why: the bench's "decoder processes CPU per event" sits above the floor's CPU per image in some
    runs and not in others. This separates what the child itself adds (the file read, the pool's
    pickles and pipes) from what a machine shared with the main thread, Tansu and Redis adds: here
    the child runs alone. The child's CPU is read from /proc, so this process's own work is not in it."""
    from imgdedup.bench.baselines import floor_loop  # here: baselines imports this module

    settings = load_settings(file_roots=sorted({p.resolve().parent for p in paths}), sscd_enabled=False)
    sources = [{"uri": p.resolve().as_uri()} for p in paths] * copies
    blobs = [p.read_bytes() for p in paths] * copies
    best = {"decoder process (file:// sources)": float("inf"), "floor loop (bytes in memory)": float("inf")}
    pool = DecodeProcesses(settings, processes=1)
    try:
        (pid,) = pool.warm()
        for _ in range(repeat):
            started = cpu_seconds(pid)
            futures = [f for i in range(0, len(sources), CHILD_SUBMIT) for f in pool.submit(sources[i:i + CHILD_SUBMIT])]
            failed = [r for r in (f.result() for f in futures) if isinstance(r, DeadLetterError)]
            if failed:
                raise RuntimeError(f"the decoder process failed {len(failed)} images: {failed[0]}")
            spent = {"decoder process (file:// sources)": cpu_seconds(pid) - started}
            started = time.process_time()
            floor_loop(blobs, settings)
            spent["floor loop (bytes in memory)"] = time.process_time() - started
            best = {k: min(best[k], spent[k] * 1000 / len(sources)) for k in best}
    finally:
        pool.close()
    return best


def _map(pool: Executor, args: list) -> list:
    chunk = 8 if isinstance(pool, ProcessPoolExecutor) else 1
    return list(pool.map(_work, args, chunksize=chunk))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="directory of *.jpg (default: shared corpus)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per speed, best kept")
    parser.add_argument("--only", choices=("policy", "gil", "parallel", "child"), help="print just one of the tables")
    args = parser.parse_args(argv)
    one_blas_thread()  # as in the worker's decoder processes; forked pool processes inherit it
    paths = sorted(args.corpus.glob("*.jpg"))
    blobs = [p.read_bytes() for p in paths]
    print(f"{len(blobs)} corpus images; variants: orig + {', '.join(VARIANTS)}; load {_load()}\n")
    if args.only in (None, "policy"):
        print(f"{'policy':<41} {'images':>6} {'differ':>6} {'max bits':>8} {'var mean':>8} {'var max':>7}"
              f" {'img/s':>6} {'img/CPU-s':>9}")
        for label, n, differ, worst, vmean, vmax, wall, cpu in policy_table(blobs, args.repeat):
            vmean = f"{vmean:.2f}" if vmean != "" else ""
            print(f"{label:<41} {n!s:>6} {differ!s:>6} {worst!s:>8} {vmean:>8} {vmax!s:>7} {wall:>6.0f} {cpu:>9.0f}")
        n, differ, worst = luma_shift(blobs)
        print(f"luma only against the RGB draft (>= {DRAFT_MIN_SIDE}): {differ} of {n} pHashes differ, by at most"
              f" {worst} bits")
    if args.only in (None, "gil"):
        print(f"\nCPU ms per image (thread CPU time, so machine load does not inflate it); load {_load()}")
        for mode, step, ms in gil_table(blobs, args.repeat):
            print(f"{mode:<6} {step:<52} {ms:>6.2f}")
    if args.only == "child":
        print(f"CPU ms per image, least of {args.repeat} alternating runs over {len(paths) * CHILD_COPIES} images;"
              f" load {_load()}")
        (child, child_ms), (floor, floor_ms) = child_table(paths, args.repeat).items()
        print(f"{child:<36} {child_ms:>6.2f}\n{floor:<36} {floor_ms:>6.2f}")
        print(f"{'decoder process ÷ floor loop':<36} {child_ms / floor_ms:>6.2f}")
    if args.only in ("policy", "gil", "child"):
        return
    print(f"\nbatch of {len(blobs) * 4} images, decode + hash_features, images/s (draft floor {DRAFT_MIN_SIDE});"
          f" load {_load()}")
    print(f"{'decode':<8} {'1 thread':>9} {'2 threads':>10} {'2 procs':>8} {'thr/1':>6} {'proc/thr':>9}")
    for label, serial, threads, procs in parallel_table(blobs, args.repeat):
        print(f"{label:<8} {serial:>9.0f} {threads:>10.0f} {procs:>8.0f} {threads / serial:>6.2f} {procs / threads:>9.2f}")
    print(f"load at the end {_load()} (1/5/15-min load average; other processes make wall-clock rates noisy)")


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
