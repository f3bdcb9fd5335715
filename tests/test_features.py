"""features: the pHash is imagehash's bit for bit, goldens hold, draft decoding stays within its measured
bound, and the low-detail flag separates blank/gradient images from every corpus photo with a margin."""

from __future__ import annotations

import io
import json
from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageDraw

from imgdedup.bench.decode_bench import make_variants
from imgdedup.config import Settings, load_settings
from imgdedup.decode import decode
from imgdedup.features import detail_std, hash_features, phash64, phash_hex, sha256_hex

GOLDEN = json.loads((Path(__file__).parent / "data" / "phash_golden.json").read_text())
FULL = load_settings(draft_decode=False)
DRAFT = load_settings(draft_decode=True)
#: The shipped default threshold (tests use the default so a bad default fails here).
THRESHOLD = Settings.model_fields["low_detail_std"].default
#: Measured (README, "Fetching, decoding and hash features"): draft decoding changes the pHash of ~10% of images, by 2 bits, at most 4.
DRAFT_MAX_BITS = 4
DRAFT_MAX_CHANGED = 0.15
#: Measured (same section; `decode_bench --only policy`): the luma plane only, against the RGB draft, changes 7 of 468 images by 2 bits.
LUMA_MAX_BITS = 2
LUMA_MAX_CHANGED = 0.03
#: Both sides of the low-detail threshold keep at least this factor from it.
MARGIN = 1.5


def imagehash_int(image: Image.Image) -> int:
    return int(str(imagehash.phash(image)), 16)


def encode(im: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **options)
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus_blobs(corpus_files) -> list[bytes]:
    return [p.read_bytes() for p in corpus_files]


@pytest.fixture(scope="module")
def corpus_variants(corpus_blobs) -> list[bytes]:
    """Every corpus image, re-encoded at quality 75, progressive 4:4:4, and resized by 0.6 and 1.7;
    every fourth also upscaled 2.5x (so draft scales 4 and 8 are exercised)."""
    out = []
    for i, data in enumerate(corpus_blobs):
        names = ("q75", "prog444", "x0.6", "x1.7") + (("x2.5",) if i % 4 == 0 else ())
        out += list(make_variants(data, names).values())
    return out


# --- definition ----------------------------------------------------------------------------------


def test_sha256_and_hex_formats():
    assert sha256_hex(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert phash_hex(1) == "0000000000000001"
    assert phash_hex(2**64 - 1) == "f" * 16
    assert phash_hex(0xE98A82B53668E98F) == "e98a82b53668e98f"


@pytest.mark.parametrize("name", sorted(GOLDEN["images"]))
def test_goldens_on_the_full_decode(corpus_dir, name):
    data = (corpus_dir / name).read_bytes()
    features = hash_features(data, decode(data, FULL), FULL)
    assert features.sha256 == GOLDEN["images"][name]["sha256"]  # the corpus file is the one the golden was made of
    assert phash_hex(features.phash) == GOLDEN["images"][name]["phash"]


def test_phash64_is_imagehash_on_corpus_and_variants(corpus_blobs, corpus_variants):
    for data in corpus_blobs + corpus_variants[::7]:
        image = decode(data, FULL).image
        assert phash64(image) == imagehash_int(image)


@pytest.mark.parametrize("image", [
    Image.new("RGB", (1, 1), (10, 20, 30)), Image.new("RGB", (64, 64), "white"), Image.new("L", (7, 3), 90),
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (31, 77, 3), dtype=np.uint8)),
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (500, 20), dtype=np.uint8)),
], ids=["1x1", "white", "grey-7x3", "noise-77x31", "grey-20x500"])
def test_phash64_is_imagehash_on_odd_images(image):
    assert phash64(image) == imagehash_int(image)


def test_draft_decoding_stays_within_the_measured_bound(corpus_blobs, corpus_variants):
    changed = []
    for data in corpus_blobs + corpus_variants:
        drafted = decode(data, DRAFT, min_side=224)
        changed.append((phash64(drafted.image) ^ imagehash_int(decode(data, FULL).image)).bit_count())
    assert max(changed) <= DRAFT_MAX_BITS
    assert sum(c > 0 for c in changed) <= DRAFT_MAX_CHANGED * len(changed)
    assert any(d > 1 for d in (decode(b, DRAFT).scale for b in corpus_variants))  # the draft path really ran


def test_luma_decoding_stays_within_the_draft_bound_and_near_the_rgb_draft(corpus_blobs, corpus_variants):
    to_definition, to_rgb_draft = [], []
    for data in corpus_blobs + corpus_variants:
        luma = phash64(decode(data, DRAFT, luma_only=True).image)
        to_definition.append((luma ^ imagehash_int(decode(data, FULL).image)).bit_count())
        to_rgb_draft.append((luma ^ phash64(decode(data, DRAFT).image)).bit_count())
    assert max(to_definition) <= DRAFT_MAX_BITS
    assert sum(c > 0 for c in to_definition) <= DRAFT_MAX_CHANGED * len(to_definition)
    assert max(to_rgb_draft) <= LUMA_MAX_BITS
    assert 0 < sum(c > 0 for c in to_rgb_draft) <= LUMA_MAX_CHANGED * len(to_rgb_draft)  # not the RGB path again


# --- low detail ----------------------------------------------------------------------------------


def synthetic_low_detail() -> dict[str, Image.Image]:
    """Blank pages, solid colours, gradients and vignettes: images whose pHash bits are noise."""
    w, h = 800, 600
    y, x = np.mgrid[0:h, 0:w].astype(float)
    rng = np.random.default_rng(0)

    def grey(a):
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))

    def rgb(r, g, b):
        return Image.fromarray(np.stack([np.clip(c + 0 * x, 0, 255) for c in (r, g, b)], -1).astype(np.uint8))

    def page(draw):
        im = Image.new("RGB", (w, h), (250, 250, 248))
        draw(ImageDraw.Draw(im))
        return im

    return {
        "white": Image.new("RGB", (w, h), "white"), "black": Image.new("RGB", (w, h), "black"),
        "red": Image.new("RGB", (w, h), (200, 30, 30)), "grey-noise": grey(128 + rng.normal(0, 10, (h, w))),
        "h-gradient": grey(x * 255 / w), "v-gradient": grey(y * 255 / h), "diagonal": grey((x + y) * 255 / (w + h)),
        "radial": grey(255 - np.hypot(x - w / 2, y - h / 2) * 255 / 500),
        "vignette": grey(200 - 0.0006 * ((x - w / 2) ** 2 + (y - h / 2) ** 2)),
        "two-colour": rgb(x * 255 / w, 100, 255 - x * 255 / w), "sky": rgb(60 + y * 80 / h, 120 + y * 80 / h, 230),
        "sunset": rgb(255 - y * 100 / h, 120 + y * 60 / h - 0.0002 * (x - w / 2) ** 2, 80 + y * 150 / h),
        "noisy-gradient": grey(x * 255 / w + rng.normal(0, 8, (h, w))),
        "text-line": page(lambda d: d.text((50, 50), "hello world", fill="black")),
        "small-mark": page(lambda d: d.rectangle((390, 290, 402, 302), fill="black")),
        "dot": page(lambda d: d.ellipse((380, 280, 420, 320), fill="black")),
        "thin-frame": page(lambda d: d.rectangle((10, 10, w - 10, h - 10), outline=(200, 200, 200))),
    }


SYNTHETIC = synthetic_low_detail()


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
def test_blank_solid_and_gradient_images_are_low_detail(name):
    for data in (encode(SYNTHETIC[name], "PNG"), encode(SYNTHETIC[name], "JPEG", quality=75)):
        for settings in (FULL, DRAFT):
            features = hash_features(data, decode(data, settings), settings)
            assert features.low_detail, f"{name}: detail {features.detail:.2f} >= {THRESHOLD}"
            assert features.detail * MARGIN <= THRESHOLD


def test_no_corpus_photo_is_low_detail(corpus_blobs, corpus_variants):
    details = []
    for data in corpus_blobs + corpus_variants[::3]:
        for settings in (FULL, DRAFT):
            features = hash_features(data, decode(data, settings, min_side=224), settings)
            assert not features.low_detail
            details.append(features.detail)
    assert min(details) >= MARGIN * THRESHOLD, f"corpus minimum detail {min(details):.2f}"


def test_the_threshold_comes_from_the_settings(corpus_blobs):
    data = corpus_blobs[0]
    decoded = decode(data, FULL)
    assert hash_features(data, decoded, load_settings(low_detail_std=1000)).low_detail
    assert not hash_features(data, decoded, load_settings(low_detail_std=0)).low_detail
    assert hash_features(data, decoded, FULL).detail == pytest.approx(detail_std(decoded.image))
