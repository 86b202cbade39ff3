"""MicroBatcher: size/time flushing and the covered-positions rule behind invariant 1."""

from __future__ import annotations

from daemon.batcher import MicroBatcher
from daemon.sources import SourceRecord


class FakeClock:
    """A clock the test advances by hand (time itself, not a stand-in component)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def record(offset: int, partition: str = "0", topic: str = "edits") -> SourceRecord:
    return SourceRecord(topic, partition, offset, None, b"{}", 0, offset + 1)


def test_batch_is_due_when_full_and_take_returns_oldest_first() -> None:
    batcher: MicroBatcher[str] = MicroBatcher(max_size=3, max_wait_s=60, clock=FakeClock())
    for i in range(4):
        batcher.add(f"e{i}", f"e{i}", record(i))
    assert batcher.due()
    assert batcher.take() == ["e0", "e1", "e2"]
    assert len(batcher) == 1
    assert not batcher.due()


def test_partial_batch_is_due_after_max_wait() -> None:
    clock = FakeClock()
    batcher: MicroBatcher[str] = MicroBatcher(max_size=10, max_wait_s=2.0, clock=clock)
    batcher.add("a", "a", record(0))
    clock.now = 1.9
    assert not batcher.due()
    clock.now = 2.0
    assert batcher.due()


def test_requested_flush_makes_partial_batch_due_once() -> None:
    batcher: MicroBatcher[str] = MicroBatcher(max_size=10, max_wait_s=60, clock=FakeClock())
    batcher.request_flush()
    assert not batcher.due(), "an empty batcher is never due, and the request is dropped"
    batcher.add("a", "a", record(0))
    assert not batcher.due()
    batcher.request_flush()
    assert batcher.due()
    batcher.take()
    batcher.add("b", "b", record(1))
    assert not batcher.due()


def test_covered_stops_at_oldest_pending_record_per_partition() -> None:
    batcher: MicroBatcher[str] = MicroBatcher(max_size=2, max_wait_s=60, clock=FakeClock())
    batcher.observe(record(0))  # e.g. dead-lettered: done at once
    batcher.add("a", "a", record(1))
    batcher.observe(record(2))  # a duplicate read after a pending edit
    batcher.add("b", "b", record(3))
    batcher.add("c", "c", record(4))
    batcher.observe(record(0, partition="1"))
    assert batcher.covered() == {"edits": {"0": 1, "1": 1}}
    assert batcher.take() == ["a", "b"]
    assert batcher.covered() == {"edits": {"0": 4, "1": 1}}
    batcher.take()
    assert batcher.covered() == {"edits": {"0": 5, "1": 1}}


def test_holds_detects_pending_duplicate_keys_until_taken() -> None:
    batcher: MicroBatcher[str] = MicroBatcher(max_size=5, max_wait_s=60, clock=FakeClock())
    batcher.add("a", "edit-1", record(0))
    assert batcher.holds("edit-1")
    batcher.take()
    assert not batcher.holds("edit-1")


def test_reset_starts_covering_from_given_positions() -> None:
    batcher: MicroBatcher[str] = MicroBatcher(max_size=5, max_wait_s=60, clock=FakeClock())
    batcher.add("a", "a", record(7))
    batcher.reset({"edits": {"0": 3}})
    assert len(batcher) == 0
    assert batcher.covered() == {"edits": {"0": 3}}
