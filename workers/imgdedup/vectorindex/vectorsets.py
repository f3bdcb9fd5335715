"""Redis 8 Vector Sets backend (the default).

One vector set per (namespace, embedder, shard). The shard of an image is a stable hash of its id,
so each shard's key (hash-tagged on its own) lands on its own Cluster slot and one large namespace
spreads over the cluster. A query asks every shard for its k best in one non-transactional
pipeline and merges the answers.

VSIM's WITHSCORES score is not cosine: Redis reports a similarity in [0, 1] (1 identical,
0 opposite) equal to ``1 - d / 2`` where ``d = 1 - cos`` is the cosine distance, so
``score = (1 + cos) / 2`` and ``cos = 2 * score - 1``. With Q8 quantisation the stored vectors
are int8, so scores are approximate (measured error well under 0.01 in cosine at 512-d).
"""

from __future__ import annotations

import zlib

import numpy as np

from imgdedup.config import Settings
from imgdedup.keys import Keys
from imgdedup.roundtrip import Finish
from imgdedup.vectorindex.base import Neighbours, VectorIndex, as_matrix, fp32_blob, text

#: Flags fixed when a vector set is created: every VADD must send the same ones, or Redis
#: answers "quantization mismatch" / "M value mismatch". Q8 stores int8 (4x less memory than
#: NOQUANT); M is the HNSW graph degree (Redis' default, 16).
CREATION_FLAGS = ("Q8", "M", 16)
#: VADD options (not creation flags). None: ``CAS`` (neighbour candidates collected on a background
#: thread, so several connections insert in parallel: 1.1-1.4x VADD/s with 3 connections, measured) is
#: written to the append-only file as sent, and Redis 8.2 aborts when it replays it on start-up (it
#: asserts that no replayed command blocks). A Redis that persists must be able to restart.
VADD_OPTIONS: tuple[str, ...] = ()
#: Search exploration factor of VSIM: higher finds true neighbours more often, costs latency; the
#: worker passes its setting (``vector_query_ef``).
QUERY_EF = Settings.model_fields["vector_query_ef"].default


def shard_of(image_id: str, shards: int) -> int:
    """Stable shard of an id: CRC-32 of its UTF-8 bytes mod shards (same in every process)."""
    return zlib.crc32(image_id.encode()) % shards


def score_to_cosine(score: float) -> float:
    """VSIM WITHSCORES score (1 - cosine_distance / 2) to cosine similarity."""
    return 2.0 * float(score) - 1.0


def _pairs(reply) -> list[tuple[str, float]]:
    """(element, score) pairs from a VSIM WITHSCORES reply, parsed (dict) or raw (flat list)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return [(text(k), float(v)) for k, v in reply.items()]
    return [(text(reply[i]), float(reply[i + 1])) for i in range(0, len(reply), 2)]


class VectorSetIndex(VectorIndex):
    def __init__(self, client, keys: Keys, shards: int, creation_flags: tuple = CREATION_FLAGS,
                 ef: int = QUERY_EF):
        self.client, self.keys, self.shards = client, keys, shards
        self.creation_flags, self.ef = creation_flags, ef

    def locator(self, embedder: str, image_id: str) -> str:
        return f"{embedder}/{shard_of(image_id, self.shards)}"

    def queue_add(self, pipe, ns: str, embedder: str, items: list[tuple[str, np.ndarray]]) -> Finish:
        for image_id, vector in items:
            shard = shard_of(image_id, self.shards)
            pipe.execute_command("VADD", self.keys.vectorset(ns, embedder, shard), "FP32", fp32_blob(vector),
                                 image_id, *VADD_OPTIONS, *self.creation_flags)
        return lambda replies: [self.locator(embedder, image_id) for image_id, _ in items]

    def queue_query(self, pipe, ns: str, embedder: str, vectors: np.ndarray, k: int) -> Finish:
        matrix = as_matrix(vectors)
        for row in matrix:
            blob = fp32_blob(row)
            for shard in range(self.shards):
                pipe.execute_command("VSIM", self.keys.vectorset(ns, embedder, shard), "FP32", blob,
                                     "WITHSCORES", "COUNT", k, "EF", max(self.ef, k))

        def finish(replies: list) -> list[Neighbours]:
            out = []
            for q in range(len(matrix)):
                merged = [pair for reply in replies[q * self.shards:(q + 1) * self.shards] for pair in _pairs(reply)]
                merged.sort(key=lambda pair: pair[1], reverse=True)
                out.append([(image_id, score_to_cosine(score)) for image_id, score in merged[:k]])
            return out

        return finish

    def remove(self, ns: str, embedder: str, items: list[tuple[str, str]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for image_id, locator in items:
            pipe.execute_command("VREM", self.keys.vectorset(ns, embedder, self._shard(embedder, locator)), image_id)
        if items:
            pipe.execute()

    def count(self, ns: str, embedder: str) -> int:
        return sum(self._shard_sizes([(ns, embedder)]))

    def largest_shards(self, items: list[tuple[str, str]]) -> list[int]:
        sizes = self._shard_sizes(items)
        return [max(sizes[i:i + self.shards]) for i in range(0, len(sizes), self.shards)]

    def _shard_sizes(self, items: list[tuple[str, str]]) -> list[int]:
        """VCARD of every shard of every (ns, embedder), in one round trip (metrics ask for all namespaces)."""
        pipe = self.client.pipeline(transaction=False)
        for ns, embedder in items:
            for shard in range(self.shards):
                pipe.execute_command("VCARD", self.keys.vectorset(ns, embedder, shard))
        return [int(n or 0) for n in pipe.execute()] if items else []

    @staticmethod
    def _shard(embedder: str, locator: str) -> int:
        """Shard named by a locator "embedder/shard" (as written, not as recomputed now)."""
        name, _, shard = locator.rpartition("/")
        if name != embedder or not shard.isdigit():
            raise ValueError(f"locator {locator!r} is not a vector-set entry of embedder {embedder!r}")
        return int(shard)
