"""The Redis key layout, in one place.

Every key starts with ``<prefix>:v<LAYOUT_VERSION>`` so a new layout can be written beside an old
one and the old one dropped after a backfill. Every key names its namespace, so tenants never share
a key. Curly braces are Redis Cluster hash tags:

- ``{ns}`` keys (the sequence counter and the commit order) share one slot per namespace, so the
  commit script that assigns a sequence number touches a single slot;
- record, SHA-256, hash-bucket and vector keys are tagged by their own identity, so one large
  namespace spreads over the whole cluster. Commands on them are per key (pipelines, no MULTI),
  which redis-py's cluster client routes and groups by node.

Keys, with what they hold:

=========================================  =============================================================
``P:{ns}:seq``                              string counter: last sequence number given in ``ns``
``P:{ns}:order``                            hash image_id -> ``"<seq>"`` once committed (it then counts as a
                                            match for later images), ``"<seq> <canonical image_id>"``
                                            once decided a duplicate (a unique image is its own
                                            canonical); one HMGET answers both for every candidate
``P:rec:{ns/image_id}``                     hash: the image record (fields in :data:`RECORD_FIELDS`)
``P:sha:{ns/sha256}``                       set of image_ids whose bytes have this SHA-256
``P:mih:{ns/t/xxxx}``                       string: hash-table ``t`` bucket ``xxxx`` (hex substring), entries
                                            ``<16 hex pHash><image_id>\\n`` (see :mod:`imgdedup.hashindex`)
``P:vec:{ns/embedder/shard}``               Redis vector set of one embedder's vectors (element = image_id)
``P:vdoc:{ns/embedder}:image_id``           hash holding one vector for the RediSearch backend
``P:namespaces``                            set of namespaces that ever held an image (for metrics)
=========================================  =============================================================
"""

from __future__ import annotations

from dataclasses import dataclass

#: 2: hash buckets are strings of entries (were SETs in 1).
#: 3: the canonical original moved from the image record into the order hash.
LAYOUT_VERSION = 3

#: Fields of an image record hash (``P:rec:{ns/image_id}``).
RECORD_FIELDS = (
    "event_id",  # event that last wrote the record (idempotent replay key)
    "sha256",  # hex digest of the image bytes
    "phash",  # 16 hex digits
    "low_detail",  # "1" if the image skipped pHash matching
    "mih",  # bucket hex substring per table, comma-separated, named before writing ("" if none)
    "vectors",  # comma-separated "embedder/shard" vector entries written
    "decision",  # JSON of the decided verdict (verdict, duplicate_of, matches; empty ones left out) for replays
    "indexed_at",  # unix seconds of the first write
)


@dataclass(frozen=True)
class Keys:
    """Key names for one key prefix. Pure string building: no I/O here."""

    prefix: str = "imgdedup"

    @property
    def base(self) -> str:
        return f"{self.prefix}:v{LAYOUT_VERSION}"

    def seq(self, ns: str) -> str:
        return f"{self.base}:{{{ns}}}:seq"

    def order(self, ns: str) -> str:
        return f"{self.base}:{{{ns}}}:order"

    def record(self, ns: str, image_id: str) -> str:
        return f"{self.base}:rec:{{{ns}/{image_id}}}"

    def sha(self, ns: str, sha256_hex: str) -> str:
        return f"{self.base}:sha:{{{ns}/{sha256_hex}}}"

    def mih_bucket(self, ns: str, table: int, substring_hex: str) -> str:
        return f"{self.base}:mih:{{{ns}/{table}/{substring_hex}}}"

    def mih_pattern(self, ns: str) -> str:
        """SCAN pattern of every hash bucket of a namespace (metrics and tests, never the hot path)."""
        return f"{self.base}:mih:{{{_glob_escape(ns)}/*"

    def vectorset(self, ns: str, embedder: str, shard: int) -> str:
        return f"{self.base}:vec:{{{ns}/{embedder}/{shard}}}"

    def vector_doc_prefix(self, ns: str, embedder: str) -> str:
        return f"{self.base}:vdoc:{{{ns}/{embedder}}}:"

    def vector_doc(self, ns: str, embedder: str, image_id: str) -> str:
        return self.vector_doc_prefix(ns, embedder) + image_id

    def search_index(self, ns: str, embedder: str) -> str:
        return f"{self.base}:ftidx:{ns}:{embedder}"

    def namespaces(self) -> str:
        return f"{self.base}:namespaces"


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
