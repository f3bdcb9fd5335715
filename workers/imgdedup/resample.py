"""Pillow's LANCZOS resize of an 8-bit greyscale image, bit for bit, as matrix products.

Why: the pHash's 32x32 greyscale is ``image.convert("L").resize((32, 32), LANCZOS)``. For a draft-decoded
photo (~512x384) Pillow's resize, in scalar loops, cost half as much as decoding the JPEG. Its
arithmetic is linear up to two roundings, so BLAS can do it exactly:

- Pillow (``libImaging/Resample.c``) builds each output pixel's filter taps in double precision,
  rounds them to integers scaled by 2**22 (``normalize_coeffs_8bpc``), sums ``pixel * tap`` in
  integers starting from 2**21, and keeps ``clip(sum >> 22, 0, 255)`` -- along rows, then, on those
  8-bit results, along columns (since Pillow 13 the other way round for images that shrink mostly in
  height).
- Here the same integer taps fill banded matrices and ``float64`` matrix products form the sums.
  Every product and partial sum is an integer below 2**53, so each is exact, in any order; floor
  division by 2**22 and the clip then give Pillow's bytes.
- The taps follow Pillow's order of operations. NumPy's ``sin`` may differ from the C library's in
  the last bit, so the taps of an output that lies near a rounding boundary are recomputed with
  ``math.sin`` (the C library's, as Pillow's C code uses).

``tests/test_resample.py`` compares the output with Pillow's on random sizes and contents, and
``tests/test_features.py`` the pHash with imagehash's.
"""

from __future__ import annotations

import math
import threading
from functools import lru_cache
from typing import NamedTuple

import numpy as np
from threadpoolctl import threadpool_limits

#: Pillow's fixed-point precision for 8-bit resampling (``PRECISION_BITS``).
_PRECISION_BITS = 32 - 8 - 2
_HALF = float(1 << (_PRECISION_BITS - 1))
_SCALE = float(1 << _PRECISION_BITS)
_LANCZOS_SUPPORT = 3.0

#: Input pixels per block of rows in a pass: bounds the float64 copy (2 MB) on huge images.
_BLOCK_PIXELS = 1 << 18
_scratch = threading.local()  # per thread: the float64 copy's buffer


def one_blas_thread() -> threadpool_limits:
    """Limit BLAS to one thread in this process; also a context manager that restores the limit.

    Why: these products are small, and OpenBLAS's threads spin on the other cores while they wait
    (measured on 2 cores: twice the CPU time for the same wall time). The worker parallelises across
    its decoder processes instead, and a baseline loop must run the way the worker does."""
    return threadpool_limits(limits=1, user_api="blas")


def lanczos_l(grey: np.ndarray, width: int, height: int) -> np.ndarray:
    """``Image.fromarray(grey, "L").resize((width, height), Image.LANCZOS)`` as a uint8 array."""
    in_height, in_width = grey.shape
    out = grey
    # Pillow skips a pass whose size does not change, and since 13.0 runs the vertical pass first
    # when the height shrinks by more than twice as many pixels as the width does.
    if in_height - height > 0 and in_height - height > 2 * (in_width - width):
        if height != in_height:
            out = _along_rows(out.T, _taps(in_height, height)).T
        if width != in_width:
            out = _along_rows(out, _taps(in_width, width))
    else:
        if width != in_width:
            out = _along_rows(out, _taps(in_width, width))
        if height != in_height:
            out = _along_rows(out.T, _taps(in_height, height)).T
    return np.ascontiguousarray(out) if out is not grey else grey.copy()


def _along_rows(grey: np.ndarray, taps: Taps) -> np.ndarray:
    """One pass: each row of ``grey`` resampled to ``taps.size`` pixels, in blocks of rows.

    The tap matrix is banded: each group of outputs multiplies only the input columns its taps
    cover, which halves the work of a 512 -> 32 pass."""
    rows = max(1, _BLOCK_PIXELS // grey.shape[1])
    out = np.empty((grey.shape[0], taps.size), np.uint8)
    sums = np.empty((min(rows, grey.shape[0]), taps.size), np.float64)
    for start in range(0, grey.shape[0], rows):
        block = _as_float(grey[start : start + rows])
        for first, end, j0, j1, group in taps.blocks:
            np.matmul(block[:, first:end], group, out=sums[: len(block), j0:j1])
        out[start : start + rows] = _fixed_point(sums[: len(block)])
    return out


def _as_float(grey: np.ndarray) -> np.ndarray:
    """``grey`` as float64, in a buffer this thread reuses until its next call.

    Why: a new 1.5 MB array per image went back to the OS when freed, and every image paid ~60 page
    faults to get it again (~0.7 before this module, measured with getrusage)."""
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.size < grey.size:
        buffer = _scratch.buffer = np.empty(grey.size, np.float64)
    out = buffer[: grey.size].reshape(grey.shape)
    np.copyto(out, grey)
    return out


def _fixed_point(sums: np.ndarray) -> np.ndarray:
    """Pillow's ``clip8``: (2**21 + sum) >> 22, clipped to 0..255."""
    return np.clip(np.floor((sums + _HALF) / _SCALE), 0, 255).astype(np.uint8)


#: Outputs per group of the banded product (measured: 8 beat 4 and 16 on a 512 -> 32 pass).
_GROUP = 8


class Taps(NamedTuple):
    """Pillow's integer taps for one (input size, output size), as the banded product uses them."""

    blocks: list[tuple[int, int, int, int, np.ndarray]]  # (first input, end, first output, end, taps)
    size: int  # output size


#: Input sides whose taps are cached. Draft-decoded photos have sides below it; a larger side's taps
#: are recomputed (~1 ms, next to tens of ms to decode such an image), so images of many large sizes
#: cannot grow the cache: an entry for a 512-pixel side holds 4 blocks of ~225 x 8 taps, ~57 kB, and
#: one for a 1024-pixel side ~115 kB.
_CACHED_SIDE = 1024


def _taps(in_size: int, out_size: int) -> Taps:
    return _cached_taps(in_size, out_size) if in_size <= _CACHED_SIDE else _build_taps(in_size, out_size)


#: Sides seen in a day of photos are many: the bench's 2,418 images have 329 distinct sides after
#: draft decoding.
@lru_cache(maxsize=512)
def _cached_taps(in_size: int, out_size: int) -> Taps:
    return _build_taps(in_size, out_size)


def _build_taps(in_size: int, out_size: int) -> Taps:
    firsts, counts, taps = _pillow_taps(in_size, out_size)
    inside = np.arange(taps.shape[1]) < counts[:, None]
    rows = firsts[:, None] + np.arange(taps.shape[1])  # input pixel of each tap
    blocks = []
    for j0 in range(0, out_size, _GROUP):
        j1 = min(j0 + _GROUP, out_size)
        first, end = int(firsts[j0:j1].min()), int((firsts + counts)[j0:j1].max())
        block = np.zeros((end - first, j1 - j0), np.float64)
        used = inside[j0:j1]
        block[rows[j0:j1][used] - first, np.nonzero(used)[0]] = taps[j0:j1][used]
        blocks.append((first, end, j0, j1, block))
    return Taps(blocks, out_size)


def _pillow_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``precompute_coeffs`` + ``normalize_coeffs_8bpc`` for the box (0, in_size), vectorised: per
    output pixel, its first input pixel, its number of taps and its integer taps (a padded row).

    NumPy's ``sin`` may differ from the C library's in the last bit, which moves a scaled tap by
    ~1e-9; only a tap within 1e-6 of a rounding boundary could round differently, and such an
    output's taps are recomputed one by one with ``math.sin``, exactly as Pillow does."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = _LANCZOS_SUPPORT * filterscale
    center = (np.arange(out_size) + 0.5) * scale
    firsts = np.maximum((center - support + 0.5).astype(np.int64), 0)
    counts = np.minimum((center + support + 0.5).astype(np.int64), in_size) - firsts
    offsets = np.arange(int(counts.max()))
    inside = offsets < counts[:, None]
    positions = ((offsets + firsts[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale)
    weights = np.where(inside, _lanczos_array(positions), 0.0)
    totals = np.cumsum(weights, axis=1)[:, -1]  # Pillow sums in order; cumsum does too
    weights = np.divide(weights, totals[:, None], out=weights, where=totals[:, None] != 0.0)
    scaled = weights * _SCALE
    taps = np.trunc(np.where(weights < 0, scaled - 0.5, scaled + 0.5))
    for j in np.flatnonzero((np.abs(np.abs(scaled) % 1.0 - 0.5) < 1e-6).any(axis=1)).tolist():
        taps[j, : counts[j]] = _exact_taps(int(firsts[j]), int(counts[j]), float(center[j]), filterscale)
    return firsts, counts, taps


def _lanczos_array(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((-3.0 <= x) & (x < 3.0), _sinc_array(x) * _sinc_array(x / 3), 0.0)


def _sinc_array(x: np.ndarray) -> np.ndarray:
    radians = x * math.pi
    return np.where(x == 0.0, 1.0, np.sin(radians) / radians)


def _exact_taps(first: int, count: int, center: float, filterscale: float) -> list[float]:
    """One output's integer taps with the C library's ``sin``, in Pillow's order of operations."""
    ss = 1.0 / filterscale
    weights = [_lanczos((x + first - center + 0.5) * ss) for x in range(count)]
    total = 0.0
    for w in weights:
        total += w
    if total != 0.0:
        weights = [w / total for w in weights]
    return [float(int(w * _SCALE - 0.5) if w < 0 else int(w * _SCALE + 0.5)) for w in weights]


def _lanczos(x: float) -> float:
    return _sinc(x) * _sinc(x / 3) if -3.0 <= x < 3.0 else 0.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x
