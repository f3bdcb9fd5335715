"""Running the project's Lua scripts from pipelines, on standalone Redis and on Redis Cluster alike.

redis-py's cluster pipeline refuses EVALSHA (``Script`` objects use it), so scripts are sent as
``EVAL <source>``: Redis caches a script by the SHA-1 of its source, so a repeated EVAL costs the
same as EVALSHA apart from a few hundred bytes on the wire, and there is no NOSCRIPT to handle after
a failover or on a node that never saw SCRIPT LOAD. Every script here touches keys of one slot only.
"""

from __future__ import annotations

from typing import Any


def queue_eval(pipe: Any, source: str, keys: list, args: list) -> None:
    """Queue one run of ``source`` on ``pipe`` (the cluster client routes it by its first key)."""
    pipe.execute_command("EVAL", source, len(keys), *keys, *args)
