"""The Kafka path alone: the baseline of the worker's event->verdict latency, at the paced run's rate.

The bench's producer offers small events at the same rate to fresh topics; a forwarder with the worker's
consumer and producer settings and the worker's batching (the first event plus what is already fetched)
publishes each one unchanged as its answer, storing its offset once the broker acknowledged it; the
bench's verdict reader receives it. What is left is the worker's two broker hops and its Kafka clients,
with no image, Redis or verdict work and none of the worker's CPU load on the machine: the part of the
worker's latency that no work inside the worker can remove.
"""

from __future__ import annotations

import threading
import uuid
from functools import partial

from confluent_kafka import Consumer, Producer, TopicPartition

from imgdedup import messages
from imgdedup.bench.report import percentiles_ms
from imgdedup.bench.stream import AnswerReader, Answers, fresh_topics, offer, wait_for
from imgdedup.config import Settings
from imgdedup.kafka_io import consumer_config, producer_config


class Forwarder:
    """A thread answering every input event with itself, as the worker answers with a verdict."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.stopping = threading.Event()
        self.consumer = Consumer(consumer_config(settings))
        self.producer = Producer(producer_config(settings))
        self.thread = threading.Thread(target=self._run, daemon=True, name="bench-forwarder")

    def __enter__(self):
        self.consumer.subscribe([self.settings.input_topic])
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.thread.join(10)
        self.producer.flush(10)
        self.consumer.close()

    def _run(self) -> None:
        size, out = self.settings.batch_size, self.settings.verdict_topic
        while not self.stopping.is_set():
            msgs = self.consumer.consume(1, self.settings.batch_timeout_s)
            if msgs and size > 1:
                msgs += self.consumer.consume(size - 1, 0)
            for msg in msgs:
                if msg.error() is None:
                    source = TopicPartition(msg.topic(), msg.partition(), msg.offset() + 1)
                    self.producer.produce(out, msg.value(), msg.key(), on_delivery=partial(self._store, source))
            self.producer.poll(0)

    def _store(self, source: TopicPartition, err, _msg) -> None:
        """As the worker does once the broker has acknowledged an answer (without the worker's wait for
        earlier offsets: the forwarder never restarts, so what it commits is never read)."""
        if err is None:
            self.consumer.store_offsets(offsets=[source])


def run_kafka_floor(settings: Settings, rate: float, seconds: float, timeout_s: float = 60.0) -> dict:
    """Offer ``rate`` events/s for ``seconds`` through the forwarder; latency as in the paced run."""
    s = fresh_topics(settings, "floor")
    count = max(1, round(rate * seconds))
    events = [messages.make_event(f"floor-{i}", event_id=str(uuid.uuid4()), namespace="floor",
                                  uri="file:///not-read.jpg") for i in range(count + 1)]
    answers = Answers()
    producer = Producer(producer_config(s, **{"linger.ms": 0}))
    with AnswerReader(s, answers), Forwarder(s):
        warm, events = events[0], events[1:]
        offer(producer, s, [warm], rate)  # connects the producer and waits out the group join
        producer.flush(30)
        wait_for(answers, [warm["event_id"]], None, timeout_s)
        sent, _ = offer(producer, s, events, rate)
        producer.flush(30)
        wait_for(answers, sent, None, timeout_s + seconds)
    with answers.lock:
        latencies = [answers.got[eid][0] - t for eid, (t, _) in sent.items()]
    return {"rate": rate, "events": count, "latency_ms": percentiles_ms(latencies), "input_topic": s.input_topic}

