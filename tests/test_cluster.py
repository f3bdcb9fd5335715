"""The index store on a real Redis Cluster: three Redis 8.2 nodes started here, slots split between
them. Every key is its own hash tag (or shares its namespace's), so these check that no command spans
slots on another node: pHash bucket scripts and GETs, the commit script, vector sets, deletes."""

from __future__ import annotations

import time
from itertools import count

import numpy as np
import pytest
import redis

from imgdedup import devstack
from imgdedup.config import load_settings
from imgdedup.hashindex import PHashIndex
from imgdedup.keys import Keys
from imgdedup.store import ImageFeatures, IndexStore
from imgdedup.vectorindex.vectorsets import VectorSetIndex

SLOTS = 16384
_namespaces = count()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    nodes, buses = [], []
    try:
        for i in range(3):
            buses.append(devstack.free_port())  # the default, port + 10000, can be out of range
            nodes.append(devstack.start_redis(
                devstack.free_port(), tmp_path_factory.mktemp(f"node{i}"), persist=False,
                extra=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                       "--cluster-port", str(buses[-1]))))
        clients = [redis.Redis.from_url(n.address) for n in nodes]
        bounds = np.linspace(0, SLOTS, len(nodes) + 1).astype(int)
        for client, lo, hi in zip(clients, bounds, bounds[1:]):
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", int(lo), int(hi) - 1)
        for node, bus in zip(nodes[1:], buses[1:]):
            port = int(node.address.rsplit(":", 1)[1].split("/")[0])
            clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", port, bus)
        deadline = time.monotonic() + 30
        while any(c.cluster("info")["cluster_state"] != "ok" for c in clients):
            if time.monotonic() > deadline:
                pytest.fail("cluster did not reach state ok")
            time.sleep(0.1)
        client = redis.RedisCluster.from_url(nodes[0].address.rsplit("/", 1)[0])
        yield client
        client.close()
    finally:
        for node in nodes:
            node.stop()


def _brute(ids, hashes, query, radius):
    d = np.bitwise_count(np.array(hashes, dtype=np.uint64) ^ np.uint64(query))
    return sorted(((ids[i], int(d[i])) for i in np.flatnonzero(d <= radius)), key=lambda m: (m[1], m[0]))


def test_keys_spread_over_every_node(cluster):
    index = PHashIndex(cluster, Keys("c" + str(next(_namespaces))), 4, bucket_cap_bytes=10_000)
    index.add("ns", [(f"i{i}", int(h)) for i, h in enumerate(np.random.default_rng(0).integers(0, 2**63, 200))])
    per_node = [n.redis_connection.dbsize() for n in cluster.get_primaries()]
    assert len(per_node) == 3 and min(per_node) > 0


def test_phash_index_matches_brute_force_on_a_cluster(cluster):
    rng = np.random.default_rng(3)
    centres = rng.integers(0, 2**64, 20, dtype=np.uint64)
    flips = rng.integers(0, 64, (600, 6))
    hashes = [int(centres[i % 20]) ^ int(np.bitwise_or.reduce(np.uint64(1) << flips[i, : i % 7].astype(np.uint64)))
              if i % 7 else int(centres[i % 20]) for i in range(600)]
    ids = [f"img-{i}" if i % 5 else f"a%b\nc-{i}" for i in range(600)]
    index = PHashIndex(cluster, Keys("c" + str(next(_namespaces))), 4, bucket_cap_bytes=10**6)
    assert not index._direct_reads  # the cluster client reads bucket by bucket, grouped per node
    written = index.add("ns", list(zip(ids, hashes)))
    assert not any(w.capped for w in written)
    queries = [(hashes[i], r) for i in range(0, 600, 37) for r in (0, 4, 8, 10)]
    assert [r.matches for r in index.query("ns", queries)] == [_brute(ids, hashes, q, r) for q, r in queries]
    assert index.remove("ns", [(ids[0], hashes[0], written[0].substrings)]) == 4
    assert ids[0] not in {m[0] for m in index.query("ns", [(hashes[0], 8)])[0].matches}


def test_index_store_decides_and_deletes_on_a_cluster(cluster):
    settings = load_settings(key_prefix="c" + str(next(_namespaces)), metrics_port=0, vector_shards=4)
    store = IndexStore(cluster, settings, VectorSetIndex(cluster, Keys(settings.key_prefix), shards=4))
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((4, 512)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    near = vectors[0] + 0.01 * rng.standard_normal(512).astype(np.float32)  # cosine ~0.97
    near /= np.linalg.norm(near)

    def image(image_id, sha, phash, vector):
        return ImageFeatures("shop", image_id, f"e-{image_id}", sha * 64, phash, False, {"sscd": vector})

    first = [image("a", "a", 0x0F0F_0F0F_0F0F_0F0F, vectors[0]), image("b", "b", 0x1234_5678_9ABC_DEF0, vectors[1])]
    assert [r.decision.verdict for r in store.index(first, [None, None])] == ["unique", "unique"]
    later = [image("a2", "a", 0x0F0F_0F0F_0F0F_0F0F, vectors[2]),  # same bytes as a
             image("c", "c", 0x0F0F_0F0F_0F0F_0F0E, vectors[3]),  # pHash 1 bit from a
             image("d", "d", 0xFFFF_0000_FFFF_0000, near)]  # SSCD close to a only
    decided = store.index(later, [None] * 3)
    assert [(r.decision.verdict, r.decision.duplicate_of) for r in decided] == [
        ("exact_duplicate", "a"), ("near_duplicate", "a"), ("near_duplicate", "a")]
    ids = ["a", "b", "a2", "c", "d"]
    assert store.delete([("shop", i) for i in ids]) == [True] * 5
    left = [k for n in cluster.get_primaries() for k in n.redis_connection.scan_iter(match=f"{settings.key_prefix}:*")]
    assert sorted(k.decode().split(":")[2] for k in left) == ["namespaces", "{shop}"]  # the counter only
    assert store.vectors.count("shop", "sscd") == 0


def test_memory_is_summed_over_the_nodes(cluster):
    """INFO on a cluster client answers per node; the worker's memory gauges read the sum."""
    store = IndexStore(cluster, load_settings(key_prefix="c" + str(next(_namespaces)), metrics_port=0))
    used, limit = store.memory()
    per_node = [n.redis_connection.info("memory")["used_memory"] for n in cluster.get_primaries()]
    assert len(per_node) == 3 and used >= 3 * min(per_node) > 0
    assert limit == 0  # the test nodes have no maxmemory
