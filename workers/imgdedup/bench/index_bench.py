"""VSIM latency and Redis memory per image, through the product's IndexStore and vector index.

One namespace is filled component by component, measuring ``used_memory`` after each, so the report
says where the bytes go:

1. pHash tables: ``store.phash.add`` for every image;
2. SSCD vectors: ``store.vectors.add`` (the configured backend, shards and quantisation); VSIM latency
   is measured here, against an exact NumPy top-k of the same vectors;
3. records and the rest of ``IndexStore.index`` (record hash, SHA-256 set, commit order, decision) for a
   sample of those images: re-adding their pHash members and vectors changes nothing, so the memory
   delta is what the records cost. (Indexing every image this way would spend minutes on queries.)
   The sample's batches alternate between two clients that differ only in how they pack commands (the
   worker's :class:`~imgdedup.roundtrip.CommandPacker`, and redis-py's own packing), and the main
   thread's CPU per image of each is reported.

Then, if the measured VADD rate says it fits in ``budget_s``, the namespace grows to the next size and
VSIM is measured again. Inputs are random pHashes and random unit 512-d vectors with realistic ids.
The method follows ``vector_bench redis`` (which compares backends on synthetic ids); this one goes
through the product's IndexStore with the configured backend, so its figures are the product's.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from imgdedup.bench.mih_bench import image_id
from imgdedup.bench.report import percentiles_ms
from imgdedup.bench.vector_bench import _memory, _unit
from imgdedup.config import Settings
from imgdedup.keys import Keys
from imgdedup.store import ImageFeatures, IndexStore
from imgdedup.vectorindex import build_vector_index

NS = "index-bench"
EMBEDDER = "sscd"
DIM = 512
VECTOR_BATCH = 500
#: Connections that fill the vector index at once (as several workers and a backfill would).
FILL_CONNECTIONS = 3


class Corpus:
    """Seeded random image features, generated in order so any prefix is the same across runs."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.vectors = np.empty((0, DIM), dtype=np.float32)
        self.phashes = np.empty(0, dtype=np.uint64)

    def grow(self, count: int) -> None:
        extra = count - len(self.vectors)
        if extra > 0:
            self.vectors = np.concatenate([self.vectors, _unit(self.rng, extra, DIM)])
            self.phashes = np.concatenate(
                [self.phashes, self.rng.integers(0, 1 << 64, extra, dtype=np.uint64)]
            )


def add_phashes(store: IndexStore, corpus: Corpus, first: int, last: int, batch: int = 10_000) -> None:
    for start in range(first, last, batch):
        stop = min(start + batch, last)
        store.phash.add(NS, [(image_id(i), int(corpus.phashes[i])) for i in range(start, stop)])


def add_vectors(store: IndexStore, corpus: Corpus, first: int, last: int) -> float:
    """VADD every vector in [first, last) over FILL_CONNECTIONS connections (as several workers or a
    backfill would); returns the rate over the last tenth of the rounds (the slowest)."""
    batches = [(start, min(start + VECTOR_BATCH, last)) for start in range(first, last, VECTOR_BATCH)]

    def add(span: tuple[int, int]) -> None:
        store.vectors.add(NS, EMBEDDER, [(image_id(i), corpus.vectors[i]) for i in range(*span)])

    rounds = []
    with ThreadPoolExecutor(FILL_CONNECTIONS) as pool:
        for r in range(0, len(batches), FILL_CONNECTIONS):
            spans = batches[r : r + FILL_CONNECTIONS]
            began = time.perf_counter()
            list(pool.map(add, spans))
            rounds.append((sum(b - a for a, b in spans), time.perf_counter() - began))
    # The fill connections' query buffers (a pipeline of VADDs is ~1 MB) count in used_memory until
    # Redis trims them; closing the connections frees them now, so the deltas measure the data.
    store.client.connection_pool.disconnect()
    store.client.ping()
    tail = rounds[-max(1, len(rounds) // 10) :]
    return sum(n for n, _ in tail) / sum(t for _, t in tail)


def timed_queries(store: IndexStore, queries: np.ndarray, per_call: int, k: int) -> tuple[list[float], list]:
    """Seconds per ``store.vectors.query`` call of ``per_call`` vectors, and the answers."""
    times, answers = [], []
    for first in range(0, len(queries), per_call):
        start = time.perf_counter()
        answers += store.vectors.query(NS, EMBEDDER, queries[first : first + per_call], k)
        times.append(time.perf_counter() - start)
    return times, answers


def add_records(stores: dict[str, IndexStore], corpus: Corpus, count: int, batch: int) -> dict[str, float]:
    """The full IndexStore.index path (write, commit, query, decide) for the first ``count`` images, one
    batch per store in turn; the median main-thread CPU microseconds per image of each store's batches."""
    cpu: dict[str, list[float]] = {name: [] for name in stores}
    for b, start in enumerate(range(0, count, batch)):
        name = list(stores)[b % len(stores)]
        images = [
            ImageFeatures(
                NS,
                image_id(i),
                str(uuid.uuid4()),
                hashlib.sha256(b"%d" % i).hexdigest(),
                int(corpus.phashes[i]),
                False,
                {EMBEDDER: corpus.vectors[i]},
            )
            for i in range(start, min(start + batch, count))
        ]
        began = time.thread_time()
        stores[name].index(images, stores[name].records([(NS, img.image_id) for img in images]))
        cpu[name].append((time.thread_time() - began) / len(images))
    return {name: float(np.median(v)) * 1e6 if v else float("nan") for name, v in cpu.items()}


def vsim_latency(
    store: IndexStore, corpus: Corpus, size: int, queries: int, k: int, batch: int, rng: np.random.Generator
) -> dict:
    """VSIM per call of 1 and of ``batch`` queries, and an exact NumPy top-k over the same vectors."""
    picked = rng.integers(0, size, queries)
    noisy = corpus.vectors[picked] + 0.03 * rng.standard_normal((queries, DIM), dtype=np.float32)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    stored = corpus.vectors[:size]
    timed_queries(store, noisy[:8], 1, k)  # warm up
    one, answers = timed_queries(store, noisy, 1, k)
    many, _ = timed_queries(store, noisy, batch, k)
    brute, exact = [], []
    for q in noisy:
        start = time.perf_counter()
        sims = stored @ q
        top = np.argpartition(-sims, k)[:k]
        exact.append(top[np.argsort(-sims[top])])
        brute.append(time.perf_counter() - start)
    recall1 = np.mean([bool(hits) and hits[0][0] == image_id(int(e[0])) for hits, e in zip(answers, exact)])
    recall_k = np.mean(
        [len({h[0] for h in hits} & {image_id(int(i)) for i in e}) / k for hits, e in zip(answers, exact)]
    )
    return {
        "vectors": size,
        "k": k,
        "queries": queries,
        "vsim_1_ms": percentiles_ms(one),
        "batch": batch,
        "vsim_batch_ms": percentiles_ms(many),
        "brute_1_ms": percentiles_ms(brute),
        "recall_at_1": float(recall1),
        f"recall_at_{k}": float(recall_k),
    }


def run_index(
    client, settings: Settings, sizes: list[int], queries: int, records: int, budget_s: float, seed: int = 0,
    *, record_clients: dict[str, object],
) -> dict:
    """Memory per component at ``sizes[0]`` images, VSIM there and at each further size that fits the
    budget; the record sample is indexed through each of ``record_clients`` (name -> client) in turn."""

    def store_of(redis_client) -> IndexStore:
        return IndexStore(redis_client, settings, build_vector_index(redis_client, Keys(settings.key_prefix), settings))

    store = store_of(client)
    corpus, rng = Corpus(seed), np.random.default_rng(seed + 1)
    k, size = settings.vector_candidates + 1, sizes[0]
    corpus.grow(size)
    before = _memory(client)
    add_phashes(store, corpus, 0, size)
    after_phash = _memory(client)
    rate = add_vectors(store, corpus, 0, size)
    after_vectors = _memory(client)
    records = min(records, size)
    record_cpu_us = add_records({name: store_of(c) for name, c in record_clients.items()}, corpus, records,
                                settings.batch_size)
    for c in record_clients.values():  # their query buffers would count in used_memory (add_vectors)
        c.connection_pool.disconnect()
    after_records = _memory(client)
    memory = {
        "images": size,
        "record_sample": records,
        "phash_tables_b": (after_phash - before) / size,
        "sscd_vector_b": (after_vectors - after_phash) / size,
        "record_b": (after_records - after_vectors) / records,
        "index_cpu_us_per_image": record_cpu_us,
    }
    memory["total_b"] = memory["phash_tables_b"] + memory["sscd_vector_b"] + memory["record_b"]
    vsim = [dict(vsim_latency(store, corpus, size, queries, k, settings.batch_size, rng), vadd_per_s=rate)]
    skipped = []
    for bigger in sizes[1:]:
        projected = (bigger - size) / rate
        if projected > budget_s:
            skipped.append({"vectors": bigger, "projected_fill_s": projected, "budget_s": budget_s})
            continue
        corpus.grow(bigger)
        mem = _memory(client)
        rate = add_vectors(store, corpus, size, bigger)
        vector_b = (_memory(client) - mem) / (bigger - size)
        size = bigger
        vsim.append(
            dict(
                vsim_latency(store, corpus, size, queries, k, settings.batch_size, rng),
                vadd_per_s=rate,
                sscd_vector_b_marginal=vector_b,
            )
        )
    return {
        "memory": memory,
        "vsim": vsim,
        "vsim_skipped": skipped,
        "backend": settings.vector_backend,
        "shards": settings.vector_shards,
    }
