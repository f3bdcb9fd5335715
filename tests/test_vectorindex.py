"""Both vector index backends against the same contract, checked with NumPy's exact cosine as the oracle.

Every test runs once per backend on the session Redis (Vector Sets built in, RediSearch loaded);
each test has its own key prefix, so nothing leaks between them.
"""

from __future__ import annotations

import numpy as np
import pytest
import redis

from imgdedup import devstack
from imgdedup.keys import Keys
from imgdedup.vectorindex import build_vector_index
from imgdedup.vectorindex.vectorsets import CREATION_FLAGS, VectorSetIndex, score_to_cosine, shard_of

DIM = 512
#: Q8 stores int8 components; measured cosine error at 512-d is ~0.002, allow a margin.
SCORE_TOLERANCE = 0.01


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def near(rng: np.random.Generator, x: np.ndarray, noise: float) -> np.ndarray:
    """Each row moved a little (cosine ~0.83 to the original at noise 0.03 and 512-d), still unit length."""
    return _normalise(x + noise * rng.standard_normal(x.shape))


def _normalise(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ids(n: int, tag: str = "img") -> list[str]:
    return [f"{tag}-{i}" for i in range(n)]


@pytest.fixture(params=["vectorset", "redisearch"])
def backend(request, make_settings):
    return request.param


@pytest.fixture
def settings(backend, make_settings):
    return make_settings(vector_backend=backend, vector_shards=4)


@pytest.fixture
def index(settings, redis_client):
    return build_vector_index(redis_client, Keys(settings.key_prefix), settings)


def test_backend_matches_setting(index, backend):
    assert type(index).__name__ == {"vectorset": "VectorSetIndex", "redisearch": "RediSearchIndex"}[backend]


def test_largest_shard_of_a_single_graph_backend_is_its_count(make_settings, redis_client):
    settings = make_settings(vector_backend="redisearch")
    index = build_vector_index(redis_client, Keys(settings.key_prefix), settings)
    index.add("ns", "sscd", list(zip(ids(7), unit(np.random.default_rng(4), 7))))
    assert index.largest_shards([("ns", "sscd"), ("empty", "sscd")]) == [7, 0] == [index.count("ns", "sscd"), 0]


def test_queries_use_the_configured_exploration_factor(backend, make_settings, redis_client):
    settings = make_settings(vector_backend=backend, vector_query_ef=321)
    index = build_vector_index(redis_client, Keys(settings.key_prefix), settings)
    sent = []

    class Recorder:  # stands in for the pipeline: keeps the commands instead of sending them
        def execute_command(self, *args):
            sent.append(args)

    index.queue_query(Recorder(), "ns", "sscd", unit(np.random.default_rng(3), 1), k=5)
    (command,) = sent
    if backend == "vectorset":
        assert command[command.index("EF") + 1] == 321
    else:
        assert "EF_RUNTIME 321 " in command[2]


def test_exact_top_k_and_scores_match_numpy(index):
    rng = np.random.default_rng(1)
    stored, queries = unit(rng, 300), unit(rng, 20)
    names = ids(300)
    index.add("ns", "sscd", list(zip(names, stored)))
    truth = queries @ stored.T
    results = index.query("ns", "sscd", queries, k=10)
    assert len(results) == len(queries)
    for q, hits in enumerate(results):
        # Q8 may swap members whose true cosines differ by less than its error; never more.
        kth_best = np.sort(truth[q])[-10]
        assert len({image_id for image_id, _ in hits}) == 10
        assert all(truth[q, names.index(image_id)] >= kth_best - SCORE_TOLERANCE for image_id, _ in hits)
        assert hits[0][0] == names[int(np.argmax(truth[q]))] or truth[q].max() - hits[0][1] < SCORE_TOLERANCE
        scores = [score for _, score in hits]
        assert scores == sorted(scores, reverse=True)
        for image_id, score in hits:
            assert score == pytest.approx(truth[q, names.index(image_id)], abs=SCORE_TOLERANCE)


def test_recall_at_one_on_thousands_of_vectors(index):
    rng = np.random.default_rng(2)
    stored = unit(rng, 3000)
    names = ids(3000)
    index.add("ns", "sscd", list(zip(names, stored)))
    picked = rng.choice(3000, size=300, replace=False)
    queries = np.concatenate([stored[picked[:100]], near(rng, stored[picked[100:]], 0.03)])
    results = index.query("ns", "sscd", queries, k=10)
    truth = queries @ stored.T
    assert [hits[0][0] for hits in results] == [names[i] for i in picked]
    exact_self = [hits[0][1] for hits in results[:100]]
    assert min(exact_self) > 1 - SCORE_TOLERANCE
    found = [len({h for h, _ in hits} & {names[i] for i in np.argsort(-truth[q])[:10]})
             for q, hits in enumerate(results)]
    assert np.mean(found) / 10 >= 0.9  # approximate search: nearly all of the true top 10


def test_scores_are_cosine_across_the_whole_range(index):
    """Vectors at known angles to the query, including negative cosines (VSIM's raw score is (1 + cos) / 2)."""
    rng = np.random.default_rng(3)
    q, other = unit(rng, 2)
    other = _normalise((other - (other @ q) * q)[None, :])[0]  # orthogonal to q
    targets = [1.0, 0.9, 0.5, 0.0, -0.5, -0.9]
    vectors = [np.float32(c) * q + np.float32(np.sqrt(1 - c * c)) * other for c in targets]
    names = [f"cos{c}" for c in targets]
    index.add("ns", "sscd", list(zip(names, vectors)))
    hits = index.query("ns", "sscd", q, k=len(targets))[0]
    assert [h for h, _ in hits] == names
    for (_, score), cos in zip(hits, targets):
        assert score == pytest.approx(cos, abs=SCORE_TOLERANCE)


def test_remove_deletes_exactly_the_given_entries(index):
    rng = np.random.default_rng(4)
    stored = unit(rng, 60)
    names = ids(60)
    locators = index.add("ns", "sscd", list(zip(names, stored)))
    assert len(locators) == 60
    gone = list(zip(names[:20], locators[:20]))
    index.remove("ns", "sscd", gone)
    assert index.count("ns", "sscd") == 40
    results = index.query("ns", "sscd", stored, k=5)
    returned = {h for hits in results for h, _ in hits}
    assert returned.isdisjoint(names[:20])
    assert [hits[0][0] for hits in results[20:]] == names[20:]
    index.remove("ns", "sscd", gone)  # removing again is harmless
    assert index.count("ns", "sscd") == 40


def test_remove_rejects_a_locator_of_another_embedder(index):
    rng = np.random.default_rng(5)
    locator = index.add("ns", "sscd", [("a", unit(rng, 1)[0])])[0]
    with pytest.raises(ValueError, match="locator"):
        index.remove("ns", "clip", [("a", locator)])


def test_namespaces_and_embedders_are_isolated(index):
    rng = np.random.default_rng(6)
    a, b, c = unit(rng, 30), unit(rng, 30), unit(rng, 30)
    index.add("tenant-a", "sscd", list(zip(ids(30, "a"), a)))
    index.add("tenant-b", "sscd", list(zip(ids(30, "b"), b)))
    index.add("tenant-a", "clip", list(zip(ids(30, "c"), c)))
    assert index.count("tenant-a", "sscd") == index.count("tenant-b", "sscd") == index.count("tenant-a", "clip") == 30
    assert index.count("tenant-c", "sscd") == 0
    for ns, embedder, tag, vectors in [("tenant-a", "sscd", "a", b), ("tenant-b", "sscd", "b", a),
                                       ("tenant-a", "clip", "c", a)]:
        returned = {h for hits in index.query(ns, embedder, vectors, k=30) for h, _ in hits}
        assert returned and all(h.startswith(tag + "-") for h in returned)
    assert index.query("tenant-c", "sscd", a[:2], k=3) == [[], []]


def test_re_adding_an_id_replaces_its_vector(index):
    rng = np.random.default_rng(7)
    first, second = unit(rng, 40), unit(rng, 40)
    names = ids(40)
    assert index.add("ns", "sscd", list(zip(names, first))) == index.add("ns", "sscd", list(zip(names, first)))
    assert index.count("ns", "sscd") == 40
    index.add("ns", "sscd", [(names[0], second[0])])
    assert index.count("ns", "sscd") == 40
    hits = index.query("ns", "sscd", second[0], k=1)[0]
    assert hits[0][0] == names[0] and hits[0][1] > 1 - SCORE_TOLERANCE
    assert index.query("ns", "sscd", first[0], k=1)[0][0][0] != names[0]


def test_empty_inputs(index):
    assert index.add("ns", "sscd", []) == []
    assert index.query("ns", "sscd", np.empty((0, DIM), np.float32), k=3) == []
    assert index.query("ns", "sscd", unit(np.random.default_rng(8), 2), k=3) == [[], []]
    assert index.count("ns", "sscd") == 0
    index.remove("ns", "sscd", [])


# --- Vector Sets specifics ------------------------------------------------------------------------------------


def test_shard_is_a_stable_hash_of_the_id():
    assert shard_of("img-1", 4) == 2803911311 % 4  # CRC-32, the same in every process (unlike hash())
    spread = {shard_of(f"img-{i}", 8) for i in range(200)}
    assert spread == set(range(8))


def test_score_conversion():
    assert score_to_cosine(1.0) == 1.0
    assert score_to_cosine(0.5) == 0.0
    assert score_to_cosine(0.0) == -1.0


def test_vector_sets_spread_over_every_shard_and_queries_merge(make_settings, redis_client):
    settings = make_settings(vector_backend="vectorset", vector_shards=4)
    keys = Keys(settings.key_prefix)
    index = build_vector_index(redis_client, keys, settings)
    rng = np.random.default_rng(9)
    base = unit(rng, 1)
    stored = near(rng, np.repeat(base, 40, axis=0), 0.02)  # 40 vectors around one point
    names = ids(40)
    locators = index.add("ns", "sscd", list(zip(names, stored)))
    assert locators == [f"sscd/{shard_of(n, 4)}" for n in names]
    per_shard = [redis_client.execute_command("VCARD", keys.vectorset("ns", "sscd", s)) for s in range(4)]
    assert all(n > 0 for n in per_shard) and sum(per_shard) == 40
    hits = index.query("ns", "sscd", base, k=40)[0]
    assert {h for h, _ in hits} == set(names)  # the merged answer holds every shard's members
    assert len({shard_of(h, 4) for h, _ in hits[:12]}) > 1
    assert index.count("ns", "sscd") == 40
    assert index.largest_shards([("ns", "sscd"), ("empty", "sscd")]) == [max(per_shard), 0] and max(per_shard) < 40


def test_vector_sets_are_created_with_the_fixed_flags(make_settings, redis_client):
    settings = make_settings(vector_backend="vectorset", vector_shards=1)
    keys = Keys(settings.key_prefix)
    VectorSetIndex(redis_client, keys, 1).add("ns", "sscd", [("a", unit(np.random.default_rng(10), 1)[0])])
    info = redis_client.execute_command("VINFO", keys.vectorset("ns", "sscd", 0))
    info = {k.decode(): v for k, v in (info.items() if isinstance(info, dict) else zip(info[::2], info[1::2]))}
    assert CREATION_FLAGS[0] == "Q8" and info["quant-type"] in (b"int8", "int8")
    assert int(info["hnsw-m"]) == CREATION_FLAGS[CREATION_FLAGS.index("M") + 1]


def test_a_redis_with_an_append_only_file_restarts_with_every_vector(backend, make_settings, tmp_path):
    """Production Redis persists with an append-only file, which replays the commands as they were
    sent. Redis 8.2 cannot replay a VADD sent with CAS (its loader asserts that no command blocks, and
    CAS does): it aborted on start-up, so this test failed while the index sent CAS."""
    port = devstack.free_port()
    server = devstack.start_redis(port, tmp_path / "aof", persist=True,
                                  modules=(devstack.redisearch_module(),) if backend == "redisearch" else ())
    settings = make_settings(vector_backend=backend, vector_shards=2, redis_url=server.address)
    vectors = unit(np.random.default_rng(12), 40)
    try:
        index = build_vector_index(redis.Redis.from_url(server.address), Keys(settings.key_prefix), settings)
        index.add("ns", "sscd", list(zip(ids(40), vectors)))
    finally:
        server.stop()
    server = devstack.start_redis(port, tmp_path / "aof", persist=True,
                                  modules=(devstack.redisearch_module(),) if backend == "redisearch" else ())
    try:
        index = build_vector_index(redis.Redis.from_url(server.address), Keys(settings.key_prefix), settings)
        assert index.count("ns", "sscd") == 40
        assert [n[0][0] for n in index.query("ns", "sscd", vectors[:5], 1)] == ids(40)[:5]
    finally:
        server.stop()


# --- real embeddings --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def corpus_embeddings(corpus_files):
    """SSCD vectors of 20 corpus photos and of a JPEG-q50 copy of each (real, clustered vectors)."""
    from PIL import Image

    from imgdedup.bench.vector_bench import make_variants
    from imgdedup.embedders.sscd import SSCDEmbedder

    embedder = SSCDEmbedder()
    images = [Image.open(path).convert("RGB") for path in corpus_files[:20]]
    copies = [make_variants(image, seed=i)["jpeg50"] for i, image in enumerate(images)]
    return embedder.embed(images), embedder.embed(copies)


@pytest.mark.sscd
def test_scores_match_numpy_on_sscd_embeddings(index, corpus_embeddings):
    originals, copies = corpus_embeddings
    names = ids(len(originals), "photo")
    index.add("ns", "sscd", list(zip(names, originals)))
    truth = copies @ originals.T
    for q, hits in enumerate(index.query("ns", "sscd", copies, k=5)):
        assert hits[0][0] == names[q]
        for image_id, score in hits:
            assert score == pytest.approx(truth[q, names.index(image_id)], abs=SCORE_TOLERANCE)
