"""Fixtures that start real servers: one Tansu broker and one Redis 8.2 (with RediSearch loaded)
per test session, on free loopback ports, stopped when the session ends. Each test gets its own
key prefix, topics and consumer group, so tests never see each other's data."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import redis

from imgdedup import devstack
from imgdedup.config import Settings, load_settings

#: The shared corpus of distinct real photos (beside the repository, also in CI).
CORPUS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "base"


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    if not CORPUS_DIR.is_dir():
        pytest.fail(f"shared corpus not found at {CORPUS_DIR} (it lives beside the repository)")
    return CORPUS_DIR


@pytest.fixture(scope="session")
def corpus_files(corpus_dir: Path) -> list[Path]:
    return sorted(corpus_dir.glob("*.jpg"))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = devstack.start_redis(
        devstack.free_port(), tmp_path_factory.mktemp("redis"), persist=False,
        modules=(devstack.redisearch_module(),),
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory):
    server = devstack.start_tansu(devstack.free_port(), tmp_path_factory.mktemp("kafka"))
    yield server
    server.stop()


@pytest.fixture
def key_prefix() -> str:
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def redis_client(redis_server) -> redis.Redis:
    client = redis.Redis.from_url(redis_server.address)
    yield client
    client.close()


@pytest.fixture
def make_settings(redis_server, key_prefix, tmp_path):
    """Settings pointing at the test Redis with this test's key prefix (Kafka added by `kafka_settings`)."""

    def make(**overrides) -> Settings:
        base = {"redis_url": redis_server.address, "key_prefix": key_prefix, "file_roots": [str(tmp_path)],
                    "metrics_port": 0}
        base.update(overrides)
        return load_settings(**base)

    return make


@pytest.fixture
def kafka_settings(kafka_broker, make_settings):
    """Settings with fresh topics (3 partitions each) and a fresh consumer group on the test broker."""

    def make(partitions: int = 3, **overrides) -> Settings:
        tag = uuid.uuid4().hex[:8]
        settings = make_settings(
            kafka_bootstrap=kafka_broker.address, input_topic=f"images-{tag}", verdict_topic=f"verdicts-{tag}",
            dlq_topic=f"dlq-{tag}", consumer_group=f"group-{tag}", partitions=partitions,
            # Short group timeouts: Tansu's joins and rebalances wait on them (3 s / 11 s instead of 23 s / 80 s).
            **{"session_timeout_ms": 6000, "max_poll_interval_ms": 10000, **overrides},
        )
        devstack.create_topics(settings.kafka_bootstrap,
                               [settings.input_topic, settings.verdict_topic, settings.dlq_topic], partitions)
        return settings

    return make
