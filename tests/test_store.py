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
