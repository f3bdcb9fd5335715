"""The front half of the pipeline for one image: read it, decode it, hash it (and, in a child process,
embed it); on a decode thread or in a child process.

Why child processes: in a saturated worker the decode threads got about one of two cores, because every
step that holds the GIL (theirs, and the main thread's Kafka, Redis and verdict work) makes the others
wait (README, "Benchmarks"). Pictures never travel back: copying them would cost more than it saves.
So the children also run the embedders that are cheap to load in every process
(``in_decoder_processes``: SSCD) on their share of the batch and send back only the vectors; an
embedder that needs the picture in the worker itself (CLIP: a torch model per process would cost GBs)
keeps the whole worker on decode threads. Inline and file:// images are read in the child, so only
the event's small ``image`` object goes over and only the features come back; http(s) bytes are
fetched by the parent's fetch threads (they hold the HTTP connection pool) and sent over.

A child that dies (a codec crashing on hostile bytes) breaks its pool and fails every image in flight
there. Those images are retried one at a time in a separate one-process pool; an image that kills that
child too is the culprit and becomes a ``decode_failed`` dead letter, and the worker carries on.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import Future, InvalidStateError, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from typing import NamedTuple

import numpy as np
from PIL import Image

from imgdedup import metrics
from imgdedup.config import Settings
from imgdedup.decode import decode
from imgdedup.errors import DeadLetterError, ErrorCode
from imgdedup.features import HashFeatures, hash_features
from imgdedup.fetch import Fetcher
from imgdedup.resample import one_blas_thread

log = logging.getLogger(__name__)

class Prepared(NamedTuple):
    """One image after the front half: what the pipeline's ``finish`` turns into ``Features``."""

    features: HashFeatures
    picture: Image.Image | None  # None when it stayed in a child process
    vectors: dict[str, np.ndarray]  # embedder name -> vector, for the embedders that ran in the child


#: What `extract` answers: the prepared image or its dead letter, and seconds per stage.
Extracted = tuple[Prepared | DeadLetterError, dict[str, float]]

#: Chunks per decoder process that a batch is cut into: enough to balance uneven images, few enough
#: that passing them costs little.
CHUNKS_PER_PROCESS = 4
#: The fewest images in a chunk, as long as every process still gets one. Each chunk costs a pickle,
#: a pipe write and wake-ups of the pool's threads, and at a steady rate below saturation batches hold
#: 2-4 images: one chunk per image cost the worker ~0.2 ms more CPU per event than chunks of two (README,
#: "What the numbers say").
MIN_CHUNK = 2


def chunk_size(images: int, processes: int) -> int:
    """Images per chunk when a batch of ``images`` goes to ``processes`` decoder processes."""
    balanced = -(-images // (CHUNKS_PER_PROCESS * processes))
    return max(1, balanced, min(MIN_CHUNK, -(-images // processes)))

_child: dict = {}  # in a child process: its settings and fetcher, set by _start_child


def _start_child(settings: Settings, embed: bool, min_side: int) -> None:
    # Ctrl-C reaches the whole process group: the parent drains and then shuts its pool down, which
    # ends the children; a child that died of the signal first would fail the images still in flight.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    one_blas_thread()
    _child.update(settings=settings, fetcher=Fetcher(settings), min_side=min_side, embedders=[])
    if embed:
        from imgdedup.embedders.registry import build_embedders

        _child["embedders"] = build_embedders(settings)


def extract(source: dict | bytes, fetcher: Fetcher, settings: Settings, min_side: int = 0) -> Extracted:
    """Fetch (unless given bytes), decode and hash one image; every failure is a dead letter, never
    an exception. Shared by the decode threads and the child processes.

    ``min_side`` 0 means no embedder will see the picture, so the decoder may give the luma plane only."""
    timings: dict[str, float] = {}
    stage = "fetch"
    try:
        started = time.perf_counter()
        data = source if isinstance(source, bytes) else fetcher.fetch(source)
        if not isinstance(source, bytes):
            timings["fetch"], started = time.perf_counter() - started, time.perf_counter()
        stage = "decode"
        decoded = decode(data, settings, min_side=min_side, luma_only=not min_side)
        timings["decode"], started = time.perf_counter() - started, time.perf_counter()
        hashed = hash_features(data, decoded, settings)
        timings["hash"] = time.perf_counter() - started
        return Prepared(hashed, decoded.image, {}), timings
    except DeadLetterError as exc:
        return exc, timings
    except Exception as exc:  # a bug triggered by one image must not take the batch down
        log.exception("%s failed unexpectedly", stage)
        return DeadLetterError(ErrorCode.INTERNAL_ERROR, f"{stage}: {type(exc).__name__}: {exc}"), timings


def embed_pictures(embedders: list, pictures: list[Image.Image]) -> tuple[list[dict | DeadLetterError], float]:
    """Every embedder's vector for each picture, one batch per embedder, and the seconds it took.

    A picture whose vector an embedder rejects (zero, NaN, not unit length) becomes an internal_error
    dead letter; to find it, a rejected batch is embedded again one picture at a time."""
    out: list[dict | DeadLetterError] = [{} for _ in pictures]
    started = time.perf_counter()
    for embedder in embedders if pictures else []:
        try:
            vectors = list(embedder.embed(pictures))
        except ValueError as exc:
            vectors = _embed_one_by_one(embedder, pictures, exc)
        for i, vector in enumerate(vectors):
            if vector is None:
                out[i] = DeadLetterError(ErrorCode.INTERNAL_ERROR, f"{embedder.name} produced an invalid vector")
            elif not isinstance(out[i], DeadLetterError):
                out[i][embedder.name] = vector
    return out, time.perf_counter() - started


def _embed_one_by_one(embedder, pictures: list[Image.Image], first_error: Exception) -> list[np.ndarray | None]:
    log.warning("%s rejected a batch (%s); embedding one by one", embedder.name, first_error)
    out = []
    for picture in pictures:
        try:
            out.append(embedder.embed([picture])[0])
        except ValueError:
            out.append(None)
    return out


def _extract_chunk_in_child(sources: list[dict | bytes]) -> list[Extracted]:
    """Extract a chunk and embed its pictures as one batch; only features and vectors go back."""
    out = [extract(source, _child["fetcher"], _child["settings"], _child["min_side"]) for source in sources]
    ok = [i for i, (result, _) in enumerate(out) if not isinstance(result, DeadLetterError)]
    if _child["embedders"] and ok:
        vectors, seconds = embed_pictures(_child["embedders"], [out[i][0].picture for i in ok])
        out[ok[0]][1]["embed"] = seconds  # one model call per chunk, observed once
        for i, embedded in zip(ok, vectors):
            result, timings = out[i]
            out[i] = (embedded if isinstance(embedded, DeadLetterError) else result._replace(vectors=embedded)), timings
    return [(r if isinstance(r, DeadLetterError) else r._replace(picture=None), t) for r, t in out]


class DecodeProcesses:
    """A pool of child processes answering :func:`extract` (without the picture) for each submitted image,
    with the vectors of the enabled embedders if ``embed`` (decoded at ``min_side``, as the embedders need)."""

    def __init__(self, settings: Settings, processes: int, embed: bool = False, min_side: int = 0):
        # Each child's model gets its share of the embedding threads, so the children together use
        # as many as one model in the worker would (more threads than cores only add contention).
        threads = max(1, settings.embed_threads // max(1, processes))
        self._settings, self._processes = settings.model_copy(update={"embed_threads": threads}), processes
        self._embed, self._min_side = embed, min_side
        # forkserver: children never inherit the parent's threads (librdkafka's, the pools') or locks.
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(["imgdedup.extract"])
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None  # started by the first submit
        self._suspects = ThreadPoolExecutor(1, thread_name_prefix="decode-isolate")
        self._solo: ProcessPoolExecutor | None = None  # used by the one _suspects thread only

    def _new_pool(self, processes: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(processes, mp_context=self._context, initializer=_start_child,
                                   initargs=(self._settings, self._embed, self._min_side))

    def close(self) -> None:
        self._suspects.shutdown(wait=True)
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
        if self._solo is not None:
            self._solo.shutdown(wait=True)

    def submit(self, sources: list[dict | bytes]) -> list[Future]:
        """One future per source, of Prepared (no picture) | DeadLetterError; stage timings go to the metrics.

        Sources travel in chunks (``chunk_size``), so the pipe and the pool's own bookkeeping are paid
        per chunk, not per image; a lone event is a chunk of one."""
        outs = [Future() for _ in sources]
        size = chunk_size(len(sources), self._processes)
        pool = self._current_pool()
        for start in range(0, len(sources), size):
            chunk = list(zip(sources[start:start + size], outs[start:start + size]))
            try:
                pool.submit(_extract_chunk_in_child, [source for source, _ in chunk]).add_done_callback(
                    partial(self._settle, chunk=chunk, pool=pool))
            except BrokenProcessPool:
                self._suspect(chunk, pool)
        return outs

    def _current_pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = self._new_pool(self._processes)
            return self._pool

    def warm(self, timeout_s: float = 120.0) -> set[int]:
        """Start every child now and wait until each has run its initializer; returns their pids.

        The pool starts its children one submit at a time, and the first batch would otherwise wait for
        the forkserver, the imports and the SSCD session (0.2-0.7 s, measured): a worker warms up before
        it takes its first event. Each probe sleeps a little so that one child cannot answer them all."""
        pool, pids = self._current_pool(), set()
        deadline = time.monotonic() + timeout_s
        try:
            while len(pids) < self._processes and time.monotonic() < deadline:
                probes = [pool.submit(_pid_after, 0.05) for _ in range(self._processes)]
                pids.update(probe.result(timeout=max(0.0, deadline - time.monotonic())) for probe in probes)
        except (BrokenProcessPool, TimeoutError) as exc:  # the first batch replaces the pool, as after any death
            log.warning("decoder processes did not warm up: %r", exc)
        return pids

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


def _pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


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
