"""Edits that arrive over HTTP: validated as the stream validates them, then appended to the edit source.

``POST /v1/edits`` (daemon/api_edits.py) hands the request body to :func:`decode_edits`, which
splits it into one compact JSON line per event and validates each line with
``schemas.parse_edit`` -- the very bytes the writer will read back and validate again -- plus the
two checks the writer applies to a valid event (its model, its task). Only when every event of the
request passes does an :class:`EditSink` append them, durably, to the same source the writer
consumes: the Kafka edits topic keyed by model (acks=all), or a spool file
``<spool>/<edits topic>/http-<host>-<pid>.jsonl`` (one ``O_APPEND`` write, fsynced). The 202
that follows therefore means "in the stream"; what then happened is in the receipts
(daemon/receipts.py).
"""

from __future__ import annotations

import json
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from schemas import InvalidEvent, Limits, parse_edit
from schemas.events import EditEvent


@dataclass(frozen=True)
class EditProblem:
    """Why one event of a request was refused (``index`` in the request, ``reason`` machine-readable)."""

    index: int
    reason: str
    detail: str
    edit_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The problem as the 422 body lists it."""
        return {"index": self.index, "edit_id": self.edit_id, "reason": self.reason, "detail": self.detail}


class EditsRefused(ValueError):
    """At least one event of a request is invalid; nothing of the request was appended."""

    def __init__(self, problems: list[EditProblem]) -> None:
        super().__init__("; ".join(f"[{p.index}] {p.reason}: {p.detail}" for p in problems))
        self.problems = problems


@dataclass(frozen=True)
class ValidEdit:
    """One event that passed: the parsed event and the exact line the writer will read."""

    event: EditEvent
    line: bytes


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # The stream refuses duplicate keys; a lenient decode here would silently keep the last one.
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise ValueError(f"duplicate key {key!r}")
        doc[key] = value
    return doc


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def decode_edits(body: bytes, *, model: str, task: str, limits: Limits, max_events: int) -> list[ValidEdit]:
    """Split a request body (one edit event, or a JSON array of them) into validated stream lines.

    Raises :class:`EditsRefused` listing every refused event (reason codes as the DLQ uses them,
    plus ``wrong_model``, ``wrong_task``, ``duplicate_in_request``), or ValueError for a body that is
    not JSON, empty, or holds more than ``max_events`` events.
    """
    try:
        doc = json.loads(body.decode("utf-8"), object_pairs_hook=_no_duplicate_keys, parse_constant=_refuse_constant)
    except UnicodeDecodeError as exc:
        raise ValueError(f"body is not UTF-8 at byte {exc.start}") from None
    except RecursionError:
        raise ValueError("body nests too deeply") from None
    except ValueError as exc:
        raise ValueError(f"body is not valid JSON: {exc}") from None
    items = doc if isinstance(doc, list) else [doc]
    if not items:
        raise ValueError("body is an empty list: send one edit event or a non-empty list of them")
    if len(items) > max_events:
        raise ValueError(f"{len(items)} edit events, at most {max_events} per request (serve.max_rows): split them")
    valid: list[ValidEdit] = []
    problems: list[EditProblem] = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        outcome = _validate_one(item, model=model, task=task, limits=limits)
        if isinstance(outcome, EditProblem):
            problems.append(EditProblem(index, outcome.reason, outcome.detail, outcome.edit_id))
        elif outcome.event.edit_id in seen:
            problems.append(EditProblem(index, "duplicate_in_request", "this edit_id appears twice in the request",
                                        outcome.event.edit_id))
        else:
            seen.add(outcome.event.edit_id)
            valid.append(outcome)
    if problems:
        raise EditsRefused(problems)
    return valid


def _validate_one(item: Any, *, model: str, task: str, limits: Limits) -> ValidEdit | EditProblem:
    edit_id = item.get("edit_id") if isinstance(item, dict) else None
    edit_id = edit_id if isinstance(edit_id, str) else None
    try:
        # ensure_ascii=False keeps the line as small as the producer wrote it; a lone surrogate
        # cannot be encoded and is refused here, as the stream refuses invalid UTF-8.
        line = json.dumps(item, ensure_ascii=False, separators=(",", ":"), allow_nan=True).encode("utf-8")
    except UnicodeEncodeError as exc:
        return EditProblem(0, "invalid_utf8", f"a string holds an unpaired surrogate at {exc.start}", edit_id)
    except (TypeError, ValueError, RecursionError) as exc:
        return EditProblem(0, "invalid_json", str(exc), edit_id)
    try:
        event = parse_edit(line, limits)
    except InvalidEvent as exc:
        return EditProblem(0, str(exc.reason_code), exc.detail, edit_id)
    if event.model != model:
        return EditProblem(0, "wrong_model", f"model {event.model!r}, but this server serves {model!r}", event.edit_id)
    if event.task != task:
        return EditProblem(0, "wrong_task", f"task {event.task!r}, but model {model} edits {task!r}", event.edit_id)
    return ValidEdit(event, line)


class EditSink(Protocol):
    """Appends validated edit lines to the stream the writer consumes; durable when ``append`` returns."""

    destination: str

    def append(self, edits: list[ValidEdit]) -> None:
        """Append every edit, in order; raise OSError (or a Kafka error) when the stream refuses."""
        ...

    def close(self) -> None:
        """Release what the sink holds open."""
        ...


class SpoolEditSink:
    """Appends to ``<spool>/<topic>/http-<host>-<pid>.jsonl`` (embedded default): the lines of one
    request are one ``write`` on an ``O_APPEND`` descriptor, then fsync, so the spool reader never
    sees half a line and concurrent requests never interleave."""

    def __init__(self, spool_dir: Path, topic: str) -> None:
        self.path = Path(spool_dir) / topic / f"http-{socket.gethostname()}-{os.getpid()}.jsonl"
        self.destination = str(self.path)
        self._lock = threading.Lock()

    def append(self, edits: list[ValidEdit]) -> None:
        """Append the request's lines and fsync them."""
        data = b"".join(edit.line + b"\n" for edit in edits)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)

    def close(self) -> None:
        """Nothing stays open between requests."""


class KafkaEditSink:
    """Produces to the edits topic keyed by model (acks=all from settings), waiting for every ack."""

    def __init__(self, producer_kwargs: dict[str, Any], topic: str) -> None:
        from kafka import KafkaProducer

        self.topic = topic
        self.destination = f"Kafka topic {topic}"
        self._producer = KafkaProducer(**producer_kwargs)

    def append(self, edits: list[ValidEdit]) -> None:
        """Send every line and wait until the broker acknowledged each."""
        futures = [self._producer.send(self.topic, key=e.event.model.encode("utf-8"), value=e.line) for e in edits]
        self._producer.flush(timeout=30)
        for future in futures:
            future.get(timeout=30)

    def close(self) -> None:
        """Flush and close the producer."""
        self._producer.close()
