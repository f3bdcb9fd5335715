"""Prometheus metrics of the worker, all defined here so names are in one place.

Labels are bounded sets only (stage, outcome, code, signal, partition, topic, namespace). The
namespace label is bounded by ``MAX_NAMESPACE_LABELS``: namespaces beyond it are reported as
``other`` so a tenant explosion cannot explode the series count. Image ids never become labels.
"""

from __future__ import annotations

import threading

from prometheus_client import Counter, Gauge, Histogram

#: Distinct namespace label values before the rest are folded into "other".
MAX_NAMESPACE_LABELS = 50

_STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_E2E_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

EVENTS_CONSUMED = Counter("imgdedup_events_consumed", "Image events taken from the input topic.", ["topic"])
VERDICTS = Counter(
    "imgdedup_verdicts", "Verdicts published, by outcome and namespace.", ["verdict", "namespace"]
)
DEAD_LETTERS = Counter("imgdedup_dead_letters", "Events sent to the dead-letter topic, by error code.", ["code"])
RETRIES = Counter("imgdedup_retries", "Retries after a transient error, by dependency.", ["dependency"])
ERRORS = Counter("imgdedup_errors", "Transient errors from Kafka or Redis, by dependency.", ["dependency"])
STAGE_SECONDS = Histogram(
    "imgdedup_stage_seconds",
    "Time in each pipeline stage: per event for fetch, decode and hash (run in parallel threads or "
    "processes); per model call for embed (a batch, or a decoder process's chunk of it); per batch for "
    "index_write, index_query and produce. On a standalone Redis the batch's queries share the round trip "
    "of its writes, so index_write includes them and index_query is the candidates' lookup.",
    ["stage"],
    buckets=_STAGE_BUCKETS,
)
END_TO_END_SECONDS = Histogram(
    "imgdedup_end_to_end_seconds",
    "From the event's occurred_at to its verdict being acknowledged by the broker.",
    buckets=_E2E_BUCKETS,
)
PROCESSING_SECONDS = Histogram(
    "imgdedup_processing_seconds",
    "From the worker taking an event off Kafka to its verdict being acknowledged.",
    buckets=_E2E_BUCKETS,
)
BATCH_SIZE = Histogram(
    "imgdedup_batch_size", "Events per consumed batch.", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
)
IN_FLIGHT = Gauge("imgdedup_in_flight", "Events taken from Kafka whose verdict is not yet acknowledged.")
MIH_PROBES = Histogram(
    "imgdedup_mih_probes", "Hash buckets read per pHash query.", buckets=(0, 4, 16, 64, 128, 256, 512, 1024, 4096)
)
MIH_CANDIDATES = Histogram(
    "imgdedup_mih_candidates",
    "Bucket members verified by popcount per pHash query.",
    buckets=(0, 1, 2, 5, 10, 50, 100, 500, 1000, 5000, 20000),
)
MIH_CAPPED = Counter("imgdedup_mih_capped_buckets", "Hash-bucket writes refused because the bucket was full.")
LOW_DETAIL = Counter("imgdedup_low_detail_images", "Images too plain for pHash matching (skipped that signal).")
DECODER_DEATHS = Counter(
    "imgdedup_decoder_process_deaths",
    "Decoder child processes that died with images in flight (each of those is retried alone).",
)
VECTOR_QUERY_SECONDS = Histogram(
    "imgdedup_vector_query_seconds",
    "Round trip that carried a batch's vector queries (shared with its SHA-256 and pHash lookups), by embedder.",
    ["embedder"],
    buckets=_STAGE_BUCKETS,
)
CONSUMER_LAG = Gauge(
    "imgdedup_consumer_lag", "Messages behind the partition's high watermark (librdkafka statistics).",
    ["topic", "partition"],
)
ASSIGNED_PARTITIONS = Gauge("imgdedup_assigned_partitions", "Input partitions assigned to this worker.")
PAUSED_PARTITIONS = Gauge("imgdedup_paused_partitions", "Input partitions paused after repeated transient errors.")
INDEX_IMAGES = Gauge("imgdedup_index_images", "Committed images in the index, by namespace.", ["namespace"])
VECTOR_QUERY_EF = Gauge("imgdedup_vector_query_ef", "HNSW exploration factor of this worker's vector queries (setting).")
VECTOR_SHARD_VECTORS = Gauge(
    "imgdedup_vector_shard_vectors",
    "Vectors in the largest shard (one HNSW graph) of a namespace's vector index, by embedder: a query's "
    "recall at a fixed EF falls as a graph grows.",
    ["namespace", "embedder"],
)
REDIS_USED_MEMORY = Gauge("imgdedup_redis_used_memory_bytes", "Redis used_memory as last reported by INFO (summed over a cluster's primaries).")
REDIS_MAX_MEMORY = Gauge("imgdedup_redis_maxmemory_bytes", "Redis maxmemory (summed over a cluster's primaries; 0 = no limit on some node).")
READY = Gauge("imgdedup_ready", "1 when connected to Kafka and Redis with partitions assigned.")
BUILD_INFO = Gauge("imgdedup_build_info", "Version and feature versions of this worker.", ["version", "features"])

def _initialise_labels() -> None:
    """Create every known label combination at zero, so the first dead letter of a code (or the first
    Redis error) is an increase that rate() can see, not a series that appears already at 1."""
    from imgdedup.errors import ErrorCode

    for code in ErrorCode:
        DEAD_LETTERS.labels(code.value)
    for dependency in ("kafka", "redis"):
        ERRORS.labels(dependency)
        RETRIES.labels(dependency)
    for stage in STAGES:
        STAGE_SECONDS.labels(stage)


#: Pipeline stages timed by imgdedup_stage_seconds.
STAGES = ("fetch", "decode", "hash", "embed", "index_write", "index_query", "produce")
_initialise_labels()

_seen_namespaces: set[str] = set()
_ns_lock = threading.Lock()


def namespace_label(namespace: str) -> str:
    """Bounded label value for a namespace: the first MAX_NAMESPACE_LABELS keep their names."""
    with _ns_lock:
        if namespace in _seen_namespaces:
            return namespace
        if len(_seen_namespaces) < MAX_NAMESPACE_LABELS:
            _seen_namespaces.add(namespace)
            return namespace
    return "other"
