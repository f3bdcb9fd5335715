"""Multi-index hashing arithmetic, checked against brute force."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imgdedup import mih

U64 = st.integers(0, (1 << 64) - 1)


@given(st.lists(U64, min_size=1, max_size=20), st.sampled_from([1, 2, 4, 8, 16]))
@settings(max_examples=100, deadline=None)
def test_split_cuts_most_significant_bits_first(hashes, tables):
    width = 64 // tables
    subs = mih.split(np.array(hashes, dtype=np.uint64), tables)
    assert subs.shape == (len(hashes), tables)
    for h, row in zip(hashes, subs.tolist()):
        text = f"{h:064b}"
        assert row == [int(text[t * width:(t + 1) * width], 2) for t in range(tables)]


def test_split_rejects_uneven_tables():
    with pytest.raises(ValueError):
        mih.split(np.zeros(1, dtype=np.uint64), 3)


def _toy_substring_counts(diffs: np.ndarray, bits: int, tables: int) -> np.ndarray:
    """Popcount of each of `tables` equal slices of `bits`-bit values, shape (n, tables)."""
    width = bits // tables
    shifts = np.array([bits - width * (t + 1) for t in range(tables)], dtype=np.uint64)
    slices = (diffs[:, None] >> shifts[None, :]) & np.uint64((1 << width) - 1)
    return np.bitwise_count(slices)


@pytest.mark.parametrize("bits,tables", [(8, 1), (8, 2), (8, 4), (8, 8), (16, 1), (16, 2), (16, 4), (16, 8),
                                         (16, 16), (12, 4)])
def test_table_radii_is_complete_and_tight_exhaustively(bits, tables):
    """Every difference of popcount ≤ r shows up in some table within its radius (complete), and
    lowering any one table's radius loses some difference (the rule probes nothing it need not)."""
    diffs = np.arange(1 << bits, dtype=np.uint64)
    total = np.bitwise_count(diffs)
    per_table = _toy_substring_counts(diffs, bits, tables)
    width = bits // tables
    for radius in range(bits + 1):
        radii = np.array(mih.table_radii(radius, tables))
        assert len(radii) == tables and radii.max() - radii.min() <= 1
        within = total <= radius
        found = (per_table <= radii[None, :]).any(axis=1)
        assert found[within].all(), (radius, radii)
        for t in range(tables):
            if radii[t] < 0 or radii.max() + 1 > width:
                continue  # nothing to lower, or a slice too narrow to realise the counter-example
            lowered = radii.copy()
            lowered[t] -= 1
            assert not (per_table <= lowered[None, :]).any(axis=1)[within].all(), (radius, t)


def test_table_radii_examples_from_the_notes():
    assert mih.table_radii(8, 4) == [2, 1, 1, 1]
    assert mih.table_radii(10, 4) == [2, 2, 2, 1]
    assert mih.table_radii(0, 4) == [0, -1, -1, -1]
    assert mih.table_radii(3, 4) == [0, 0, 0, 0]
    assert mih.probe_count(8, 4) == 137 + 3 * 17
    assert mih.probe_count(10, 4) == 3 * 137 + 17
    assert mih.probe_count(7, 4) == 4 * 17
    with pytest.raises(ValueError):
        mih.table_radii(-1, 4)


@pytest.mark.parametrize("width", [4, 8, 16])
@pytest.mark.parametrize("radius", [-1, 0, 1, 2, 3, 5, 16, 70])
def test_probe_masks_dense_match_brute_force(width, radius):
    masks = mih.probe_masks(width, radius)
    expected = [v for v in range(1 << width) if v.bit_count() <= radius]
    assert sorted(masks.tolist()) == expected
    assert len(masks) == mih.mask_count(width, radius)
    if len(masks):
        assert masks[0] == 0 and (np.diff(np.bitwise_count(masks).astype(int)) >= 0).all()
    assert not masks.flags.writeable


@pytest.mark.parametrize("width,radius", [(32, 0), (32, 1), (32, 2), (32, 3), (64, 1), (64, 2)])
def test_probe_masks_wide_are_all_distinct_masks_within_radius(width, radius):
    """Distinct values, each of popcount ≤ r, exactly as many as exist: that is the whole set."""
    masks = mih.probe_masks(width, radius)
    assert masks.dtype == np.uint64
    assert len(masks) == sum(comb(width, k) for k in range(radius + 1)) == len(np.unique(masks))
    assert int(np.bitwise_count(masks).max()) <= radius
    assert int(masks.max()) < (1 << width) if width < 64 else True
    assert masks[0] == 0


@given(st.integers(0, 0xFFFF), st.integers(0, 5))
@settings(max_examples=50, deadline=None)
def test_probes_are_the_buckets_within_radius(substring, radius):
    got = mih.probes(substring, 16, radius)
    assert got[0] == substring
    assert sorted(got.tolist()) == [v for v in range(1 << 16) if (v ^ substring).bit_count() <= radius]


@given(st.lists(st.tuples(U64, U64), min_size=1, max_size=30))
@settings(max_examples=100, deadline=None)
def test_hamming_matches_python_popcount(pairs):
    a = np.array([p[0] for p in pairs], dtype=np.uint64)
    b = np.array([p[1] for p in pairs], dtype=np.uint64)
    assert mih.hamming(a, b).tolist() == [(x ^ y).bit_count() for x, y in pairs]


def test_format_substring_is_zero_padded_hex():
    assert mih.format_substring(0xA, 16) == "000a"
    assert mih.format_substring(np.uint64(0xF), 4) == "f"
    assert mih.format_substring(1, 64) == "0" * 15 + "1"
    assert mih.format_substring((1 << 32) - 1, 32) == "ffffffff"
    assert mih.format_substring(0x3C, 8) == "3c"
    with pytest.raises(ValueError):
        mih.format_substring(1, 6)
