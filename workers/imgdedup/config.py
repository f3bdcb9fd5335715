"""Every setting imgdedup reads, in one place.

Values come from environment variables ``IMGDEDUP_<NAME>`` (upper case), then from CLI
overrides (``imgdedup --set name=value`` or the named flags), which win. Invalid values fail at
start with a message that names the setting, so a typo never becomes a silent default.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal, get_origin

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: librdkafka property names are dotted lower-case words (``socket.timeout.ms``).
_LIBRDKAFKA_KEY = re.compile(r"^[a-z][a-z0-9_.]*$")


class ConfigError(ValueError):
    """A setting has an invalid value; the message names the setting and the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMGDEDUP_", extra="forbid", validate_default=True)

    # --- Kafka -------------------------------------------------------------------------------
    kafka_bootstrap: str = Field("127.0.0.1:19092", description="Kafka bootstrap servers, comma separated.")
    kafka_extra: dict[str, str] = Field(
        default_factory=dict,
        description="Extra librdkafka properties (JSON object), e.g. SASL/TLS settings; applied to every client.",
    )
    input_topic: str = Field("images", description="Topic of image events (image-event.v1).")
    verdict_topic: str = Field("image-verdicts", description="Topic the worker publishes verdicts to.")
    dlq_topic: str = Field("images-dlq", description="Dead-letter topic (dead-letter.v1).")
    consumer_group: str = Field("imgdedup", description="Consumer group of the workers.")
    partitions: int = Field(6, ge=1, le=10_000, description="Partitions of the topics `dev up` creates.")
    batch_size: int = Field(64, ge=1, le=10_000, description="Most events taken from Kafka per batch.")
    batch_timeout_s: float = Field(0.05, gt=0, le=60, description="Longest idle wait for an event; a batch is "
                                 "the first event plus what is already fetched, up to batch_size.")
    max_poll_interval_ms: int = Field(
        300_000, ge=5_000, description="librdkafka max.poll.interval.ms (also the rebalance timeout); above the slowest batch."
    )
    session_timeout_ms: int = Field(45_000, ge=1_000, description="librdkafka session.timeout.ms of the worker's group.")
    fetch_wait_max_ms: int = Field(
        10, ge=1, le=10_000, description="librdkafka fetch.wait.max.ms: the longest a broker may hold a fetch; "
        "Tansu holds fetches even when data arrives (a hop's p99 is about half of this) and costs ~0.1 core "
        "per idle consumer at 10. Apache Kafka answers as soon as data arrives, so there a larger value "
        "(500) only saves idle fetch requests."
    )

    # --- Redis -------------------------------------------------------------------------------
    redis_url: SecretStr = Field(
        SecretStr("redis://127.0.0.1:16379/0"), description="Redis >= 8 URL (redis://, rediss://)."
    )
    redis_cluster: bool = Field(False, description="Connect with the Redis Cluster client.")
    key_prefix: str = Field("imgdedup", pattern=r"^[A-Za-z0-9_.-]{1,32}$", description="First part of every key.")

    # --- Fetch and decode --------------------------------------------------------------------
    file_roots: list[Path] = Field(
        default_factory=list, description="Directories file:// URIs may read from (JSON list); empty refuses all."
    )
    http_allow_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts or CIDRs that http(s) fetches may reach even if private/loopback (JSON list).",
    )
    fetch_timeout_s: float = Field(10.0, gt=0, le=300, description="Whole-request timeout of http(s) fetches.")
    fetch_max_redirects: int = Field(3, ge=0, le=10, description="Redirects followed by http(s) fetches.")
    max_image_bytes: int = Field(25_000_000, ge=1024, description="Largest accepted encoded image.")
    max_image_pixels: int = Field(60_000_000, ge=1024, description="Largest accepted width x height.")
    fetch_threads: int = Field(8, ge=1, le=256, description="Threads waiting on http(s) fetches (I/O, not CPU).")
    decode_threads: int = Field(
        default_factory=lambda: len(os.sched_getaffinity(0)), ge=1, le=256,
        json_schema_extra={"documented_default": "CPUs usable"},
        description="Threads decoding and hashing (CPU; inline and file:// images are read there too). "
        "Default: the CPUs this process may run on; in a container set it to the CPU limit.",
    )
    decode_processes: int = Field(
        default_factory=lambda: len(os.sched_getaffinity(0)), ge=0, le=256,
        json_schema_extra={"documented_default": "CPUs usable"},
        description="Child processes that read, decode, hash and SSCD-embed images in place of the decode threads "
        "(unless CLIP is enabled: it needs every picture in the worker): each has its own GIL, and a codec that "
        "crashes takes down one child, not the worker. 0: always decode on the threads.",
    )
    draft_decode: bool = Field(
        True, description="Let JPEG decoding scale down in the DCT domain, and decode only the luma plane when no "
        "embedder needs colour (fast path; false: the pHash is exactly imagehash's).")

    # --- Hash tier ---------------------------------------------------------------------------
    phash_radius: int = Field(8, ge=0, le=32, description="Largest pHash Hamming distance counted as a near duplicate.")
    mih_tables: int = Field(4, description="Substring tables of the multi-index hash (divides 64).")
    mih_bucket_cap_bytes: int = Field(
        200_000, ge=1024,
        description="Most bytes one hash bucket holds (an entry is 17 bytes plus the image id, so ~5,000 "
                    "entries of 23-byte ids); entries past it are counted, not stored.")
    low_detail_std: float = Field(
        2.5, ge=0,
        description="Robust std-dev (grey levels) of the pHash's 8x8 DCT coefficients below which an image is "
        "low-detail (blank, solid, gradient) and skips pHash matching; corpus minimum 4.2, synthetic maximum 1.4.",
    )
    max_matches: int = Field(10, ge=1, le=100, description="Most matches listed in a verdict.")

    # --- Vector tier -------------------------------------------------------------------------
    sscd_enabled: bool = Field(
        True, description="Compute SSCD copy-detection vectors (needs the vectors extra; without it the worker "
        "refuses to start until this is false)."
    )
    sscd_model: Literal["sscd_distilled", "sscd"] = Field("sscd_distilled", description="SSCD ONNX model.")
    sscd_input_size: int = Field(224, ge=64, le=1024, description="Side the image is resized to for SSCD.")
    sscd_threshold: float = Field(0.75, ge=-1, le=1, description="SSCD cosine similarity counted as a near duplicate.")
    clip_enabled: bool = Field(False, description="Compute CLIP vectors (needs the clip extra and weights).")
    clip_model: str = Field("ViT-B-32", description="open_clip model name.")
    clip_pretrained: str = Field("openai", description="open_clip pretrained tag (weights from the HF cache).")
    clip_checkpoint: Path | None = Field(None, description="Local checkpoint file; overrides clip_pretrained.")
    clip_threshold: float = Field(0.95, ge=-1, le=1, description="CLIP cosine counted as a duplicate, if enabled.")
    clip_is_duplicate_signal: bool = Field(False, description="Let CLIP similarity alone make a near duplicate.")
    embed_threads: int = Field(2, ge=1, le=64, description="Threads of the ONNX/torch runtimes (shared out among "
                               "the decoder processes when SSCD runs there).")
    vector_backend: Literal["vectorset", "redisearch"] = Field("vectorset", description="Redis vector index.")
    vector_shards: int = Field(
        1, ge=1, le=1024, description="Vector sets per (namespace, embedder): each query searches every shard, so "
        "1 on a single Redis node; about the node count on a Redis Cluster."
    )
    vector_candidates: int = Field(10, ge=1, le=1000, description="Neighbours asked of the vector index per query.")
    vector_query_ef: int = Field(
        200, ge=1, le=100_000, description="HNSW exploration factor of each vector query (VSIM EF, RediSearch "
        "EF_RUNTIME). Measured: recall@1 >= 0.95 while a shard holds at most ~500 x EF vectors; latency grows "
        "about linearly with EF."
    )

    # --- Serving -----------------------------------------------------------------------------
    metrics_port: int = Field(9464, ge=0, le=65535, description="Port of /metrics, /healthz, /readyz (0 = off).")
    metrics_host: str = Field("0.0.0.0", description="Address the metrics server binds.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")

    # --- Embedded dev stack ------------------------------------------------------------------
    dev_state_dir: Path = Field(Path(".imgdedup-dev"), description="State, logs and pid files of `dev up`.")
    dev_kafka_port: int = Field(19092, ge=1, le=65535, description="Port of the embedded Tansu broker.")
    dev_redis_port: int = Field(16379, ge=1, le=65535, description="Port of the embedded Redis 8.")

    @field_validator("kafka_extra")
    @classmethod
    def _librdkafka_keys(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [k for k in value if not _LIBRDKAFKA_KEY.match(k)]
        if bad:
            raise ValueError(f"not librdkafka property names: {bad}")
        return value

    @field_validator("mih_tables")
    @classmethod
    def _divides_64(cls, value: int) -> int:
        if value not in (1, 2, 4, 8, 16):
            raise ValueError("must be 1, 2, 4, 8 or 16 (substrings of equal width)")
        return value

    @model_validator(mode="after")
    def _distinct_topics(self) -> Settings:
        topics = [self.input_topic, self.verdict_topic, self.dlq_topic]
        if len(set(topics)) != 3:
            raise ValueError(f"input_topic, verdict_topic and dlq_topic must differ, got {topics}")
        return self

    # ------------------------------------------------------------------------------------------
    def kafka_common(self) -> dict[str, Any]:
        """Properties shared by every Kafka client (bootstrap plus the user's extras)."""
        return {"bootstrap.servers": self.kafka_bootstrap, **self.kafka_extra}

    def masked(self) -> dict[str, Any]:
        """The effective configuration with secrets hidden, for `imgdedup config`."""
        out = self.model_dump(mode="json")
        out["redis_url"] = _mask_url(self.redis_url.get_secret_value())
        out["kafka_extra"] = {
            k: ("***" if any(s in k for s in ("password", "secret", "key")) else v)
            for k, v in self.kafka_extra.items()
        }
        return out


def _mask_url(url: str) -> str:
    return re.sub(r"//([^:/@]*):([^@]*)@", r"//\1:***@", url)


def load_settings(**overrides: Any) -> Settings:
    """Build the settings from the environment plus overrides, or raise ConfigError naming the setting."""
    try:
        return Settings(**_decode_json_overrides(overrides))
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"]) or "(settings)"
            where = f"IMGDEDUP_{name.upper()}" if err["loc"] else "settings"
            lines.append(f"invalid setting {name} ({where}): {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def _decode_json_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """CLI overrides arrive as text; list and dict settings take JSON there, as their variables do."""
    out = dict(overrides)
    for name, value in overrides.items():
        field = Settings.model_fields.get(name)
        if field is None or not isinstance(value, str) or get_origin(field.annotation) not in (list, dict):
            continue
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"invalid setting {name} (IMGDEDUP_{name.upper()}): not JSON: {exc}") from None
    return out


def describe() -> list[tuple[str, str, str]]:
    """(variable, default, description) for every setting: the README's configuration table."""
    rows = []
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory else field.default
        if isinstance(default, SecretStr):
            default = default.get_secret_value()
        shown = repr(default) if default is not None else "-"
        if isinstance(field.json_schema_extra, dict):  # a default that depends on the machine
            shown = field.json_schema_extra.get("documented_default", shown)
        rows.append((f"IMGDEDUP_{name.upper()}", shown, field.description))
    return rows
