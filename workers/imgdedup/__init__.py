"""imgdedup: streaming image deduplication (Kafka in, verdicts out, indexes in Redis)."""

__version__ = "0.1.0"
