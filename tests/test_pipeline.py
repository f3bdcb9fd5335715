"""The pipeline against a real Redis, hash tier only (no embedders): verdicts, replays, deletes,
namespaces, concurrency and dead letters. The Kafka worker is tested in test_worker_e2e.py."""

from __future__ import annotations

import functools
import threading
import uuid
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgdedup import messages
from imgdedup.evaluation import variants
from imgdedup.pipeline import Pipeline

#: Transforms pHash survives on every shared base at the default radius (measured: imgdedup eval).
BENIGN = ("jpeg_q50", "resize_50", "grayscale")


def event(image_id, data=None, *, ns="default", op="upsert", uri=None, event_id=None):
    return messages.make_event(image_id, event_id=event_id or str(uuid.uuid4()), namespace=ns, op=op,
                               data=data, uri=uri)


@pytest.fixture
def pipeline(make_settings):
    p = Pipeline(make_settings(), embedders=[])
    yield p
    p.close()


@pytest.fixture(scope="module")
def corpus_bytes(corpus_files) -> dict[str, bytes]:
    return {f.stem: f.read_bytes() for f in corpus_files}


def variant(data: bytes, name: str, seed: int = 0) -> bytes:
    return variants.apply(variants.BY_NAME[name], data, np.random.default_rng(seed))


def valid(doc: dict) -> dict:
    schema = messages.VERDICT if "verdict" in doc else messages.DEAD_LETTER
    assert messages.problems(schema, doc) == [], doc
    return doc


def test_corpus_is_unique_then_exact_duplicates(pipeline, corpus_bytes):
    first = pipeline.process_events([event(k, v) for k, v in corpus_bytes.items()])
    assert [valid(d)["verdict"] for d in first] == ["unique"] * len(corpus_bytes)
    again = pipeline.process_events([event(k + "-again", v) for k, v in corpus_bytes.items()])
    assert [(d["verdict"], d["duplicate_of"]) for d in again] == [("exact_duplicate", k) for k in corpus_bytes]
    assert all(valid(d)["matches"][0] == {"image_id": d["duplicate_of"], "signal": "sha256",
                                          "canonical": d["duplicate_of"]} for d in again)


def test_benign_variants_point_to_their_base(pipeline, corpus_bytes):
    pipeline.process_events([event(k, v) for k, v in corpus_bytes.items()])
    for name in BENIGN:
        out = pipeline.process_events([event(f"{k}__{name}", variant(v, name)) for k, v in corpus_bytes.items()])
        wrong = [(d["image_id"], d["duplicate_of"]) for d in out
                 if d["duplicate_of"] not in (None, d["image_id"].split("__")[0])]
        assert wrong == [], f"{name}: variants matched another base"
        found = [d for d in out if d["verdict"] == "near_duplicate"]
        assert len(found) >= len(corpus_bytes) - 1, f"{name}: only {len(found)} found"
        assert all(valid(d)["matches"][0]["signal"] == "phash" for d in found)


def test_redelivery_gives_the_same_verdict(pipeline, corpus_bytes):
    base, _copy = list(corpus_bytes)[:2]
    pipeline.process_events([event(base, corpus_bytes[base])])
    ev = event("copy", variant(corpus_bytes[base], "jpeg_q75"))
    first = pipeline.process_events([ev])[0]
    pipeline.process_events([event("later", corpus_bytes[base])])  # more state arrives meanwhile
    again = pipeline.process_events([ev, ev])
    keep = ("verdict", "duplicate_of", "matches", "sha256", "phash", "event_id")
    assert all({k: d[k] for k in keep} == {k: first[k] for k in keep} for d in again)
    assert first["verdict"] == "near_duplicate"


def test_delete_removes_every_trace(pipeline, corpus_bytes, redis_client, key_prefix):
    stem, data = next(iter(corpus_bytes.items()))
    pipeline.process_events([event(stem, data)])
    gone = pipeline.process_events([event(stem, op="delete")])[0]
    assert valid(gone)["verdict"] == "deleted"
    assert pipeline.process_events([event("reupload", data)])[0]["verdict"] == "unique"
    pipeline.process_events([event("reupload", op="delete")])
    leftover = [k for k in redis_client.scan_iter(f"{key_prefix}:*") if b":seq" not in k and b"namespaces" not in k]
    assert leftover == []
    assert pipeline.process_events([event("never-existed", op="delete")])[0]["verdict"] == "deleted"


def test_new_bytes_under_an_old_id_replace_the_old_image(pipeline, corpus_bytes):
    (_a, da), (_b, db) = list(corpus_bytes.items())[:2]
    pipeline.process_events([event("photo", da)])
    assert pipeline.process_events([event("photo", db)])[0]["verdict"] == "unique"
    assert pipeline.process_events([event("other", da)])[0]["verdict"] == "unique"  # old bytes are gone
    assert pipeline.process_events([event("third", db)])[0]["duplicate_of"] == "photo"


def test_namespaces_never_see_each_other(pipeline, corpus_bytes):
    items = list(corpus_bytes.items())[:10]
    first = pipeline.process_events([event(k, v, ns="tenant-a") for k, v in items])
    second = pipeline.process_events([event(k, v, ns="tenant-b") for k, v in items])
    assert {d["verdict"] for d in first + second} == {"unique"}
    assert {d["verdict"] for d in pipeline.process_events([event("x" + k, v, ns="tenant-b") for k, v in items])} \
        == {"exact_duplicate"}


def test_same_image_twice_in_one_batch(pipeline, corpus_bytes):
    _stem, data = next(iter(corpus_bytes.items()))
    out = pipeline.process_events([event("a", data), event("b", data), event("a", data)])
    assert [d["verdict"] for d in out] == ["unique", "exact_duplicate", "unique"]


def test_concurrent_near_duplicates_leave_exactly_one_unique(make_settings, corpus_bytes):
    """Two workers (two pipelines, two Redis connections) index near-duplicates at the same moment."""
    settings = make_settings()
    workers = [Pipeline(settings, embedders=[]) for _ in range(2)]
    pairs = [(k, v, variant(v, "jpeg_q75", seed=1)) for k, v in list(corpus_bytes.items())[:24]]
    # Keep the pairs that are duplicates when processed one after the other (a scratch namespace).
    sequential = [workers[0].process_events([event(k, v, ns="probe"), event(k + "-near", n, ns="probe")])[1]
                  for k, v, n in pairs]
    pairs = [p for p, d in zip(pairs, sequential) if d["verdict"] == "near_duplicate"]
    assert len(pairs) >= 20
    try:
        for k, original, near in pairs:
            barrier = threading.Barrier(2)
            results = {}

            def run(i, ident, data, barrier=barrier, results=results):
                barrier.wait()
                results[i] = workers[i].process_events([event(ident, data)])[0]

            threads = [threading.Thread(target=run, args=(0, k, original)),
                       threading.Thread(target=run, args=(1, k + "-near", near))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            verdicts = sorted(d["verdict"] for d in results.values())
            assert verdicts[1] == "unique" and verdicts[0] in ("exact_duplicate", "near_duplicate"), (k, verdicts)
            dup = next(d for d in results.values() if d["verdict"] != "unique")
            uniq = next(d for d in results.values() if d["verdict"] == "unique")
            assert dup["duplicate_of"] == uniq["image_id"]
    finally:
        for w in workers:
            w.close()


def test_bad_events_become_dead_letters(pipeline, corpus_bytes, tmp_path):
    outside = Path("/etc/hostname").resolve().as_uri()
    inside = tmp_path / "ok.jpg"
    inside.write_bytes(next(iter(corpus_bytes.values())))
    cases = {
        "not_an_image": event("garbage", b"definitely not an image"),
        "uri_not_allowed": event("outside", uri=outside),
        "fetch_failed": event("missing", uri=(tmp_path / "missing.jpg").as_uri()),
        "sha256_mismatch": {**event("lying", inside.read_bytes()),
                            "image": {"uri": inside.as_uri(), "sha256": "0" * 64}},
    }
    good = event("good", uri=inside.as_uri())
    out = pipeline.process_events([cases["not_an_image"], good, *list(cases.values())[1:]])
    assert valid(out[1])["verdict"] == "unique"
    codes = [valid(d)["error"]["code"] for d in [out[0], *out[2:]]]
    assert codes == list(cases)
    raw = pipeline.process([__import__("imgdedup.pipeline", fromlist=["InputRecord"]).InputRecord(b"{oops")])[0]
    assert raw.kind == "dead_letter" and raw.message["error"]["code"] == "invalid_json"


def test_every_timestamp_the_schema_admits_gets_a_verdict(pipeline, corpus_bytes):
    """Lower-case t/z and a leap second are valid RFC 3339; Python's fromisoformat raised on them,
    out of the batch and out of the worker."""
    data = next(iter(corpus_bytes.values()))
    docs = [{**event(f"stamp-{i}", data), "occurred_at": stamp}
            for i, stamp in enumerate(["2026-11-22t10:15:00z", "2016-12-31T23:59:60Z"])]
    out = pipeline.process_events(docs)
    assert [valid(d)["verdict"] for d in out] == ["unique", "exact_duplicate"]


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_http_file_and_inline_sources_share_one_batch(make_settings, corpus_bytes, tmp_path):
    """http(s) images wait on the fetch pool and then decode on the decode pool; the others go
    straight to the decode pool. Either way each event gets its own verdict, in order."""
    names = list(corpus_bytes)[:6]
    for name in names:
        (tmp_path / f"{name}.jpg").write_bytes(corpus_bytes[name])
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(tmp_path)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    p = Pipeline(make_settings(http_allow_hosts=["127.0.0.1"], fetch_threads=3, decode_threads=1), embedders=[])
    try:
        sources = [event(n, uri=f"{base}/{n}.jpg") if i % 3 == 0 else
                   event(n, uri=(tmp_path / f"{n}.jpg").as_uri()) if i % 3 == 1 else event(n, corpus_bytes[n])
                   for i, n in enumerate(names)]
        out = p.process_events([*sources, event("gone", uri=f"{base}/gone.jpg")])
        again = p.process_events([event(n + "-http", uri=f"{base}/{n}.jpg") for n in names])
    finally:
        p.close()
        httpd.shutdown()
    assert [(valid(d)["image_id"], d["verdict"]) for d in out[:-1]] == [(n, "unique") for n in names]
    assert valid(out[-1])["error"]["code"] == "fetch_failed" and "404" in out[-1]["error"]["message"]
    assert [(d["verdict"], d["duplicate_of"]) for d in again] == [("exact_duplicate", n) for n in names]


def test_low_detail_images_skip_phash_but_keep_exact_matching(pipeline, tmp_path):
    import io

    def png(color, noise_seed):
        arr = np.full((256, 256, 3), color, np.uint8)
        arr += np.random.default_rng(noise_seed).integers(0, 2, arr.shape, dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG")
        return buf.getvalue()

    out = pipeline.process_events([event("grey-1", png(128, 1)), event("grey-2", png(128, 2)),
                                   event("grey-1-copy", png(128, 1))])
    assert all(d["low_detail"] for d in out)
    assert [d["verdict"] for d in out] == ["unique", "unique", "exact_duplicate"]


def test_an_event_that_breaks_the_store_is_isolated(pipeline, corpus_bytes, redis_client, key_prefix):
    """A key of the wrong type (as a bug or a foreign writer would leave it) fails one event, not the batch."""
    from imgdedup.keys import Keys

    (_a, da), (_b, db) = list(corpus_bytes.items())[:2]
    redis_client.set(Keys(key_prefix).record("default", "poisoned"), "not a hash")
    out = pipeline.process_events([event("fine", da), event("poisoned", db)])
    assert out[0]["verdict"] == "unique"
    assert out[1]["error"]["code"] == "internal_error" and "WRONGTYPE" in out[1]["error"]["message"]
