"""Kafka source on kafka-python 3.x: a consumer group over the edits and control topics, manual commits.

Choices, and why:

- The consumer is created and subscribed on the first :meth:`KafkaSource.seek`, which the worker
  calls only after it holds the model's writer lease. A standby daemon therefore never joins the
  group and never takes partitions it could not process (DESIGN.md invariant 4).
- Positions come from the manifest of the serving version, not from the group's committed offsets
  (which may lag a published version after a crash, or lead it for dead-lettered tails). The
  rebalance listener seeks every newly assigned partition there — or to where this process had
  already read, so a rebalance never re-delivers records that are pending in the batcher. The
  listener never commits: commits inside it break ``poll()`` in kafka-python 3.
- Long training never gets the consumer evicted: kafka-python 3 sends heartbeats from a background
  thread, but leaves the group if ``poll()`` is not called for ``max_poll_interval_ms``. While a
  block trains the worker calls :meth:`keepalive`, which polls with every partition paused (and
  seeks back any record a freshly assigned, unpaused partition delivers).
- ``pause`` pauses only the edits topic, so a ``resume`` control event can still arrive.
"""

from __future__ import annotations

import logging
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, OffsetAndMetadata, TopicPartition
from kafka.errors import CommitFailedError, KafkaError

from daemon.sources import Offsets, SourceRecord

log = logging.getLogger("melo.source.kafka")


class _SeekOnAssign(ConsumerRebalanceListener):
    def __init__(self, source: KafkaSource) -> None:
        self.source = source

    def on_partitions_revoked(self, revoked: Any) -> None:
        log.info("partitions revoked: %s", sorted(str(tp) for tp in revoked))

    def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("partitions assigned: %s", sorted(str(tp) for tp in assigned))
        self.source._position_partitions(list(assigned))


class KafkaSource:
    """:class:`daemon.sources.EventSource` over Kafka topics (see module docstring)."""

    def __init__(self, consumer_kwargs: dict[str, Any], *, edits_topic: str, control_topic: str) -> None:
        self.edits_topic = edits_topic
        self.control_topic = control_topic
        self._consumer_kwargs = dict(consumer_kwargs)
        self._consumer: KafkaConsumer | None = None
        self._start: Offsets = {}  # positions from the manifest
        self._read: Offsets = {}  # positions after the last record this process delivered
        self._committed: Offsets = {}
        self._paused = False
        self._empty_polls = 0

    # -- positions

    def _wanted_offset(self, tp: TopicPartition) -> int | None:
        partition = str(tp.partition)
        read = self._read.get(tp.topic, {}).get(partition)
        if read is not None:
            return read
        return self._start.get(tp.topic, {}).get(partition)

    def _position_partitions(self, partitions: list[TopicPartition]) -> None:
        assert self._consumer is not None
        fresh = []
        for tp in partitions:
            offset = self._wanted_offset(tp)
            if offset is None:
                fresh.append(tp)
            else:
                self._consumer.seek(tp, offset)
        if fresh:
            # Not covered by any published version: everything in it is still to be processed.
            self._consumer.seek_to_beginning(*fresh)
        if self._paused:
            self._pause_edits()

    def _ensure_consumer(self) -> KafkaConsumer:
        if self._consumer is None:
            self._consumer = KafkaConsumer(**self._consumer_kwargs)
            self._consumer.subscribe([self.edits_topic, self.control_topic], listener=_SeekOnAssign(self))
        return self._consumer

    def seek(self, offsets: Offsets) -> None:
        """Read next from ``offsets`` (joining the group on the first call)."""
        self._start = {topic: dict(parts) for topic, parts in offsets.items()}
        self._read = {}
        consumer = self._ensure_consumer()
        assigned = list(consumer.assignment())
        if assigned:
            self._position_partitions(assigned)

    # -- reading

    def poll(self, timeout_s: float, max_records: int) -> list[SourceRecord]:
        """Fetch up to ``max_records`` records (per-partition order kept)."""
        consumer = self._ensure_consumer()
        batches = consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        records: list[SourceRecord] = []
        for tp, items in batches.items():
            for item in items:
                records.append(
                    SourceRecord(
                        topic=item.topic,
                        partition=str(item.partition),
                        offset=item.offset,
                        key=item.key,
                        value=item.value if item.value is not None else b"",
                        timestamp_ms=int(item.timestamp or 0),
                        next_offset=item.offset + 1,
                    )
                )
            if items:
                self._read.setdefault(tp.topic, {})[str(tp.partition)] = items[-1].offset + 1
        self._empty_polls = 0 if records else self._empty_polls + 1
        return records

    def keepalive(self, timeout_s: float) -> None:
        """Poll with every partition paused: heartbeats and the max-poll clock stay fresh, nothing is consumed."""
        consumer = self._ensure_consumer()
        assigned = list(consumer.assignment())
        if assigned:
            consumer.pause(*assigned)
        stray = consumer.poll(timeout_ms=max(int(timeout_s * 1000), 50), max_records=1)
        for tp, items in stray.items():
            if items:  # a partition assigned during this poll was not paused yet: un-read it
                consumer.seek(tp, items[0].offset)
        assigned = list(consumer.assignment())
        consumer.resume(*assigned)
        if self._paused:
            self._pause_edits()

    def at_end(self) -> bool:
        """True once every assigned, unpaused partition has been fetched up to its high-water mark
        (the broker's fetch responses say where the log ends; before the first one we do not know)."""
        consumer = self._consumer
        if consumer is None or self._empty_polls < 1:
            return False
        assigned = [tp for tp in consumer.assignment() if tp not in consumer.paused()]
        if not consumer.assignment():
            return False
        for tp in assigned:
            highwater = consumer.highwater(tp)
            if highwater is None or consumer.position(tp, timeout_ms=1000) < highwater:
                return False
        return True

    # -- committing

    def commit(self, offsets: Offsets) -> None:
        """Commit ``offsets`` for the partitions this member still owns (others are re-covered by the
        next owner's manifest positions, so a failed commit loses nothing)."""
        consumer = self._ensure_consumer()
        owned = {(tp.topic, tp.partition) for tp in consumer.assignment()}
        payload = {
            TopicPartition(topic, int(partition)): OffsetAndMetadata(offset, "", -1)
            for topic, parts in offsets.items()
            for partition, offset in parts.items()
            if (topic, int(partition)) in owned
        }
        if not payload:
            return
        try:
            consumer.commit(payload)
        except (CommitFailedError, KafkaError) as error:
            log.warning("offset commit failed (%s); the published manifest still records the positions", error)
            return
        for tp, meta in payload.items():
            self._committed.setdefault(tp.topic, {})[str(tp.partition)] = meta.offset

    def committed(self) -> Offsets:
        """Offsets this process committed (the broker's view: ``consumer.committed``)."""
        return {topic: dict(parts) for topic, parts in self._committed.items()}

    # -- flow control

    def _pause_edits(self) -> None:
        assert self._consumer is not None
        edits = [tp for tp in self._consumer.assignment() if tp.topic == self.edits_topic]
        if edits:
            self._consumer.pause(*edits)

    def pause(self) -> None:
        """Stop fetching edit events; control events still flow."""
        self._paused = True
        if self._consumer is not None:
            self._pause_edits()

    def resume(self) -> None:
        """Fetch edit events again."""
        self._paused = False
        if self._consumer is not None:
            self._consumer.resume(*self._consumer.assignment())

    def assigned_partitions(self) -> int:
        """Partitions the consumer group assigns this member now (0 before it joined)."""
        return 0 if self._consumer is None else len(self._consumer.assignment())

    def close(self) -> None:
        """Leave the group without committing anything."""
        if self._consumer is not None:
            self._consumer.close(autocommit=False)
            self._consumer = None
