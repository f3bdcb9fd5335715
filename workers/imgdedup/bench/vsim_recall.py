"""VSIM recall and latency against the query exploration factor (EF) at large sizes.

``imgdedup bench`` measured recall@1 0.95 at 100k vectors in one vector set and 0.36 at 1M with the
product's EF (200). This experiment answers what EF (or how many shards) a namespace of that size
needs, and at what latency. Filling 1M vectors takes about an hour on 2 cores, so the filled Redis is
saved as ``dump.rdb`` in ``--workdir`` and a rerun with the same directory starts from it (Vector
Sets store their graphs in the RDB file: loading does not rebuild them). Loading does not keep the
entry point (it becomes the first node of the top level read back) and sorts each node's links, so
at a small EF a rerun's answers can differ slightly from the first run's on the same links.

Vectors are seeded random unit vectors (the hard case for HNSW: no clusters to navigate by); each
query is a stored vector plus Gaussian noise (cosine ~0.83 to it, as a near duplicate's descriptor
would be) and its exact top-1 comes from a NumPy scan of all vectors. The fill and the queries go
through the product's ``VectorSetIndex`` (Q8, M 16, VADD over several connections).

    python -m imgdedup.bench.vsim_recall --count 1000000 --workdir /tmp/vsim-1m --efs 200,500,1000,2000
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import redis

from imgdedup import devstack
from imgdedup.bench.vector_bench import _unit
from imgdedup.keys import Keys
from imgdedup.vectorindex.vectorsets import VectorSetIndex

NS, EMBEDDER, DIM = "recall-bench", "sscd", 512
#: Per-dimension noise of a query around its stored vector: norm ~0.68, cosine ~0.83 to the source.
QUERY_NOISE = 0.03
FILL_CONNECTIONS, FILL_BATCH = 3, 500


def vectors(count: int, seed: int) -> np.ndarray:
    """The same ``count`` random unit vectors for a given seed, generated in chunks (1M x 512 is 2 GB)."""
    rng = np.random.default_rng(seed)
    out = np.empty((count, DIM), dtype=np.float32)
    for first in range(0, count, 100_000):
        out[first:first + 100_000] = _unit(rng, min(100_000, count - first), DIM)
    return out


def fill(address: str, index_of, data: np.ndarray, start: int) -> None:
    """VADD data[start:] over FILL_CONNECTIONS connections, printing the rate every 50k vectors."""
    spans = [(a, min(a + FILL_BATCH, len(data))) for a in range(start, len(data), FILL_BATCH)]
    indexes = [index_of(redis.Redis.from_url(address)) for _ in range(FILL_CONNECTIONS)]

    def add(job: tuple[int, tuple[int, int]]) -> None:
        worker, (a, b) = job
        indexes[worker].add(NS, EMBEDDER, [(f"img-{i}", data[i]) for i in range(a, b)])

    began, mark = time.perf_counter(), time.perf_counter()
    with ThreadPoolExecutor(FILL_CONNECTIONS) as pool:
        for r in range(0, len(spans), FILL_CONNECTIONS):
            list(pool.map(add, enumerate(spans[r:r + FILL_CONNECTIONS])))
            done = spans[min(r + FILL_CONNECTIONS, len(spans)) - 1][1]
            if done % 50_000 < FILL_BATCH * FILL_CONNECTIONS:
                now = time.perf_counter()
                print(f"  {done:>9,} vectors, {now - began:6.0f} s, {50_000 / (now - mark):5.0f} VADD/s lately",
                      flush=True)
                mark = now


def exact_top1(data: np.ndarray, queries: np.ndarray) -> np.ndarray:
    best = np.full(len(queries), -2.0, dtype=np.float32)
    arg = np.zeros(len(queries), dtype=np.int64)
    for first in range(0, len(data), 100_000):
        sims = data[first:first + 100_000] @ queries.T
        top = sims.argmax(axis=0)
        better = sims[top, np.arange(len(queries))] > best
        best[better], arg[better] = sims[top, np.arange(len(queries))][better], top[better] + first
    return arg


def sweep(index, queries: np.ndarray, truth: np.ndarray, k: int) -> dict:
    """Recall@1 and single-query latency of ``index`` (one EF) over ``queries``."""
    index.query(NS, EMBEDDER, queries[:8], k)  # warm up
    times, hits = [], 0
    for q, want in zip(queries, truth):
        began = time.perf_counter()
        (answer,) = index.query(NS, EMBEDDER, q[None, :], k)
        times.append(time.perf_counter() - began)
        hits += bool(answer) and answer[0][0] == f"img-{want}"
    ms = np.array(times) * 1e3
    return {"recall_at_1": hits / len(queries), "p50_ms": float(np.median(ms)), "p99_ms": float(np.quantile(ms, 0.99))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=1, help="vector sets the namespace is split into")
    parser.add_argument("--efs", default="200,500,1000,2000", help="query EFs to measure (comma-separated)")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--k", type=int, default=11, help="neighbours asked per query (product: candidates + 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, required=True, help="Redis directory; keeps dump.rdb for reruns")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)

    data = vectors(args.count, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    picked = rng.integers(0, args.count, args.queries)
    queries = data[picked] + QUERY_NOISE * rng.standard_normal((args.queries, DIM), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    truth = exact_top1(data, queries)
    server = devstack.start_redis(devstack.free_port(), args.workdir, persist=False)
    try:
        keys = Keys("recall")
        client = redis.Redis.from_url(server.address, socket_timeout=None)  # SAVE of 1M vectors takes a while
        stored = VectorSetIndex(client, keys, args.shards).count(NS, EMBEDDER)
        if stored not in (0, args.count):
            raise SystemExit(f"{args.workdir} holds {stored:,} vectors, not {args.count:,}; use another --workdir")
        print(f"{args.count:,} random unit {DIM}-d vectors in {args.shards} shard(s); {stored:,} already stored")
        fill(server.address, lambda c: VectorSetIndex(c, keys, args.shards), data, stored)
        if stored != args.count:
            client.save()
        rows = []
        for ef in (int(x) for x in args.efs.split(",")):
            row = {"ef": ef, **sweep(VectorSetIndex(client, keys, args.shards, ef=ef), queries, truth, args.k)}
            rows.append(row)
            print(f"EF {ef:5d}: recall@1 {row['recall_at_1']:.3f}  p50 {row['p50_ms']:6.2f} ms  "
                  f"p99 {row['p99_ms']:6.2f} ms", flush=True)
        result = {"vectors": args.count, "shards": args.shards, "queries": args.queries, "k": args.k,
                  "seed": args.seed, "noise": QUERY_NOISE, "rows": rows,
                  "used_memory": int(client.info("memory")["used_memory"])}
        if args.out:
            args.out.write_text(json.dumps(result, indent=2))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
