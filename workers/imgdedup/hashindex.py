"""pHash Hamming-radius index in Redis: multi-index hash tables whose buckets are Redis strings.

Each 64-bit pHash is cut into ``tables`` substrings (:mod:`imgdedup.mih`); table ``t`` keeps one bucket
per substring value at ``keys.mih_bucket(ns, t, hex)``. A bucket is a string of entries, each
``<16 hex digits of the pHash><image id>\n`` (``%`` and newline in ids escaped), so a query verifies
candidates by popcount without a second round trip.

Why strings and not SETs: at 1M hashes a radius-8 query reads 188 buckets holding ~2,900 entries.
SUNION of 188 sets cost Redis ~750 us per query (it builds a de-duplicated set), pipelined SMEMBERS
~320 us plus a reply per bucket for the client to parse; an MGET of 188 strings is a lookup and a copy
per key, and the client finds the entries of all buckets with NumPy on one joined buffer. Writes and
deletes are one single-key script per bucket (atomic check for presence and the cap).

Cluster-safe: every script and read names exactly one key. With ``redis.RedisCluster`` reads go through
non-transactional pipelines of GETs, which the cluster client routes and groups per node. With a plain
``redis.Redis`` (``direct_reads``) a query's bucket reads are one MGET, written in RESP from the NumPy
array of its keys: straight to a pooled connection (:meth:`PHashIndex.query`), or queued on a pipeline
as a :class:`~imgdedup.roundtrip.Packed` command when the client takes those (the worker's does).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import redis

from imgdedup import metrics, roundtrip
from imgdedup.keys import Keys
from imgdedup.lua import queue_eval
from imgdedup.mih import format_substring, mask_count, probe_count, probe_masks, split, table_radii, width_of
from imgdedup.roundtrip import Finish, Packed, is_standalone, sends_packed

_MAX_PHASH = (1 << 64) - 1
_SENTINEL = "\x00substring\x00"
_NEWLINE = ord("\n")
_FULL = -1
_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)

# KEYS = buckets, ARGV[1] = the cap in bytes, ARGV[1 + i] = the entry (ends with a newline) for KEYS[i].
# Returns per bucket 1 if appended, 0 if it was there already, -1 if it would take the bucket over the
# cap. The cap is in bytes because a string's length is known at once while counting entries means
# scanning it on every add; bytes are also what a query pays for. SET of the whole value rather than
# APPEND, which would over-allocate the string for growth (up to twice its size). A standalone Redis
# gets a whole batch's buckets in one run (see PHashIndex.queue_add); a cluster one bucket per run.
_APPEND_LUA = """
local cap, out = tonumber(ARGV[1]), {}
for i, key in ipairs(KEYS) do
  local blob, entry = redis.call('GET', key) or '', ARGV[i + 1]
  if string.sub(blob, 1, #entry) == entry or string.find(blob, '\\n' .. entry, 1, true) then out[i] = 0
  elseif #blob + #entry > cap then out[i] = -1
  else redis.call('SET', key, blob .. entry); out[i] = 1 end
end
return out
"""

#: Buckets per append script on a standalone Redis: one run blocks the server, so a huge batch is cut.
APPEND_BUCKETS_PER_RUN = 512

# KEYS[1] = a bucket, ARGV[1] = the entry. Removes it; deletes the bucket when it empties. Returns 1 if found.
_CUT_LUA = """
local blob = redis.call('GET', KEYS[1])
if not blob then return 0 end
local entry, at = ARGV[1], nil
if string.sub(blob, 1, #entry) == entry then at = 1
else
  local found = string.find(blob, '\\n' .. entry, 1, true)
  if found then at = found + 1 end
end
if not at then return 0 end
local rest = string.sub(blob, 1, at - 1) .. string.sub(blob, at + #entry)
if rest == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], rest) end
return 1
"""


@dataclass(frozen=True)
class AddResult:
    """Which bucket each table got for one image ("" where a full bucket refused it)."""

    image_id: str
    substrings: list[str]  # hex substring per table; "" where the bucket was full (capped)

    @property
    def capped(self) -> list[int]:
        return [t for t, s in enumerate(self.substrings) if not s]


@dataclass(frozen=True)
class QueryResult:
    """Hashes within the radius, sorted by (distance, image_id), plus what the query cost."""

    matches: list[tuple[str, int]]  # (image_id, Hamming distance)
    probes: int  # buckets read
    candidates: int  # members verified (one found in k tables counts k times)

    def excluding(self, image_id: str) -> list[tuple[str, int]]:
        """Matches other than the querying image itself (it is in the index once written)."""
        return [m for m in self.matches if m[0] != image_id]


class PHashIndex:
    """Add, remove and radius-query pHashes in batches, one round trip per batch."""

    def __init__(self, client, keys: Keys, tables: int, bucket_cap_bytes: int, *, max_probes: int = 1 << 16,
                 direct_reads: bool | None = None, batched_writes: bool | None = None):
        self._client = client
        self._keys = keys
        self.tables = tables
        self.width = width_of(tables)
        self.bucket_cap_bytes = bucket_cap_bytes
        self.max_probes = max_probes
        if _decodes_responses(client):
            raise ValueError("PHashIndex needs a client with decode_responses=False (members are binary)")
        if direct_reads is None:
            direct_reads = is_standalone(client)
        self._direct_reads = direct_reads
        # A script may touch keys of one cluster slot only, and every bucket has a slot of its own.
        self._batched_writes = is_standalone(client) if batched_writes is None else batched_writes
        self._packed = direct_reads and sends_packed(client)

    # --- writes --------------------------------------------------------------------------------

    def add(self, ns: str, items: list[tuple[str, int]]) -> list[AddResult]:
        """Write each (image_id, phash) into every table (see :meth:`queue_add`), one round trip."""
        return roundtrip.run(self._client, self.queue_add, ns, items)

    def queue_add(self, pipe, ns: str, items: list[tuple[str, int]]) -> Finish:
        """Queue the bucket writes of each (image_id, phash); a full bucket refuses the entry (capped).

        One script per bucket appends the entry unless it is there already or it would take the bucket
        past ``bucket_cap_bytes``, atomically, so re-adding is harmless and a full bucket never grows.
        """
        unique = list(dict.fromkeys((image_id, _check_phash(phash)) for image_id, phash in items))
        writes = self._bucket_writes(ns, unique) if unique else []
        # One script run per bucket costs Redis and the client a command each (four per image).
        per_run = APPEND_BUCKETS_PER_RUN if self._batched_writes else 1
        for start in range(0, len(writes), per_run):
            chunk = writes[start:start + per_run]
            queue_eval(pipe, _APPEND_LUA, [key for key, _, _, _ in chunk],
                       [self.bucket_cap_bytes, *(entry for _, entry, _, _ in chunk)])

        def finish(replies: list) -> list[AddResult]:
            statuses = [status for chunk in replies for status in chunk]
            refused = [w for w, status in zip(writes, statuses) if status == _FULL]
            if refused:
                metrics.MIH_CAPPED.inc(len(refused))
            written = {(item, t): hexstr for _, _, (item, t), hexstr in writes}
            for _, _, slot, _ in refused:
                written[slot] = ""
            by_item = {item: AddResult(item[0], [written[item, t] for t in range(self.tables)]) for item in unique}
            return [by_item[image_id, int(phash)] for image_id, phash in items]

        return finish

    def remove(self, ns: str, items: list[tuple[str, int, list[str]]]) -> int:
        """Remove exactly the entries an earlier :meth:`add` wrote; returns how many existed."""
        pipe = self._client.pipeline(transaction=False)
        count = 0
        for image_id, phash, substrings in items:
            entry = _entry(image_id, _check_phash(phash))
            for table, hexstr in enumerate(substrings):
                if hexstr:
                    queue_eval(pipe, _CUT_LUA, [self._key(ns, table, hexstr.encode())], [entry])
                    count += 1
        return sum(pipe.execute()) if count else 0

    def substrings(self, phashes: list[int]) -> list[list[str]]:
        """The bucket (hex substring) of each pHash in every table: where :meth:`add` writes it."""
        if not phashes:
            return []
        rows = split(np.array([_check_phash(p) for p in phashes], dtype=np.uint64), self.tables).tolist()
        return [[format_substring(v, self.width) for v in row] for row in rows]

    def _bucket_writes(self, ns: str, unique: list[tuple[str, int]]):
        """(key, entry, (item, table), hex) for every table of every item."""
        writes = []
        for item, row in zip(unique, self.substrings([phash for _, phash in unique])):
            entry = _entry(*item)
            for table, hexstr in enumerate(row):
                writes.append((self._key(ns, table, hexstr.encode()), entry, (item, table), hexstr))
        return writes

    # --- queries -------------------------------------------------------------------------------

    def query(self, ns: str, queries: list[tuple[int, int]]) -> list[QueryResult]:
        """All stored hashes within each query's radius, exactly (unless buckets were capped).

        On a standalone Redis each query is one MGET written straight to a pooled connection (cheaper
        than redis-py's command layer for a few hundred keys); otherwise see :meth:`queue_query`.
        """
        if not self._direct_reads:
            return roundtrip.run(self._client, self.queue_query, ns, queries)
        probes, commands = self._mget_commands(ns, queries)
        return self._results(queries, probes, _mget_direct(self._client, commands))

    def queue_query(self, pipe, ns: str, queries: list[tuple[int, int]]) -> Finish:
        """Queue the bucket reads of every query: one MGET per query on a standalone Redis (written in
        RESP here when the client takes :class:`~imgdedup.roundtrip.Packed` commands); on a cluster one
        GET per distinct bucket (MGET would span slots), grouped per node by the client."""
        if self._packed:
            probes, commands = self._mget_commands(ns, queries)
            for command in filter(None, commands):
                pipe.execute_command(command)

            def finish_packed(replies: list) -> list[QueryResult]:
                got = iter(replies)
                return self._results(queries, probes, [next(got) if command else [] for command in commands])
            return finish_packed
        plans = self._probe_keys(ns, queries)
        probes = [len(plan) for plan in plans]
        if self._direct_reads:
            live = [plan for plan in plans if plan]
            for plan in live:
                pipe.execute_command("MGET", *plan)

            def finish(replies: list) -> list[QueryResult]:
                got = iter(replies)
                return self._results(queries, probes, [next(got) if plan else [] for plan in plans])
            return finish
        slots: dict[bytes, int] = {}
        plan_slots = [[slots.setdefault(key, len(slots)) for key in plan] for plan in plans]
        for key in slots:
            pipe.get(key)

        def finish_each(replies: list) -> list[QueryResult]:
            return self._results(queries, probes, [[replies[i] for i in ids] for ids in plan_slots])
        return finish_each

    def _results(self, queries, probes: list[int], buckets) -> list[QueryResult]:
        results = _verify(queries, probes, buckets)
        for result in results:
            metrics.MIH_PROBES.observe(result.probes)
            metrics.MIH_CANDIDATES.observe(result.candidates)
        return results

    def _probe_groups(self, ns: str, queries: list[tuple[int, int]]):
        """Per radius in use: its queries (indices), the substrings each one probes (a row per query,
        in the frame's order: table by table) and the arguments of that radius' key frame.

        Built for the whole batch in NumPy: a radius-8 query reads 188 buckets, and making their keys
        one Python concatenation at a time cost ~280 us per query on the worker's main thread.
        """
        by_radius: dict[int, list[int]] = {}
        for i, (_, radius) in enumerate(queries):
            by_radius.setdefault(radius, []).append(i)
        templates = _templates(self._keys, ns, self.tables)
        for radius, members in by_radius.items():
            if probe_count(radius, self.tables) > self.max_probes:
                raise ValueError(f"radius {radius} with {self.tables} tables needs "
                                 f"{probe_count(radius, self.tables)} probes (> max_probes {self.max_probes})")
            rows = split(np.array([_check_phash(queries[i][0]) for i in members], dtype=np.uint64), self.tables)
            radii = table_radii(radius, self.tables)
            values = np.concatenate([rows[:, t, None] ^ probe_masks(self.width, r)[None, :]
                                     for t, r in enumerate(radii) if r >= 0], axis=1)
            yield members, values, (templates, tuple(radii), self.width)

    def _probe_keys(self, ns: str, queries: list[tuple[int, int]]) -> list[list[bytes]]:
        """Bucket keys each query reads: every substring within its table's radius, per table."""
        plans: list[list[bytes]] = [[] for _ in queries]
        for members, values, frame_args in self._probe_groups(ns, queries):
            for i, keys in zip(members, _keys_of(_frame(*frame_args), values, self.width)):
                plans[i] = keys
        return plans

    def _mget_commands(self, ns: str, queries: list[tuple[int, int]]) -> tuple[list[int], list[Packed | None]]:
        """Each query's probe count and its bucket reads as one MGET in RESP (None if it reads none)."""
        probes, commands = [0] * len(queries), [None] * len(queries)
        for members, values, frame_args in self._probe_groups(ns, queries):
            for i, command in zip(members, _mgets_of(frame_args, values)):
                probes[i], commands[i] = values.shape[1], command
        return probes, commands

    # --- introspection -------------------------------------------------------------------------

    def sizes(self, ns: str) -> dict:
        """Buckets, entries and the largest bucket of a namespace, by SCAN: tests and ops, not the hot path."""
        keys = list(self._client.scan_iter(match=self._keys.mih_pattern(ns), count=1000))
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
        counts = [(blob or b"").count(b"\n") for blob in pipe.execute()] if keys else []
        return {"buckets": len(keys), "members": sum(counts), "largest": max(counts, default=0)}

    def _key(self, ns: str, table: int, hexstr: bytes) -> bytes:
        head, tail = _templates(self._keys, ns, self.tables)[table]
        return head + hexstr + tail


def _verify(queries: list[tuple[int, int]], probes: list[int], buckets: list[list[bytes | None]]) -> list[QueryResult]:
    """Exact Hamming check of every entry read for a batch of queries, vectorised over all of them.

    Each query's buckets are joined, and the queries' parts into one buffer; NumPy finds the entry
    starts (after each newline), decodes the 16 hex digits at each and compares every entry with its
    own query's hash, so neither a candidate nor a query costs a Python step; only hits do. An image
    found in several tables is verified once per table: cheaper than de-duplicating candidates.
    """
    parts = [b"".join(filter(None, found)) for found in buckets]
    buffer = b"".join(parts)
    best: list[dict[str, int]] = [{} for _ in queries]
    counts = [0] * len(queries)
    if buffer:
        raw = np.frombuffer(buffer, dtype=np.uint8)
        ends = np.flatnonzero(raw == _NEWLINE)
        starts = np.concatenate(([0], ends[:-1] + 1))
        owner = np.searchsorted(np.cumsum([len(part) for part in parts]), starts, side="right")
        hashes = _hex_prefixes(raw, starts)
        wanted = np.array([phash for phash, _ in queries], dtype=np.uint64)
        radii = np.array([radius for _, radius in queries])
        distances = np.bitwise_count(hashes ^ wanted[owner])
        counts = np.bincount(owner, minlength=len(queries)).tolist()
        hits = np.flatnonzero(distances <= radii[owner])
        # Python ints from here: indexing NumPy arrays one hit at a time cost more than the check itself.
        for start, end, query, distance in zip(*(a[hits].tolist() for a in (starts, ends, owner, distances))):
            image_id, seen = _unescape(buffer[start + 16 : end]), best[query]
            seen[image_id] = min(distance, seen.get(image_id, distance))  # one image, two pHashes: the nearer
    return [
        QueryResult(sorted(found.items(), key=lambda m: (m[1], m[0])), probe_count, count)
        for found, probe_count, count in zip(best, probes, counts)
    ]


def _hex_prefixes(raw: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """The pHash written as 16 hex digits at each start, as uint64.

    Each entry's digits are copied out as a row of a 16-byte sliding view of the buffer, and all of them
    decoded at once by ``bytes.fromhex`` in C. For the ~2,900 entries of a radius-8 query at 1M hashes
    this took 0.12 ms, against 0.43-0.55 ms for a table lookup, shift and OR per digit in NumPy (ad hoc
    timings of both on one such buffer)."""
    rows = np.ndarray((len(raw) - 15, 16), np.uint8, raw, 0, (1, 1))[starts]
    return np.frombuffer(bytes.fromhex(rows.tobytes().decode("ascii")), dtype=">u8").astype(np.uint64)


def _mget_direct(client: redis.Redis, commands: list[Packed | None]) -> list[list[bytes | None]]:
    """Send the queries' MGETs (None: a query that reads nothing) pipelined on one pooled connection.

    Written pre-packed: building a few hundred arguments through redis-py's command layer cost more
    than Redis' own work. Any error mid-stream drops the connection (unread replies must never reach
    the next user); connection errors are retried by the connection's Retry policy.
    """
    live = [command for command in commands if command]
    if not live:
        return [[] for _ in commands]
    replies = iter(_exchange(client, b"".join(live), len(live)))
    return [next(replies) if command else [] for command in commands]


def _exchange(client: redis.Redis, packed: bytes, count: int) -> list:
    """Send pre-packed commands on one pooled connection and read `count` replies."""
    pool = client.connection_pool
    conn = pool.get_connection()

    def exchange():
        try:
            conn.send_packed_command([packed])
            return [conn.read_response() for _ in range(count)]
        except BaseException:
            conn.disconnect()
            raise

    try:
        return conn.retry.call_with_retry(exchange, lambda _error: conn.disconnect())
    finally:
        pool.release(conn)


@lru_cache(maxsize=4096)
def _templates(keys: Keys, ns: str, tables: int) -> tuple[tuple[bytes, bytes], ...]:
    """(bytes before, bytes after) the substring in each table's bucket key, taken from keys.py."""
    out = []
    for table in range(tables):
        head, sep, tail = keys.mih_bucket(ns, table, _SENTINEL).partition(_SENTINEL)
        if not sep or _SENTINEL in tail:
            raise ValueError(f"cannot template bucket keys for namespace {ns!r}")
        out.append((head.encode(), tail.encode()))
    return tuple(out)


#: One frame per (namespace, radius) in use: ~7 KB at radius 8, so 1,024 of them for many tenants cost ~7 MB.
@lru_cache(maxsize=1024)
def _frame(templates: tuple[tuple[bytes, bytes], ...], radii: tuple[int, ...], width: int):
    """Every probe key of one query with its substring digits left blank, one uint8 row per key in probe
    order (table by table), and the row ranges whose digits start at the same column (one range unless
    the table numbers have one and two digits). Shorter rows end in NULs, which ``_keys_of`` drops."""
    digits = width // 4
    tables = [(templates[t], mask_count(width, r)) for t, r in enumerate(radii) if r >= 0]
    size = max(len(head) + digits + len(tail) for (head, tail), _ in tables)
    frame = np.zeros((sum(count for _, count in tables), size), dtype=np.uint8)
    groups: dict[int, list[int]] = {}  # digits' first column -> [first row, end row]
    row = 0
    for (head, tail), count in tables:
        frame[row : row + count, : len(head)] = np.frombuffer(head, dtype=np.uint8)
        at = len(head) + digits
        frame[row : row + count, at : at + len(tail)] = np.frombuffer(tail, dtype=np.uint8)
        groups.setdefault(len(head), [row, row + count])[1] = row + count
        row += count
    frame.setflags(write=False)
    return frame, tuple((start, first, end) for start, (first, end) in groups.items())


def _keys_of(frame, substrings: np.ndarray, width: int) -> list[list[bytes]]:
    """The probe keys of each row of a 2-D array of substrings (one row per query, one column per probe,
    in the frame's row order), as lists of bytes (NumPy drops the trailing NULs; a key ends with ``}``)."""
    template = frame[0]
    return _filled(frame, substrings, width).view(f"S{template.shape[1]}")[..., 0].tolist()


def _filled(frame, substrings: np.ndarray, width: int) -> np.ndarray:
    """A copy of the frame per query (uint8, queries x probes x row bytes) with each probe's substring
    written in as hex digits: one NumPy pass for every table of every query."""
    template, groups = frame
    digits = width // 4
    out = np.empty((substrings.shape[0], *template.shape), dtype=np.uint8)
    out[...] = template
    shifts = np.arange(4 * (digits - 1), -1, -4, dtype=np.uint64)
    hex_digits = _HEX_DIGITS[(substrings[..., None] >> shifts) & np.uint64(15)]
    for start, first, end in groups:
        out[:, first:end, start : start + digits] = hex_digits[:, first:end]
    return out


@lru_cache(maxsize=1024)
def _resp_frame(templates: tuple[tuple[bytes, bytes], ...], radii: tuple[int, ...], width: int):
    """:func:`_frame` with each key written as a RESP bulk string (``$<length>``, CRLF, the key, CRLF),
    when every key of the frame has the same length (fewer than 10 tables); None otherwise. ~11 KB at
    radius 8."""
    template, groups = _frame(templates, radii, width)
    if len(groups) != 1 or not template[:, -1].all():
        return None
    lead = b"$%d\r\n" % template.shape[1]
    resp = np.empty((template.shape[0], len(lead) + template.shape[1] + 2), dtype=np.uint8)
    resp[:, : len(lead)] = np.frombuffer(lead, dtype=np.uint8)
    resp[:, len(lead) : -2] = template
    resp[:, -2:] = np.frombuffer(b"\r\n", dtype=np.uint8)
    resp.setflags(write=False)
    ((start, first, end),) = groups
    return resp, ((start + len(lead), first, end),)


def _mgets_of(frame_args: tuple, substrings: np.ndarray) -> list[Packed]:
    """One MGET of its probe keys per row of substrings, each written as a whole RESP command: with
    keys of one length, the rows of one filled array and a header, without a Python step per key."""
    width = frame_args[2]
    resp = _resp_frame(*frame_args)
    if resp is None:
        return [_mget_command(keys) for keys in _keys_of(_frame(*frame_args), substrings, width)]
    head = b"*%d\r\n$4\r\nMGET\r\n" % (resp[0].shape[0] + 1)
    return [Packed(head + row.tobytes()) for row in _filled(resp, substrings, width)]


def _mget_command(keys: list[bytes]) -> Packed:
    return Packed(b"*%d\r\n$4\r\nMGET\r\n" % (len(keys) + 1)
                  + b"".join([b"$%d\r\n%b\r\n" % (len(key), key) for key in keys]))


def _entry(image_id: str, phash: int) -> bytes:
    """One bucket entry: 16 hex digits, the id with ``%`` and newline escaped, a newline."""
    escaped = image_id.replace("%", "%25").replace("\n", "%0A") if "%" in image_id or "\n" in image_id else image_id
    return b"%016x%b\n" % (phash, escaped.encode())


def _unescape(raw: bytes) -> str:
    text = raw.decode()
    return text.replace("%0A", "\n").replace("%25", "%") if "%" in text else text


def _check_phash(phash) -> int:
    value = int(phash)
    if not 0 <= value <= _MAX_PHASH:
        raise ValueError(f"pHash must be a 64-bit unsigned integer, got {phash!r}")
    return value


def _decodes_responses(client) -> bool:
    kwargs = getattr(client, "get_connection_kwargs", dict)()
    return bool(kwargs.get("decode_responses"))
