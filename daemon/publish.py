"""What the daemon tells the world: DLQ records, per-edit receipts, forgotten edits, snapshot announcements.

``Outbox`` is the transport (Kafka producer, or JSONL files next to the snapshots in the embedded
default); ``Publisher`` builds the messages. Delivery is at-least-once: after a crash, records
after the last manifest are read again and their DLQ records / receipts are sent again, so
consumers key on ``edit_id`` + ``status`` (receipts) or source position (DLQ).

Message shapes (JSON, UTF-8):

- DLQ (``melo.edits.dlq``): the value is the ORIGINAL bytes unchanged; headers ``melo.reason``,
  ``melo.detail``, ``melo.source`` (``topic/partition/offset``). The file outbox writes
  ``{"reason", "detail", "source", "value_b64"}`` instead (files have no headers).
- Receipt (``melo.edit-results``, key = edit id): ``{"edit_id", "model", "status", "version",
  "reason", "detail", "source", "at"}``; status is one of applied | duplicate | rejected |
  not_learned | forgotten | rolled_back | retracted. ``not_learned``: the trainer could not reproduce
  the target within its budget; ``detail`` gives the final loss and the budget spent, the edit is
  dead-lettered too (reason ``not_learned``) and is not part of any version.
- Forgotten (``melo.forgotten``, key = edit id): ``{"edit_id", "model", "version", "block", "at"}``.
- Announcement (``melo.snapshots``, key = model): ``{"model", "version", "parent", "kind",
  "created_at", "edits", "stats"}``.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from daemon.sources import SourceRecord

RECEIPT_STATUSES = ("applied", "duplicate", "rejected", "not_learned", "forgotten", "rolled_back", "retracted")


class Outbox(Protocol):
    """A transport for outgoing records; ``flush`` returns only once everything sent is durable."""

    def send(self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]] | None = None) -> None:
        """Queue one record for ``topic``."""
        ...

    def flush(self, timeout_s: float = 30.0) -> None:
        """Block until every queued record is delivered (raise if it cannot be)."""
        ...

    def close(self) -> None:
        """Flush and release the transport."""
        ...


class FileOutbox:
    """Outbox of append-only JSONL files ``<directory>/<topic>.jsonl`` (embedded default)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._handles: dict[str, Any] = {}
        self._lock = threading.Lock()

    def send(self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]] | None = None) -> None:
        """Append one line; DLQ values that are not JSON are stored base64-encoded by the Publisher."""
        line = value.rstrip(b"\n") + b"\n"
        with self._lock:
            handle = self._handles.get(topic)
            if handle is None:
                handle = open(self.directory / f"{topic}.jsonl", "ab")  # noqa: SIM115 - kept open across sends
                self._handles[topic] = handle
            handle.write(line)

    def flush(self, timeout_s: float = 30.0) -> None:
        """fsync every file written to."""
        with self._lock:
            for handle in self._handles.values():
                handle.flush()
                os.fsync(handle.fileno())

    def close(self) -> None:
        """Flush and close the files."""
        self.flush()
        with self._lock:
            for handle in self._handles.values():
                handle.close()
            self._handles.clear()

    def read(self, topic: str) -> list[dict]:
        """Every record written to ``topic`` so far (for the CLI and tests)."""
        path = self.directory / f"{topic}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class KafkaOutbox:
    """Outbox on a kafka-python ``KafkaProducer`` (settings give acks=all: a flushed record is replicated)."""

    def __init__(self, producer_kwargs: dict[str, Any]) -> None:
        from kafka import KafkaProducer

        self._producer = KafkaProducer(**producer_kwargs)
        self._futures: list[Any] = []
        self._lock = threading.Lock()

    def send(self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]] | None = None) -> None:
        """Queue a record on the producer."""
        future = self._producer.send(topic, key=key, value=value, headers=headers or [])
        with self._lock:
            self._futures.append(future)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait for every queued record's acknowledgement; raise the first delivery error."""
        self._producer.flush(timeout=timeout_s)
        with self._lock:
            futures, self._futures = self._futures, []
        for future in futures:
            future.get(timeout=timeout_s)

    def close(self) -> None:
        """Flush and close the producer."""
        self.flush()
        self._producer.close()


def _source(record: SourceRecord | None) -> str | None:
    if record is None:
        return None
    stream, partition = record.position
    return f"{stream}/{partition}/{record.offset}"


def _json(payload: dict) -> bytes:
    return json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")


class Publisher:
    """Builds and sends the daemon's outgoing messages for one model."""

    def __init__(self, outbox: Outbox, model: str, topics: dict[str, str], *, binary_dlq: bool) -> None:
        """``topics`` maps dlq / results / forgotten / snapshots to topic names. ``binary_dlq``: the
        transport carries raw bytes + headers (Kafka); otherwise the DLQ record is JSON (files)."""
        self.outbox = outbox
        self.model = model
        self.topics = topics
        self.binary_dlq = binary_dlq

    def dead_letter(self, record: SourceRecord, reason: str, detail: str) -> None:
        """Send ``record``'s original bytes to the DLQ with a machine-readable ``reason``."""
        source = _source(record) or ""
        if self.binary_dlq:
            headers = [
                ("melo.reason", reason.encode()),
                ("melo.detail", detail.encode("utf-8", "replace")[:1000]),
                ("melo.source", source.encode()),
            ]
            self.outbox.send(self.topics["dlq"], record.key, record.value, headers)
        else:
            payload = {
                "reason": reason,
                "detail": detail[:1000],
                "source": source,
                "value_b64": base64.b64encode(record.value).decode("ascii"),
            }
            self.outbox.send(self.topics["dlq"], record.key, _json(payload))

    def receipt(
        self,
        edit_id: str,
        status: str,
        *,
        version: int | None = None,
        reason: str | None = None,
        detail: str | None = None,
        record: SourceRecord | None = None,
    ) -> None:
        """Tell upstream what happened to one edit."""
        if status not in RECEIPT_STATUSES:
            raise ValueError(f"receipt status {status!r} is not one of {RECEIPT_STATUSES}")
        payload = {
            "edit_id": edit_id,
            "model": self.model,
            "status": status,
            "version": version,
            "reason": reason,
            "detail": detail,
            "source": _source(record),
            "at": time.time(),
        }
        self.outbox.send(self.topics["results"], edit_id.encode(), _json(payload))

    def forgotten(self, edit_id: str, version: int, block: int | None) -> None:
        """Report an edit dropped by a cluster conflict (DESIGN.md §2)."""
        payload = {"edit_id": edit_id, "model": self.model, "version": version, "block": block, "at": time.time()}
        self.outbox.send(self.topics["forgotten"], edit_id.encode(), _json(payload))

    def announce(self, manifest: dict) -> None:
        """Announce a published version to serving replicas."""
        payload = {
            "model": self.model,
            "version": manifest.get("version"),
            "parent": manifest.get("parent"),
            "kind": manifest.get("kind"),
            "created_at": manifest.get("created_at"),
            "edits": len(manifest.get("edit_ids") or []),
            "stats": manifest.get("stats"),
        }
        self.outbox.send(self.topics["snapshots"], self.model.encode(), _json(payload))

    def flush(self, timeout_s: float = 30.0) -> None:
        """Block until everything sent is durable."""
        self.outbox.flush(timeout_s)
