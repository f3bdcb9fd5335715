"""The streaming worker: consume image events in batches, run the pipeline, publish verdicts and dead
letters, and commit an offset only when everything before it in its partition is acknowledged.

Failure behaviour, because this is what operators meet at 3 a.m.:
- bad input -> a dead letter, never a crash;
- Redis unavailable -> bounded retries with backoff, then the batch's partitions are rewound and paused
  and the worker keeps polling (heartbeats continue); it resumes them after a growing delay;
- a verdict the broker refused -> its partition is rewound to that message (replays are idempotent);
- rebalance: on revoke, in-flight verdicts are flushed and the revoked partitions committed; on a lost
  assignment nothing is committed (another worker already owns those partitions);
- SIGTERM/SIGINT -> stop consuming, finish the batch, flush, commit, close, exit 0.
"""

from __future__ import annotations

import gc
import json
import logging
import signal
import threading
import time
from collections import deque
from functools import partial
from typing import NamedTuple

import click
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from imgdedup import __version__, messages, metrics
from imgdedup.config import Settings
from imgdedup.health import HealthServer
from imgdedup.kafka_io import consumer_config, producer_config
from imgdedup.offsets import OffsetTracker
from imgdedup.pipeline import TRANSIENT_ERRORS, InputRecord, Output, Pending, Pipeline

log = logging.getLogger(__name__)

RETRY_DELAYS_S = (0.1, 0.3, 1.0, 3.0)  # in-batch retries of a transient Redis error
PAUSE_DELAYS_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # pauses after the retries are used up, growing
SIZES_EVERY_S = 15.0  # how often index sizes and Redis memory are read for metrics
GC_YOUNG_THRESHOLD = 20_000  # allocations between young collections once the start-up heap is frozen
#: While images are decoding, new events are taken at least this often (and the oldest batch indexed
#: as soon as it is decoded): the most an arriving event waits for the loop to come round.
TAKE_EVERY_S = 0.002
#: Events decoding at once, in batch_size units: past it the worker indexes before taking more.
BATCHES_IN_FLIGHT = 2


class Batch(NamedTuple):
    """Consumed messages whose images are being fetched, decoded and hashed on the pool."""

    msgs: list
    pending: Pending
    taken: float  # wall time, the start of imgdedup_processing_seconds


class Worker:
    def __init__(self, settings: Settings, pipeline: Pipeline | None = None):
        self.settings = settings
        self.pipeline = pipeline or Pipeline(settings)
        self.stopping = threading.Event()
        self.tracker = OffsetTracker()
        self.assigned: set[tuple[str, int]] = set()
        self.paused: list[TopicPartition] = []
        self.pause_level = 0
        self.resume_at = 0.0
        self.redis_ok = False
        self.kafka_ok = False
        self.rewind: dict[tuple[str, int], int] = {}  # partitions to seek back after failed deliveries
        self.next_sizes = 0.0
        self.consumer: Consumer | None = None
        self.producer: Producer | None = None
        # Batches being fetched and decoded on the pool, oldest first, while an older one is indexed.
        self.in_flight: deque[Batch] = deque()
        # Set when an image of a batch in flight has been decoded: the loop waits on it, not on the
        # futures themselves (concurrent.futures.wait cost 160 us of CPU per 2 ms wait on the AMD VM,
        # this 75 us; the loop waits ~500 times a second while images are in flight).
        self.decoded = threading.Event()

    # --- lifecycle -----------------------------------------------------------------------------
    def ready(self) -> tuple[bool, str]:
        problems = [name for name, ok in (("redis", self.redis_ok), ("kafka", self.kafka_ok),
                                          ("partitions assigned", bool(self.assigned))) if not ok]
        metrics.READY.set(0 if problems else 1)
        return (False, "not ready: " + ", ".join(problems)) if problems else (True, "ready")

    def stop(self, *_args) -> None:
        self.stopping.set()

    def run(self) -> None:
        features = ",".join(f"{k}={v}" for k, v in sorted(self.pipeline.extractor.versions.items()))
        metrics.BUILD_INFO.labels(__version__, features).set(1)
        metrics.VECTOR_QUERY_EF.set(self.settings.vector_query_ef)
        self.pipeline.extractor.warm()
        self._wait_for_redis()
        if self.stopping.is_set():
            return
        self.producer = Producer(producer_config(self.settings, error_cb=self._kafka_error))
        self.consumer = Consumer(consumer_config(self.settings, error_cb=self._kafka_error,
                                                 stats_cb=self._stats, **{"statistics.interval.ms": 5000}))
        self.consumer.subscribe([self.settings.input_topic], on_assign=self._on_assign,
                                on_revoke=self._on_revoke, on_lost=self._on_lost)
        log.info("worker consuming %s as group %s; %s", self.settings.input_topic, self.settings.consumer_group,
                 self.pipeline.extractor.layout())
        try:
            while not self.stopping.is_set():
                self._step()
        finally:
            self._shutdown()

    def _step(self) -> None:
        """Start decoding whatever has arrived, then index the oldest batches that are decoded, as one.

        Decoding (decoder processes or threads) and indexing (this thread, mostly waiting on Redis)
        overlap, and an event starts decoding within TAKE_EVERY_S of its arrival rather than after the
        batch before it is indexed. Batches that finish decoding together share their Redis round trips,
        so under load they grow and the round trips per event fall (group commit)."""
        self._maybe_resume()
        msgs = self._take_batch()
        self.producer.poll(0)
        self._apply_rewinds()
        good = []
        for msg in msgs:
            if msg.error() is None:
                good.append(msg)
            elif msg.error().code() != KafkaError._PARTITION_EOF:
                metrics.ERRORS.labels("kafka").inc()
                log.warning("consume error: %s", msg.error())
        if good:
            self.in_flight.append(self._submit(good))
        ready = self._decoded_batches()
        if ready:
            self._complete(ready)
        if time.monotonic() >= self.next_sizes:
            self._report_sizes()
        metrics.IN_FLIGHT.set(self.tracker.in_flight)
        self.ready()

    def _take_batch(self) -> list:
        """What has already been fetched, up to batch_size. With nothing in flight it waits up to
        batch_timeout_s for a first event; with images decoding, up to TAKE_EVERY_S or until the oldest
        batch is decoded; with enough in flight, not at all. `consume(n, timeout)` alone holds a lone
        event until n arrive or the timeout ends, which at moderate rates would be most of its latency."""
        size = self.settings.batch_size
        if not self.in_flight:
            msgs = self.consumer.consume(1, self.settings.batch_timeout_s)
            if msgs and size > 1:
                msgs += self.consumer.consume(size - 1, 0)
            return msgs
        if self._pool_full():
            return []
        self.decoded.clear()
        if not self.in_flight[0].pending.decoded():
            self.decoded.wait(TAKE_EVERY_S)
        return self.consumer.consume(size, 0)

    def _pool_full(self) -> bool:
        return sum(len(batch.msgs) for batch in self.in_flight) >= BATCHES_IN_FLIGHT * self.settings.batch_size

    def _decoded_batches(self) -> list[Batch]:
        """The oldest batches, in order, whose images are all decoded; when the pool holds enough events,
        the oldest one even if it is not (indexing it waits for the pool, and taking more would too)."""
        ready = []
        while self.in_flight and self.in_flight[0].pending.decoded():
            ready.append(self.in_flight.popleft())
        if not ready and self.in_flight and self._pool_full():
            ready.append(self.in_flight.popleft())
        return ready

    def _finish_in_flight(self) -> None:
        if self.in_flight:
            batches = list(self.in_flight)
            self.in_flight.clear()
            self._complete(batches)

    def _shutdown(self) -> None:
        log.info("worker stopping: finishing the batches in flight, flushing verdicts and committing offsets")
        self._finish_in_flight()
        if self.producer is not None:
            self.producer.flush(30)
        if self.consumer is not None:
            self._commit_all()
            self.consumer.close()  # may revoke partitions, which flushes the producer once more
        # librdkafka's producer lives as long as the object: drop it, or its threads keep dialing
        # the broker for as long as this Worker is referenced.
        self.producer = self.consumer = None
        self.pipeline.close()
        self.assigned.clear()
        self.ready()

    # --- a batch -------------------------------------------------------------------------------
    def _submit(self, msgs) -> Batch:
        self.kafka_ok = True
        metrics.BATCH_SIZE.observe(len(msgs))
        for msg in msgs:
            metrics.EVENTS_CONSUMED.labels(msg.topic()).inc()
            self.tracker.consumed(msg.topic(), msg.partition(), msg.offset())
        records = [InputRecord(m.value(), m.key(), m.topic(), m.partition(), m.offset()) for m in msgs]
        pending = self.pipeline.submit(records)
        for future in pending.prepared.values():
            future.add_done_callback(self._decoded_one)
        return Batch(msgs, pending, time.time())

    def _decoded_one(self, _future) -> None:
        self.decoded.set()

    def _complete(self, batches: list[Batch]) -> None:
        """Index consecutive batches as one and produce their verdicts and dead letters."""
        outputs = self._process_with_retries(Pending.join([batch.pending for batch in batches]))
        if outputs is None:  # Redis stayed away: redo these batches, and those behind them, later
            redo = [*batches, *self.in_flight]
            self.in_flight.clear()
            self._pause_and_rewind([msg for batch in redo for msg in batch.msgs])
            return
        taken = [batch.taken for batch in batches for _ in batch.msgs]
        with metrics.STAGE_SECONDS.labels("produce").time():
            for out, started in zip(outputs, taken, strict=True):
                topic = self.settings.verdict_topic if out.kind == "verdict" else self.settings.dlq_topic
                self._produce(topic, out, started)
            self.producer.poll(0)

    def _process_with_retries(self, pending: Pending) -> list[Output] | None:
        for attempt, delay in enumerate((*RETRY_DELAYS_S, None)):
            try:
                outputs = self.pipeline.complete(pending)
                self.redis_ok, self.pause_level = True, 0
                return outputs
            except TRANSIENT_ERRORS as exc:
                self.redis_ok = False
                metrics.ERRORS.labels("redis").inc()
                log.warning("redis unavailable (attempt %d): %s", attempt + 1, exc)
                if delay is None or self.stopping.wait(delay):
                    return None
                metrics.RETRIES.labels("redis").inc()
        return None

    def _produce(self, topic: str, out: Output, started: float) -> None:
        while True:
            try:  # msg.latency() in the delivery report counts from this call, not from a refused one
                callback = partial(self._delivered, out, started, time.time())
                self.producer.produce(topic, messages.encode(out.message), out.key, on_delivery=callback)
                return
            except BufferError:  # local queue full: let acknowledgements drain it
                self.producer.poll(0.05)
            except KafkaException as exc:
                if out.kind != "dead_letter" or out.message["record"]["value"] is None:
                    raise
                # The original record, base64-encoded, can exceed the broker's message size: keep the
                # reason and the source coordinates, drop the copy (the input topic still has it).
                out.message["record"]["value"] = None
                out.message["error"]["message"] += f" (original record not copied: {exc.args[0].str()})"

    def _delivered(self, out: Output, started: float, handed: float, err, msg) -> None:
        """Runs at the producer's next poll, which can come a whole idle consume() after the broker's
        acknowledgement; latencies end at the acknowledgement (``msg.latency()`` after produce())."""
        src = out.source
        if err is not None:
            metrics.ERRORS.labels("kafka").inc()
            log.error("verdict for %s/%s offset %s not delivered: %s", src.topic, src.partition, src.offset, err)
            key = (src.topic, src.partition)
            self.rewind[key] = min(self.rewind.get(key, src.offset), src.offset)
            return
        acked = handed + (msg.latency() or 0.0)
        if out.kind == "verdict":
            ns = metrics.namespace_label(out.message["namespace"])
            metrics.VERDICTS.labels(out.message["verdict"], ns).inc()
            if out.message.get("latency_ms") is not None:
                processed_delay = acked - messages.parse_rfc3339(out.message["processed_at"]).timestamp()
                metrics.END_TO_END_SECONDS.observe(out.message["latency_ms"] / 1000 + max(processed_delay, 0))
        else:
            metrics.DEAD_LETTERS.labels(out.message["error"]["code"]).inc()
        metrics.PROCESSING_SECONDS.observe(acked - started)
        commit_at = self.tracker.acknowledged(src.topic, src.partition, src.offset)
        if commit_at is not None and (src.topic, src.partition) in self.assigned:
            try:
                self.consumer.store_offsets(offsets=[TopicPartition(src.topic, src.partition, commit_at)])
            except KafkaException as exc:  # revoked meanwhile: the new owner replays from its commit
                log.info("offset not stored for %s/%s: %s", src.topic, src.partition, exc)

    # --- failures: pause, rewind, resume --------------------------------------------------------
    def _pause_and_rewind(self, msgs) -> None:
        first: dict[tuple[str, int], int] = {}
        for m in msgs:
            key = (m.topic(), m.partition())
            first[key] = min(first.get(key, m.offset()), m.offset())
        parts = [TopicPartition(t, p, off) for (t, p), off in first.items()]
        for tp in parts:
            self._seek(tp)
        self.consumer.pause(parts)
        self.paused.extend(parts)
        delay = PAUSE_DELAYS_S[min(self.pause_level, len(PAUSE_DELAYS_S) - 1)]
        self.pause_level += 1
        self.resume_at = time.monotonic() + delay
        metrics.PAUSED_PARTITIONS.set(len(self.paused))
        log.warning("paused %d partitions for %.0fs after repeated Redis errors", len(parts), delay)

    def _maybe_resume(self) -> None:
        if self.paused and time.monotonic() >= self.resume_at:
            live = [tp for tp in self.paused if (tp.topic, tp.partition) in self.assigned]
            if live:
                self.consumer.resume(live)
            self.paused = []
            metrics.PAUSED_PARTITIONS.set(0)

    def _apply_rewinds(self) -> None:
        while self.rewind:
            (topic, partition), offset = self.rewind.popitem()
            if (topic, partition) in self.assigned:
                self._seek(TopicPartition(topic, partition, offset))

    def _seek(self, tp: TopicPartition) -> None:
        try:
            self.consumer.seek(tp)
        except KafkaException as exc:
            log.warning("seek %s/%s to %s failed: %s", tp.topic, tp.partition, tp.offset, exc)

    # --- rebalancing ---------------------------------------------------------------------------
    def _on_assign(self, consumer, partitions) -> None:
        self.assigned.update((tp.topic, tp.partition) for tp in partitions)
        self.kafka_ok = True
        metrics.ASSIGNED_PARTITIONS.set(len(self.assigned))
        log.info("assigned %s", sorted(tp.partition for tp in partitions))

    def _on_revoke(self, consumer, partitions) -> None:
        self._finish_in_flight()  # finish what was taken before handing partitions over
        self.producer.flush(30)  # acknowledgements of in-flight verdicts store their offsets now
        self._commit([tp for tp in partitions if (tp.topic, tp.partition) in self.assigned])
        self._drop(partitions)
        log.info("revoked %s", sorted(tp.partition for tp in partitions))

    def _on_lost(self, consumer, partitions) -> None:
        self._drop(partitions)  # never commit: those partitions belong to someone else now
        log.warning("lost %s", sorted(tp.partition for tp in partitions))

    def _drop(self, partitions) -> None:
        for tp in partitions:
            self.assigned.discard((tp.topic, tp.partition))
            self.tracker.forget(tp.topic, tp.partition)
            try:
                metrics.CONSUMER_LAG.remove(tp.topic, str(tp.partition))
            except KeyError:  # no statistics arrived for it yet
                pass
        metrics.ASSIGNED_PARTITIONS.set(len(self.assigned))

    def _commit(self, partitions) -> None:
        offsets = [TopicPartition(tp.topic, tp.partition, off) for tp in partitions
                   if (off := self.tracker.commit_offset(tp.topic, tp.partition)) is not None]
        if offsets:
            try:
                self.consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as exc:
                log.warning("commit failed: %s", exc)

    def _commit_all(self) -> None:
        self._commit([TopicPartition(t, p) for t, p in self.assigned])

    # --- observability -------------------------------------------------------------------------
    def _wait_for_redis(self) -> None:
        delay = 0.5
        while not self.stopping.is_set():
            try:
                self.pipeline.client.ping()
                self.redis_ok = True
                return
            except TRANSIENT_ERRORS as exc:
                self.redis_ok = False
                metrics.ERRORS.labels("redis").inc()
                log.warning("waiting for Redis at %s: %s", self.settings.masked()["redis_url"], exc)
                self.stopping.wait(delay)
                delay = min(delay * 2, 30.0)

    def _kafka_error(self, err) -> None:
        metrics.ERRORS.labels("kafka").inc()
        if err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            self.kafka_ok = False
        log.warning("kafka: %s", err)

    def _stats(self, stats_json: str) -> None:
        stats = json.loads(stats_json)
        for topic, tstats in stats.get("topics", {}).items():
            for part, pstats in tstats.get("partitions", {}).items():
                lag = pstats.get("consumer_lag", -1)
                if part != "-1" and (topic, int(part)) in self.assigned and lag >= 0:
                    metrics.CONSUMER_LAG.labels(topic, part).set(lag)

    def _report_sizes(self) -> None:
        self.next_sizes = time.monotonic() + SIZES_EVERY_S
        try:
            store = self.pipeline.store
            sizes = store.namespace_sizes()
            for ns, count in sizes.items():
                metrics.INDEX_IMAGES.labels(metrics.namespace_label(ns)).set(count)
            if store.vectors is not None:
                graphs = [(ns, e.name) for ns in sizes for e in self.pipeline.extractor.embedders]
                for (ns, name), largest in zip(graphs, store.vectors.largest_shards(graphs)):
                    metrics.VECTOR_SHARD_VECTORS.labels(metrics.namespace_label(ns), name).set(largest)
            used, limit = store.memory()
            metrics.REDIS_USED_MEMORY.set(used)
            metrics.REDIS_MAX_MEMORY.set(limit)
            self.redis_ok = True
        except TRANSIENT_ERRORS as exc:
            self.redis_ok = False
            log.warning("redis unavailable while reading sizes: %s", exc)


def freeze_startup_heap() -> None:
    """Take what start-up allocated (modules, models, clients) out of the garbage collector's sight.

    A full collection walks every tracked object while holding the GIL, so it stalls the decode
    threads and every event in flight. In the bench's worker the start-up heap made each of them take
    31-48 ms, seven times per run: as long as the hash tier's whole p99 budget. Frozen objects are never
    scanned again, and a higher young threshold makes the collections that remain rarer (what a
    batch allocates is freed by reference counting long before). In the command, not in `Worker`,
    because it changes the whole process.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


@click.command("worker")
@click.pass_context
def worker_command(ctx) -> None:
    """Consume image events and publish verdicts until SIGTERM/SIGINT."""
    from imgdedup.cli import settings_from
    from imgdedup.embedders import EmbedderUnavailable

    settings = settings_from(ctx)
    try:
        worker = Worker(settings)
    except EmbedderUnavailable as exc:  # missing weights or extra: say what to provide, start nothing
        raise click.ClickException(str(exc)) from None
    signal.signal(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, worker.stop)
    freeze_startup_heap()
    server = HealthServer(settings.metrics_host, settings.metrics_port, worker.ready).start() \
        if settings.metrics_port else None
    if server:
        log.info("metrics on http://%s:%d/metrics", settings.metrics_host, server.port)
    try:
        worker.run()
    finally:
        if server:
            server.stop()
