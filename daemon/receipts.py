"""What happened to an edit, read back from the receipts the writer sends (daemon/publish.py).

The writer sends one receipt per outcome to ``melo.edit-results`` (the Kafka topic, or
``<data_dir>/outbox/melo.edit-results.jsonl`` in the embedded default). A :class:`ReceiptIndex`
follows that stream and keeps, per edit id of its model, the receipts seen so far;
:func:`edit_status` folds them into one state:

=============  ======================================================================
pending        accepted into the stream, no receipt yet (or not known at all: 404)
applied        learned in ``version``
not_learned    in ``version``, but training stopped before every target token was the model's
               greedy choice (the receipt's detail says after how many iterations)
forgotten      a newer conflicting edit shrank its cluster in ``version``
retracted      removed by a retract in ``version``
rolled_back    undone by a rollback in ``version``
rejected       refused (``reason`` / ``detail`` as in the DLQ record)
duplicate      its id was already applied (or queued) when it arrived
=============  ======================================================================

Receipts are at-least-once and arrive in the order the writer sent them, so the newest receipt
that is not ``duplicate`` wins; ``duplicate`` only stands when it is all there is (a second copy
of an applied edit must not hide that the first was applied).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

Status = Literal[
    "pending", "applied", "not_learned", "forgotten", "retracted", "rolled_back", "rejected", "duplicate"
]
# Every receipt's edit id is remembered; bound the memory of one process following a long stream.
MAX_TRACKED_EDITS = 1_000_000


@dataclass(frozen=True)
class EditStatus:
    """The state of one edit as ``GET /v1/edits/{id}`` reports it."""

    edit_id: str
    status: Status
    version: int | None = None
    reason: str | None = None
    detail: str | None = None

    @property
    def final(self) -> bool:
        """True once a receipt decided the edit (a later receipt may still change it: forgotten, ...)."""
        return self.status != "pending"

    def to_json(self) -> dict[str, Any]:
        """The response body."""
        return {"edit_id": self.edit_id, "status": self.status, "version": self.version,
                "reason": self.reason, "detail": self.detail}


def _not_learned(receipt: dict[str, Any]) -> bool:
    # The writer marks an applied-but-unlearned edit by its detail (daemon/edit_outcomes.py); a later
    # writer may send status "not_learned" itself.
    detail = receipt.get("detail")
    return receipt.get("status") == "not_learned" or (
        receipt.get("status") == "applied" and isinstance(detail, str) and detail.startswith("not learned")
    )


def edit_status(edit_id: str, receipts: list[dict[str, Any]]) -> EditStatus:
    """Fold an edit's receipts (oldest first) into its current state; ``pending`` when there are none."""
    if not receipts:
        return EditStatus(edit_id, "pending")
    decisive = [r for r in receipts if r.get("status") != "duplicate"] or receipts
    last = decisive[-1]
    status: Status = "not_learned" if _not_learned(last) else last.get("status", "pending")
    version = last.get("version")
    return EditStatus(edit_id, status, int(version) if isinstance(version, int) else None,
                      last.get("reason"), last.get("detail"))


class ReceiptIndex(Protocol):
    """Receipts of one model by edit id, kept up to date with the results stream."""

    def receipts(self, edit_id: str) -> list[dict[str, Any]]:
        """Every receipt seen for ``edit_id``, oldest first."""
        ...


def receipt_of(value: bytes, model: str) -> dict[str, Any] | None:
    """The receipt in a results-stream record if it is one of ``model``'s, else None."""
    try:
        receipt = json.loads(value)
    except ValueError:
        return None  # not a receipt of ours: the results topic is shared with other producers
    if not isinstance(receipt, dict) or receipt.get("model") != model or not isinstance(receipt.get("edit_id"), str):
        return None
    return receipt


class _Table:
    """Receipts by edit id for one model (thread-safe)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self._by_id: dict[str, list[dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def add(self, value: bytes) -> None:
        receipt = receipt_of(value, self.model)
        if receipt is None:
            return
        edit_id = receipt["edit_id"]
        with self._lock:
            if edit_id not in self._by_id and len(self._by_id) >= MAX_TRACKED_EDITS:
                self._by_id.pop(next(iter(self._by_id)))  # oldest first: dicts keep insertion order
            self._by_id.setdefault(edit_id, []).append(receipt)

    def get(self, edit_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._by_id.get(edit_id, ()))


class FileReceipts:
    """Receipts from the file outbox (embedded default): reads what was appended since the last call."""

    def __init__(self, path: Path, model: str) -> None:
        self.path = Path(path)
        self._table = _Table(model)
        self._offset = 0
        self._lock = threading.Lock()

    def receipts(self, edit_id: str) -> list[dict[str, Any]]:
        """Catch up with the file, then answer."""
        self._catch_up()
        return self._table.get(edit_id)

    def _catch_up(self) -> None:
        with self._lock:
            try:
                with self.path.open("rb") as handle:
                    handle.seek(self._offset)
                    for line in handle:
                        if not line.endswith(b"\n"):
                            break  # the writer is still appending it: read it next time
                        self._offset += len(line)
                        self._table.add(line)
            except FileNotFoundError:
                return


class KafkaReceipts:
    """Receipts from the results topic: a background consumer without a group reads it from the start."""

    def __init__(self, client_kwargs: dict[str, Any], topic: str, model: str) -> None:
        self.client_kwargs = client_kwargs
        self.topic = topic
        self._table = _Table(model)
        self._stop = threading.Event()
        self._consumer: Any = None
        self._thread = threading.Thread(target=self._run, name=f"receipts-{model}", daemon=True)

    def receipts(self, edit_id: str) -> list[dict[str, Any]]:
        """What the consumer has read so far."""
        return self._table.get(edit_id)

    def start(self) -> KafkaReceipts:
        """Connect and follow the topic in a background thread; returns self."""
        from kafka import KafkaConsumer

        self._consumer = KafkaConsumer(
            self.topic, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest", **self.client_kwargs
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop following and close the consumer."""
        self._stop.set()
        self._thread.join(10.0)
        if self._consumer is not None:
            self._consumer.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            for records in self._consumer.poll(timeout_ms=200).values():
                for record in records:
                    self._table.add(record.value)
