"""Encoded bytes to one canonical RGB picture: what every feature (pHash, SSCD, CLIP) is computed on.

Canonical means: the first frame, EXIF orientation applied, transparency flattened onto white,
8-bit RGB. Guards run on the header before any pixel is decoded (Pillow's ``Image.open`` is lazy).

JPEG draft decoding (DCT scaling by 1/2, 1/4, 1/8) is the fast path (~1.9x). It is not free: no
draft scale keeps the pHash identical on every image (even 1/2 changes 2 bits on 11 of the 78 corpus
photos; see README, "Fetching, decoding and hash features"). ``DRAFT_MIN_SIDE`` is the measured floor: ~10% of corpus images
and variants change, by 2 bits (at most 4), and original-to-variant distances stay as with full
decoding. ``draft_decode=false`` gives exactly imagehash's pHash of the full image.

When only the pHash needs the pixels (``luma_only``: no embedder in this worker), the fast path also
asks libjpeg for the luma plane alone: it then never reconstructs the two chroma planes nor converts
to RGB (README, "Cost and parallelism"). JPEG's luma uses the weights of Pillow's "L"
conversion, so only rounding differs from Y of the decoded RGB: it moves a few more hashes by 2 bits
(README, "The pHash"; the bound is tested with the draft's).
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps

from imgdedup.config import Settings
from imgdedup.errors import DeadLetterError, ErrorCode

#: Formats we decode, if this Pillow build can (naming one it lacks would make Image.open raise
#: KeyError). JPEG's opener also returns MPO files (phones); "MPO" has no opener of its own. Others
#: (EPS runs Ghostscript; exotic parsers are attack surface) are "not an image".
Image.init()
FORMATS = tuple(f for f in ("JPEG", "PNG", "GIF", "WEBP", "AVIF", "BMP", "TIFF") if f in Image.OPEN)

#: Draft decoding never leaves the shorter side below this many pixels (measured: pHash within 4 bits).
DRAFT_MIN_SIDE = 256

#: Background transparent pixels are flattened onto, so a logo on alpha hashes like the same logo on white.
BACKGROUND = (255, 255, 255)

_ORIENTATION = 0x0112
_SWAPS_SIDES = {5, 6, 7, 8}
#: What Pillow raises for truncated or corrupt data once the format is known (fuzzing has found the
#: odd IndexError or TypeError in plugins, so those count as corrupt data too, for ``load`` only).
_CORRUPT = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, struct.error, zlib.error)

# Our own header check refuses every image this warning would be about, before decoding; the
# warning would only repeat it (and ``warnings.catch_warnings`` is not thread-safe).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass(frozen=True)
class Decoded:
    image: Image.Image  # canonical RGB picture (possibly draft-reduced); "L" only if asked for luma_only
    width: int  # size of the full image after EXIF orientation, whatever the draft scale
    height: int
    format: str  # Pillow format name, e.g. "JPEG"
    scale: int = 1  # JPEG draft reduction (1 = full decode, else 2, 4 or 8)


def decode(data: bytes, settings: Settings, *, min_side: int = 0, luma_only: bool = False,
           draft_min_side: int = DRAFT_MIN_SIDE) -> Decoded:
    """Decode ``data`` into a ``Decoded``, or raise DeadLetterError (not_an_image, too_many_pixels, decode_failed).

    ``min_side`` is the shortest side a consumer of the image needs (e.g. the SSCD input size);
    draft decoding never goes below it nor below ``draft_min_side`` (changed only to measure policies).
    ``luma_only``: nothing but the pHash will look at the picture, so it may come back as "L": a colour
    JPEG's luma plane (with draft decoding on), or a grey image left grey; everything else is RGB.
    """
    im = _open(data, settings.max_image_pixels)
    width, height = im.size
    fast = settings.draft_decode and im.format in ("JPEG", "MPO")
    scale = draft_scale(width, height, max(min_side, draft_min_side)) if fast else 1
    if scale > 1 or (fast and luma_only):
        # Pillow switches the mode only for YCbCr data, so CMYK and grey JPEGs keep theirs.
        im.draft("L" if luma_only else "RGB", (width // scale, height // scale))
    try:
        im.load()
    except Image.DecompressionBombError as exc:
        raise DeadLetterError(ErrorCode.TOO_MANY_PIXELS, str(exc)) from None
    except _CORRUPT as exc:
        raise DeadLetterError(ErrorCode.DECODE_FAILED, f"{im.format} data is corrupt or truncated: {exc}") from None
    try:
        oriented = _orient(im)
        picture = oriented if luma_only and plain_grey(oriented) else to_rgb(oriented)
    except (OSError, ValueError) as exc:  # e.g. a mode Pillow cannot convert to RGB
        raise DeadLetterError(ErrorCode.DECODE_FAILED, f"cannot convert {im.format} {im.mode} to RGB: {exc}") from None
    if oriented.size != im.size:  # a 90-degree orientation swaps the sides
        width, height = height, width
    return Decoded(picture, width, height, im.format, scale)


def draft_scale(width: int, height: int, min_side: int) -> int:
    """Largest JPEG DCT scale (8, 4, 2) whose output keeps the shorter side >= ``min_side``; 1 if none.

    Pillow's decoder rounds the reduced size up, so the output's shorter side is ceil(side / scale).
    """
    side = min(width, height)
    for scale in (8, 4, 2):
        if -(-side // scale) >= max(min_side, 1):
            return scale
    return 1


def _open(data: bytes, max_pixels: int) -> ImageFile.ImageFile:
    """Open lazily (header only) and refuse unknown formats and too many pixels before decoding."""
    Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow's own guard as a backstop (it errors at 2x this)
    try:
        im = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.UnidentifiedImageError:
        raise DeadLetterError(ErrorCode.NOT_AN_IMAGE, f"not a supported image ({', '.join(FORMATS)})") from None
    except Image.DecompressionBombError as exc:
        raise DeadLetterError(ErrorCode.TOO_MANY_PIXELS, str(exc)) from None
    except _CORRUPT as exc:
        raise DeadLetterError(ErrorCode.DECODE_FAILED, f"unreadable image header: {exc}") from None
    width, height = im.size
    if width * height > max_pixels:
        raise DeadLetterError(
            ErrorCode.TOO_MANY_PIXELS, f"{width}x{height} = {width * height} pixels, over max_image_pixels {max_pixels}"
        )
    if width < 1 or height < 1:
        raise DeadLetterError(ErrorCode.DECODE_FAILED, f"empty image {width}x{height}")
    return im


def _orient(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation. Unreadable EXIF means "as stored": it must not lose a good image."""
    try:
        orientation = im.getexif().get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - malformed EXIF raises anything from struct.error to TypeError
        return im
    if orientation not in range(2, 9):
        return im
    return ImageOps.exif_transpose(im)


def plain_grey(im: Image.Image) -> bool:
    """8-bit grey with nothing to flatten: the pHash's "L" as is (Pillow's L -> RGB -> L is the identity)."""
    return im.mode == "L" and "transparency" not in im.info


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB with transparency flattened onto ``BACKGROUND``.

    16-bit and 32-bit integer greys are scaled by 1/256 (Pillow's own conversion clips them at 255,
    which turns most 16-bit images white).
    """
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        grey = np.asarray(im, dtype=np.int64)
        im = Image.fromarray((np.clip(grey, 0, 65535) >> 8).astype(np.uint8), "L")
    elif im.mode == "F":
        im = im.convert("L")
    if "transparency" in im.info and im.mode in ("P", "L", "RGB"):
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        flat = Image.new("RGB", rgba.size, BACKGROUND)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return im if im.mode == "RGB" else im.convert("RGB")
