"""The worker through a real Tansu broker and a real Redis: verdicts, dead letters between good events,
redelivery, two workers in one group, SIGTERM, and a Redis outage. Hash tier only (the vector tier has
its own end-to-end test), so these stay quick."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from imgdedup import devstack, messages
from imgdedup.evaluation import variants
from imgdedup.kafka_io import consume_verdicts, produce_events
from imgdedup.pipeline import Pipeline
from imgdedup.worker import Worker


def events_for(files: list[Path], suffix: str = "", transform: str | None = None) -> list[dict]:
    out = []
    for f in files:
        data = f.read_bytes()
        if transform:
            data = variants.apply(variants.BY_NAME[transform], data, np.random.default_rng(0))
        out.append(messages.make_event(f.stem + suffix, event_id=str(uuid.uuid4()), data=data))
    return out


class RunningWorker:
    """A Worker on a thread, stopped (gracefully, like SIGTERM) at the end of the with-block."""

    def __init__(self, settings):
        self.worker = Worker(settings, Pipeline(settings, embedders=[]))
        self.thread = threading.Thread(target=self.worker.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self.worker

    def __exit__(self, *exc):
        self.worker.stop()
        self.thread.join(60)
        assert not self.thread.is_alive()


def wait_until(check, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def by_event(docs: list[dict]) -> dict[str, dict]:
    out = {}
    for d in docs:
        assert d["event_id"] not in out, f"two verdicts for {d['event_id']}"
        out[d["event_id"]] = d
    return out


@pytest.mark.parametrize("decode_processes", [0, 2], ids=["decode-threads", "decode-processes"])
def test_corpus_then_copies_then_variants_with_a_poison_message(kafka_settings, corpus_files, decode_processes):
    settings = kafka_settings(partitions=3, decode_processes=decode_processes)
    bases = events_for(corpus_files)
    with RunningWorker(settings):
        produce_events(settings, bases[:30])
        producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
        producer.produce(settings.input_topic, b"{not json", b"default/poison")
        producer.flush(10)
        produce_events(settings, bases[30:])
        first = by_event(consume_verdicts(settings, len(bases), timeout_s=120))
        copies = events_for(corpus_files, "-copy")
        produce_events(settings, copies)
        near = events_for(corpus_files, "-q50", "jpeg_q50")
        produce_events(settings, near)
        rest = by_event(consume_verdicts(settings, len(bases) * 3, timeout_s=120))
        dead = consume_verdicts(settings, 1, timeout_s=30, topic=settings.dlq_topic)
    assert {first[e["event_id"]]["verdict"] for e in bases} == {"unique"}
    # no embedder: the pHash comes from the JPEGs' luma planes, and every verdict says so
    assert {d["features"]["phash"] for d in [*first.values(), *rest.values()]} == {"imagehash-phash-8x4+draft256+luma"}
    assert all(rest[e["event_id"]]["verdict"] == "exact_duplicate" for e in copies)
    assert all(rest[e["event_id"]]["duplicate_of"] == e["image_id"].removesuffix("-copy") for e in copies)
    found = [rest[e["event_id"]] for e in near if rest[e["event_id"]]["verdict"] == "near_duplicate"]
    assert len(found) >= len(near) - 1  # one shared base is too plain for pHash (low detail)
    assert all(d["duplicate_of"] == d["image_id"].removesuffix("-q50") for d in found)
    assert len(rest) == len(bases) * 3
    assert [d["error"]["code"] for d in dead] == ["invalid_json"]
    assert dead[0]["record"]["key"] == "ZGVmYXVsdC9wb2lzb24="  # base64 of the original key
    assert messages.problems(messages.DEAD_LETTER, dead[0]) == []


def test_redelivery_gives_identical_verdicts(kafka_settings, corpus_files):
    settings = kafka_settings(partitions=2)
    events = events_for(corpus_files[:10]) + events_for(corpus_files[:10], "-q75", "jpeg_q75")
    produce_events(settings, events)
    with RunningWorker(settings):
        first = by_event(consume_verdicts(settings, len(events), timeout_s=120))
    # A second consumer group re-reads every event from the start: each is delivered again.
    again_settings = settings.model_copy(update={"consumer_group": settings.consumer_group + "-replay"})
    with RunningWorker(again_settings):
        docs = consume_verdicts(settings, 2 * len(events), timeout_s=120)
    second: dict[str, list[dict]] = {}
    for d in docs:
        second.setdefault(d["event_id"], []).append(d)
    keep = ("verdict", "duplicate_of", "matches", "sha256", "phash")
    for event_id, verdict in first.items():
        assert len(second[event_id]) == 2
        assert all({k: d[k] for k in keep} == {k: verdict[k] for k in keep} for d in second[event_id])


def test_two_workers_split_partitions_and_each_event_gets_one_verdict(kafka_settings, corpus_files):
    settings = kafka_settings(partitions=4)
    with RunningWorker(settings) as w1, RunningWorker(settings) as w2:
        wait_until(lambda: w1.assigned and w2.assigned and len(w1.assigned | w2.assigned) == 4, 60,
                   "both workers to own partitions")
        assert not (w1.assigned & w2.assigned)
        events = events_for(corpus_files[:40])
        produce_events(settings, events)
        verdicts = by_event(consume_verdicts(settings, len(events), timeout_s=120))
        time.sleep(1)  # a duplicate verdict, if any, would arrive now
        assert len(consume_verdicts(settings, len(events) + 1, timeout_s=3)) == len(events)
    assert set(verdicts) == {e["event_id"] for e in events}


def test_sigterm_drains_commits_and_exits_zero(kafka_settings, corpus_files, tmp_path):
    settings = kafka_settings(partitions=2)
    env = {**os.environ, "IMGDEDUP_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
           "IMGDEDUP_REDIS_URL": settings.redis_url.get_secret_value(), "IMGDEDUP_KEY_PREFIX": settings.key_prefix,
           "IMGDEDUP_INPUT_TOPIC": settings.input_topic, "IMGDEDUP_VERDICT_TOPIC": settings.verdict_topic,
           "IMGDEDUP_DLQ_TOPIC": settings.dlq_topic, "IMGDEDUP_CONSUMER_GROUP": settings.consumer_group,
           "IMGDEDUP_METRICS_PORT": str(devstack.free_port()), "IMGDEDUP_SSCD_ENABLED": "false",
           "IMGDEDUP_SESSION_TIMEOUT_MS": "6000", "IMGDEDUP_MAX_POLL_INTERVAL_MS": "10000"}
    proc = subprocess.Popen([sys.executable, "-m", "imgdedup", "worker"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        events = events_for(corpus_files[:12])
        produce_events(settings, events)
        assert len(consume_verdicts(settings, len(events), timeout_s=120)) == len(events)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": settings.consumer_group})
    try:
        committed = consumer.committed([TopicPartition(settings.input_topic, p) for p in range(2)], timeout=10)
        # Offsets are contiguous from 0 per partition, so the commits add up to the event count exactly
        # when nothing is left to redo. (Tansu's ListOffsets reports batch counts, not record offsets,
        # as high watermarks, so the watermarks cannot be compared here.)
        assert sum(max(tp.offset, 0) for tp in committed) == len(events)
    finally:
        consumer.close()


@pytest.mark.slow
def test_redis_outage_pauses_then_recovers(kafka_settings, corpus_files, tmp_path):
    port = devstack.free_port()
    own_redis = devstack.start_redis(port, tmp_path / "r1", persist=False)
    settings = kafka_settings(partitions=2, redis_url=own_redis.address)
    events = events_for(corpus_files[:6])
    with RunningWorker(settings) as worker:
        produce_events(settings, events[:3])
        assert len(consume_verdicts(settings, 3, timeout_s=60)) == 3
        own_redis.stop()
        produce_events(settings, events[3:])
        wait_until(lambda: not worker.ready()[0], 30, "the worker to report not ready")
        assert "redis" in worker.ready()[1]
        time.sleep(2)  # it keeps polling, paused, without dying
        assert not consume_verdicts(settings, 4, timeout_s=2)[3:]
        own_redis = devstack.start_redis(port, tmp_path / "r2", persist=False)
        try:
            docs = consume_verdicts(settings, 6, timeout_s=90)
        finally:
            pass
    own_redis.stop()
    assert {d["event_id"] for d in docs} == {e["event_id"] for e in events}


def test_a_record_too_big_to_copy_still_gets_its_dead_letter(kafka_settings, corpus_files):
    settings = kafka_settings(partitions=1)
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    producer.produce(settings.input_topic, b"x" * 900_000, b"default/huge")  # base64 of it exceeds 1 MB
    producer.flush(10)
    good = events_for(corpus_files[:1])
    produce_events(settings, good)
    with RunningWorker(settings):
        dead = consume_verdicts(settings, 1, timeout_s=60, topic=settings.dlq_topic)
        verdicts = consume_verdicts(settings, 1, timeout_s=60)
    assert dead[0]["error"]["code"] == "invalid_json" and dead[0]["record"]["value"] is None
    assert "original record not copied" in dead[0]["error"]["message"]
    assert dead[0]["source"]["offset"] == 0 and messages.problems(messages.DEAD_LETTER, dead[0]) == []
    assert verdicts[0]["event_id"] == good[0]["event_id"]


class _Acknowledged:
    """A delivery report's message: the broker acknowledged it ``seconds`` after produce()."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def latency(self) -> float:
        return self.seconds


def test_latency_metrics_end_at_the_brokers_acknowledgement():
    """The delivery callback runs at the producer's next poll, here a year after the verdict was made:
    processing and end-to-end latency must end at the acknowledgement, not when the callback ran."""
    from types import SimpleNamespace

    from prometheus_client import REGISTRY

    from imgdedup.config import Settings
    from imgdedup.pipeline import InputRecord, Output

    worker = Worker(Settings(), pipeline=SimpleNamespace())
    worker.tracker.consumed("images", 0, 7)
    processed_at = messages.parse_rfc3339("2026-11-30T00:00:00.000Z").timestamp()
    handed = processed_at + 0.020  # the batch was taken 50 ms before its verdicts were handed over
    started = handed - 0.050
    message = {"namespace": "default", "verdict": "unique", "latency_ms": 30.0,
               "processed_at": "2026-11-30T00:00:00.000Z"}
    out = Output("verdict", None, message, InputRecord(b"{}", None, "images", 0, 7))

    def observed(name: str) -> tuple[float, float]:
        return REGISTRY.get_sample_value(f"{name}_sum"), REGISTRY.get_sample_value(f"{name}_count")

    before = {n: observed(n) for n in ("imgdedup_processing_seconds", "imgdedup_end_to_end_seconds")}
    worker._delivered(out, started, handed, None, _Acknowledged(0.004))
    after = {n: observed(n) for n in before}
    (p_sum0, p_n0), (p_sum1, p_n1) = before["imgdedup_processing_seconds"], after["imgdedup_processing_seconds"]
    (e_sum0, e_n0), (e_sum1, e_n1) = before["imgdedup_end_to_end_seconds"], after["imgdedup_end_to_end_seconds"]
    assert (p_n1 - p_n0, e_n1 - e_n0) == (1, 1)
    assert p_sum1 - p_sum0 == pytest.approx(0.054, abs=1e-6)  # taken -> handed over -> acknowledged
    assert e_sum1 - e_sum0 == pytest.approx(0.030 + 0.024, abs=1e-6)  # occurred -> processed -> acknowledged
