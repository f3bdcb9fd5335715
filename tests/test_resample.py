"""resample: the matrix-product Lanczos resize gives Pillow's bytes, for any size and content, on both
pass orders, through the exact fallback for taps near a rounding boundary, and with BLAS on one thread."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from threadpoolctl import threadpool_info, threadpool_limits

from imgdedup import resample
from imgdedup.config import load_settings
from imgdedup.decode import decode
from imgdedup.features import GREY_SIDE, grey32


def pillow(grey: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(grey, "L").resize((width, height), Image.LANCZOS))


def content(kind: str, height: int, width: int, seed: int) -> np.ndarray:
    """Random noise, a checkerboard and black/white noise drive the sums past 0 and 255, so the clip
    is exercised along with the rounding."""
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return rng.integers(0, 256, (height, width), dtype=np.uint8)
    if kind == "checker":
        return (np.indices((height, width)).sum(0) % 2 * 255).astype(np.uint8)
    return rng.choice(np.array([0, 255], np.uint8), (height, width))


@settings(max_examples=300, deadline=None)
@given(
    width=st.integers(1, 700),
    height=st.integers(1, 700),
    out_width=st.integers(1, 120),
    out_height=st.integers(1, 120),
    kind=st.sampled_from(["noise", "checker", "extremes"]),
    seed=st.integers(0, 2**16),
)
def test_any_size_and_content_matches_pillow(width, height, out_width, out_height, kind, seed):
    grey = content(kind, height, width, seed)
    assert np.array_equal(resample.lanczos_l(grey, out_width, out_height), pillow(grey, out_width, out_height))


@pytest.mark.parametrize("shape", [(700, 60), (60, 700), (384, 512), (32, 500), (500, 32), (32, 32), (5, 3)])
def test_pass_order_and_skipped_passes_match_pillow(shape):
    """Tall images take the vertical pass first (Pillow 13); a side already 32 skips its pass."""
    grey = content("noise", *shape, seed=sum(shape))
    assert np.array_equal(resample.lanczos_l(grey, 32, 32), pillow(grey, 32, 32))


def test_huge_image_is_resampled_in_blocks_and_matches_pillow():
    grey = content("noise", 1500, 2100, seed=7)  # > _BLOCK_PIXELS: several row blocks in each pass
    assert grey.size > 4 * resample._BLOCK_PIXELS
    assert np.array_equal(resample.lanczos_l(grey, 32, 32), pillow(grey, 32, 32))


def test_only_sides_up_to_the_cached_limit_are_cached():
    """Images of many large sizes must not grow the per-process tap cache."""
    resample._cached_taps.cache_clear()
    big = resample._CACHED_SIDE + 1
    for side in (big, big + 1, resample._CACHED_SIDE):
        grey = content("noise", 40, side, seed=side)
        assert np.array_equal(resample.lanczos_l(grey, 32, 40), pillow(grey, 32, 40))
    assert resample._cached_taps.cache_info().currsize == 1


def test_vectorised_taps_equal_pillows_scalar_arithmetic():
    """Every output's taps, computed with NumPy, equal the one-by-one computation in Pillow's order."""
    for in_size in range(1, 300):
        for out_size in (32, 7, 450):
            firsts, counts, taps = resample._pillow_taps(in_size, out_size)
            scale = in_size / out_size
            support = 3 * max(scale, 1.0)
            for j in range(out_size):
                center = (j + 0.5) * scale
                assert counts[j] == min(int(center + support + 0.5), in_size) - int(firsts[j])
                exact = resample._exact_taps(int(firsts[j]), int(counts[j]), center, max(scale, 1.0))
                assert list(taps[j, : counts[j]]) == exact and not taps[j, counts[j] :].any()


def test_taps_near_a_rounding_boundary_take_the_exact_path(monkeypatch):
    calls = []
    exact = resample._exact_taps
    monkeypatch.setattr(resample, "_exact_taps", lambda *args: calls.append(args) or exact(*args))
    in_size = next((n for n in range(600, 1000) if resample._pillow_taps(n, 32) and calls), None)
    assert in_size, "no width from 600 to 1000 has a tap near a rounding boundary: the test needs others"
    resample._cached_taps.cache_clear()
    grey = content("noise", 40, in_size, seed=in_size)
    assert np.array_equal(resample.lanczos_l(grey, 32, 40), pillow(grey, 32, 40))


def test_grey32_equals_pillow_on_decoded_corpus_photos(corpus_files):
    config = load_settings()
    for path in corpus_files[:20]:
        image = decode(path.read_bytes(), config).image
        expected = np.asarray(image.convert("L").resize((GREY_SIDE, GREY_SIDE), Image.LANCZOS))
        assert np.array_equal(grey32(image), expected), path.name


def test_one_blas_thread_limits_and_restores():
    """NumPy's wheels bundle OpenBLAS; if threadpoolctl could not see it, the limit would do nothing
    and the decoder processes would spin on BLAS threads, so its absence is a failure, not a skip."""
    def blas_threads() -> list[int]:
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    assert blas_threads(), "threadpoolctl sees no BLAS library: one_blas_thread would limit nothing"
    with threadpool_limits(limits=2, user_api="blas"):  # a known starting point, whatever ran before
        with resample.one_blas_thread():
            assert set(blas_threads()) == {1}
        assert set(blas_threads()) == {2}


def test_threads_resampling_at_once_each_get_pillows_bytes():
    """Each thread reuses a float64 buffer of its own; threads must not see each other's."""
    from concurrent.futures import ThreadPoolExecutor

    images = [content("noise", 300 + 7 * i, 400 - 5 * i, seed=i) for i in range(16)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda grey: [resample.lanczos_l(grey, 32, 32) for _ in range(20)], images))
    for grey, outputs in zip(images, results):
        assert all(np.array_equal(out, pillow(grey, 32, 32)) for out in outputs)
