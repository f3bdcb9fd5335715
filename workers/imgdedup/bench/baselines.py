"""The loops the worker is measured against, run in this process on the same bytes the worker gets.

- decode floor: ``decode`` (JPEG draft, luma only) + ``hash_features`` (SHA-256, pHash, detail), one
  thread -- the least work that produces the worker's hash-tier features;
- imagededup-style: ``Image.open(...).convert("RGB")`` without draft + ``imagehash.phash``, one thread
  (decode_bench's definition of the pHash);
- raw SSCD: decode (as the pipeline does for SSCD) + the SSCD embedder in batches, no Redis, no Kafka.

Rates are (images per wall second, images per CPU second of this process), best of ``repeat`` runs
interleaved so a burst of load from other processes hits all loops alike (decode_bench._best_rates).
"""

from __future__ import annotations

import multiprocessing
import os
import time

from imgdedup.bench.decode_bench import _best_rates, _definition
from imgdedup.config import Settings
from imgdedup.decode import decode
from imgdedup.features import hash_features
from imgdedup.resample import one_blas_thread


def floor_loop(blobs: list[bytes], settings: Settings) -> int:
    for data in blobs:
        hash_features(data, decode(data, settings, luma_only=True), settings)
    return len(blobs)


def imagededup_loop(blobs: list[bytes]) -> int:
    for data in blobs:
        _definition(data)
    return len(blobs)


def sscd_loop(blobs: list[bytes], settings: Settings, embedder) -> int:
    """Decode at the SSCD input size and embed, ``batch_size`` images per model call (like the worker)."""
    for start in range(0, len(blobs), settings.batch_size):
        images = [
            decode(data, settings, min_side=embedder.size).image
            for data in blobs[start : start + settings.batch_size]
        ]
        embedder.embed(images)
    return len(blobs)


def hash_baselines(blobs: list[bytes], settings: Settings, repeat: int) -> dict[str, dict[str, float]]:
    """{"floor": {...}, "imagededup": {...}} with per_s (wall) and per_cpu_s rates, and "floor_both_cores":
    the floor's per_cpu_s while one copy runs on every usable CPU at once."""
    best = _best_rates(
        {"floor": lambda: floor_loop(blobs, settings), "imagededup": lambda: imagededup_loop(blobs)}, repeat
    )
    out = {name: {"per_s": wall, "per_cpu_s": cpu, "images": len(blobs)} for name, (wall, cpu) in best.items()}
    copies = len(os.sched_getaffinity(0))
    rates = [max(r) for r in zip(*(_floor_copies(blobs, settings, copies) for _ in range(repeat)))]
    out["floor_both_cores"] = {"per_cpu_s": sum(rates) / copies, "copies": copies, "images": len(blobs)}
    return out


#: Files in the speed probe: ~0.6 s of the floor loop per run on this machine.
PROBE_FILES = 300


def speed_probe(blobs: list[bytes], settings: Settings) -> float:
    """The floor loop's images per CPU-second on (up to) PROBE_FILES files, run just before and just
    after a worker run. The worker and its baselines run minutes apart; on a VM whose host shares its
    cores the machine's speed can change in between, and then the ratios compare different machines.
    The probe's after/before ratio says by how much it changed.

    Best of two runs: right after the bench process forks (``_floor_copies``), OpenBLAS starts its
    threads again, and they spin for a fraction of a second; a single run then read ~25 % slow."""
    return max(_floor_rate((blobs, settings)) for _ in range(2))


#: How far the probe's after/before ratio may move before the bench warns that a section's ratios
#: compare two different machines (single runs of the floor loop move by a few percent).
PROBE_TOLERANCE = 0.10


def probe_warning(before: float, after: float) -> str | None:
    change = after / before - 1 if before else 0.0
    if abs(change) <= PROBE_TOLERANCE:
        return None
    return (f"the machine ran the floor loop {abs(change):.0%} {'faster' if change > 0 else 'slower'} after the "
            "worker run than before it: this section's ratios compare two different machines; rerun it")


def _floor_copies(blobs: list[bytes], settings: Settings, copies: int) -> list[float]:
    """Images per CPU-second of each of ``copies`` floor loops run at once in separate processes.

    A worker keeps every core busy, and a core is slower when its neighbours work too (shared caches
    and memory bandwidth, and on a VM whatever the host shares): this says how much slower, so the
    worker's per-CPU ratio can be read against what the machine itself gives under full load."""
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(copies) as pool:
        return pool.map(_floor_rate, [(blobs, settings)] * copies)


def _floor_rate(args: tuple[list[bytes], Settings]) -> float:
    blobs, settings = args
    with one_blas_thread():
        cpu = time.process_time()
        floor_loop(blobs, settings)
        return len(blobs) / max(time.process_time() - cpu, 1e-9)


def sscd_baseline(blobs: list[bytes], settings: Settings, embedder, repeat: int) -> dict[str, float]:
    sscd_loop(blobs[: settings.batch_size], settings, embedder)  # warm up the ONNX session
    ((wall, cpu),) = _best_rates({"sscd": lambda: sscd_loop(blobs, settings, embedder)}, repeat).values()
    return {
        "per_s": wall,
        "per_cpu_s": cpu,
        "images": len(blobs),
        "model": embedder.version,
        "threads": settings.embed_threads,
    }
