"""Redis vector indexes for embeddings: Vector Sets (default) or RediSearch, behind one interface."""

from __future__ import annotations

from imgdedup.keys import Keys
from imgdedup.vectorindex.base import Neighbours, VectorIndex

__all__ = ["Neighbours", "VectorIndex", "build_vector_index"]


def build_vector_index(client, keys: Keys, settings) -> VectorIndex:
    """The backend named by ``settings.vector_backend`` on `client` (redis.Redis or RedisCluster)."""
    if settings.vector_backend == "vectorset":
        from imgdedup.vectorindex.vectorsets import VectorSetIndex

        return VectorSetIndex(client, keys, settings.vector_shards, ef=settings.vector_query_ef)
    if settings.vector_backend == "redisearch":
        from imgdedup.vectorindex.redisearch import RediSearchIndex

        return RediSearchIndex(client, keys, ef_runtime=settings.vector_query_ef)
    raise ValueError(f"unknown vector_backend {settings.vector_backend!r}")
