"""Which offsets may be committed: per partition, the highest offset below which every consumed
message has had its verdict or dead letter acknowledged by the broker.

Acknowledgements arrive out of order (the producer batches per output partition), so a message's
offset is only released once every earlier message of its partition is done. Committing
`highest contiguous done + 1` is what makes the worker at-least-once and never at-most-once.
"""

from __future__ import annotations

from collections import deque


class PartitionOffsets:
    def __init__(self) -> None:
        self._pending: deque[int] = deque()  # consumed, in consumption (= offset) order
        self._done: set[int] = set()
        self.commit_offset: int | None = None  # next offset to consume after a restart

    def consumed(self, offset: int) -> None:
        if self._pending and offset <= self._pending[-1]:
            # A re-consumed offset after a seek: forget the later state, it will be redone.
            while self._pending and self._pending[-1] >= offset:
                self._done.discard(self._pending.pop())
        self._pending.append(offset)

    def acknowledged(self, offset: int) -> bool:
        """Mark done; returns True if the committable offset moved."""
        if not self._pending or offset < self._pending[0]:
            return False  # stale acknowledgement from before a seek or a rebalance
        self._done.add(offset)
        moved = False
        while self._pending and self._pending[0] in self._done:
            done = self._pending.popleft()
            self._done.discard(done)
            self.commit_offset = done + 1
            moved = True
        return moved

    @property
    def in_flight(self) -> int:
        return len(self._pending)


class OffsetTracker:
    """PartitionOffsets for every assigned (topic, partition)."""

    def __init__(self) -> None:
        self._parts: dict[tuple[str, int], PartitionOffsets] = {}

    def consumed(self, topic: str, partition: int, offset: int) -> None:
        self._parts.setdefault((topic, partition), PartitionOffsets()).consumed(offset)

    def acknowledged(self, topic: str, partition: int, offset: int) -> int | None:
        """Returns the new committable offset of that partition if it moved, else None."""
        part = self._parts.get((topic, partition))
        if part is not None and part.acknowledged(offset):
            return part.commit_offset
        return None

    def forget(self, topic: str, partition: int) -> None:
        self._parts.pop((topic, partition), None)

    def commit_offset(self, topic: str, partition: int) -> int | None:
        part = self._parts.get((topic, partition))
        return part.commit_offset if part else None

    @property
    def in_flight(self) -> int:
        return sum(p.in_flight for p in self._parts.values())
