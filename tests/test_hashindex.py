"""PHashIndex against a real Redis: exact radius search (NumPy brute force is the oracle), capping,
removal and namespace isolation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from imgdedup import roundtrip
from imgdedup.hashindex import PHashIndex
from imgdedup.keys import Keys
from imgdedup.mih import probe_count

MAX = (1 << 64) - 1
#: (tables, radius) pairs cheap enough for a property test (every table count, radii 0..16).
CASES = [(m, r) for m in (1, 2, 4, 8, 16) for r in range(17) if probe_count(r, m) <= 5000]
_namespaces = itertools.count()


def brute_force(ids: list[str], hashes: list[int], query: int, radius: int) -> list[tuple[str, int]]:
    """The oracle: a full popcount scan, sorted by (distance, image_id)."""
    dist = np.bitwise_count(np.array(hashes, dtype=np.uint64) ^ np.uint64(query))
    return sorted(((ids[i], int(dist[i])) for i in np.flatnonzero(dist <= radius)), key=lambda m: (m[1], m[0]))


def _flip(value: int, bits: list[int]) -> int:
    for bit in bits:
        value ^= 1 << bit
    return value


@st.composite
def skewed_hashes(draw) -> list[int]:
    """Clusters around a few centres (all-zero and all-one among them), exact duplicates, 1-bit
    neighbours, plus a few uniform hashes."""
    centres = draw(st.lists(st.one_of(st.just(0), st.just(MAX), st.integers(0, MAX)), min_size=1, max_size=4))
    hashes = []
    for centre in centres:
        for _ in range(draw(st.integers(1, 12))):
            flips = draw(st.lists(st.integers(0, 63), max_size=draw(st.sampled_from([0, 1, 1, 3, 6, 12]))))
            hashes.append(_flip(centre, flips))
    return hashes + draw(st.lists(st.integers(0, MAX), max_size=6))


@st.composite
def index_cases(draw):
    hashes = draw(skewed_hashes())
    tables, _ = draw(st.sampled_from(CASES))
    radii = [r for m, r in CASES if m == tables]
    queries = []
    for _ in range(draw(st.integers(1, 6))):
        base = draw(st.sampled_from(hashes + [0, MAX]))
        near = _flip(base, draw(st.lists(st.integers(0, 63), max_size=10)))
        queries.append((draw(st.sampled_from([base, near, draw(st.integers(0, MAX))])), draw(st.sampled_from(radii))))
    return hashes, tables, queries


@pytest.fixture
def packing_client(redis_server) -> redis.Redis:
    """A client like the worker's (pipeline.connect_redis): its pipelines take pre-packed commands."""
    client = roundtrip.standalone_client(redis_server.address)
    yield client
    client.close()


#: The read paths: (PHashIndex direct_reads, whether the client takes Packed commands, queries through
#: a pipeline as the worker's IndexStore does rather than through PHashIndex.query). The cluster-like
#: path also writes as on a cluster, one bucket per script run (the others: a batch's buckets per run,
#: 512 at most, so the shared-bucket test's batches take several runs).
READ_PATHS = {
    "query: MGETs on a raw connection": (True, False, False),
    "pipeline: packed MGETs (the worker's)": (True, True, True),
    "pipeline: MGETs packed by redis-py": (True, False, True),
    "pipeline: a GET per bucket (as on a cluster)": (False, False, True),
}


def run_queries(client, packing_client, prefix: str, tables: int, path: str, ns: str, items, queries):
    direct, packed, piped = READ_PATHS[path]
    index = PHashIndex(packing_client if packed else client, Keys(prefix), tables, bucket_cap_bytes=10**9,
                       direct_reads=direct, batched_writes=direct)
    assert index._packed == packed
    added = index.add(ns, items)
    assert all(not a.capped for a in added)
    return roundtrip.run(index._client, index.queue_query, ns, queries) if piped else index.query(ns, queries)


@given(case=index_cases(), path=st.sampled_from(sorted(READ_PATHS)))
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_query_returns_exactly_the_brute_force_set(redis_client, packing_client, key_prefix, case, path):
    hashes, tables, queries = case
    ns = f"prop{next(_namespaces)}"
    ids = [f"img-{i}" if i % 3 else f"bild-ü{i}" if i % 2 else f"line\n%0A{i}%" for i in range(len(hashes))]
    results = run_queries(redis_client, packing_client, key_prefix, tables, path, ns, list(zip(ids, hashes)), queries)
    assert len(results) == len(queries)
    for (query, radius), result in zip(queries, results):
        expected = brute_force(ids, hashes, query, radius)
        assert result.matches == expected
        assert result.probes == probe_count(radius, tables)
        assert len(expected) <= result.candidates <= len(hashes) * tables


@pytest.mark.parametrize("tables", [4, 16])
def test_every_read_path_with_a_shared_bucket_batch(redis_client, packing_client, key_prefix, tables):
    """Several queries in one batch share buckets; every read path agrees with the oracle. With 16
    tables the bucket keys have two lengths (tables 0-9 and 10-15), which the packed MGET writes key by key."""
    rng = np.random.default_rng(7)
    centre = int(rng.integers(0, MAX, dtype=np.uint64))
    hashes = [_flip(centre, rng.choice(64, size=k, replace=False).tolist()) for k in rng.integers(0, 9, 300)]
    ids = [f"i{i}" for i in range(len(hashes))]
    queries = [(h, 8) for h in hashes[:20]] + [(centre, 10), (centre, 0)]
    expected = [brute_force(ids, hashes, q, r) for q, r in queries]
    for path in READ_PATHS:
        results = run_queries(redis_client, packing_client, key_prefix, tables, path, "shared", list(zip(ids, hashes)), queries)
        assert [r.matches for r in results] == expected, path
        assert [r.probes for r in results] == [probe_count(r, tables) for _, r in queries], path
    assert any(len(a) > 1 for a in expected)


#: Commands as the worker and redis-py's own methods send them, and the argument kinds redis-py converts.
ORDINARY_COMMANDS = [
    ("HSET", "k:{a}", "f", b"\x00bin", 7, 1.5, -2**63, "näme/ünicode"),
    ("EVALSHA", "3f786850e387550fdab836ed7e6dc881de23001b", 1, "k", "0123456789abcdefid\n", 200000),
    ("CLIENT SETNAME", "imgdedup"),  # a two-word name: redis-py splits it
    (b"SET", b"k", b"v"),
    (b"CONFIG GET", b"maxmemory"),
    ("SET", bytearray(b"k"), memoryview(b"v")),  # hiredis refuses both; redis-py turns them into bytes
    ("SET", "", b""),
]


@pytest.mark.parametrize("fast", [True, False])
def test_the_packing_client_packs_other_commands_as_redis_py_does(packing_client, fast):
    from redis.connection import HiredisRespSerializer
    from redis.exceptions import DataError

    packer = roundtrip.CommandPacker(fast)
    for args in ORDINARY_COMMANDS:
        assert packer.pack(*args) == HiredisRespSerializer().pack(*args), args
    for bad in (("SET", "k", None), ("SET", "k", {"a": 1})):
        with pytest.raises(DataError):
            packer.pack(*bad)
    packed = roundtrip.Packed(b"*2\r\n$4\r\nECHO\r\n$2\r\nhi\r\n")
    assert packer.pack(packed) == [packed]
    pipe = packing_client.pipeline(transaction=False)
    pipe.execute_command(packed)
    pipe.set("plain", "value")
    pipe.get("plain")
    assert pipe.execute() == [b"hi", True, b"value"]
    assert roundtrip.sends_packed(packing_client)


def test_query_result_excludes_self_and_empty_cases(redis_client, key_prefix):
    index = PHashIndex(redis_client, Keys(key_prefix), 4, bucket_cap_bytes=10_000)
    assert index.add("ns", []) == [] and index.query("ns", []) == []
    assert index.query("ns", [(123, 8)])[0].matches == []
    index.add("ns", [("a", 0xFF), ("b", 0xFE)])
    (result,) = index.query("ns", [(0xFF, 2)])
    assert result.matches == [("a", 0), ("b", 1)]
    assert result.excluding("a") == [("b", 1)]


def _entries(client, bucket: str) -> int:
    """Entries in a bucket (each ends with a newline)."""
    return (client.get(bucket) or b"").count(b"\n")


def _capped_count() -> float:
    return REGISTRY.get_sample_value("imgdedup_mih_capped_buckets_total") or 0.0


ENTRY = 16 + 2 + 1  # bytes of one bucket entry of the ids below: hex pHash, "c0".."c9", newline


@pytest.mark.parametrize("batched", [True, False], ids=["batch per script run", "bucket per script run"])
def test_full_bucket_never_grows_and_is_reported(redis_client, key_prefix, batched):
    keys = Keys(key_prefix)
    index = PHashIndex(redis_client, keys, 4, bucket_cap_bytes=3 * ENTRY, batched_writes=batched)
    rng = np.random.default_rng(1)
    # Same top 16 bits (table 0 bucket "abcd"), random elsewhere (their own buckets in tables 1-3).
    hashes = [(0xABCD << 48) | int(v) for v in rng.integers(0, 1 << 48, 10)]
    items = [(f"c{i}", h) for i, h in enumerate(hashes)]
    before = _capped_count()
    results = index.add("ns", items[:6]) + [index.add("ns", [item])[0] for item in items[6:]]
    bucket = keys.mih_bucket("ns", 0, "abcd")
    assert _entries(redis_client, bucket) == 3
    assert [r.capped for r in results] == [[]] * 3 + [[0]] * 7
    assert all(r.substrings[0] == "" and all(r.substrings[1:]) for r in results[3:])
    assert _capped_count() - before == 7
    assert index.sizes("ns") == {"buckets": 1 + 3 * 10, "members": 3 + 30, "largest": 3}
    # Re-adding is harmless: the written stay written, the refused stay refused.
    assert index.add("ns", items) == results
    assert _entries(redis_client, bucket) == 3
    # Capped images are still found through their other tables when the radius probes them.
    assert {m[0] for m in index.query("ns", [(hashes[8], 3)])[0].matches} >= {"c8"}
    # A removal frees a slot; the next add of a refused image takes it.
    index.remove("ns", [("c0", hashes[0], results[0].substrings)])
    assert index.add("ns", [items[9]])[0].capped == []
    assert _entries(redis_client, bucket) == 3
    # Lowering the cap refuses new members but never evicts ones already written (their records
    # say they are there).
    smaller = PHashIndex(redis_client, keys, 4, bucket_cap_bytes=ENTRY, batched_writes=batched)
    assert [r.capped for r in smaller.add("ns", [items[1], items[2], items[3]])] == [[], [], [0]]
    assert _entries(redis_client, bucket) == 3


def test_remove_takes_exactly_what_was_written(redis_client, key_prefix):
    index = PHashIndex(redis_client, Keys(key_prefix), 4, bucket_cap_bytes=10_000)
    items = [("a", 0x0123456789ABCDEF), ("b", 0x0123456789ABCDEE), ("c", MAX)]
    written = index.add("ns", items)
    assert written[0].substrings == index.substrings([items[0][1]])[0] == ["0123", "4567", "89ab", "cdef"]
    assert index.sizes("ns")["members"] == 12
    assert index.remove("ns", [("a", items[0][1], written[0].substrings)]) == 4
    assert index.sizes("ns")["members"] == 8
    assert index.remove("ns", [("a", items[0][1], written[0].substrings)]) == 0
    (result,) = index.query("ns", [(items[0][1], 8)])
    assert result.matches == [("b", 1)]
    # A table that was capped ("") is skipped; nothing else of "c" is touched but its own members.
    assert index.remove("ns", [("c", MAX, ["ffff", "", "ffff", "ffff"])]) == 3
    assert [r.matches for r in index.query("ns", [(MAX, 3)])] == [[("c", 0)]]
    assert index.remove("ns", []) == 0


def test_namespaces_never_see_each_other(redis_client, key_prefix):
    index = PHashIndex(redis_client, Keys(key_prefix), 4, bucket_cap_bytes=10_000)
    hashes = [0, 1, MAX, 0xF0F0F0F0F0F0F0F0]
    shop1 = index.add("shop1", [(f"s1-{i}", h) for i, h in enumerate(hashes)])
    index.add("shop2", [(f"s2-{i}", h) for i, h in enumerate(hashes)])
    assert {m[0] for r in index.query("shop1", [(h, 16) for h in hashes]) for m in r.matches} == {
        f"s1-{i}" for i in range(4)}
    index.remove("shop1", [(f"s1-{i}", h, w.substrings) for i, (h, w) in enumerate(zip(hashes, shop1))])
    assert index.sizes("shop1") == {"buckets": 0, "members": 0, "largest": 0}
    assert index.sizes("shop2")["members"] == 16
    assert [r.matches for r in index.query("shop2", [(0, 0)])] == [[("s2-0", 0)]]


def test_rejects_unusable_settings(redis_server, redis_client, key_prefix):
    decoding = redis.Redis.from_url(redis_server.address, decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses"):
        PHashIndex(decoding, Keys(key_prefix), 4, 100)
    decoding.close()
    index = PHashIndex(redis_client, Keys(key_prefix), 1, 100)
    with pytest.raises(ValueError, match="max_probes"):
        index.query("ns", [(0, 8)])
    with pytest.raises(ValueError, match="64-bit"):
        index.add("ns", [("x", 1 << 64)])
    with pytest.raises(ValueError):
        PHashIndex(redis_client, Keys(key_prefix), 3, 100)
