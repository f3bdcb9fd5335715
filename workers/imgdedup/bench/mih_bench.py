"""pHash radius queries on the Redis multi-index tables at scale, against a NumPy brute-force scan.

The index is filled through ``PHashIndex.add`` (big batches) with mostly uniform random hashes plus
clusters of near-identical ones, so queries meet real matches and crowded buckets. Queries are half
perturbed copies of stored hashes (0 to radius + 2 bits flipped) and half uniform. Every MIH answer
is compared with the brute-force answer (same ids, same distances): recall must be exact.

The batched queries also go through a pipeline the way the worker sends them (``queue_query``), once
with each query's MGET written in RESP from its keys' NumPy array (a client that takes ``Packed``
commands, like the worker's) and once packed argument by argument by redis-py (a plain client), in
alternating order: the main thread's CPU per query of each is the client-side cost of the worker's reads.
"""

from __future__ import annotations

import time

import numpy as np

from imgdedup import roundtrip
from imgdedup.bench.report import percentiles_ms
from imgdedup.hashindex import PHashIndex
from imgdedup.keys import Keys

NS = "mih-bench"
CLUSTER_SHARE = 0.02  # of the stored hashes, in clusters of CLUSTER_SIZE within 4 bits of a centre
CLUSTER_SIZE = 20


def image_id(i: int) -> str:
    """Ids shaped like a listing feed's (about 24 bytes)."""
    return f"listing-{1_000_000 + i // 5}/photo-{i % 5}"


def flip_bits(rng: np.random.Generator, values: np.ndarray, max_bits: int) -> np.ndarray:
    """Each value with 0..max_bits distinct random bits flipped."""
    out = values.copy()
    for row in range(len(out)):
        bits = rng.choice(64, size=rng.integers(0, max_bits + 1), replace=False)
        out[row] ^= np.bitwise_or.reduce(
            np.left_shift(np.uint64(1), bits.astype(np.uint64)), initial=np.uint64(0)
        )
    return out


def make_hashes(rng: np.random.Generator, count: int) -> np.ndarray:
    clustered = int(count * CLUSTER_SHARE) // CLUSTER_SIZE * CLUSTER_SIZE
    uniform = rng.integers(0, 1 << 64, count - clustered, dtype=np.uint64, endpoint=False)
    centres = rng.integers(0, 1 << 64, clustered // CLUSTER_SIZE, dtype=np.uint64, endpoint=False)
    members = flip_bits(rng, np.repeat(centres, CLUSTER_SIZE), 4) if clustered else np.empty(0, np.uint64)
    hashes = np.concatenate([uniform, members])
    rng.shuffle(hashes)
    return hashes


def fill(index: PHashIndex, hashes: np.ndarray, batch: int = 20_000) -> float:
    """Add every hash; returns hashes added per second."""
    start = time.perf_counter()
    values = hashes.tolist()
    for first in range(0, len(values), batch):
        index.add(NS, [(image_id(first + i), h) for i, h in enumerate(values[first : first + batch])])
    return len(values) / (time.perf_counter() - start)


def brute_force(hashes: np.ndarray, query: int, radius: int) -> list[tuple[str, int]]:
    distances = np.bitwise_count(hashes ^ np.uint64(query))
    hits = np.flatnonzero(distances <= radius)
    return sorted(((image_id(int(i)), int(distances[i])) for i in hits), key=lambda m: (m[1], m[0]))


def server_usec(client) -> int:
    """Microseconds Redis has spent in commands since its stats were reset (INFO commandstats):
    the server's share of a query, apart from the client's and the network's."""
    return sum(int(stats["usec"]) for stats in client.info("commandstats").values())


def run_mih(
    client,
    key_prefix: str,
    tables: int,
    bucket_cap_bytes: int,
    radius: int,
    count: int,
    singles: int,
    batches: int,
    batch_size: int = 64,
    seed: int = 0,
    *,
    packing_client,
) -> dict:
    rng = np.random.default_rng(seed)
    index = PHashIndex(client, Keys(key_prefix), tables, bucket_cap_bytes)
    hashes = make_hashes(rng, count)
    before = int(client.info("memory")["used_memory"])
    add_rate = fill(index, hashes)
    table_bytes = (int(client.info("memory")["used_memory"]) - before) / count
    n_queries = singles + batches * batch_size
    near = flip_bits(rng, hashes[rng.integers(0, count, n_queries // 2)], radius + 2)
    queries = np.concatenate([near, rng.integers(0, 1 << 64, n_queries - len(near), dtype=np.uint64)])
    rng.shuffle(queries)
    qlist = queries.tolist()

    brute_s, expected = [], []
    for q in qlist:
        start = time.perf_counter()
        expected.append(brute_force(hashes, q, radius))
        brute_s.append(time.perf_counter() - start)

    index.query(NS, [(q, radius) for q in qlist[:10]])  # warm the connection
    one_s, answers = [], []
    server_before = server_usec(client)
    for q in qlist[:singles]:
        start = time.perf_counter()
        answers += index.query(NS, [(q, radius)])
        one_s.append(time.perf_counter() - start)
    server_per_query_us = (server_usec(client) - server_before) / max(1, singles)
    many_s = []
    for b in range(batches):
        chunk = qlist[singles + b * batch_size : singles + (b + 1) * batch_size]
        start = time.perf_counter()
        answers += index.query(NS, [(q, radius) for q in chunk])
        many_s.append(time.perf_counter() - start)

    mismatched = sum(a.matches != e for a, e in zip(answers, expected))
    piped = _pipelined_cpu(client, index, packing_client, key_prefix, qlist[singles:], expected[singles:], radius, batch_size)
    brute_batches = [
        sum(brute_s[singles + b * batch_size : singles + (b + 1) * batch_size]) for b in range(batches)
    ]
    return {
        "hashes": count,
        "table_bytes_per_hash": table_bytes,
        "radius": radius,
        "tables": tables,
        "add_per_s": add_rate,
        "queries": n_queries,
        "queries_with_matches": sum(bool(e) for e in expected),
        "matches": sum(len(e) for e in expected),
        "mismatched_queries": mismatched + piped.pop("mismatched"),
        "checked_queries": len(answers) + piped.pop("checked"),
        "probes_per_query": answers[0].probes if answers else 0,
        "mean_candidates": float(np.mean([a.candidates for a in answers])) if answers else 0.0,
        "mih_1_ms": percentiles_ms(one_s),
        "server_us_per_query": server_per_query_us,
        "brute_1_ms": percentiles_ms(brute_s[:singles]),
        "batch_size": batch_size,
        "mih_batch_ms": percentiles_ms(many_s),
        "brute_batch_ms": percentiles_ms(brute_batches),
        **piped,
    }


def _pipelined_cpu(client, index: PHashIndex, packing_client, key_prefix: str, queries: list[int],
                   expected: list, radius: int, batch_size: int) -> dict:
    """Main-thread CPU per query of the batches sent as the worker sends them, packed MGETs against
    MGETs packed by redis-py, alternating which goes first; every answer checked against brute force."""
    paths = {"packed": (packing_client, PHashIndex(packing_client, Keys(key_prefix), index.tables,
                                                   index.bucket_cap_bytes)),
             "redis-py": (client, index)}
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    mismatched = checked = 0
    for b, start in enumerate(range(0, len(queries) - batch_size + 1, batch_size)):
        chunk = [(q, radius) for q in queries[start : start + batch_size]]
        for name in sorted(paths, reverse=bool(b % 2)):
            began = time.thread_time()
            sender, path = paths[name]
            got = roundtrip.run(sender, path.queue_query, NS, chunk)
            cpu[name].append((time.thread_time() - began) / len(chunk))
            mismatched += sum(a.matches != e for a, e in zip(got, expected[start : start + batch_size]))
            checked += len(got)
    return {"pipelined_cpu_us": {name: float(np.median(v)) * 1e6 if v else float("nan") for name, v in cpu.items()},
            "mismatched": mismatched, "checked": checked}
