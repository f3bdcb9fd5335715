"""RediSearch backend: one HNSW vector index per (namespace, embedder) over hash documents.

Each vector is a hash ``keys.vector_doc(ns, embedder, image_id)`` with one FLOAT32 field; the
index (COSINE metric) is created on first use and remembered per process. RediSearch reports the
cosine *distance* ``1 - cos``, so similarity is ``1 - distance``.
"""

from __future__ import annotations

import numpy as np
import redis

from imgdedup.config import Settings
from imgdedup.keys import Keys
from imgdedup.roundtrip import Finish
from imgdedup.vectorindex.base import Neighbours, VectorIndex, as_matrix, fp32_blob, text

#: Hash field holding the FP32 vector.
FIELD = "vec"
#: HNSW search exploration factor per query (recall vs latency); the worker passes its setting.
EF_RUNTIME = Settings.model_fields["vector_query_ef"].default
#: Locator suffix: a document's key follows from (ns, embedder, image_id) alone.
LOCATOR_SUFFIX = "ft"


class RediSearchIndex(VectorIndex):
    def __init__(self, client, keys: Keys, ef_runtime: int = EF_RUNTIME):
        self.client, self.keys, self.ef_runtime = client, keys, ef_runtime
        self._ready: set[tuple[str, str]] = set()

    def ensure_index(self, ns: str, embedder: str, dim: int) -> None:
        """Create the (ns, embedder) index unless this process already knows it exists."""
        if (ns, embedder) in self._ready:
            return
        try:
            self.client.execute_command(
                "FT.CREATE", self.keys.search_index(ns, embedder), "ON", "HASH",
                "PREFIX", 1, self.keys.vector_doc_prefix(ns, embedder),
                "SCHEMA", FIELD, "VECTOR", "HNSW", 6, "TYPE", "FLOAT32", "DIM", dim, "DISTANCE_METRIC", "COSINE",
            )
        except redis.ResponseError as exc:
            if "already exists" not in str(exc).lower():
                raise
        self._ready.add((ns, embedder))

    def locator(self, embedder: str, image_id: str) -> str:
        return f"{embedder}/{LOCATOR_SUFFIX}"

    def queue_add(self, pipe, ns: str, embedder: str, items: list[tuple[str, np.ndarray]]) -> Finish:
        if items:
            self.ensure_index(ns, embedder, int(np.asarray(items[0][1]).shape[-1]))
        for image_id, vector in items:
            pipe.hset(self.keys.vector_doc(ns, embedder, image_id), FIELD, fp32_blob(vector))
        return lambda replies: [self.locator(embedder, image_id) for image_id, _ in items]

    def queue_query(self, pipe, ns: str, embedder: str, vectors: np.ndarray, k: int) -> Finish:
        matrix = as_matrix(vectors)
        if len(matrix):
            self.ensure_index(ns, embedder, matrix.shape[1])
        index = self.keys.search_index(ns, embedder)
        knn = f"*=>[KNN {k} @{FIELD} $v EF_RUNTIME {max(self.ef_runtime, k)} AS dist]"
        for row in matrix:
            pipe.execute_command("FT.SEARCH", index, knn, "PARAMS", 2, "v", fp32_blob(row), "SORTBY", "dist",
                                 "RETURN", 1, "dist", "LIMIT", 0, k, "DIALECT", 2)
        prefix = self.keys.vector_doc_prefix(ns, embedder)
        return lambda replies: [_neighbours(reply, prefix) for reply in replies]

    def remove(self, ns: str, embedder: str, items: list[tuple[str, str]]) -> None:
        if not items:
            return
        for _, locator in items:
            if locator != f"{embedder}/{LOCATOR_SUFFIX}":
                raise ValueError(f"locator {locator!r} is not a RediSearch entry of embedder {embedder!r}")
        self.client.delete(*(self.keys.vector_doc(ns, embedder, image_id) for image_id, _ in items))

    def count(self, ns: str, embedder: str) -> int:
        try:
            info = self.client.execute_command("FT.INFO", self.keys.search_index(ns, embedder))
        except redis.ResponseError as exc:
            if "unknown index" in str(exc).lower() or "no such index" in str(exc).lower():
                return 0
            raise
        fields = _as_map(info)
        return int(float(text(fields.get("num_docs", 0))))


def _as_map(reply) -> dict:
    """A reply map with str keys, whether redis-py parsed it (dict) or not (flat RESP2 list)."""
    if isinstance(reply, dict):
        return {text(k): v for k, v in reply.items()}
    return {text(k): v for k, v in zip(reply[::2], reply[1::2])}


def _hits(reply) -> list[tuple[str, dict]]:
    """(document key, returned fields) of an FT.SEARCH reply in either shape redis-py may hand back:
    parsed ({"results": [{"id", "extra_attributes"}]}) or raw RESP2 ([total, key, [field, value...], ...])."""
    if isinstance(reply, dict):
        rows = [_as_map(row) for row in _as_map(reply).get("results", [])]
        return [(text(row["id"]), {**_as_map(row.get("values") or []), **_as_map(row.get("extra_attributes") or [])})
                for row in rows]
    return [(text(reply[i]), _as_map(reply[i + 1])) for i in range(1, len(reply), 2)]


def _neighbours(reply, prefix: str) -> Neighbours:
    """(image_id, cosine similarity) pairs; RediSearch's COSINE distance is 1 - cos."""
    return [(key.removeprefix(prefix), 1.0 - float(text(fields["dist"])))
            for key, fields in _hits(reply)]
