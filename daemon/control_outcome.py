"""What became of a control event sent to a running writer: a published version, or a dead letter.

The writer executes ``rollback`` / ``retract`` events in stream order. Success is a manifest that
carries the event's ``request_id``; failure (an unknown version, an edit that is not reachable) is
a DLQ record whose original bytes are the event, with the reason code and detail. The CLI waits
for whichever comes first (``melo rollback`` / ``melo retract`` without ``--no-wait``).

A watcher must be created *before* the event is sent: the Kafka watcher starts at the DLQ's end at
that moment, so it cannot miss the record and does not read the topic's whole history.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from daemon.settings import Settings, TopicsSettings


@dataclass(frozen=True)
class ControlOutcome:
    """Published (``version``) or refused (``reason`` and ``detail`` from the DLQ record)."""

    request_id: str
    version: int | None = None
    reason: str | None = None
    detail: str | None = None

    @property
    def ok(self) -> bool:
        """True when the writer published a version for the request."""
        return self.version is not None


class DeadLetterWatch(Protocol):
    """Finds the DLQ record of a control event by its request id."""

    def find(self, request_id: str) -> tuple[str, str] | None:
        """(reason, detail) of the event's DLQ record, if one has arrived."""
        ...

    def close(self) -> None:
        """Release the watcher."""
        ...


def _request_id_of(value: bytes) -> str | None:
    try:
        doc = json.loads(value)
    except ValueError:
        return None
    rid = doc.get("request_id") if isinstance(doc, dict) else None
    return rid if isinstance(rid, str) else None


class FileDeadLetters:
    """The file outbox's DLQ (``<data_dir>/outbox/<dlq topic>.jsonl``), read from where it ended at creation."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._offset = self.path.stat().st_size if self.path.exists() else 0

    def find(self, request_id: str) -> tuple[str, str] | None:
        """Scan the lines appended since the last call."""
        if not self.path.exists():
            return None
        with self.path.open("rb") as handle:
            handle.seek(self._offset)
            for line in handle:
                if not line.endswith(b"\n"):
                    break
                self._offset += len(line)
                record = json.loads(line)
                original = base64.b64decode(record.get("value_b64", ""))
                if _request_id_of(original) == request_id:
                    return str(record.get("reason")), str(record.get("detail"))
        return None

    def close(self) -> None:
        """Nothing is held open."""


class KafkaDeadLetters:
    """The DLQ topic, every partition, from its end at creation (no consumer group, nothing committed)."""

    def __init__(self, client_kwargs: dict[str, Any], topic: str) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self._consumer = KafkaConsumer(group_id=None, enable_auto_commit=False, **client_kwargs)
        partitions = [TopicPartition(topic, p) for p in sorted(self._consumer.partitions_for_topic(topic) or ())]
        self._consumer.assign(partitions)
        self._consumer.seek_to_end()
        for partition in partitions:
            self._consumer.position(partition)  # resolve the end now, before the event is sent

    def find(self, request_id: str) -> tuple[str, str] | None:
        """Poll once for new DLQ records."""
        for records in self._consumer.poll(timeout_ms=200).values():
            for record in records:
                if _request_id_of(record.value) == request_id:
                    headers = {k: v.decode("utf-8", "replace") for k, v in (record.headers or [])}
                    return headers.get("melo.reason", "?"), headers.get("melo.detail", "")
        return None

    def close(self) -> None:
        """Close the consumer."""
        self._consumer.close()


def dead_letter_watch(settings: Settings) -> DeadLetterWatch:
    """The DLQ of the writer of ``settings.model``, watched from now on."""
    if settings.kafka is not None:
        return KafkaDeadLetters(settings.kafka.client_kwargs(), settings.kafka.topics.dlq)
    return FileDeadLetters(Path(settings.data_dir) / "outbox" / f"{TopicsSettings().dlq}.jsonl")


def wait_for_outcome(
    store: Any, model: str, request_id: str, *, after: int, dead_letters: DeadLetterWatch, timeout_s: float,
    poll_s: float = 0.1,
) -> ControlOutcome | None:
    """The outcome of ``request_id``: a version newer than ``after`` carrying it, or its DLQ record;
    None when neither appeared within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        latest = store.latest(model) or 0
        for version in range(after + 1, latest + 1):
            if store.manifest(model, version).request_id == request_id:
                return ControlOutcome(request_id, version=version)
        after = max(after, latest)
        refused = dead_letters.find(request_id)
        if refused is not None:
            return ControlOutcome(request_id, reason=refused[0], detail=refused[1])
        if time.monotonic() >= deadline:
            return None
        time.sleep(poll_s)
