"""Multi-index hashing arithmetic for 64-bit pHashes: pure NumPy, no I/O.

A pHash is cut into ``tables`` substrings of equal width (table 0 holds the most significant bits).
Each table maps a substring to the hashes carrying it. Two hashes within Hamming distance ``r`` must
agree closely on at least one substring (:func:`table_radii`), so a query reads only the buckets
near its own substrings (:func:`probes`) and verifies those candidates exactly (:func:`hamming`).
See Norouzi, Punjani & Fleet, "Fast Exact Search in Hamming Space with Multi-Index Hashing"
(TPAMI 2014).
"""

from __future__ import annotations

from functools import lru_cache
from itertools import combinations
from math import comb

import numpy as np

HASH_BITS = 64
#: Widths up to this many bits build their masks by filtering every value (fast, small); wider
#: ones enumerate bit combinations.
_DENSE_MASK_BITS = 20


def width_of(tables: int) -> int:
    """Bits per substring; only equal widths are allowed so every table has the same key space."""
    if tables < 1 or HASH_BITS % tables:
        raise ValueError(f"tables must divide {HASH_BITS}, got {tables}")
    return HASH_BITS // tables


def split(hashes: np.ndarray, tables: int) -> np.ndarray:
    """Substrings of each hash, shape (n, tables), column 0 = most significant bits (uint64)."""
    width = width_of(tables)
    hashes = np.asarray(hashes, dtype=np.uint64).reshape(-1)
    shifts = np.array([HASH_BITS - width * (t + 1) for t in range(tables)], dtype=np.uint64)
    mask = np.uint64((1 << width) - 1)
    return (hashes[:, None] >> shifts[None, :]) & mask


def table_radii(radius: int, tables: int) -> list[int]:
    """Search radius per table so that every hash within ``radius`` of the query is found in some table.

    With r = m·a + b (0 ≤ b < m), the first b+1 tables get radius a and the other m−b−1 get a−1
    (−1: that table is not probed). Proof: a hash missed everywhere differs by ≥ a+1 bits in each of
    the first b+1 substrings and ≥ a in the rest, so by ≥ (b+1)(a+1) + (m−b−1)·a = r+1 bits in total.
    """
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    width_of(tables)
    a, b = divmod(radius, tables)
    return [a if t <= b else a - 1 for t in range(tables)]


@lru_cache(maxsize=64)
def probe_masks(width: int, radius: int) -> np.ndarray:
    """All XOR masks of popcount ≤ radius over ``width`` bits, by popcount then value (read-only uint64).

    Mask 0 comes first, so the query's own bucket is always the first probe.
    """
    if not 1 <= width <= HASH_BITS:
        raise ValueError(f"width must be 1..{HASH_BITS}, got {width}")
    radius = min(radius, width)
    if radius < 0:
        masks = np.zeros(0, dtype=np.uint64)
    elif width <= _DENSE_MASK_BITS:
        values = np.arange(1 << width, dtype=np.uint64)
        counts = np.bitwise_count(values)
        keep = counts <= radius
        masks = values[keep][np.argsort(counts[keep], kind="stable")]
    else:
        masks = np.fromiter(
            (sum(1 << bit for bit in bits) for k in range(radius + 1) for bits in combinations(range(width), k)),
            dtype=np.uint64, count=mask_count(width, radius),
        )
        masks = masks[np.lexsort((masks, np.bitwise_count(masks)))]
    masks.setflags(write=False)
    return masks


def mask_count(width: int, radius: int) -> int:
    """Number of masks of popcount ≤ radius over ``width`` bits (0 for a negative radius)."""
    return sum(comb(width, k) for k in range(min(radius, width) + 1))


def probe_count(radius: int, tables: int) -> int:
    """Buckets one query of this radius reads: the cost model of the index."""
    width = width_of(tables)
    return sum(mask_count(width, r) for r in table_radii(radius, tables))


def probes(substring: int, width: int, radius: int) -> np.ndarray:
    """Bucket substrings within ``radius`` bits of ``substring`` (its own bucket first)."""
    return np.uint64(substring) ^ probe_masks(width, radius)


def hamming(a, b) -> np.ndarray:
    """Elementwise Hamming distance between uint64 hashes (broadcasting)."""
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64)))


def format_substring(value: int, width: int) -> str:
    """Lower-case hex of a substring, zero-padded to width/4 digits: the bucket's name in its key."""
    return f"{int(value):0{_hex_digits(width)}x}"


def _hex_digits(width: int) -> int:
    if width % 4:
        raise ValueError(f"width must be a multiple of 4 bits, got {width}")
    return width // 4
