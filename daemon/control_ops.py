"""Rollback and retract requests from the HTTP admin API, kept on the single writer.

The writer of a model (``daemon.worker.Worker``, holding the record-store lease) is the only process
that publishes versions; :meth:`Worker.rollback` and :meth:`Worker.retract` do the work. Other
processes never write the snapshot store themselves -- two publishers would race for version n+1
and the record store would drift from CURRENT. So a request reaches the writer as a control event:
:class:`ChannelControl` sends it (``schemas/control.v1.json``) on the control channel the writer
consumes -- the Kafka control topic keyed by model, or the spool's control directory in the
embedded setup -- then waits for the manifest carrying the request id. Published within ``wait_s``
→ ``published`` with the new version; otherwise ``accepted`` (HTTP 202): the writer applies it when
it gets to it, in stream order with the edits, and the request id finds the result later in
``GET /v1/versions``.

It checks the request against the store first (the version exists; the edit is reachable in
CURRENT), so a mistake is a 404 now rather than a dead letter later.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from daemon.settings import Settings, TopicsSettings
from schemas.events import MONITOR_REASON_PREFIX, ControlEvent

if TYPE_CHECKING:  # serving_state imports torch; the CLI sends control events without it
    from daemon.serving_state import VersionHistory

Status = Literal["published", "accepted"]


class ControlError(Exception):
    """A control request that cannot be carried out; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ControlResult:
    """The outcome of one rollback / retract request."""

    request_id: str
    status: Status
    version: int | None  # the version the request produced, once published
    via: Literal["worker", "control"]


class ControlOps(Protocol):
    """Rollback and retract, however they reach the writer."""

    def rollback(self, to_version: int, reason: str, *, request_id: str | None = None, trigger: str = "manual") -> ControlResult:
        """Publish a new version whose content is ``to_version``'s."""
        ...

    def retract(self, edit_id: str, reason: str, *, request_id: str | None = None) -> ControlResult:
        """Publish a new version in which ``edit_id`` is no longer reachable."""
        ...


def new_request_id() -> str:
    """A fresh request id (valid against the control schema's identifier pattern)."""
    return f"http-{uuid.uuid4().hex}"


def _check_rollback(history: VersionHistory, to_version: int) -> None:
    known = {m.version for m in history.state.store.versions(history.state.model_name)}
    if to_version not in known:
        raise ControlError(404, f"cannot roll back to version {to_version}: stored versions are {sorted(known)}")


def _check_retract(history: VersionHistory, edit_id: str) -> None:
    current = history.current()
    if current is None or edit_id not in history.reachable(current):
        raise ControlError(404, f"edit {edit_id!r} is not reachable in the current version {current}: nothing to retract")


class SendControl(Protocol):
    """Sends control events to the writer; raises OSError / KafkaError when it cannot."""

    def __call__(self, event: ControlEvent) -> None:
        """Send one event; it is durable on the channel when this returns."""
        ...

    @property
    def destination(self) -> str:
        """Where events go, for messages to people."""
        ...

    def close(self) -> None:
        """Release what the sender holds open."""
        ...


class SpoolControlSender:
    """Appends control events to ``<spool>/<control topic>/<sender>-<host>-<pid>.jsonl`` (embedded setup).

    Each event is one ``write`` of a complete line on an ``O_APPEND`` descriptor, fsynced: the spool
    reader never sees half a line, and lines from several senders never interleave.
    """

    def __init__(self, spool_dir: Path, topic: str, *, sender: str = "http") -> None:
        """``sender`` names the file (``http`` for a serving replica, ``cli`` for the CLI)."""
        self.path = Path(spool_dir) / topic / f"{sender}-{socket.gethostname()}-{os.getpid()}.jsonl"
        self._lock = threading.Lock()

    @property
    def destination(self) -> str:
        """The spool file events are appended to."""
        return str(self.path)

    def __call__(self, event: ControlEvent) -> None:
        line = (json.dumps(event.to_json(), sort_keys=True) + "\n").encode("utf-8")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

    def close(self) -> None:
        """Nothing stays open between events."""


class KafkaControlSender:
    """Produces control events to the control topic, keyed by model (acks=all, flushed per event)."""

    def __init__(self, producer_kwargs: dict[str, Any], topic: str) -> None:
        from kafka import KafkaProducer

        self.topic = topic
        self._producer = KafkaProducer(**producer_kwargs)

    def __call__(self, event: ControlEvent) -> None:
        value = json.dumps(event.to_json(), sort_keys=True).encode("utf-8")
        self._producer.send(self.topic, key=event.model.encode("utf-8"), value=value).get(timeout=30)

    @property
    def destination(self) -> str:
        """The control topic."""
        return f"Kafka topic {self.topic}"

    def close(self) -> None:
        """Flush and close the producer."""
        self._producer.close()


def control_sender(settings: Settings, *, sender: str = "http") -> SendControl:
    """The control channel the writer of ``settings.model`` consumes: Kafka if configured, else the spool
    (``sender`` names the spool file: who wrote the events)."""
    if settings.kafka is not None:
        return KafkaControlSender(settings.kafka.producer_kwargs(), settings.kafka.topics.control)
    assert settings.spool_dir is not None  # filled in by Settings
    return SpoolControlSender(settings.spool_dir, TopicsSettings().control, sender=sender)


class ChannelControl:
    """Control from a process that is not the writer: send on the control channel, wait for the version."""

    def __init__(self, send: SendControl, history: VersionHistory, *, wait_s: float = 30.0, poll_s: float = 0.1) -> None:
        """``wait_s``: how long a request waits for the writer before answering ``accepted``."""
        self.send = send
        self.history = history
        self.wait_s = wait_s
        self.poll_s = poll_s

    def rollback(self, to_version: int, reason: str, *, request_id: str | None = None, trigger: str = "manual") -> ControlResult:
        """Ask the writer to roll back to ``to_version``.

        The reason of a monitor-triggered rollback starts with ``monitor:`` so the writer counts it
        as ``reason="monitor"`` and its receipts and manifest say who asked.
        """
        _check_rollback(self.history, to_version)
        if trigger == "monitor" and not reason.startswith(MONITOR_REASON_PREFIX):
            reason = f"{MONITOR_REASON_PREFIX} {reason}"[:1000]
        return self._submit(lambda rid: ControlEvent(type="rollback", model=self.history.state.model_name, request_id=rid,
                                                     reason=reason, to_version=to_version, created_at=_now()), request_id)

    def retract(self, edit_id: str, reason: str, *, request_id: str | None = None) -> ControlResult:
        """Ask the writer to retract ``edit_id``."""
        _check_retract(self.history, edit_id)
        return self._submit(lambda rid: ControlEvent(type="retract", model=self.history.state.model_name, request_id=rid,
                                                     reason=reason, edit_id=edit_id, created_at=_now()), request_id)

    def _submit(self, build: Callable[[str], ControlEvent], request_id: str | None) -> ControlResult:
        request_id = request_id or new_request_id()
        before = self.history.state.store.latest(self.history.state.model_name) or 0
        try:
            self.send(build(request_id))
        except OSError as exc:
            raise ControlError(503, f"could not send the control event to the writer: {exc}") from exc
        version = self._wait_for(request_id, after=before)
        status: Status = "published" if version is not None else "accepted"
        return ControlResult(request_id=request_id, status=status, version=version, via="control")

    def _wait_for(self, request_id: str, *, after: int) -> int | None:
        """The version published for ``request_id`` (only versions after ``after`` can be it)."""
        store, model = self.history.state.store, self.history.state.model_name
        deadline = time.monotonic() + self.wait_s
        while True:
            latest = store.latest(model) or 0
            for version in range(after + 1, latest + 1):
                if store.manifest(model, version).request_id == request_id:
                    return version
            after = max(after, latest)  # manifests appear whole (link), so a read one never changes
            if time.monotonic() >= deadline:
                return None
            time.sleep(self.poll_s)


def _now() -> datetime:
    return datetime.now(UTC)
