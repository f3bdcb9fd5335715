"""Several modules' commands in one pipeline, each module getting back exactly its own replies.

Why: indexing a batch used to be a chain of about eight pipelines (records, writes, bucket writes,
commit, SHA-256 lookups, bucket reads, candidates, decisions), and py-spy of a worker at half its
maximum rate showed the main thread waiting on Redis replies most of the time. Commands that do not
depend on each other's replies now share a round trip: a module *queues* its commands and returns a
function that turns its slice of the replies into its result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
from redis._parsers import Encoder
from redis.connection import HiredisRespSerializer, PythonRespSerializer
from redis.utils import HIREDIS_AVAILABLE

if HIREDIS_AVAILABLE:
    import hiredis

#: What a ``queue_*`` method returns: its replies (in queueing order) -> its result.
Finish = Callable[[list], Any]


def is_standalone(client) -> bool:
    """A plain Redis client, not a cluster one: one connection runs a whole pipeline, in order, and a
    multi-key command may name keys of any slot."""
    return isinstance(client, redis.Redis)


class Packed(bytes):
    """A whole command already written in RESP, queued as ``pipe.execute_command(Packed(...))``:
    :class:`CommandPacker` sends it as it is.

    Why: a radius-8 pHash query is an MGET of 188 keys, and redis-py checks and packs every argument
    in Python. That was a third of a saturated worker's main thread (py-spy ``--gil``), while the keys
    are rows of one NumPy array that can be written out as the command in one piece
    (:mod:`imgdedup.hashindex`)."""


class CommandPacker:
    """redis-py's command packer (the ``command_packer`` connection option) that passes :class:`Packed`
    commands through and packs every other command to the same bytes as redis-py itself.

    With hiredis, redis-py's packer first rebuilds the arguments in a Python generator (to turn
    bytearray and memoryview into bytes) and then calls ``hiredis.pack_command``: 14 us for a record's
    17-argument HSET, against 3.7 us for ``hiredis.pack_command`` alone (ad hoc, Intel Xeon VM). The
    worker sends ~7 such commands per image (plus a few per batch), so a command named by a one-word
    ``str`` goes to hiredis directly; hiredis refuses (TypeError) exactly the argument types that need
    redis-py's conversion or its DataError, and those take redis-py's path. ``fast=False`` keeps
    redis-py's path for every command: the bench's baseline."""

    def __init__(self, fast: bool = True):
        self._default = (HiredisRespSerializer() if HIREDIS_AVAILABLE
                         else PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode))
        self._fast = fast and HIREDIS_AVAILABLE

    def pack(self, *args) -> list:
        if len(args) == 1 and isinstance(args[0], Packed):
            return [args[0]]
        if self._fast and isinstance(args[0], str) and " " not in args[0]:
            try:
                return [hiredis.pack_command(args)]
            except TypeError:
                pass  # bytearray, memoryview or an invalid type: redis-py converts it or raises DataError
        return self._default.pack(*args)


def standalone_client(url: str, *, fast_packing: bool = True, **kwargs) -> redis.Redis:
    """A plain client whose connections accept :class:`Packed` commands (``fast_packing``: see
    :class:`CommandPacker`)."""
    return redis.Redis.from_url(url, command_packer=CommandPacker(fast_packing), **kwargs)


def sends_packed(client) -> bool:
    """Whether ``client``'s connections send :class:`Packed` commands as they are (a client not made
    by :func:`standalone_client` would send one as a single bulk string, a command Redis rejects)."""
    return is_standalone(client) and isinstance(
        client.connection_pool.connection_kwargs.get("command_packer"), CommandPacker)


class Parts:
    """Several modules' commands queued on one pipeline; :meth:`results` hands each its own replies.

    A ``queue_*`` method can itself queue several parts and return ``parts.results`` composed with its
    own finish, so it can ride on a caller's round trip as one part."""

    def __init__(self, pipe):
        self.pipe, self._base = pipe, len(pipe)
        self._parts: list[tuple[int, int, Finish]] = []

    def add(self, queue: Callable[..., Finish], *args: Any) -> int:
        """Run ``queue(pipe, *args)``; returns the index of its result in :meth:`results`' list."""
        start = len(self.pipe)
        finish = queue(self.pipe, *args)
        self._parts.append((start - self._base, len(self.pipe) - self._base, finish))
        return len(self._parts) - 1

    def results(self, replies: list) -> list:
        """Each part's result, in the order added, from the replies to everything queued since creation."""
        return [finish(replies[start:stop]) for start, stop, finish in self._parts]


class RoundTrip(Parts):
    def __init__(self, client):
        super().__init__(client.pipeline(transaction=False))

    def execute(self) -> list:
        """Send everything queued in one round trip; each part's result, in the order added."""
        return self.results(self.pipe.execute() if len(self.pipe) else [])


def run(client, queue: Callable[..., Finish], *args: Any) -> Any:
    """One part on its own round trip: what a module's plain (non-queued) method does."""
    trip = RoundTrip(client)
    trip.add(queue, *args)
    return trip.execute()[0]
