"""decode: canonical RGB pictures from awkward inputs, header guards, and the draft-decoding policy."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from imgdedup.config import load_settings
from imgdedup.decode import DRAFT_MIN_SIDE, FORMATS, decode, draft_scale
from imgdedup.errors import DeadLetterError, ErrorCode
from imgdedup.features import phash64

#: decode silences this warning for the process; pytest re-enables warnings per test.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

FULL = load_settings(draft_decode=False)
DRAFT = load_settings(draft_decode=True)


def encode(im: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **options)
    return buf.getvalue()


def pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im, dtype=np.int16)


def code_of(data: bytes, settings=FULL) -> ErrorCode:
    with pytest.raises(DeadLetterError) as info:
        decode(data, settings)
    return info.value.code


def bits(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, followed by a tiny (wrong) IDAT: decoding it would fail."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def landscape(corpus_files) -> Image.Image:
    """A 1024x576 corpus photo."""
    for path in corpus_files:
        im = Image.open(path)
        if im.size == (1024, 576):
            return im.convert("RGB")
    pytest.fail("no 1024x576 image in the corpus")


# --- orientation ---------------------------------------------------------------------------------

#: EXIF orientation -> how the camera stored an upright picture (inverse of what exif_transpose does).
STORED_AS = {
    1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("orientation", sorted(STORED_AS))
def test_every_exif_orientation_gives_the_upright_picture(orientation):
    upright = Image.fromarray(np.random.default_rng(orientation).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    stored = upright if STORED_AS[orientation] is None else upright.transpose(STORED_AS[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    decoded = decode(encode(stored, "PNG", exif=exif.tobytes()), FULL)
    assert (decoded.width, decoded.height) == (50, 30)
    assert np.array_equal(pixels(decoded.image), pixels(upright))


def test_exif_rotation_changes_the_phash_and_is_undone(landscape):
    stored = landscape.transpose(Image.Transpose.ROTATE_90)  # a camera held sideways
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    decoded = decode(data, FULL)
    as_stored = Image.open(io.BytesIO(data)).convert("RGB")
    assert (decoded.width, decoded.height) == (1024, 576)
    assert np.array_equal(pixels(decoded.image), pixels(as_stored.transpose(Image.Transpose.ROTATE_270)))
    assert bits(phash64(decoded.image), phash64(as_stored)) >= 20  # ignoring EXIF would give another hash
    assert bits(phash64(decoded.image), phash64(landscape)) <= 4  # only JPEG re-encoding noise remains


def test_orientation_is_applied_after_draft_decoding(landscape):
    exif = Image.Exif()
    exif[0x0112] = 8
    data = encode(landscape.transpose(Image.Transpose.ROTATE_270), "JPEG", quality=95, exif=exif.tobytes())
    decoded = decode(data, DRAFT)
    assert decoded.scale == 2
    assert (decoded.width, decoded.height) == (1024, 576)
    assert decoded.image.size == (512, 288)
    assert bits(phash64(decoded.image), phash64(decode(data, FULL).image)) <= 4


# --- modes ---------------------------------------------------------------------------------------


def test_rgba_is_flattened_onto_white():
    im = Image.new("RGBA", (4, 1))
    im.putdata([(255, 0, 0, 255), (255, 0, 0, 0), (0, 0, 255, 128), (0, 0, 0, 0)])
    decoded = decode(encode(im, "PNG"), FULL)
    assert decoded.image.mode == "RGB" and decoded.format == "PNG"
    got = pixels(decoded.image)[0]
    assert np.abs(got - [[255, 0, 0], [255, 255, 255], [127, 127, 255], [255, 255, 255]]).max() <= 1


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_is_flattened_onto_white(fmt):
    im = Image.new("P", (2, 2))
    im.putpalette([0, 0, 0, 0, 160, 0] + [0] * 762)
    im.putdata([0, 1, 1, 0])
    decoded = decode(encode(im, fmt, transparency=0), FULL)
    assert pixels(decoded.image).reshape(4, 3).tolist() == [[255, 255, 255], [0, 160, 0], [0, 160, 0], [255, 255, 255]]


def test_grey_with_alpha_is_flattened():
    im = Image.new("LA", (2, 1))
    im.putdata([(0, 255), (0, 0)])
    assert pixels(decode(encode(im, "PNG"), FULL).image)[0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_cmyk_jpeg_becomes_rgb():
    decoded = decode(encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95), FULL)
    assert decoded.image.mode == "RGB"
    assert np.abs(pixels(decoded.image) - [255, 0, 0]).max() <= 8


def test_16_bit_grey_png_is_scaled_not_clipped():
    ramp = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really a 16-bit image
    assert pixels(decode(data, FULL).image)[0, :, 0].tolist() == [0, 1, 128, 255]


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    decoded = decode(data, FULL)
    assert decoded.format == "GIF" and np.abs(pixels(decoded.image) - [255, 0, 0]).max() <= 2


def test_one_bit_image():
    checker = (np.indices((8, 8)).sum(axis=0) % 2 * 255).astype(np.uint8)
    decoded = decode(encode(Image.fromarray(checker).convert("1"), "PNG"), FULL)
    assert np.array_equal(pixels(decoded.image)[:, :, 0], checker)


# --- broken and hostile input ---------------------------------------------------------------------


def test_truncated_jpeg_fails_to_decode(corpus_files):
    data = corpus_files[0].read_bytes()
    assert code_of(data[: len(data) // 2]) is ErrorCode.DECODE_FAILED
    assert code_of(data[: len(data) // 2], DRAFT) is ErrorCode.DECODE_FAILED


def test_corrupt_png_data_fails_to_decode():
    assert code_of(png_header_only(64, 64)) is ErrorCode.DECODE_FAILED


@pytest.mark.parametrize("data", [
    b"", b"garbage bytes, not an image at all" * 10, b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
    encode(Image.new("RGB", (8, 8)), "PPM"), encode(Image.new("RGB", (8, 8)), "TGA"),
], ids=["empty", "garbage", "eps", "ppm", "tga"])
def test_unknown_or_unsupported_formats_are_not_images(data):
    assert code_of(data) is ErrorCode.NOT_AN_IMAGE


@pytest.mark.parametrize("width,height", [(100_000, 100_000), (10_000, 10_000), (60_001, 1_000)])
def test_decompression_bomb_is_refused_from_the_header(width, height):
    """The IDAT is not valid for these sizes: too_many_pixels (not decode_failed) proves no decoding ran."""
    assert code_of(png_header_only(width, height)) is ErrorCode.TOO_MANY_PIXELS


def test_gif_bomb_header_is_refused():
    screen = struct.pack("<HHBBB", 65535, 65535, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, 65535, 65535, 0) + b"\x02\x02\x4c\x01\x00"
    gif = b"GIF89a" + screen + frame + b";"
    assert code_of(gif) is ErrorCode.TOO_MANY_PIXELS


def test_max_image_pixels_setting_is_honoured():
    data = encode(Image.new("RGB", (64, 64)), "PNG")
    assert decode(data, FULL).image.size == (64, 64)
    assert code_of(data, load_settings(max_image_pixels=4095)) is ErrorCode.TOO_MANY_PIXELS


# --- draft policy ---------------------------------------------------------------------------------


@pytest.mark.parametrize("width,height,min_side,scale", [
    (1024, 576, 256, 2), (1024, 1024, 256, 4), (4000, 3000, 256, 8), (300, 200, 256, 1), (1024, 576, 0, 8),
    (1030, 1030, 129, 8), (1024, 576, 577, 1), (576, 1024, 288, 2),
])
def test_draft_scale(width, height, min_side, scale):
    assert draft_scale(width, height, min_side) == scale


def test_draft_keeps_the_requested_side(landscape):
    data = encode(landscape, "JPEG", quality=90)
    assert decode(data, DRAFT, min_side=224).image.size == (512, 288)  # DRAFT_MIN_SIDE wins over 224
    assert decode(data, DRAFT, min_side=300).image.size == (1024, 576)  # 288 would be too small
    assert decode(data, FULL).image.size == (1024, 576)
    assert decode(encode(landscape, "PNG"), DRAFT).scale == 1  # only JPEG has DCT scaling


def test_draft_on_the_corpus_never_goes_below_the_floor(corpus_files):
    for path in corpus_files:
        data = path.read_bytes()
        full_size = Image.open(io.BytesIO(data)).size
        decoded = decode(data, DRAFT, min_side=224)
        assert (decoded.width, decoded.height) == full_size
        assert decoded.scale == 1 or min(decoded.image.size) >= DRAFT_MIN_SIDE
        assert decoded.image.size == tuple(-(-side // decoded.scale) for side in full_size)


@pytest.mark.parametrize("fmt", ["WEBP", "AVIF", "BMP", "TIFF", "GIF", "PNG", "JPEG"])
def test_supported_formats_decode_to_rgb(fmt):
    if fmt not in FORMATS:
        pytest.skip(f"this Pillow build cannot open {fmt}")
    im = Image.fromarray(np.random.default_rng(3).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    decoded = decode(encode(im, fmt), DRAFT)
    assert decoded.format == fmt and decoded.image.mode == "RGB" and decoded.image.size == (40, 24)


def test_mpo_from_a_camera_decodes_its_first_picture(landscape):
    """Phones write MPO (JPEG with extra pictures); Pillow opens it through the JPEG plugin."""
    data = encode(landscape, "MPO", save_all=True, append_images=[landscape.rotate(180)])
    decoded = decode(data, DRAFT)
    assert decoded.format == "MPO" and decoded.scale == 2
    assert bits(phash64(decoded.image), phash64(landscape)) <= 4
    luma = decode(data, DRAFT, luma_only=True)  # the first picture's luma plane, as for a JPEG
    assert luma.image.mode == "L" and luma.image.size == decoded.image.size
    assert bits(phash64(luma.image), phash64(decoded.image)) <= 2


# --- luma only -----------------------------------------------------------------------------------


def test_luma_only_gives_the_jpeg_luma_plane_at_the_draft_size(landscape):
    data = encode(landscape, "JPEG", quality=90)
    luma, rgb = decode(data, DRAFT, luma_only=True), decode(data, DRAFT)
    assert luma.image.mode == "L" and luma.image.size == rgb.image.size == (512, 288)
    assert (luma.scale, luma.width, luma.height, luma.format) == (rgb.scale, rgb.width, rgb.height, rgb.format)
    ycbcr = Image.open(io.BytesIO(data))
    ycbcr.draft("YCbCr", (512, 288))
    assert np.array_equal(pixels(luma.image), pixels(ycbcr.getchannel("Y")))  # the stored Y plane itself
    # Pillow's "L" of libjpeg's RGB uses the same weights: only rounding (and clipping) differs.
    assert np.abs(pixels(luma.image) - pixels(rgb.image.convert("L"))).mean() < 0.1


def test_luma_only_decodes_small_jpegs_to_luma_too(landscape):
    small = encode(landscape.resize((300, 200)), "JPEG", quality=90)
    decoded = decode(small, DRAFT, luma_only=True)
    assert decoded.scale == 1 and decoded.image.mode == "L" and decoded.image.size == (300, 200)


def test_luma_only_is_applied_before_the_orientation(landscape):
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(landscape.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif.tobytes())
    decoded = decode(data, DRAFT, luma_only=True)
    assert decoded.image.mode == "L" and decoded.image.size == (512, 288) and (decoded.width, decoded.height) == (1024, 576)
    upright = decode(encode(landscape, "JPEG", quality=95), DRAFT, luma_only=True)
    assert bits(phash64(decoded.image), phash64(upright.image)) <= 4


@pytest.mark.parametrize("source,mode", [
    ("cmyk-jpeg", "RGB"),  # Pillow gives luma only for YCbCr data
    ("grey-jpeg", "L"),
    ("rgba-png", "RGB"),  # transparency is flattened first
    ("grey-png", "L"),
    ("grey-png-transparency", "RGB"),
    ("rgb-png", "RGB"),
])
def test_luma_only_keeps_every_other_image_canonical(landscape, source, mode):
    small = landscape.resize((320, 180))
    im = {
        "cmyk-jpeg": small.convert("CMYK"), "grey-jpeg": small.convert("L"), "rgba-png": small.convert("RGBA"),
        "grey-png": small.convert("L"), "grey-png-transparency": small.convert("L"), "rgb-png": small,
    }[source]
    options = {"transparency": 0} if source == "grey-png-transparency" else {}
    data = encode(im, "JPEG" if source.endswith("jpeg") else "PNG", **options)
    luma, rgb = decode(data, DRAFT, luma_only=True), decode(data, DRAFT)
    assert luma.image.mode == mode and rgb.image.mode == "RGB"
    assert np.array_equal(pixels(luma.image.convert("L")), pixels(rgb.image.convert("L")))
    assert phash64(luma.image) == phash64(rgb.image)


def test_luma_only_needs_draft_decoding_so_the_full_decode_stays_imagehash(landscape):
    decoded = decode(encode(landscape, "JPEG", quality=90), FULL, luma_only=True)
    assert decoded.image.mode == "RGB" and decoded.scale == 1
