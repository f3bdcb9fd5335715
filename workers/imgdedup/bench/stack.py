"""Where the bench runs: its own throw-away Tansu + Redis (default), or the configured servers.

On its own servers the bench may wipe Redis between sections, so each memory figure starts from an
empty server; on configured servers it only ever touches keys under its own prefixes, and removes them.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis
from pydantic import SecretStr

from imgdedup import devstack
from imgdedup.config import Settings
from imgdedup.keys import Keys


@dataclass
class Stack:
    settings: Settings
    owned: bool
    pids: dict[str, int] = field(default_factory=dict)  # server processes whose CPU time is reported

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.settings.redis_url.get_secret_value())

    def clean(self, client: redis.Redis, key_prefix: str) -> None:
        """Remove what a section wrote: everything on our own server, only our prefix on someone else's."""
        if self.owned:
            client.flushall()
            return
        batch = []
        for key in client.scan_iter(match=f"{Keys(key_prefix).base}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.unlink(*batch)
                batch = []
        if batch:
            client.unlink(*batch)


@contextmanager
def bench_stack(settings: Settings, external: bool) -> Iterator[Stack]:
    if external:
        yield Stack(settings, owned=False)
        return
    modules = (devstack.redisearch_module(),) if settings.vector_backend == "redisearch" else ()
    with tempfile.TemporaryDirectory(prefix="imgdedup-bench-") as workdir:
        rds = devstack.start_redis(
            devstack.free_port(), Path(workdir) / "redis", persist=False, modules=modules
        )
        try:
            kafka = devstack.start_tansu(devstack.free_port(), Path(workdir) / "kafka")
        except Exception:
            rds.stop()
            raise
        try:
            own = settings.model_copy(
                update={
                    "kafka_bootstrap": kafka.address,
                    "redis_url": SecretStr(rds.address),
                    "redis_cluster": False,
                }
            )
            yield Stack(own, owned=True, pids={"redis": rds.process.pid, "kafka": kafka.process.pid})
        finally:
            kafka.stop()
            rds.stop()
