"""What happened to each edit, told to its producer and the metrics: receipts (applied, duplicate,
rejected, not_learned, forgotten), dead-letter records, and the writer's running totals.

Receipts and DLQ records are only queued here; the worker flushes them before the manifest that
covers their source positions (daemon/worker.py, step 1).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from daemon import metrics
from daemon.sources import SourceRecord
from daemon.writer_state import PendingEdit, WriterState

if TYPE_CHECKING:  # melo_runtime loads torch: the worker imports it when it builds its first editor
    from melo_runtime.edits import BatchResult, Edit

log = logging.getLogger("melo.worker")


class OutcomeReporter:
    """Receipts, dead letters, metrics and :class:`daemon.writer_state.Progress` for edit outcomes."""

    def __init__(self, state: WriterState) -> None:
        self.state = state

    def reject(self, record: SourceRecord, reason: str, detail: str, *, edit_id: str | None) -> None:
        """Dead-letter ``record`` (and receipt ``edit_id`` when known); its position counts as done."""
        s = self.state
        stream, partition = record.position
        log.warning("model %s: rejected %s at %s/%s/%s: %s (%s)", s.model, edit_id or "an event", stream, partition,
                    record.offset, reason, detail[:200])
        s.publisher.dead_letter(record, reason, detail)
        if edit_id is not None:
            s.publisher.receipt(edit_id, "rejected", reason=reason, detail=detail, record=record)
        s.batcher.observe(record)
        s.progress.dead_lettered += 1
        s.progress.rejected += 1
        metrics.DLQ.labels(reason=reason).inc()
        metrics.REJECTED.labels(reason=reason).inc()

    def duplicate(self, edit_id: str, record: SourceRecord) -> None:
        """Receipt an edit already applied (or already in the batch); its position counts as done."""
        s = self.state
        s.publisher.receipt(edit_id, "duplicate", version=s.version, record=record)
        s.batcher.observe(record)
        s.progress.duplicates += 1
        metrics.DUPLICATES.labels(model=s.model).inc()

    def refused_by_editor(self, rejected: list[tuple[Edit, str]], by_id: Mapping[str, PendingEdit]) -> None:
        """Dead-letter and receipt each edit the editor refused while the batch trained."""
        s = self.state
        for edit, detail in rejected:
            item = by_id[edit.edit_id]
            log.warning("model %s: rejected %s: rejected_by_editor (%s)", s.model, edit.edit_id, detail[:200])
            s.publisher.dead_letter(item.record, "rejected_by_editor", detail)
            s.publisher.receipt(edit.edit_id, "rejected", reason="rejected_by_editor", detail=detail, record=item.record)
            s.progress.rejected += 1
            s.progress.dead_lettered += 1
            metrics.DLQ.labels(reason="rejected_by_editor").inc()
            metrics.REJECTED.labels(reason="rejected_by_editor").inc()

    def not_learned(self, results: list[BatchResult], by_id: Mapping[str, PendingEdit]) -> set[str]:
        """Dead-letter and receipt every edit the trainer could not learn within its budget.

        Such an edit is not applied: the editor indexed none of its keys (its inputs keep the base
        model's answer), no version lists it, and producing it again retries it.
        """
        s = self.state
        assert s.editor is not None
        config = s.editor.config
        budget = (
            f"iterations {config.iterations}, max_iterations {config.max_iterations}, "
            f"retry_rounds {config.retry_rounds}"
        )
        failed: set[str] = set()
        for result in results:
            for edit_id in result.not_learned:
                item = by_id[edit_id]
                loss = result.edit_losses.get(edit_id, float("nan"))
                detail = (
                    f"not learned: final loss {loss:.4f} after {result.iterations_run} iterations in "
                    f"{result.blocks_added} block(s) (budget: {budget}); its keys are not indexed, so its "
                    "inputs keep the base model's answer; produce it again to retry"
                )
                s.publisher.dead_letter(item.record, "not_learned", detail)
                s.publisher.receipt(edit_id, "not_learned", reason="not_learned", detail=detail, record=item.record)
                failed.add(edit_id)
        s.progress.not_learned += len(failed)
        s.progress.dead_lettered += len(failed)
        metrics.EDITS_NOT_LEARNED.labels(model=s.model).inc(len(failed))
        metrics.DLQ.labels(reason="not_learned").inc(len(failed))
        return failed

    def applied(
        self, results: list[BatchResult], by_id: Mapping[str, PendingEdit], *, not_learned: set[str], version: int
    ) -> None:
        """Receipt each learned (or indexed) edit of ``results`` as applied in ``version``; batch metrics."""
        s = self.state
        for result in results:
            for edit_id in result.edit_ids:
                if edit_id in not_learned:
                    continue
                item = by_id[edit_id]
                learned = result.learned.get(edit_id, True)  # False only with melo.index_not_learned
                s.publisher.receipt(
                    edit_id, "applied", version=version, record=item.record,
                    detail=None if learned else f"indexed but not learned within {result.iterations_run} iterations",
                )
                created = item.event.created_at
                if created is not None:
                    metrics.EDIT_LATENCY.labels(model=s.model).observe(max(time.time() - created.timestamp(), 0.0))
            metrics.TRAIN_SECONDS.labels(model=s.model).observe(result.seconds)
            metrics.BATCH_SIZE.labels(model=s.model).observe(len(result.edit_ids))
            metrics.CONFLICTS.labels(model=s.model).inc(result.conflicts)
            s.progress.conflicts += result.conflicts

    def forgotten(self, edit_ids: list[str], *, version: int) -> None:
        """Receipt and announce edits whose every key left the index in ``version``."""
        for edit_id in edit_ids:
            self.state.publisher.receipt(edit_id, "forgotten", version=version)
            self.state.publisher.forgotten(edit_id, version, None)
