"""The front half of the pipeline for one image: read it, decode it, hash it; on a decode thread or in
a child process.

Why child processes: in a saturated worker the decode threads got about one of two cores, because every
step that holds the GIL (theirs, and the main thread's Kafka, Redis and verdict work) makes the others
wait (README, "Benchmarks"). Used only when no embedder needs the decoded picture: copying pictures
back would cost more than it saves. Inline and file:// images are read in the child, so only the
event's small ``image`` object goes over and only the features come back; http(s) bytes are fetched by
the parent's fetch threads (they hold the HTTP connection pool) and sent over.

A child that dies (a codec crashing on hostile bytes) breaks its pool and fails every image in flight
there. Those images are retried one at a time in a separate one-process pool; an image that kills that
child too is the culprit and becomes a ``decode_failed`` dead letter, and the worker carries on.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
import time
from concurrent.futures import Future, InvalidStateError, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial

from PIL import Image

from imgdedup import metrics
from imgdedup.config import Settings
from imgdedup.decode import decode
from imgdedup.errors import DeadLetterError, ErrorCode
from imgdedup.features import HashFeatures, hash_features
from imgdedup.fetch import Fetcher

log = logging.getLogger(__name__)

#: What `extract` answers: (features, decoded picture) or the dead letter, and seconds per stage.
#: A child answers the same with no picture (None): pictures stay in the child.
Extracted = tuple[tuple[HashFeatures, Image.Image | None] | DeadLetterError, dict[str, float]]

#: Chunks per decoder process that a batch is cut into: enough to balance uneven images, few enough
#: that passing them costs little.
CHUNKS_PER_PROCESS = 4

_child: dict = {}  # in a child process: its settings and fetcher, set by _start_child


def _start_child(settings: Settings) -> None:
    # Ctrl-C reaches the whole process group: the parent drains and then shuts its pool down, which
    # ends the children; a child that died of the signal first would fail the images still in flight.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _child["settings"], _child["fetcher"] = settings, Fetcher(settings)


def extract(source: dict | bytes, fetcher: Fetcher, settings: Settings, min_side: int = 0) -> Extracted:
    """Fetch (unless given bytes), decode and hash one image; every failure is a dead letter, never
    an exception. Shared by the decode threads and the child processes."""
    timings: dict[str, float] = {}
    stage = "fetch"
    try:
        started = time.perf_counter()
        data = source if isinstance(source, bytes) else fetcher.fetch(source)
        if not isinstance(source, bytes):
            timings["fetch"], started = time.perf_counter() - started, time.perf_counter()
        stage = "decode"
        decoded = decode(data, settings, min_side=min_side)
        timings["decode"], started = time.perf_counter() - started, time.perf_counter()
        hashed = hash_features(data, decoded, settings)
        timings["hash"] = time.perf_counter() - started
        return (hashed, decoded.image), timings
    except DeadLetterError as exc:
        return exc, timings
    except Exception as exc:  # a bug triggered by one image must not take the batch down
        log.exception("%s failed unexpectedly", stage)
        return DeadLetterError(ErrorCode.INTERNAL_ERROR, f"{stage}: {type(exc).__name__}: {exc}"), timings


def _extract_chunk_in_child(sources: list[dict | bytes]) -> list[Extracted]:
    out = []
    for source in sources:
        result, timings = extract(source, _child["fetcher"], _child["settings"])
        out.append(((result if isinstance(result, DeadLetterError) else (result[0], None)), timings))
    return out


class DecodeProcesses:
    """A pool of child processes answering :func:`extract` (without the picture) for each submitted image."""

    def __init__(self, settings: Settings, processes: int):
        self._settings, self._processes = settings, processes
        # forkserver: children never inherit the parent's threads (librdkafka's, the pools') or locks.
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(["imgdedup.extract"])
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None  # started by the first submit
        self._suspects = ThreadPoolExecutor(1, thread_name_prefix="decode-isolate")
        self._solo: ProcessPoolExecutor | None = None  # used by the one _suspects thread only

    def _new_pool(self, processes: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(processes, mp_context=self._context, initializer=_start_child,
                                   initargs=(self._settings,))

    def close(self) -> None:
        self._suspects.shutdown(wait=True)
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
        if self._solo is not None:
            self._solo.shutdown(wait=True)

    def submit(self, sources: list[dict | bytes]) -> list[Future]:
        """One future per source, of (HashFeatures, None) | DeadLetterError; stage timings go to the metrics.

        Sources travel in chunks, ~CHUNKS_PER_PROCESS per process, so the pipe and the pool's own
        bookkeeping are paid per chunk, not per image; a lone event is a chunk of one."""
        outs = [Future() for _ in sources]
        size = max(1, -(-len(sources) // (CHUNKS_PER_PROCESS * self._processes)))
        with self._lock:
            if self._pool is None:
                self._pool = self._new_pool(self._processes)
            pool = self._pool
        for start in range(0, len(sources), size):
            chunk = list(zip(sources[start:start + size], outs[start:start + size]))
            try:
                pool.submit(_extract_chunk_in_child, [source for source, _ in chunk]).add_done_callback(
                    partial(self._settle, chunk=chunk, pool=pool))
            except BrokenProcessPool:
                self._suspect(chunk, pool)
        return outs

    def _settle(self, done: Future, chunk: list, pool: ProcessPoolExecutor) -> None:
        if done.cancelled():
            for _, out in chunk:
                out.cancel()
        elif isinstance(done.exception(), BrokenProcessPool):
            self._suspect(chunk, pool)
        elif done.exception() is not None:
            for _, out in chunk:
                _settle_one(out.set_exception, done.exception())
        else:
            for (_, out), result in zip(chunk, done.result()):
                _deliver(out, result)

    def _suspect(self, chunk: list, broken: ProcessPoolExecutor) -> None:
        """A child died with these images in flight: replace the pool, then retry each image alone."""
        with self._lock:
            if self._pool is broken:
                log.error("a decoder process died; starting a new pool and retrying its images one at a time")
                metrics.DECODER_DEATHS.inc()
                self._pool = self._new_pool(self._processes)
        for source, out in chunk:
            try:
                self._suspects.submit(self._isolate, source, out)
            except RuntimeError as exc:  # shutting down: the waiter must not hang
                _settle_one(out.set_exception, exc)

    def _isolate(self, source, out: Future) -> None:
        if self._solo is None:
            self._solo = self._new_pool(1)
        try:
            _deliver(out, self._solo.submit(_extract_chunk_in_child, [source]).result()[0])
        except BrokenProcessPool:
            self._solo = None
            _deliver(out, (DeadLetterError(ErrorCode.DECODE_FAILED, "the decoder process died on this image"), {}))


def observe(timings: dict[str, float]) -> None:
    for stage, seconds in timings.items():
        metrics.STAGE_SECONDS.labels(stage).observe(seconds)


def _deliver(out: Future, result: Extracted) -> None:
    value, timings = result
    observe(timings)
    _settle_one(out.set_result, value)


def _settle_one(setter, value) -> None:
    try:
        setter(value)
    except InvalidStateError:  # cancelled: a redelivery whose stored verdict made the features unnecessary
        pass
