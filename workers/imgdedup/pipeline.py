"""The processing pipeline, independent of Kafka: records in, verdicts and dead letters out.

Stages: parse -> fetch -> decode -> hash features -> embed (batched) -> index write/commit/query ->
verdict. The worker feeds it consumer batches; `imgdedup eval` feeds it events directly, so the
numbers eval reports come from this very code.

Failures of one event (bad input, a corrupt image, a bug triggered by one image) become that event's
dead letter; transient Redis errors propagate so the caller retries the whole batch.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import redis

from imgdedup import messages, metrics
from imgdedup.config import Settings
from imgdedup.decode import DRAFT_MIN_SIDE
from imgdedup.errors import DeadLetterError, ErrorCode
from imgdedup.extract import DecodeProcesses, Prepared, embed_pictures, extract, observe
from imgdedup.features import phash_hex
from imgdedup.fetch import Fetcher, is_network
from imgdedup.resample import one_blas_thread
from imgdedup.roundtrip import standalone_client
from imgdedup.store import ImageFeatures, IndexStore

log = logging.getLogger(__name__)

#: The pHash definition recorded in verdicts: imagehash.phash (hash_size 8, highfreq 4), and with draft
#: decoding on, the draft floor, because drafting moves ~10 % of hashes by up to 4 bits, and "+luma" when
#: JPEGs are decoded to their luma plane only (no embedder): a few more by 2 bits (docs: decode).
PHASH_VERSION = "imagehash-phash-8x4"


def phash_version(settings: Settings, luma_only: bool) -> str:
    if not settings.draft_decode:
        return PHASH_VERSION
    return PHASH_VERSION + f"+draft{DRAFT_MIN_SIDE}" + ("+luma" if luma_only else "")

#: Exceptions that mean "Redis is unavailable right now": retry the batch, never dead-letter it.
TRANSIENT_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError,
                    redis.exceptions.TryAgainError, redis.exceptions.ClusterDownError)


@dataclass
class Features:
    sha256: str
    phash: int
    low_detail: bool
    detail: float
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)


@dataclass
class InputRecord:
    """One consumed record; topic/partition/offset are None when not from Kafka (eval, tests)."""

    value: bytes | None
    key: bytes | None = None
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None


@dataclass
class Pending:
    """A batch whose fetch/decode/hash runs on the pool while the caller completes earlier batches."""

    records: list[InputRecord]
    parsed: list  # ImageEvent, or the Output (dead letter) of a record that did not parse
    prepared: dict[int, Future]  # record index -> fetch/decode/hash of that upsert

    def decoded(self) -> bool:
        """Whether every image's front half has finished, so completing it will not wait on the pool."""
        return all(f.done() for f in self.prepared.values())

    @classmethod
    def join(cls, batches: list[Pending]) -> Pending:
        """Consecutive submitted batches as one: completed together, they share their Redis round trips."""
        if len(batches) == 1:
            return batches[0]
        records, parsed, prepared = [], [], {}
        for batch in batches:
            prepared.update({len(records) + i: f for i, f in batch.prepared.items()})
            records += batch.records
            parsed += batch.parsed
        return cls(records, parsed, prepared)


@dataclass
class Output:
    kind: str  # "verdict" | "dead_letter"
    key: bytes | None
    message: dict
    source: InputRecord


def connect_redis(settings: Settings) -> redis.Redis:
    url = settings.redis_url.get_secret_value()
    if settings.redis_cluster:
        return redis.RedisCluster.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    return standalone_client(url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=30)


class FeatureExtractor:
    """Bytes to features, with the same code for the worker and for eval."""

    def __init__(self, settings: Settings, embedders: list | None = None):
        self.settings = settings
        one_blas_thread()  # for the decode threads; each decoder process sets its own
        # Decoder processes build their own embedders from the settings, so embedders handed in (tests,
        # eval's variants) keep the work on threads, where those very objects run.
        from_settings = embedders is None
        if embedders is None:
            from imgdedup.embedders.registry import build_embedders

            embedders = build_embedders(settings)
        self.embedders = embedders
        self.min_side = max([settings.sscd_input_size] if embedders else [0])
        self.fetcher = Fetcher(settings)
        # Two pools: more threads than cores for CPU work only adds GIL and cache contention (measured:
        # `imgdedup bench`, README "Benchmarks"), while waiting on remote servers needs many threads.
        self.pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        self.fetch_pool = ThreadPoolExecutor(settings.fetch_threads, thread_name_prefix="fetch")
        in_children = not embedders or (from_settings and all(e.in_decoder_processes for e in embedders))
        self.processes = DecodeProcesses(settings, settings.decode_processes, embed=bool(embedders),
                                         min_side=self.min_side) if settings.decode_processes and in_children else None
        # extract decodes luma only when min_side is 0 (no embedder); the recorded version follows it.
        self.versions = {"phash": phash_version(settings, luma_only=not self.min_side)} | {
            e.name: e.version for e in embedders}

    def layout(self) -> str:
        """Where the features are computed, for the worker's start-up log (an operator sizing CPUs and
        memory needs to know whether the model runs in every decoder process or on the main thread)."""
        names = "+".join(["decode", "hash", *(e.name for e in self.embedders if self.processes is not None)])
        if self.processes is not None:
            return f"{names} in {self.settings.decode_processes} decoder processes"
        where = f"{names} on {self.settings.decode_threads} decode threads"
        return where + "".join(f"; {e.name} on the main thread" for e in self.embedders)

    def warm(self) -> None:
        """Start the decoder processes (and their models) before the first event needs them."""
        if self.processes is not None:
            self.processes.warm()

    def close(self) -> None:
        self.fetch_pool.shutdown(wait=True)
        self.pool.shutdown(wait=True)
        if self.processes is not None:
            self.processes.close()
        self.fetcher.close()

    def extract(self, blobs: list[bytes]) -> list[Features | DeadLetterError]:
        return self.finish(list(self.pool.map(self._extract_here, blobs)))

    def start(self, events: list[messages.ImageEvent]) -> list[Future]:
        """Fetch, decode and hash each event on the pools; `finish` embeds what these futures produced.
        Inline and file:// bytes are read where they are decoded; http(s) waits on the fetch pool first."""
        local = [i for i, e in enumerate(events) if not is_network(e.image)]
        futures = dict(zip(local, self._decode([events[i].image for i in local])))
        for i, event in enumerate(events):
            if i not in futures:
                futures[i] = self._fetch_then_decode(event)
        return [futures[i] for i in range(len(events))]

    def _fetch_then_decode(self, event: messages.ImageEvent) -> Future:
        done: Future = Future()

        def decode_fetched(fetched: Future) -> None:
            if fetched.exception() is not None or isinstance(fetched.result(), DeadLetterError):
                return _forward(fetched, done)
            try:
                self._decode([fetched.result()])[0].add_done_callback(partial(_forward, dst=done))
            except RuntimeError as exc:  # the pool is shutting down: the waiter must not hang
                done.set_exception(exc)

        self.fetch_pool.submit(self._fetch_guarded, event).add_done_callback(decode_fetched)
        return done

    def _decode(self, sources: list[dict | bytes]) -> list[Future]:
        if self.processes is not None:
            return self.processes.submit(sources)
        return [self.pool.submit(self._extract_here, source) for source in sources]

    def _extract_here(self, source: dict | bytes):
        result, timings = extract(source, self.fetcher, self.settings, self.min_side)
        observe(timings)
        return result

    def _fetch_guarded(self, event: messages.ImageEvent) -> bytes | DeadLetterError:
        try:
            with metrics.STAGE_SECONDS.labels("fetch").time():
                return self.fetcher.fetch(event.image)
        except DeadLetterError as exc:
            return exc
        except Exception as exc:  # a fetch bug must not take the batch down
            log.exception("fetch failed unexpectedly for event %s", event.event_id)
            return DeadLetterError(ErrorCode.INTERNAL_ERROR, f"fetch: {type(exc).__name__}: {exc}")

    def finish(self, prepared: list[Prepared | DeadLetterError]) -> list[Features | DeadLetterError]:
        """Embed, in one batch per embedder, every decoded picture that has no vectors yet (images
        from decoder processes come with theirs)."""
        out: list = [p if isinstance(p, DeadLetterError) else
                     Features(p.features.sha256, p.features.phash, p.features.low_detail, p.features.detail,
                              vectors=dict(p.vectors), versions=self.versions) for p in prepared]
        todo = [i for i, p in enumerate(prepared) if not isinstance(p, DeadLetterError) and p.picture is not None]
        if todo and self.embedders:
            vectors, seconds = embed_pictures(self.embedders, [prepared[i].picture for i in todo])
            observe({"embed": seconds})
            for i, embedded in zip(todo, vectors):
                if isinstance(embedded, DeadLetterError):
                    out[i] = embedded
                else:
                    out[i].vectors.update(embedded)
        return out


class Pipeline:
    def __init__(self, settings: Settings, client: redis.Redis | None = None, embedders: list | None = None):
        self.settings = settings
        self.client = client if client is not None else connect_redis(settings)
        self.extractor = FeatureExtractor(settings, embedders)
        vector_index = None
        if self.extractor.embedders:
            from imgdedup.keys import Keys
            from imgdedup.vectorindex import build_vector_index

            vector_index = build_vector_index(self.client, Keys(settings.key_prefix), settings)
        self.store = IndexStore(self.client, settings, vector_index)

    def close(self) -> None:
        self.extractor.close()

    # --- entry points --------------------------------------------------------------------------
    def process_events(self, events: list[dict]) -> list[dict]:
        """Run image-event documents through the pipeline; returns verdict or dead-letter documents in order."""
        return [o.message for o in self.process([InputRecord(messages.encode(e)) for e in events])]

    def process(self, records: list[InputRecord]) -> list[Output]:
        return self.complete(self.submit(records))

    def submit(self, records: list[InputRecord]) -> Pending:
        """Parse, and start fetching, decoding and hashing every upsert on the pool. No Redis yet, so a
        worker can submit later batches and complete earlier ones while the pool works."""
        parsed = [self._parse(r) for r in records]
        upserts = [i for i, p in enumerate(parsed) if isinstance(p, messages.ImageEvent) and p.op == "upsert"]
        prepared = dict(zip(upserts, self.extractor.start([parsed[i] for i in upserts])))
        return Pending(records, parsed, prepared)

    def complete(self, pending: Pending) -> list[Output]:
        """Embed, index and decide a submitted batch; safe to call again after a transient Redis error."""
        results: dict[int, Output] = {i: p for i, p in enumerate(pending.parsed) if isinstance(p, Output)}
        events = [(i, p) for i, p in enumerate(pending.parsed) if not isinstance(p, Output)]
        for segment in _segments(events):
            results.update(self._process_isolating(segment, pending))
        return [results[i] for i in range(len(pending.records))]

    def _process_isolating(self, segment, pending: Pending) -> dict[int, Output]:
        """A segment at once; if that fails for a reason other than Redis being away, one event at a
        time, so the event that triggers a bug becomes an internal_error dead letter and the rest go on."""
        records = pending.records
        try:
            return self._process_segment(segment, pending)
        except TRANSIENT_ERRORS:
            raise
        except Exception:
            log.exception("batch of %d failed; retrying its events one by one", len(segment))
        out: dict[int, Output] = {}
        for i, event in segment:
            try:
                out.update(self._process_segment([(i, event)], pending))
            except TRANSIENT_ERRORS:
                raise
            except Exception as exc:
                log.exception("event %s failed", event.event_id)
                out[i] = self._dead_letter(records[i], DeadLetterError(
                    ErrorCode.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"), event.event_id)
        return out

    # --- stages --------------------------------------------------------------------------------
    def _parse(self, record: InputRecord) -> messages.ImageEvent | Output:
        try:
            return messages.parse_event(record.value)
        except DeadLetterError as exc:
            return self._dead_letter(record, exc)

    def _process_segment(self, segment, pending: Pending) -> dict[int, Output]:
        records = pending.records
        out: dict[int, Output] = {}
        deletes = [(i, e) for i, e in segment if e.op == "delete"]
        if deletes:
            self.store.delete([(e.namespace, e.image_id) for _, e in deletes])
            for i, e in deletes:
                out[i] = self._verdict(records[i], e, "deleted", None, [], None, None, False, {})
        upserts = [(i, e) for i, e in segment if e.op == "upsert"]
        if not upserts:
            return out
        prior = self.store.records([(e.namespace, e.image_id) for _, e in upserts])
        fresh = []
        for (i, e), rec in zip(upserts, prior):
            stored = self.store.stored_decision(rec, e.event_id)
            if stored is not None:  # a redelivery: the same verdict, without the features
                pending.prepared[i].cancel()
                out[i] = self._verdict(records[i], e, stored.verdict, stored.duplicate_of, stored.matches,
                                       rec["sha256"], rec["phash"], rec.get("low_detail") == "1",
                                       self.extractor.versions)
            else:
                fresh.append((i, e, rec))
        if not fresh:
            return out
        features = self.extractor.finish([pending.prepared[i].result() for i, _, _ in fresh])
        ready = []
        for (i, e, rec), f in zip(fresh, features):
            if isinstance(f, DeadLetterError):
                out[i] = self._dead_letter(records[i], f, e.event_id)
            elif e.image.get("sha256") and e.image["sha256"] != f.sha256:
                out[i] = self._dead_letter(records[i], DeadLetterError(
                    ErrorCode.SHA256_MISMATCH, f"event says sha256 {e.image['sha256']}, bytes have {f.sha256}"),
                    e.event_id)
            else:
                ready.append((i, e, rec, f))
        if ready:
            items = [ImageFeatures(e.namespace, e.image_id, e.event_id, f.sha256, f.phash, f.low_detail, f.vectors)
                     for _, e, _, f in ready]
            indexed = self.store.index(items, [rec for _, _, rec, _ in ready])
            for (i, e, _, f), res in zip(ready, indexed):
                d = res.decision
                if f.low_detail:
                    metrics.LOW_DETAIL.inc()
                out[i] = self._verdict(records[i], e, d.verdict, d.duplicate_of, d.matches, f.sha256,
                                       phash_hex(f.phash), f.low_detail, f.versions)
        return out

    def _verdict(self, record, event, verdict, duplicate_of, matches, sha256, phash, low_detail, features) -> Output:
        message = messages.make_verdict(event, verdict=verdict, duplicate_of=duplicate_of, matches=matches,
                                        sha256=sha256, phash=phash, low_detail=low_detail, features=features)
        return Output("verdict", event.key, message, record)

    def _dead_letter(self, record: InputRecord, error: DeadLetterError, event_id: str | None = None) -> Output:
        message = messages.make_dead_letter(error, key=record.key, value=record.value, topic=record.topic,
                                            partition=record.partition, offset=record.offset, event_id=event_id)
        return Output("dead_letter", record.key, message, record)


def _forward(src: Future, dst: Future) -> None:
    if dst.cancelled():  # a redelivery whose stored verdict made the features unnecessary
        return
    exc = src.exception()
    dst.set_exception(exc) if exc is not None else dst.set_result(src.result())


def _segments(events: list[tuple[int, messages.ImageEvent]]):
    """Consecutive runs of events in which no (namespace, image_id) appears twice, so events about the
    same image are applied in their order while everything else is batched."""
    segment, seen = [], set()
    for i, event in events:
        ident = (event.namespace, event.image_id)
        if ident in seen:
            yield segment
            segment, seen = [], set()
        segment.append((i, event))
        seen.add(ident)
    if segment:
        yield segment
