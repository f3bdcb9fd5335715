"""Hash-tier features of one image: SHA-256 of the bytes, the 64-bit pHash and a low-detail measure.

The pHash is imagehash's (``imagehash.phash``, hash_size 8, highfreq_factor 4) by definition:
Pillow's greyscale, Pillow's Lanczos arithmetic and the same SciPy DCT, so
``phash64(im) == int(str(imagehash.phash(im)), 16)``
bit for bit (tests/test_features.py checks it on the corpus and variants). It is reimplemented to
share the 32x32 greyscale and its DCT with the low-detail measure instead of computing them twice,
and to do Pillow's Lanczos resize as matrix products (``resample``), which give Pillow's bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import scipy.fftpack
from PIL import Image

from imgdedup.config import Settings
from imgdedup.decode import Decoded
from imgdedup.resample import lanczos_l

HASH_SIZE = 8
GREY_SIDE = HASH_SIZE * 4  # imagehash's highfreq_factor 4

#: Factors turning scipy.fftpack's unnormalised DCT-II into the orthonormal one (energy-preserving),
#: so the detail measure is in grey levels whatever the transform's conventions.
_AXIS = np.full(HASH_SIZE, np.sqrt(1 / (2 * GREY_SIDE)))
_AXIS[0] = np.sqrt(1 / (4 * GREY_SIDE))
_ORTHO = np.outer(_AXIS, _AXIS)

#: Scales a median absolute deviation to a standard deviation (for normally distributed values).
_MAD_TO_STD = 1.4826


@dataclass(frozen=True)
class HashFeatures:
    sha256: str  # hex digest of the encoded bytes (exact duplicates)
    phash: int  # 64-bit pHash, first DCT coefficient in the most significant bit (imagehash's hex order)
    low_detail: bool  # detail < settings.low_detail_std: the pHash carries no signal; skip pHash matching
    detail: float  # robust spread of the pHash's DCT coefficients (see detail_std)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def grey32(image: Image.Image) -> np.ndarray:
    """The pHash's input exactly as imagehash makes it: Pillow "L" luma, Lanczos to 32x32, uint8."""
    return lanczos_l(np.asarray(image.convert("L")), GREY_SIDE, GREY_SIDE)


def low_dct(grey: np.ndarray) -> np.ndarray:
    """The 8x8 lowest frequencies of imagehash's DCT (unnormalised type II, rows then columns)."""
    return scipy.fftpack.dct(scipy.fftpack.dct(grey, axis=0), axis=1)[:HASH_SIZE, :HASH_SIZE]


def phash_from_dct(low: np.ndarray) -> int:
    """Bits = coefficient > median, row-major, first bit most significant (imagehash's ``str`` order)."""
    bits = (low > np.median(low)).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def detail_from_dct(low: np.ndarray) -> float:
    """How far, typically, the pHash's 64 coefficients lie from the median they are thresholded at.

    When that spread is small the bits are decided by noise: blank pages, solid colours and smooth
    gradients all land on a handful of hashes and collide. Plain pixel std-dev cannot see this (a
    full-range gradient has std-dev ~74), this measure can (~0 for linear gradients). It is the
    median absolute deviation scaled to a std-dev, of the orthonormal coefficients (grey levels).
    """
    ortho = low * _ORTHO
    return float(_MAD_TO_STD * np.median(np.abs(ortho - np.median(ortho))))


def phash64(image: Image.Image) -> int:
    """imagehash.phash(image) as an int (pass the oriented, flattened RGB image from ``decode``)."""
    return phash_from_dct(low_dct(grey32(image)))


def phash_hex(value: int) -> str:
    """16 lower-case hex digits, the same text as ``str(imagehash.phash(...))``."""
    return f"{value:016x}"


def detail_std(image: Image.Image) -> float:
    """Detail of an image as the pHash sees it (see ``detail_from_dct``); low_detail below the setting."""
    return detail_from_dct(low_dct(grey32(image)))


def hash_features(data: bytes, decoded: Decoded, settings: Settings) -> HashFeatures:
    """SHA-256 of ``data`` plus pHash and detail of ``decoded.image``, sharing one 32x32 DCT."""
    low = low_dct(grey32(decoded.image))
    detail = detail_from_dct(low)
    return HashFeatures(sha256_hex(data), phash_from_dct(low), detail < settings.low_detail_std, detail)
