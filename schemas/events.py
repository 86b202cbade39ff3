"""Typed, validated events: what `schemas.validate` returns once raw bytes pass every check."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

Task = Literal["generate", "classify"]
ControlType = Literal["rollback", "retract", "pause", "resume"]
# A rollback whose reason starts with this was asked for by the monitor: the writer counts it as
# reason="monitor" and the admin API prefixes reasons of monitor-triggered rollbacks with it.
MONITOR_REASON_PREFIX = "monitor:"


@dataclass(frozen=True)
class LocalityProbe:
    """An input whose output must not change because of an edit (`expected` = the output it must keep)."""

    prompt: str
    expected: str | None = None


@dataclass(frozen=True)
class EditEvent:
    """One accepted edit event (schemas/edit.v1.json), already checked against the configured limits."""

    edit_id: str
    model: str
    task: Task
    prompt: str
    target: str
    rephrases: tuple[str, ...] = ()
    subject: str | None = None
    locality: tuple[LocalityProbe, ...] = ()
    source: str | None = None
    created_at: datetime | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The event as a JSON object that `parse_edit` accepts again (absent optional fields omitted)."""
        doc: dict[str, Any] = {
            "edit_id": self.edit_id,
            "model": self.model,
            "task": self.task,
            "prompt": self.prompt,
            "target": self.target,
        }
        if self.rephrases:
            doc["rephrases"] = list(self.rephrases)
        if self.subject is not None:
            doc["subject"] = self.subject
        if self.locality:
            doc["locality"] = [
                {"prompt": p.prompt} | ({} if p.expected is None else {"expected": p.expected}) for p in self.locality
            ]
        if self.source is not None:
            doc["source"] = self.source
        if self.created_at is not None:
            doc["created_at"] = self.created_at.isoformat()
        if self.metadata:
            doc["metadata"] = self.metadata
        return doc


@dataclass(frozen=True)
class ControlEvent:
    """One accepted control event (schemas/control.v1.json).

    `to_version` is set only for rollback, `edit_id` only for retract.
    """

    type: ControlType
    model: str
    request_id: str
    reason: str
    to_version: int | None = None
    edit_id: str | None = None
    created_at: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        """The event as a JSON object that `parse_control` accepts again."""
        doc: dict[str, Any] = {
            "type": self.type,
            "model": self.model,
            "request_id": self.request_id,
            "reason": self.reason,
        }
        if self.to_version is not None:
            doc["to_version"] = self.to_version
        if self.edit_id is not None:
            doc["edit_id"] = self.edit_id
        if self.created_at is not None:
            doc["created_at"] = self.created_at.isoformat()
        return doc
