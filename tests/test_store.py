"""IndexStore details the end-to-end tests do not reach: what the record says about capped buckets."""

from __future__ import annotations

import numpy as np
import pytest

from imgdedup.store import ImageFeatures, IndexStore


def test_record_names_every_bucket_and_delete_leaves_nothing_even_when_capped(redis_client, make_settings):
    """The record lists the buckets before they are written (a crash in between must not leak entries),
    so it names refused ones too; a delete cuts each, and cutting an absent entry does nothing."""
    settings = make_settings(mih_bucket_cap_bytes=1024)  # ~25 entries of these ids
    store = IndexStore(redis_client, settings)
    rng = np.random.default_rng(2)
    hashes = [(0xBEEF << 48) | int(v) for v in rng.integers(0, 1 << 48, 40)]  # one shared bucket in table 0
    images = [ImageFeatures("ns", f"listing-{i:05d}/photo-1", f"e{i}", f"{i:064x}", h, False)
              for i, h in enumerate(hashes)]
    for start in range(0, 40, 8):
        store.index(images[start:start + 8], [None] * 8)
    shared = store.keys.mih_bucket("ns", 0, "beef")
    assert 0 < redis_client.get(shared).count(b"\n") < 40  # some entries were refused
    records = store.records([("ns", img.image_id) for img in images])
    assert all(rec["mih"].split(",")[0] == "beef" and len(rec["mih"].split(",")) == 4 for rec in records)
    assert store.delete([("ns", img.image_id) for img in images]) == [True] * 40
    assert list(redis_client.scan_iter(match=f"{settings.key_prefix}:*:mih:*")) == []
    assert list(redis_client.scan_iter(match=f"{settings.key_prefix}:*:rec:*")) == []


def test_memory_on_a_single_node(redis_client, make_settings):
    used, limit = IndexStore(redis_client, make_settings()).memory()
    assert used == pytest.approx(int(redis_client.info("memory")["used_memory"]), rel=0.5) and limit == 0


def test_a_copy_of_a_duplicate_points_at_the_original_and_a_rewrite_keeps_its_order(redis_client, make_settings):
    """Canonical originals and sequence numbers come from the namespace's order hash: a copy of `b`
    (itself a near duplicate of `a`) names `a` as its original, in the verdict and in the evidence;
    indexing an image again after its decision keeps its sequence number."""
    store = IndexStore(redis_client, make_settings(phash_radius=8))
    a = ImageFeatures("ns", "a", "ea", "a" * 64, 0x0123456789ABCDEF, False)
    b = ImageFeatures("ns", "b", "eb", "b" * 64, 0x0123456789ABCDEF ^ 0b111, False)
    copy_of_b = ImageFeatures("ns", "c", "ec", "b" * 64, b.phash, False)
    first, second, third = (store.index([img], [None])[0] for img in (a, b, copy_of_b))
    assert (first.decision.verdict, second.decision.verdict) == ("unique", "near_duplicate")
    assert (third.decision.verdict, third.decision.duplicate_of) == ("exact_duplicate", "a")
    assert third.decision.matches[0] == {"image_id": "b", "signal": "sha256", "canonical": "a"}
    again = store.index([b], store.records([("ns", "b")]))[0]
    assert again.seq == second.seq and again.decision.duplicate_of == "a"


def test_a_standalone_redis_answers_the_queries_in_the_writes_round_trip(redis_client, make_settings):
    """Write, commit and query share one pipeline on a standalone Redis (it runs one connection's
    commands in order, so the queries still see the commit): three round trips for a batch that finds a
    candidate (writes + queries, the candidates' order, the decisions), and the verdicts are those of
    the concurrency rule."""
    store = IndexStore(redis_client, make_settings(phash_radius=8))
    original = ImageFeatures("ns", "a", "ea", "a" * 64, 0x0123456789ABCDEF, False)
    store.index([original], [None])
    executed = []
    real_pipeline = redis_client.pipeline

    def counting_pipeline(*args, **kwargs):
        pipe = real_pipeline(*args, **kwargs)
        execute = pipe.execute
        pipe.execute = lambda *a, **k: executed.append(len(pipe)) or execute(*a, **k)
        return pipe

    redis_client.pipeline = counting_pipeline
    try:
        copy = ImageFeatures("ns", "b", "eb", "b" * 64, original.phash ^ 0b11, False)
        twin = ImageFeatures("ns", "c", "ec", "c" * 64, original.phash ^ 0b101, False)
        first, second = store.index([copy, twin], [None, None])
    finally:
        del redis_client.pipeline
    assert len(executed) == 3
    assert (first.decision.verdict, first.decision.duplicate_of) == ("near_duplicate", "a")
    assert (second.decision.verdict, second.decision.duplicate_of) == ("near_duplicate", "a")
    assert second.seq == first.seq + 1  # committed in the order given, and each saw the other's entry
    assert {m["image_id"] for m in second.decision.matches} == {"a", "b"}


def test_a_batch_over_two_namespaces_commits_each_in_batch_order_and_a_replay_keeps_the_numbers(
        redis_client, make_settings):
    """One commit script per namespace numbers that namespace's images in the order they came in the
    batch, whatever the other namespace's images around them; committing again returns the same numbers."""
    store = IndexStore(redis_client, make_settings())
    images = [ImageFeatures(ns, f"{ns}-{i}", f"e-{ns}-{i}", f"{i:064x}", 0x1111 * (i + 1), False)
              for i, ns in enumerate(["shop1", "shop2", "shop2", "shop1", "shop2"])]
    seqs = [indexed.seq for indexed in store.index(images, [None] * 5)]
    assert seqs == [1, 1, 2, 2, 3]
    replay = store.index(images[::-1], store.records([(img.namespace, img.image_id) for img in images[::-1]]))
    assert [indexed.seq for indexed in replay] == seqs[::-1]


def test_copies_in_one_batch_get_their_own_namespaces_candidates_when_looked_up_together(redis_client, make_settings):
    """A batch's candidates are read once per namespace (one HMGET of every id its images found); each
    copy still gets its own candidates' numbers and canonicals, and the namespaces stay apart."""
    store = IndexStore(redis_client, make_settings(phash_radius=8))
    base = 0x0123456789ABCDEF
    store.index([ImageFeatures("a", "orig", "e-a", "0" * 64, base, False)], [None])
    store.index([ImageFeatures("b", "root", "e-root", "1" * 64, base, False)], [None])
    store.index([ImageFeatures("b", "orig", "e-b", "2" * 64, base, False)], [None])  # a copy of root
    copies = [ImageFeatures(ns, f"copy{i}", f"e-{ns}{i}", f"{ns}{i}".ljust(64, "f"), base ^ (1 << i), False)
              for ns in ("a", "b") for i in range(3)]
    results = store.index(copies, [None] * 6)
    assert [r.decision.duplicate_of for r in results] == ["orig"] * 3 + ["root"] * 3
    for result, copy in zip(results, copies):
        earlier = {c.image_id for c in copies if c.namespace == copy.namespace and c.image_id < copy.image_id}
        own = {"orig"} if copy.namespace == "a" else {"root", "orig"}
        assert {m["image_id"] for m in result.decision.matches} == own | earlier
