"""The vector index interface the pipeline codes against, whatever Redis feature backs it.

Scores are always cosine similarity in [-1, 1] (vectors are L2-normalised), best first, so the
thresholds in the settings mean the same thing on every backend. The caller stores the locators
that `add` returns in the image record and hands them back to `remove`, so a delete reaches
exactly what was written even if the shard count changed since.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from imgdedup import roundtrip
from imgdedup.roundtrip import Finish

#: One query's answer: (image_id, cosine similarity), best first.
Neighbours = list[tuple[str, float]]


class VectorIndex(ABC):
    """Nearest-neighbour search over one (namespace, embedder) vector collection at a time.

    Backends implement the ``queue_*`` forms (commands queued on a caller's pipeline, see
    :mod:`imgdedup.roundtrip`), so the index store can share round trips with its other writes and reads.
    """

    client: object

    def add(self, ns: str, embedder: str, items: list[tuple[str, np.ndarray]]) -> list[str]:
        """Write (image_id, vector) pairs; re-adding an id replaces its vector. Returns one locator per item."""
        return roundtrip.run(self.client, self.queue_add, ns, embedder, items)

    def query(self, ns: str, embedder: str, vectors: np.ndarray, k: int) -> list[Neighbours]:
        """The k nearest stored vectors of each row of `vectors` (self included if stored)."""
        return roundtrip.run(self.client, self.queue_query, ns, embedder, vectors, k)

    @abstractmethod
    def locator(self, embedder: str, image_id: str) -> str:
        """What :meth:`add` returns for this image: the image record keeps it for :meth:`remove`."""

    @abstractmethod
    def queue_add(self, pipe, ns: str, embedder: str, items: list[tuple[str, np.ndarray]]) -> Finish:
        """:meth:`add`, queued on ``pipe``."""

    @abstractmethod
    def queue_query(self, pipe, ns: str, embedder: str, vectors: np.ndarray, k: int) -> Finish:
        """:meth:`query`, queued on ``pipe``."""

    @abstractmethod
    def remove(self, ns: str, embedder: str, items: list[tuple[str, str]]) -> None:
        """Delete (image_id, locator) entries written by `add`; unknown entries are ignored."""

    @abstractmethod
    def count(self, ns: str, embedder: str) -> int:
        """Vectors stored for (ns, embedder)."""

    def largest_shards(self, items: list[tuple[str, str]]) -> list[int]:
        """Vectors in the biggest single HNSW graph of each (ns, embedder): what a query's recall
        depends on. Backends with one graph per (ns, embedder) answer :meth:`count`."""
        return [self.count(ns, embedder) for ns, embedder in items]


def as_matrix(vectors: np.ndarray) -> np.ndarray:
    """Query vectors as a C-contiguous little-endian float32 matrix (one row per query)."""
    matrix = np.ascontiguousarray(vectors, dtype="<f4")
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    if matrix.ndim != 2:
        raise ValueError(f"vectors must be 1-d or 2-d, got shape {matrix.shape}")
    return matrix


def fp32_blob(vector: np.ndarray) -> bytes:
    """The FP32 wire format both backends take: little-endian float32 bytes."""
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
