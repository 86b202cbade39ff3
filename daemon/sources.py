"""Event sources: where edit and control events come from (Kafka, or a local spool directory).

Both implementations speak in *positions*: ``Offsets`` maps a topic to ``{partition: next offset}``
(partition keys are decimal strings so the map round-trips through JSON manifests unchanged). For
Kafka the key is the topic; for the spool it is ``"<topic>/<file name>"`` with the single partition
``"0"`` (schemas/manifest.v1.json: "topic or spool file"). A manifest records the positions its
version covers, and on start the worker seeks the source there (DESIGN.md invariant 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

Offsets = dict[str, dict[str, int]]


@dataclass(frozen=True)
class SourceRecord:
    """One raw event exactly as the source delivered it (value is the original bytes)."""

    topic: str
    partition: str
    offset: int
    key: bytes | None
    value: bytes
    timestamp_ms: int
    next_offset: int  # the position right after this record (Kafka: offset + 1; spool: end of line)
    stream: str = ""  # the Offsets key when it differs from the topic (spool: "<topic>/<file>")

    @property
    def position(self) -> tuple[str, str]:
        """(Offsets key, partition) of this record."""
        return (self.stream or self.topic, self.partition)


class EventSource(Protocol):
    """A resumable, ordered stream of records from an edits topic and a control topic."""

    edits_topic: str
    control_topic: str

    def poll(self, timeout_s: float, max_records: int) -> list[SourceRecord]:
        """Return up to ``max_records`` records in per-partition order; [] after ``timeout_s``.

        Must be called regularly even while edits are paused: for Kafka it keeps group membership.
        """
        ...

    def keepalive(self, timeout_s: float) -> None:
        """Stay a live member of the source (Kafka: group heartbeats and the max-poll clock) while a
        block trains, without delivering any record."""
        ...

    def commit(self, offsets: Offsets) -> None:
        """Durably record that everything before ``offsets`` is done (published or dead-lettered)."""
        ...

    def committed(self) -> Offsets:
        """The last durably committed positions (for inspection and tests)."""
        ...

    def seek(self, offsets: Offsets) -> None:
        """Continue reading from ``offsets``; partitions not named start from the beginning."""
        ...

    def pause(self) -> None:
        """Stop delivering edit events; control events keep flowing (so ``resume`` can arrive)."""
        ...

    def resume(self) -> None:
        """Deliver edit events again after :meth:`pause`."""
        ...

    def at_end(self) -> bool:
        """True when the last poll found nothing left to read right now (used by ``--until-idle``)."""
        ...

    def assigned_partitions(self) -> int:
        """How many partitions this process reads now (Kafka: the group's assignment; spool: 1)."""
        ...

    def close(self) -> None:
        """Release connections and files. Commits nothing."""
        ...
