"""Kafka client settings and the small produce/consume helpers the CLI, eval and tests share.

The worker's delivery guarantee is at-least-once with idempotent processing: an idempotent producer
(no duplicates from producer retries), offsets stored only after the broker acknowledged the verdict,
and replays answered from the stored decision.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, Producer, TopicPartition

from imgdedup import messages
from imgdedup.config import Settings


def producer_config(settings: Settings, **extra) -> dict:
    return {
        # A worker produces a batch's verdicts in one burst, so they share requests without waiting;
        # lingering longer would only add to every verdict's latency. kafka_extra may override it.
        "linger.ms": 1,
        "client.id": "imgdedup",
        **settings.kafka_common(),
        "enable.idempotence": True,  # implies acks=all and ordered, de-duplicated retries
        **extra,
    }


def consumer_config(settings: Settings, group: str | None = None, **extra) -> dict:
    return {
        **settings.kafka_common(),
        "group.id": group or settings.consumer_group,
        "enable.auto.commit": True,  # commits what we *stored*; storing waits for the verdict's ack
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky",
        "max.poll.interval.ms": settings.max_poll_interval_ms,
        "session.timeout.ms": settings.session_timeout_ms,
        "fetch.wait.max.ms": settings.fetch_wait_max_ms,
        "heartbeat.interval.ms": max(settings.session_timeout_ms // 3, 100),
        "client.id": "imgdedup",
        **extra,
    }


def produce_events(settings: Settings, events: Iterable[dict], on_progress=None) -> None:
    """Publish image-event documents (any iterable: a generator streams) to the input topic, keyed
    namespace/image_id; raises on a failed delivery."""
    producer = Producer(producer_config(settings))
    failures: list[str] = []

    def delivered(err, msg):
        if err is not None:
            failures.append(f"{msg.key()!r}: {err}")
        elif on_progress:
            on_progress(1)

    for event in events:
        key = messages.record_key(event.get("namespace", "default"), event["image_id"])
        while True:
            try:
                producer.produce(settings.input_topic, messages.encode(event), key, on_delivery=delivered)
                break
            except BufferError:  # local queue full: serve callbacks, then retry
                producer.poll(0.1)
        producer.poll(0)
    remaining = producer.flush(60)
    if failures or remaining:
        raise RuntimeError(f"{len(failures) + remaining} events not delivered: {failures[:3]}")


def iter_topic(settings: Settings, topic: str, *, from_beginning: bool = True, follow: bool = False,
               idle_timeout_s: float = 5.0, deadline: float | None = None) -> Iterator[dict]:
    """JSON documents of a topic. Reads every partition by assignment, not through a consumer group:
    nothing is committed and there is no group join to wait for.

    Stops after `idle_timeout_s` without a message (unless following) or at the monotonic `deadline`."""
    consumer = Consumer({**settings.kafka_common(), "group.id": "imgdedup-reader", "enable.auto.commit": False,
                         "enable.partition.eof": False, "fetch.wait.max.ms": settings.fetch_wait_max_ms})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        start = OFFSET_BEGINNING if from_beginning else OFFSET_END
        consumer.assign([TopicPartition(topic, p, start) for p in partitions])
        last = time.monotonic()
        while (follow or time.monotonic() - last < idle_timeout_s) and (
                deadline is None or time.monotonic() < deadline):
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            if msg.error():
                raise RuntimeError(f"reading {topic}: {msg.error()}")
            last = time.monotonic()
            yield json.loads(msg.value())
    finally:
        consumer.close()


def consume_verdicts(settings: Settings, expected: int, timeout_s: float = 60.0,
                     topic: str | None = None) -> list[dict]:
    """Read until `expected` documents arrived from the verdict topic (or another), or the timeout passed."""
    out: list[dict] = []
    for doc in iter_topic(settings, topic or settings.verdict_topic, follow=True,
                          deadline=time.monotonic() + timeout_s):
        out.append(doc)
        if len(out) >= expected:
            break
    return out
