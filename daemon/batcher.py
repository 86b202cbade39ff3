"""Micro-batcher: groups accepted edits into batches of ``max_size`` or whatever waited ``max_wait_s``.

It also owns the answer to "which source positions are done?": every record read is *observed*;
records holding an edit that is not yet published are *pending*. For each partition the covered
position is the offset of the oldest pending record, or — with nothing pending — the position
after the last observed record. A manifest records exactly these positions, so an offset is never
covered before the version containing its edit is published (DESIGN.md invariant 1).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from daemon.sources import Offsets, SourceRecord

T = TypeVar("T")


@dataclass
class _Entry(Generic[T]):
    item: T
    key: str
    record: SourceRecord
    added_at: float = field(default=0.0)


class MicroBatcher(Generic[T]):
    """FIFO of pending items that tracks covered source positions. Not thread-safe except
    :meth:`request_flush`, which the scheduler calls from its own thread."""

    def __init__(self, max_size: int, max_wait_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if max_size < 1:
            raise ValueError(f"batch max_size must be >= 1, got {max_size}")
        if max_wait_s < 0:
            raise ValueError(f"batch max_wait_s must be >= 0, got {max_wait_s}")
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._queue: deque[_Entry[T]] = deque()
        self._keys: set[str] = set()
        self._seen: Offsets = {}
        self._flush = threading.Event()

    def __len__(self) -> int:
        return len(self._queue)

    def observe(self, record: SourceRecord) -> None:
        """Mark ``record`` as read; once nothing older in its partition is pending, it is covered."""
        stream, partition = record.position
        parts = self._seen.setdefault(stream, {})
        parts[partition] = max(parts.get(partition, 0), record.next_offset)

    def add(self, item: T, key: str, record: SourceRecord) -> None:
        """Queue ``item`` (identified by ``key``, e.g. its edit id) read from ``record``."""
        self.observe(record)
        self._queue.append(_Entry(item, key, record, self._clock()))
        self._keys.add(key)

    def holds(self, key: str) -> bool:
        """True if an item with ``key`` is pending (a within-batch duplicate)."""
        return key in self._keys

    def request_flush(self) -> None:
        """Make the next :meth:`due` true even for a partial batch (thread-safe)."""
        self._flush.set()

    def overdue(self) -> bool:
        """True when the oldest pending item has waited ``max_wait_s`` (safe to call from another thread)."""
        queue = self._queue
        try:
            oldest = queue[0].added_at
        except IndexError:
            return False
        return self._clock() - oldest >= self.max_wait_s

    def due(self) -> bool:
        """True when a full batch is waiting, the oldest item waited ``max_wait_s``, or a flush was asked."""
        if not self._queue:
            self._flush.clear()
            return False
        if len(self._queue) >= self.max_size or self._flush.is_set():
            return True
        return self.overdue()

    def take(self) -> list[T]:
        """Remove and return the oldest ``max_size`` items (they count as covered from now on)."""
        batch: list[T] = []
        while self._queue and len(batch) < self.max_size:
            entry = self._queue.popleft()
            self._keys.discard(entry.key)
            batch.append(entry.item)
        if not self._queue:
            self._flush.clear()
        return batch

    def covered(self) -> Offsets:
        """Positions before which every observed record is done (see module docstring)."""
        oldest_pending: dict[tuple[str, str], int] = {}
        for entry in self._queue:
            oldest_pending.setdefault(entry.record.position, entry.record.offset)
        covered: Offsets = {}
        for topic, parts in self._seen.items():
            for partition, next_offset in parts.items():
                covered.setdefault(topic, {})[partition] = oldest_pending.get((topic, partition), next_offset)
        return covered

    def reset(self, positions: Offsets) -> None:
        """Forget everything pending and start from ``positions`` (after a seek)."""
        self._queue.clear()
        self._keys.clear()
        self._flush.clear()
        self._seen = {topic: dict(parts) for topic, parts in positions.items()}
