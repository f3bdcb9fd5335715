"""The index store: image records, the exact (SHA-256) index, and the order in which the pHash and
vector indexes are written, committed, queried and decided.

Why write -> commit -> query -> decide. Each image is first written to every index, then *committed*:
one atomic script gives it the next per-namespace sequence number and records it in the namespace's
order hash. Queries only count candidates that are committed with a lower sequence number. For two
near-duplicates X and Y processed at once, say X commits first: Y's query runs after Y's commit, so
after X's commit, so after X's writes -- Y sees X with a lower sequence and is its duplicate; X may or
may not see Y, but Y's sequence is higher, so X stays unique. Exactly one of them is unique. Had the
sequence been taken before the writes, X (lower number, slow writes) and Y (quick) could both miss each
other. A redelivered event commits to the same sequence number (the script returns the existing one),
so a replay decides the same way; its stored decision is returned without even fetching the image.
On a standalone Redis the writes and the commit share one pipeline: one connection's commands run in
order, so the commit still follows the writes (see ``_write_and_commit``).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import redis

from imgdedup import metrics, roundtrip
from imgdedup.config import Settings
from imgdedup.hashindex import PHashIndex
from imgdedup.keys import Keys
from imgdedup.lua import queue_eval
from imgdedup.policy import Candidate, Decision, Evidence, decide
from imgdedup.roundtrip import Finish, Parts, RoundTrip

# KEYS[1] = the namespace's sequence counter, KEYS[2] = its order hash; both carry the {ns} hash tag,
# so this touches one cluster slot. ARGV = image ids, committed in this order. Returns each image's
# sequence number, giving one only once (an entry reads "<seq>" or, once decided, "<seq> <canonical>").
_COMMIT_LUA = """
local out = {}
for i, image_id in ipairs(ARGV) do
  local entry = redis.call('HGET', KEYS[2], image_id)
  if entry then out[i] = tonumber(string.match(entry, '^%d+'))
  else
    out[i] = redis.call('INCR', KEYS[1])
    redis.call('HSET', KEYS[2], image_id, out[i])
  end
end
return out
"""


@dataclass
class ImageFeatures:
    """What the store needs to index one image (built by the pipeline from the event and its features)."""

    namespace: str
    image_id: str
    event_id: str
    sha256: str
    phash: int
    low_detail: bool
    vectors: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class Indexed:
    seq: int
    decision: Decision


class IndexStore:
    def __init__(self, client: redis.Redis, settings: Settings, vector_index=None):
        self.client = client
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.phash = PHashIndex(client, self.keys, settings.mih_tables, settings.mih_bucket_cap_bytes)
        self.vectors = vector_index
        self._thresholds = {"sscd": settings.sscd_threshold, "clip": settings.clip_threshold}
        self._standalone = roundtrip.is_standalone(client)

    # --- reading -------------------------------------------------------------------------------
    def records(self, items: list[tuple[str, str]]) -> list[dict[str, str] | None]:
        """The stored record of each (namespace, image_id), or None; one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for ns, image_id in items:
            pipe.hgetall(self.keys.record(ns, image_id))
        return [{k.decode(): v.decode() for k, v in rec.items()} or None for rec in pipe.execute()]

    @staticmethod
    def stored_decision(record: dict[str, str] | None, event_id: str) -> Decision | None:
        """The decision already made for this very event (a redelivery), if any."""
        if not record or record.get("event_id") != event_id or not record.get("decision"):
            return None
        stored = json.loads(record["decision"])
        return Decision(stored["verdict"], stored.get("duplicate_of"), stored.get("matches", []))

    # --- indexing ------------------------------------------------------------------------------
    def index(self, images: list[ImageFeatures], prior: list[dict[str, str] | None]) -> list[Indexed]:
        """Write, commit, query and decide a batch of images (no image_id twice in one call)."""
        replaced = [(img.namespace, img.image_id, rec) for img, rec in zip(images, prior)
                    if rec and rec.get("sha256") != img.sha256]
        if replaced:  # a new picture under an old id is a new image: drop every trace of the old one
            self._remove(replaced)
        with metrics.STAGE_SECONDS.labels("index_write").time():
            seqs, candidates = self._write_and_commit(images)
        with metrics.STAGE_SECONDS.labels("index_query").time():
            if candidates is None:
                candidates = self._query(images)
            self._resolve(images, candidates)
        out = []
        for img, seq, cands in zip(images, seqs, candidates):
            decision = decide(seq, list(cands.values()), clip_is_duplicate_signal=self.settings.clip_is_duplicate_signal,
                              max_matches=self.settings.max_matches)
            out.append(Indexed(seq, decision))
        self._save_decisions(images, out)
        return out

    def _write_and_commit(self, images: list[ImageFeatures]) -> tuple[list[int], list[dict[str, Candidate]] | None]:
        """Write the record and every index, then commit; returns the sequence numbers, and on a
        standalone Redis each image's candidates too (None on a cluster: query afterwards).

        The record names every bucket and vector entry before they are written, so a crash between
        the two leaves nothing a delete cannot find (cutting an entry that is not there is a no-op).
        On a standalone Redis one connection runs a pipeline in order, so the commit and then the
        queries share the round trip of the writes (the queries still see every write and commit
        before them, as the concurrency rule needs); a cluster spreads the writes over nodes, so the
        commit waits for their replies, and the queries for the commit.
        """
        trip = RoundTrip(self.client)
        trip.add(self._queue_records, images)
        for ns, idx in _by_namespace(images).items():
            hashed = [i for i in idx if not images[i].low_detail]
            trip.add(self.phash.queue_add, ns, [(images[i].image_id, images[i].phash) for i in hashed])
            for name in self._embedders(images, idx):
                trip.add(self.vectors.queue_add, ns, name,
                         [(images[i].image_id, images[i].vectors[name]) for i in idx if name in images[i].vectors])
        if self._standalone:
            commit = trip.add(self._queue_commit, images)
            query = trip.add(self._queue_queries, images)
            results = trip.execute()
            return results[commit], results[query]
        trip.execute()
        return roundtrip.run(self.client, self._queue_commit, images), None

    def _queue_records(self, pipe, images: list[ImageFeatures]) -> Finish:
        now = str(int(time.time()))
        buckets = self.phash.substrings([img.phash for img in images])
        for img, substrings in zip(images, buckets):
            key = self.keys.record(img.namespace, img.image_id)
            pipe.hset(key, mapping={"event_id": img.event_id, "sha256": img.sha256, "phash": f"{img.phash:016x}",
                                    "low_detail": int(img.low_detail), **self._locations(img, substrings)})
            pipe.hsetnx(key, "indexed_at", now)
            pipe.sadd(self.keys.sha(img.namespace, img.sha256), img.image_id)
        for ns in {img.namespace for img in images}:
            pipe.sadd(self.keys.namespaces(), ns)
        return lambda replies: None

    def _locations(self, img: ImageFeatures, substrings: list[str]) -> dict[str, str]:
        """The record's ``mih`` and ``vectors`` fields: where the image's index entries go."""
        mih = "" if img.low_detail else ",".join(substrings)
        vectors = "" if self.vectors is None else ",".join(self.vectors.locator(name, img.image_id)
                                                           for name in sorted(img.vectors))
        return {"mih": mih, "vectors": vectors}

    def _queue_commit(self, pipe, images: list[ImageFeatures]) -> Finish:
        """One script run per namespace in the batch (it was one per image: a command each for Redis
        and the client)."""
        groups = _by_namespace(images)
        for ns, idx in groups.items():
            queue_eval(pipe, _COMMIT_LUA, [self.keys.seq(ns), self.keys.order(ns)], [images[i].image_id for i in idx])

        def finish(replies: list) -> list[int]:
            seqs = [0] * len(images)
            for idx, committed in zip(groups.values(), replies):
                for i, seq in zip(idx, committed):
                    seqs[i] = int(seq)
            return seqs

        return finish

    def _query(self, images: list[ImageFeatures]) -> list[dict[str, Candidate]]:
        """SHA-256, pHash and vector lookups of the whole batch in one round trip."""
        return roundtrip.run(self.client, self._queue_queries, images)

    def _queue_queries(self, pipe, images: list[ImageFeatures]) -> Finish:
        """Queue the SHA-256, pHash and vector lookups of the whole batch; the finish gives each image's
        candidates other than itself."""
        parts = Parts(pipe)
        sha = parts.add(self._queue_sha_lookups, images)
        phash_parts, vector_parts = [], []
        for ns, idx in _by_namespace(images).items():
            hashed = [i for i in idx if not images[i].low_detail]
            queries = [(images[i].phash, self.settings.phash_radius) for i in hashed]
            phash_parts.append((hashed, parts.add(self.phash.queue_query, ns, queries)))
            for name in self._embedders(images, idx):
                have = [i for i in idx if name in images[i].vectors]
                matrix = np.stack([images[i].vectors[name] for i in have])
                part = parts.add(self.vectors.queue_query, ns, name, matrix, self.settings.vector_candidates + 1)
                vector_parts.append((name, have, part))
        sent = time.perf_counter()  # queued last: the caller sends its pipeline now

        def finish(replies: list) -> list[dict[str, Candidate]]:
            for name in {name for name, _, _ in vector_parts}:
                metrics.VECTOR_QUERY_SECONDS.labels(name).observe(time.perf_counter() - sent)
            return self._candidates(images, parts.results(replies), sha, phash_parts, vector_parts)

        return finish

    def _candidates(self, images: list[ImageFeatures], results: list, sha: int, phash_parts: list,
                    vector_parts: list) -> list[dict[str, Candidate]]:
        """Each image's candidates (itself excluded) with their evidence, from the queries' results."""
        found: list[dict[str, Candidate]] = [{} for _ in images]

        def add(i: int, evidence: Evidence) -> None:
            if evidence.image_id != images[i].image_id:
                found[i].setdefault(evidence.image_id, Candidate(evidence.image_id, None, None)).evidence.append(evidence)

        for i, members in enumerate(results[sha]):
            for member in sorted(members):
                add(i, Evidence(member.decode(), "sha256"))
        for hashed, part in phash_parts:
            for i, result in zip(hashed, results[part]):
                for image_id, distance in result.matches:
                    add(i, Evidence(image_id, "phash", distance=int(distance)))
        for name, have, part in vector_parts:
            for i, neighbours in zip(have, results[part]):
                for image_id, similarity in neighbours:
                    if similarity >= self._thresholds.get(name, 1.0):
                        add(i, Evidence(image_id, name, similarity=float(similarity)))
        return found

    def _queue_sha_lookups(self, pipe, images: list[ImageFeatures]) -> Finish:
        for img in images:
            pipe.smembers(self.keys.sha(img.namespace, img.sha256))
        return lambda replies: replies

    def _resolve(self, images: list[ImageFeatures], candidates: list[dict[str, Candidate]]) -> None:
        """Fill in each candidate's sequence number (None if uncommitted) and canonical original (None
        if undecided or unique: itself): both live in the namespace's order hash, so one HMGET per
        namespace of the batch, of every image id some image of it found.
        (Reading each candidate's record instead cost one command per candidate, ~10 per image when a
        catalog holds many copies: the largest part of the worker's main-thread CPU. One HMGET per image
        asked again for the ids that the batch's copies of one photo share.)"""
        wanted: dict[str, dict[str, None]] = defaultdict(dict)  # namespace -> image ids, in first-seen order
        for img, cands in zip(images, candidates):
            wanted[img.namespace].update(dict.fromkeys(cands))
        wanted = {ns: ids for ns, ids in wanted.items() if ids}
        if not wanted:
            return
        pipe = self.client.pipeline(transaction=False)
        for ns, ids in wanted.items():
            pipe.hmget(self.keys.order(ns), list(ids))
        replies = pipe.execute()
        entries = {ns: dict(zip(ids, map(_order_entry, found))) for (ns, ids), found in zip(wanted.items(), replies)}
        for img, cands in zip(images, candidates):
            for image_id, cand in cands.items():
                cand.seq, cand.canonical = entries[img.namespace][image_id]

    def _save_decisions(self, images: list[ImageFeatures], results: list[Indexed]) -> None:
        """Each record's decision, and in the order hash the canonical original of each duplicate (a
        unique image is its own canonical: its entry stays "<seq>", bytes per image), one HSET per
        namespace for those."""
        pipe = self.client.pipeline(transaction=False)
        canonicals: dict[str, dict[str, str]] = defaultdict(dict)
        for img, res in zip(images, results):
            d = res.decision
            pipe.hset(self.keys.record(img.namespace, img.image_id), "decision", _compact_decision(d))
            if d.duplicate_of:
                canonicals[img.namespace][img.image_id] = f"{res.seq} {d.duplicate_of}"
        for ns, entries in canonicals.items():
            pipe.hset(self.keys.order(ns), mapping=entries)
        pipe.execute()

    def _embedders(self, images: list[ImageFeatures], idx: list[int]) -> list[str]:
        if self.vectors is None:
            return []
        return sorted({name for i in idx for name in images[i].vectors})

    # --- deleting ------------------------------------------------------------------------------
    def delete(self, items: list[tuple[str, str]]) -> list[bool]:
        """Remove each (namespace, image_id) from every index; returns whether it existed."""
        records = self.records(items)
        self._remove([(ns, image_id, rec) for (ns, image_id), rec in zip(items, records) if rec])
        return [rec is not None for rec in records]

    def _remove(self, items: list[tuple[str, str, dict[str, str]]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for ns, image_id, rec in items:
            pipe.srem(self.keys.sha(ns, rec["sha256"]), image_id)
            pipe.hdel(self.keys.order(ns), image_id)
            pipe.delete(self.keys.record(ns, image_id))
        pipe.execute()
        by_ns: dict[str, list] = defaultdict(list)
        for ns, image_id, rec in items:
            by_ns[ns].append((image_id, rec))
        for ns, recs in by_ns.items():
            mih = [(image_id, int(rec["phash"], 16), rec["mih"].split(","))
                   for image_id, rec in recs if rec.get("mih")]
            if mih:
                self.phash.remove(ns, mih)
            per_embedder: dict[str, list] = defaultdict(list)
            for image_id, rec in recs:
                for loc in filter(None, rec.get("vectors", "").split(",")):
                    per_embedder[loc.split("/")[0]].append((image_id, loc))
            for name, entries in per_embedder.items():
                if self.vectors is not None:
                    self.vectors.remove(ns, name, entries)

    # --- sizes, for metrics --------------------------------------------------------------------
    def memory(self) -> tuple[int, int]:
        """(used_memory, maxmemory) in bytes, summed over a cluster's primaries (its client sends a plain
        INFO to one node only); maxmemory 0 means no limit somewhere."""
        if self._standalone:
            nodes = [self.client.info("memory")]
        else:
            nodes = list(self.client.info("memory", target_nodes=redis.RedisCluster.PRIMARIES).values())
        limits = [int(node.get("maxmemory", 0)) for node in nodes]
        return sum(int(node.get("used_memory", 0)) for node in nodes), 0 if 0 in limits else sum(limits)

    def namespace_sizes(self) -> dict[str, int]:
        names = sorted(m.decode() for m in self.client.smembers(self.keys.namespaces()))
        pipe = self.client.pipeline(transaction=False)
        for ns in names:
            pipe.hlen(self.keys.order(ns))
        return dict(zip(names, pipe.execute()))


def _order_entry(entry: bytes | None) -> tuple[int | None, str | None]:
    """(sequence, canonical) of an order-hash entry: ``b"<seq>"`` or ``b"<seq> <canonical>"``."""
    if entry is None:
        return None, None
    seq, _, canonical = entry.decode().partition(" ")
    return int(seq), canonical or None


def _compact_decision(d: Decision) -> str:
    """The decision as stored for replays: JSON without the empty parts (most images are unique with
    no matches, and every byte of a record is paid once per image)."""
    stored = {"verdict": d.verdict, "duplicate_of": d.duplicate_of, "matches": d.matches}
    return json.dumps({k: v for k, v in stored.items() if v}, separators=(",", ":"))


def _by_namespace(images: list[ImageFeatures]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, img in enumerate(images):
        groups[img.namespace].append(i)
    return groups
