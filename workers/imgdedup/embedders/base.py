"""What every embedder promises, and the checks that hold it to that promise.

The vector index scores by cosine and the verdict compares cosines with fixed thresholds, so a
vector that is zero, not finite or not unit length would give a silently wrong answer; `validate`
turns that into an error the pipeline can dead-letter instead.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

#: Largest allowed deviation of a row's L2 norm from 1 (float32 models land within ~1e-6).
NORM_TOLERANCE = 1e-3


class EmbedderUnavailable(RuntimeError):
    """An enabled embedder cannot be built here (a missing extra); the message says what to install."""


class WeightsMissing(EmbedderUnavailable):
    """The model's weights are not on this machine; the message says exactly what to provide."""


@runtime_checkable
class Embedder(Protocol):
    """Turns decoded images into L2-normalised float32 vectors, one row per image."""

    #: Signal name used in verdicts and index keys ("sscd", "clip").
    name: str
    #: Model plus input policy; recorded in verdicts so vectors of different versions are never mixed unknowingly.
    version: str
    #: Length of each vector.
    dim: int
    #: Cheap to load in every decoder process and fast on one thread, so it runs there beside decoding
    #: and only its vectors travel back to the worker (imgdedup.extract); False keeps decoding on threads.
    in_decoder_processes: bool

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        """(len(images), dim) float32, rows L2-normalised; computed in batches."""
        ...


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB view of any Pillow image; transparency is flattened onto white (as the corpus was made)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); zero rows stay zero so `validate` can reject them."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def validate(vectors: np.ndarray, dim: int | None = None, tolerance: float = NORM_TOLERANCE) -> np.ndarray:
    """Return `vectors` as C-contiguous float32 (n, dim) or raise ValueError naming the first bad row."""
    array = np.ascontiguousarray(vectors, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"embeddings must be a 2-d array (n, dim), got shape {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"embeddings must have {dim} columns, got {array.shape[1]}")
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"embedding row {row} has NaN or infinite values")
    norms = np.linalg.norm(array.astype(np.float64), axis=1)
    zero = norms == 0
    if zero.any():
        row = int(np.flatnonzero(zero)[0])
        raise ValueError(f"embedding row {row} is all zeros")
    off = np.abs(norms - 1.0) > tolerance
    if off.any():
        row = int(np.flatnonzero(off)[0])
        raise ValueError(f"embedding row {row} is not L2-normalised (norm {norms[row]:.6f})")
    return array
