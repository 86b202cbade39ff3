"""The writer loop of one model: poll → validate → dedupe → micro-batch → train → publish → record →
announce → commit (DESIGN.md §4).

Order per batch, and why (invariants 1 and 2 of DESIGN.md §5):

1. DLQ records and receipts queued so far are flushed first — the next manifest covers their offsets.
2. The block trains in a helper thread while the main thread keeps the source alive (Kafka:
   ``poll()`` with every partition paused, so the consumer is never evicted from its group however
   long training takes — kafka-python 3 heartbeats from a background thread but leaves the group
   when ``poll()`` is not called for ``max_poll_interval_ms``).
3. The snapshot is published (blobs, then an O_EXCL manifest recording the covered source positions,
   then CURRENT). From here on the batch is durable: a crash replays nothing but the record store.
4. The record store is committed (one fenced, atomic transaction; retried while Redis is down).
5. Announcement, receipts and forgotten records are sent and flushed.
6. Source offsets are committed — only offsets the published manifest covers.

Control events are executed in stream order: the pending batch is published first. ``rollback``
and ``retract`` are also plain methods (:meth:`Worker.rollback`, :meth:`Worker.retract`) that the
HTTP admin API calls on the running worker; they take the same lock as the loop, so one writer
stays one writer.

After each edit version is published, announced and committed, the callbacks registered with
:meth:`Worker.on_edit_published` run on the loop thread (``melo run`` registers the monitor's
after-publish check there, so a harmful batch is rolled back before the next one trains).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from daemon import metrics
from daemon.batcher import MicroBatcher
from daemon.crash import CrashPoints
from daemon.errors import CorruptSnapshot, Fenced, Retryable, SnapshotNotFound, VersionConflict, VersionMoved, WrongBaseWeights
from daemon.publish import Publisher
from daemon.recovery import (
    Recovered,
    RecoveryError,
    applied_by_version,
    cluster_records,
    fence_snapshots,
    manifest_field,
    reconcile,
    recover,
    retry,
)
from daemon.redelivery import redeliver
from daemon.sources import EventSource, Offsets, SourceRecord
from schemas import InvalidEvent, Limits, Reason, parse_control, parse_edit
from schemas.events import MONITOR_REASON_PREFIX, ControlEvent, EditEvent

if TYPE_CHECKING:
    from daemon.settings import Settings

log = logging.getLogger("melo.worker")

EXIT_OK = 0
EXIT_LEASE_LOST = 3
EXIT_BACKEND_DOWN = 4
# Recovery cannot go on by itself (e.g. CURRENT does not load); the log line names the fix.
EXIT_RECOVERY = 5


class LeaseLost(RuntimeError):
    """Another daemon became the writer of this model: stop publishing and consuming."""


class BatchAbandoned(RuntimeError):
    """Shutdown was asked while a block trained; nothing of the batch was published or committed."""


# Called after each edit version: (its manifest, the applied edit events, ids of the edits the
# trainer reports learned).
PublishHook = Callable[[Any, Sequence[EditEvent], frozenset[str]], Any]


class EditorFactory(Protocol):
    """Builds MeloEditors over the one loaded backbone."""

    base_model: dict[str, Any]  # {"id", "weights_sha256"} recorded in every manifest

    def fresh(self) -> Any:
        """An editor with no edits, configured by the backbone's preset and the settings overrides."""
        ...

    def from_files(self, files: dict[str, bytes]) -> Any:
        """The editor a snapshot's files describe."""
        ...


@dataclass(frozen=True)
class WorkerOptions:
    """Knobs of the loop (filled from Settings by :func:`daemon.cli`)."""

    model: str
    task: str
    owner: str
    batch_max_size: int = 16
    batch_max_wait_s: float = 5.0
    lease_ttl_s: float = 30.0
    lease_renew_s: float = 10.0
    retry_deadline_s: float = 300.0
    poll_timeout_s: float = 0.5
    poll_max_records: int = 500
    limits: Limits = field(default_factory=Limits)
    reject_other_models: bool = False  # dead-letter events of other models instead of leaving them to their writer
    # A writer holding the lease with no partition this long logs a warning (and again at this interval).
    partitionless_warn_s: float = 60.0


@dataclass
class PendingEdit:
    """An accepted edit waiting in the micro-batcher."""

    event: EditEvent
    record: SourceRecord


@dataclass
class Progress:
    """Running totals for the CLI's summary."""

    events: int = 0
    applied: int = 0
    duplicates: int = 0
    rejected: int = 0
    dead_lettered: int = 0
    forgotten: int = 0
    not_learned: int = 0
    versions_published: int = 0
    conflicts: int = 0
    control: int = 0


def _to_edit(event: EditEvent) -> Any:
    from melo_runtime import Edit

    return Edit(
        edit_id=event.edit_id,
        prompt=event.prompt,
        target=event.target,
        rephrases=tuple(event.rephrases),
        subject=event.subject,
    )


def _edit_id_of(raw: bytes) -> str | None:
    """Best-effort edit id of an event that failed validation, so its receipt can name it."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    value = doc.get("edit_id") if isinstance(doc, dict) else None
    return value if isinstance(value, str) and 0 < len(value) <= 128 else None


class Worker:
    """The single writer of one model. Construct, then :meth:`run` (blocks until stopped or idle)."""

    def __init__(
        self,
        options: WorkerOptions,
        *,
        source: EventSource,
        snapshots: Any,
        records: Any,
        publisher: Publisher,
        editors: EditorFactory,
        crash: CrashPoints | None = None,
        on_progress: Callable[[str], None] | None = None,
        training_display: Callable[[str], Any] | None = None,
    ) -> None:
        """``training_display(description)``, when given, returns a progress display (``refresh()``,
        ``close()``: a tqdm bar) shown while a block trains -- `melo run` passes one on a terminal."""
        self.options = options
        self.model = options.model
        self.source = source
        self.snapshots = snapshots
        self.records = records
        self.publisher = publisher
        self.editors = editors
        self.crash = crash or CrashPoints()
        self.on_progress = on_progress or (lambda line: log.info("%s", line))
        self.training_display = training_display
        self.batcher: MicroBatcher[PendingEdit] = MicroBatcher(options.batch_max_size, options.batch_max_wait_s)
        self.progress = Progress()
        self.editor: Any = None
        self.version: int | None = None
        self.token: int | None = None
        self.paused = False
        self._committed: Offsets = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._lease_lost = threading.Event()
        self._last_renewal = time.monotonic()
        self._trainer: threading.Thread | None = None
        self._publish_hooks: list[PublishHook] = []
        self._partitionless_since: float | None = None
        self._last_partition_warning = 0.0

    # ----------------------------------------------------------------- lifecycle

    @property
    def lock(self) -> threading.RLock:
        """The loop's lock, held while a batch or control event is processed: whoever holds it acts
        between two turns of the loop (the monitor takes it before probing and rolling back)."""
        return self._lock

    def on_edit_published(self, hook: PublishHook) -> None:
        """Run ``hook(manifest, events, learned_ids)`` on the loop thread after every edit version."""
        self._publish_hooks.append(hook)

    def stop(self) -> None:
        """Ask the loop to finish (signal-safe): pending edits are abandoned, nothing unpublished is committed."""
        self._stop.set()

    @property
    def training_abandoned(self) -> bool:
        """True if a training thread is still running after the loop stopped (the CLI exits without it)."""
        return self._trainer is not None and self._trainer.is_alive()

    def start(self, *, tolerate_corrupt: bool = False) -> bool:
        """Recover (lease, CURRENT, record store, source position); False if stopped while waiting.

        ``tolerate_corrupt``: go on when CURRENT does not load, with no editor — only
        :meth:`rollback` may follow (the CLI's direct rollback repairing a corrupt CURRENT).
        """
        self.on_progress(f"model {self.model}: waiting for the writer lease as {self.options.owner}")
        recovered = recover(
            self.records,
            self.snapshots,
            self.model,
            self.options.owner,
            lease_ttl_s=self.options.lease_ttl_s,
            retry_deadline_s=self.options.retry_deadline_s,
            stop=self._stop,
            tolerate_corrupt=tolerate_corrupt,
        )
        if recovered is None:
            return False
        self._resume_from(recovered)
        if recovered.corrupt is None:
            self._redeliver()
        return True

    def _check_base_weights(self, version: int) -> None:
        """Refuse to continue a history trained on other base weights (its blocks would be wrong)."""
        recorded = manifest_field(self.snapshots.manifest(self.model, version), "base_model") or {}
        ours = self.editors.base_model
        if recorded.get("weights_sha256") and ours.get("weights_sha256") != recorded["weights_sha256"]:
            raise WrongBaseWeights(
                f"model {self.model!r} version {version} was made for base weights {recorded['weights_sha256']} "
                f"({recorded.get('id')}), but this daemon loaded {ours.get('weights_sha256')} ({ours.get('id')}): "
                "set backbone (and dtype) to the weights the history was trained on, or use a new model name"
            )

    def _resume_from(self, recovered: Recovered) -> None:
        self.token = recovered.token
        self.version = recovered.version
        self._last_renewal = time.monotonic()
        if recovered.version is not None and recovered.corrupt is None:
            self._check_base_weights(recovered.version)
        if recovered.corrupt is not None:
            self.editor = None
            self.on_progress(f"model {self.model}: version {self.version} does not load ({recovered.corrupt})")
        elif recovered.files is None:
            self.editor = self.editors.fresh()
        else:
            self.editor = self.editors.from_files(recovered.files)
        self.source.seek(recovered.offsets)
        self.batcher.reset(recovered.offsets)
        self._committed = recovered.offsets
        metrics.LEASE_HELD.labels(model=self.model).set(1)
        metrics.SNAPSHOT_VERSION.labels(model=self.model).set(self.version or 0)
        self.refresh_metrics()
        replay = " (record store replayed)" if recovered.replayed else ""
        self.on_progress(
            f"model {self.model}: writer token {self.token}, resuming from version {self.version or 'none'}{replay}"
        )

    def _redeliver(self) -> None:
        """Re-send receipts and announcements a crash kept from going out, then let the after-publish
        hooks (the monitor's check) judge CURRENT if it is one of those versions."""
        resent = redeliver(self.publisher, self.snapshots, self.model, self.version)
        if resent:
            self.on_progress(f"model {self.model}: re-sent receipts and announcements of version(s) {resent}")
        if self.version in resent:
            manifest = self.snapshots.manifest(self.model, self.version)
            if manifest_field(manifest, "kind") == "edit":
                self._run_publish_hooks(manifest, [], frozenset())

    def run(self, *, until_idle: bool = False) -> int:
        """Recover, then loop until stopped (or, with ``until_idle``, until the source is drained and
        everything read is published and committed). Returns the process exit status."""
        try:
            if not self.start():
                return EXIT_OK
            while not self._stop.is_set():
                if self._lease_lost.is_set():
                    raise LeaseLost(f"model {self.model}: the writer lease was lost")
                if self.step() and until_idle:
                    return EXIT_OK
            return EXIT_OK
        except LeaseLost as error:
            log.error("%s; stopping without publishing", error)
            metrics.LEASE_HELD.labels(model=self.model).set(0)
            return EXIT_LEASE_LOST
        except BatchAbandoned:
            log.warning("model %s: shutdown during training; the batch was abandoned (not published)", self.model)
            return EXIT_OK
        except Retryable as error:
            log.error("model %s: %s", self.model, error)
            return EXIT_BACKEND_DOWN
        except RecoveryError as error:
            log.error("%s", error)
            return EXIT_RECOVERY
        except CorruptSnapshot as error:  # e.g. an unreadable manifest: restore it from a backup
            log.error("model %s: %s; restore it, or roll back to a version `melo snapshots verify` passes", self.model, error)
            return EXIT_RECOVERY
        finally:
            self.close()

    def close(self) -> None:
        """Flush the outbox, close the source and release the writer lease. :meth:`run` ends with it;
        call it after :meth:`start` when driving the worker without :meth:`run` (the CLI's direct
        rollback / retract)."""
        try:
            self.publisher.flush()
        except Exception as error:  # noqa: BLE001 - shutdown must go on; the records are re-sent after restart
            log.warning("model %s: could not flush the outbox on shutdown: %s", self.model, error)
        self.source.close()
        if self.token is not None and not self._lease_lost.is_set():
            try:
                self.records.release_lease(self.model, self.options.owner, self.token)
            except Exception as error:  # noqa: BLE001 - the lease then simply expires after its TTL
                log.warning("model %s: could not release the lease (it will expire): %s", self.model, error)
        metrics.LEASE_HELD.labels(model=self.model).set(0)
        metrics.SECONDS_WITHOUT_PARTITIONS.labels(model=self.model).set(0)

    # ----------------------------------------------------------------- one turn of the loop

    def step(self) -> bool:
        """Poll once and process what is due; True when idle (source drained, nothing pending)."""
        records = self.source.poll(self.options.poll_timeout_s, self.options.poll_max_records)
        self._watch_partitions()
        with self._lock:
            if records:
                self.crash.reached("polled")
                self._handle(records)
            while self.batcher.due() and not self._stop.is_set():
                self._process_batch()
            if records or not self.source.at_end():
                return False
            if len(self.batcher):
                self.batcher.request_flush()  # drained: no reason to wait out max_wait_s
                return False
            self._commit_done_records()
            return True

    def _watch_partitions(self) -> None:
        """Export the assignment; warn (then every minute) while the lease is held with no partition:
        such a writer blocks the model and reads nothing (a consumer group stuck after a rebalance)."""
        assigned = self.source.assigned_partitions()
        now = time.monotonic()
        metrics.ASSIGNED_PARTITIONS.labels(model=self.model).set(assigned)
        if assigned:
            self._partitionless_since = None
            metrics.SECONDS_WITHOUT_PARTITIONS.labels(model=self.model).set(0)
            return
        if self._partitionless_since is None:
            self._partitionless_since = self._last_partition_warning = now
        idle = now - self._partitionless_since
        metrics.SECONDS_WITHOUT_PARTITIONS.labels(model=self.model).set(idle)
        warn_s = self.options.partitionless_warn_s
        if idle >= warn_s and now - self._last_partition_warning >= warn_s:
            self._last_partition_warning = now
            log.warning(
                "model %s: this writer holds the lease but has had no partition assigned for %.0fs; nothing is being "
                "read. Check the consumer group (kafka-consumer-groups.sh --describe --group <kafka.group_id>) and "
                "restart this process if the group does not assign it a partition", self.model, idle,
            )

    def _handle(self, records: Sequence[SourceRecord]) -> None:
        accepted: list[tuple[EditEvent, SourceRecord]] = []
        for record in records:
            self.progress.events += 1
            metrics.EVENTS_RECEIVED.labels(topic=record.topic).inc()
            if record.topic == self.source.control_topic:
                self._enqueue(accepted)
                accepted = []
                while len(self.batcher):  # control acts on everything before it in the stream
                    self.batcher.request_flush()
                    self._process_batch()
                self._handle_control(record)
                continue
            try:
                event = parse_edit(record.value, self.options.limits)
            except InvalidEvent as error:
                self._reject(record, str(error.reason_code), error.detail, edit_id=_edit_id_of(record.value))
                continue
            if event.model != self.model:
                if self.options.reject_other_models:
                    self._reject(record, "wrong_model", f"model {event.model!r}, but this daemon edits {self.model!r}",
                                 edit_id=event.edit_id)
                else:
                    self.batcher.observe(record)  # another model's event: its own daemon handles it
                continue
            if event.task != self.options.task:
                self._reject(record, "wrong_task", f"task {event.task!r} but model {self.model} edits {self.options.task!r}",
                             edit_id=event.edit_id)
                continue
            accepted.append((event, record))
        self._enqueue(accepted)

    def _reject(self, record: SourceRecord, reason: str, detail: str, *, edit_id: str | None) -> None:
        stream, partition = record.position
        log.warning("model %s: rejected %s at %s/%s/%s: %s (%s)", self.model, edit_id or "an event", stream, partition,
                    record.offset, reason, detail[:200])
        self.publisher.dead_letter(record, reason, detail)
        if edit_id is not None:
            self.publisher.receipt(edit_id, "rejected", reason=reason, detail=detail, record=record)
        self.batcher.observe(record)
        self.progress.dead_lettered += 1
        self.progress.rejected += 1
        metrics.DLQ.labels(reason=reason).inc()
        metrics.REJECTED.labels(reason=reason).inc()

    def _enqueue(self, accepted: list[tuple[EditEvent, SourceRecord]]) -> None:
        if not accepted:
            return
        ids = [event.edit_id for event, _ in accepted]
        applied = retry(
            lambda: set(self.records.applied(self.model, ids)),
            what="checking applied edit ids in the record store",
            deadline_s=self.options.retry_deadline_s,
            stop=self._stop,
            on_retry=self._log_retry,
        )
        for event, record in accepted:
            if event.edit_id in applied or self.batcher.holds(event.edit_id):
                self.publisher.receipt(event.edit_id, "duplicate", version=self.version, record=record)
                self.batcher.observe(record)
                self.progress.duplicates += 1
                metrics.DUPLICATES.labels(model=self.model).inc()
            elif (refusal := self._editor_refusal(event)) is not None:
                self._reject(record, *refusal, edit_id=event.edit_id)
            else:
                self.batcher.add(PendingEdit(event, record), event.edit_id, record)
        self.crash.reached("outbox")

    def _editor_refusal(self, event: EditEvent) -> tuple[str, str] | None:
        """(reason, detail) if the editor would refuse this edit, e.g. over its token budget: the
        character limits of schemas/ cannot see tokens, so the budget is checked here, at intake,
        and a refused edit never enters (and never splits) a batch."""
        from melo_runtime.editor import TokenLimitError

        try:
            self.editor.check_edit(_to_edit(event))
        except TokenLimitError as error:
            return str(Reason.TOO_MANY_TOKENS), str(error)
        except ValueError as error:
            return "rejected_by_editor", str(error)
        return None

    # ----------------------------------------------------------------- batches

    def _process_batch(self) -> None:
        pending = self.batcher.take()
        if not pending:
            return
        covered = self.batcher.covered()
        self.publisher.flush()  # DLQ records / receipts before the manifest that covers them
        results, rejected = self._apply([_to_edit(p.event) for p in pending])
        self.crash.reached("trained")
        by_id = {p.event.edit_id: p for p in pending}
        for edit, detail in rejected:
            item = by_id[edit.edit_id]
            log.warning("model %s: rejected %s: rejected_by_editor (%s)", self.model, edit.edit_id, detail[:200])
            self.publisher.dead_letter(item.record, "rejected_by_editor", detail)
            self.publisher.receipt(edit.edit_id, "rejected", reason="rejected_by_editor", detail=detail, record=item.record)
            self.progress.rejected += 1
            self.progress.dead_lettered += 1
            metrics.DLQ.labels(reason="rejected_by_editor").inc()
            metrics.REJECTED.labels(reason="rejected_by_editor").inc()
        not_learned = self._report_not_learned(results, by_id)
        applied_ids = [edit_id for result in results for edit_id in result.edit_ids if edit_id not in not_learned]
        if not applied_ids:
            self.publisher.flush()
            self._commit_source(covered)
            return
        forgotten = [edit_id for result in results for edit_id in result.forgotten]
        files = self.editor.export_files()
        manifest = self._publish(files, kind="edit", edit_ids=applied_ids, offsets=covered)
        new_version = int(manifest_field(manifest, "version"))
        self._record(new_version, files, applied_ids=applied_ids, removed_ids=[])
        for result in results:
            for edit_id in result.edit_ids:
                if edit_id in not_learned:
                    continue
                item = by_id[edit_id]
                learned = result.learned.get(edit_id, True)  # False only with melo.index_not_learned
                self.publisher.receipt(
                    edit_id, "applied", version=new_version, record=item.record,
                    detail=None if learned else f"indexed but not learned within {result.iterations_run} iterations",
                )
                created = item.event.created_at
                if created is not None:
                    metrics.EDIT_LATENCY.labels(model=self.model).observe(max(time.time() - created.timestamp(), 0.0))
            metrics.TRAIN_SECONDS.labels(model=self.model).observe(result.seconds)
            metrics.BATCH_SIZE.labels(model=self.model).observe(len(result.edit_ids))
            metrics.CONFLICTS.labels(model=self.model).inc(result.conflicts)
            self.progress.conflicts += result.conflicts
        for edit_id in forgotten:
            self.publisher.receipt(edit_id, "forgotten", version=new_version)
            self.publisher.forgotten(edit_id, new_version, None)
        self.progress.applied += len(applied_ids)
        self.progress.forgotten += len(forgotten)
        metrics.EDITS_APPLIED.labels(model=self.model).inc(len(applied_ids))
        metrics.FORGOTTEN.labels(model=self.model).inc(len(forgotten))
        self._announce_and_commit(manifest, covered)
        stats = self.editor.stats()
        self.on_progress(
            f"version {new_version}: +{len(applied_ids)} edits (total {self.progress.applied}), "
            f"blocks {stats.get('blocks')}, clusters {stats.get('clusters')}, conflicts {stats.get('conflicts_total')}, "
            f"forgotten {len(forgotten)}, trained in {sum(r.seconds for r in results):.1f}s"
        )
        learned = frozenset(i for result in results for i, ok in result.learned.items() if ok)
        self._run_publish_hooks(manifest, [by_id[i].event for i in applied_ids], learned)

    def _report_not_learned(self, results: list[Any], by_id: dict[str, PendingEdit]) -> set[str]:
        """Dead-letter and receipt every edit the trainer could not learn within its budget.

        Such an edit is not applied: the editor indexed none of its keys (its inputs keep the base
        model's answer), no version lists it, and producing it again retries it.
        """
        config = self.editor.config
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
                self.publisher.dead_letter(item.record, "not_learned", detail)
                self.publisher.receipt(edit_id, "not_learned", reason="not_learned", detail=detail, record=item.record)
                failed.add(edit_id)
        self.progress.not_learned += len(failed)
        self.progress.dead_lettered += len(failed)
        metrics.EDITS_NOT_LEARNED.labels(model=self.model).inc(len(failed))
        metrics.DLQ.labels(reason="not_learned").inc(len(failed))
        return failed

    def _run_publish_hooks(self, manifest: Any, events: list[EditEvent], learned: frozenset[str]) -> None:
        for hook in self._publish_hooks:
            try:
                hook(manifest, events, learned)
            except (LeaseLost, BatchAbandoned, Retryable):
                raise  # the writer's own failures (e.g. from a rollback the hook asked for) stop the loop
            except Exception:  # noqa: BLE001 - the version is durable already; a failing observer must not stop the writer
                log.exception("model %s: after-publish hook %r failed on version %s", self.model, hook, self.version)

    def _apply(self, edits: list[Any]) -> tuple[list[Any], list[tuple[Any, str]]]:
        """Train ``edits``; edits the editor refuses (ValueError) are left out so the valid ones
        still land as one block. Refusals are found edit by edit without training; only edits that
        are valid alone but refused together are isolated by bisection (each half its own block)."""
        try:
            return [self._train(edits)], []
        except ValueError as error:
            if len(edits) == 1:
                return [], [(edits[0], str(error))]
        rejected: list[tuple[Any, str]] = []
        for edit in edits:
            try:
                self.editor.check_edit(edit)
            except ValueError as error:
                rejected.append((edit, str(error)))
        if rejected:
            refused = {id(edit) for edit, _ in rejected}
            good = [edit for edit in edits if id(edit) not in refused]
            results, more = self._apply(good) if good else ([], [])
            return results, rejected + more
        middle = len(edits) // 2
        left_results, left_rejected = self._apply(edits[:middle])
        right_results, right_rejected = self._apply(edits[middle:])
        return left_results + right_results, left_rejected + right_rejected

    def _train(self, edits: list[Any]) -> Any:
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                outcome["result"] = self.editor.apply_batch(edits)
            except BaseException as error:  # noqa: BLE001 - re-raised on the loop thread below
                outcome["error"] = error

        self._trainer = threading.Thread(target=target, name="melo-train", daemon=True)
        self._trainer.start()
        display = None
        if self.training_display is not None:
            display = self.training_display(f"training block {getattr(self.editor, 'blocks', '?')} ({len(edits)} edits)")
        try:
            while self._trainer.is_alive():
                if self._stop.is_set():
                    raise BatchAbandoned()
                self._trainer.join(0.2)
                self.source.keepalive(0)
                if display is not None:
                    display.refresh()
        finally:
            if display is not None:
                display.close()
        self._trainer = None
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]

    # ----------------------------------------------------------------- publishing

    def _publish(
        self,
        files: dict[str, bytes],
        *,
        kind: str,
        edit_ids: list[str],
        offsets: Offsets,
        extra: dict[str, Any] | None = None,
    ) -> Any:
        stats = self.editor.stats()
        meta: dict[str, Any] = {
            "base_model": self.editors.base_model,
            "melo_config": self.editor.config.to_dict(),
            "edit_counts": {"total": len(self.editor.edit_ids()), "new": len(edit_ids)},
            "edit_ids": list(edit_ids),
            "offsets": offsets,
            "stats": {
                "blocks": int(stats.get("blocks", 0)),
                "clusters": int(stats.get("clusters", 0)),
                "keys": int(stats.get("keys", 0)),
                "edits": int(stats.get("edits", 0)),
                "conflicts": int(stats.get("conflicts_total", 0)),
                "forgotten": int(stats.get("forgotten_total", 0)),
                "retracted": int(stats.get("retracted_total", 0)),
            },
            "kind": kind,
            "writer": {"owner": self.options.owner, "token": int(self.token or 0)},
        }
        meta.update(extra or {})
        self.crash.reached("blobs")
        started = time.perf_counter()
        try:
            manifest = self.snapshots.publish(self.model, files, parent=self.version, meta=meta)
        except Fenced as error:
            metrics.PUBLISH_FAILURES.labels(model=self.model).inc()
            raise self._fenced_out(error) from error
        except VersionConflict as error:
            metrics.PUBLISH_FAILURES.labels(model=self.model).inc()
            self._lease_lost.set()
            raise LeaseLost(f"model {self.model}: another writer published version {(self.version or 0) + 1}") from error
        metrics.PUBLISH_SECONDS.labels(model=self.model).observe(time.perf_counter() - started)
        self.crash.reached("published")
        self.progress.versions_published += 1
        return manifest

    def _record(self, new_version: int, files: dict[str, bytes], *, applied_ids: list[str], removed_ids: list[str]) -> None:
        expected = self.version or 0
        try:
            retry(
                lambda: self.records.commit_version(
                    self.model, self.token, expected, new_version,
                    applied_ids=applied_ids, clusters=cluster_records(files), removed_ids=removed_ids,
                ),
                what=f"committing version {new_version} to the record store",
                deadline_s=self.options.retry_deadline_s,
                stop=self._stop,
                on_retry=self._log_retry,
            )
        except (Fenced, VersionMoved) as error:
            self._resync(new_version, files, error)
        self.version = new_version
        self.crash.reached("recorded")
        metrics.SNAPSHOT_VERSION.labels(model=self.model).set(new_version)
        metrics.LAST_COMMIT.labels(model=self.model).set(time.time())

    def _resync(self, new_version: int, files: dict[str, bytes], cause: Exception) -> None:
        """The record store refused our commit after the snapshot was published (our lease expired
        while Redis was down, or the store restarted behind us): take the lease again and let
        recovery's reconcile bring the store up to the published version."""
        log.warning("model %s: record store refused version %s (%s); re-acquiring the lease", self.model, new_version, cause)
        token = retry(
            lambda: self.records.acquire_lease(self.model, self.options.owner, self.options.lease_ttl_s,
                                               above=self.snapshots.fence_token(self.model)),
            what="re-acquiring the writer lease", deadline_s=self.options.retry_deadline_s, stop=self._stop,
        )
        if token is None or self.snapshots.current(self.model) != new_version:
            self._lease_lost.set()
            raise LeaseLost(f"model {self.model}: another daemon holds the lease now") from cause
        try:
            fence_snapshots(self.snapshots, self.model, int(token), self.options.owner)
        except RecoveryError as error:
            self._lease_lost.set()
            raise LeaseLost(str(error)) from cause
        self.token = int(token)
        self._last_renewal = time.monotonic()
        reconcile(self.records, self.snapshots, self.model, self.token, new_version, files,
                  retry_deadline_s=self.options.retry_deadline_s, stop=self._stop)

    def _fenced_out(self, error: Fenced) -> LeaseLost:
        """The snapshot store saw a newer writer token: this writer was paused past its lease and a
        successor took over. Nothing was published; stop without touching the stores again."""
        self._lease_lost.set()
        return LeaseLost(f"model {self.model}: fenced out by a newer writer ({error})")

    def _announce_and_commit(self, manifest: Any, covered: Offsets) -> None:
        self.publisher.announce(manifest if isinstance(manifest, dict) else _manifest_dict(manifest))
        self.publisher.flush()
        self.snapshots.mark_announced(self.model, int(manifest_field(manifest, "version")))
        self.crash.reached("announced")
        self._commit_source(covered)
        self.refresh_metrics()

    def _commit_source(self, offsets: Offsets) -> None:
        if offsets and offsets != self._committed:
            self.source.commit(offsets)
            self._committed = offsets
            self.crash.reached("committed")

    def _commit_done_records(self) -> None:
        """Idle: commit positions of records that needed no version (duplicates, DLQ) once their
        receipts / DLQ records are durable."""
        covered = self.batcher.covered()
        if covered != self._committed:
            self.publisher.flush()
            self._commit_source(covered)

    def _log_retry(self, error: Exception, waited: float) -> None:
        log.warning("model %s: %s — retrying (%.1fs so far)", self.model, error, waited)

    # ----------------------------------------------------------------- control

    def _handle_control(self, record: SourceRecord) -> None:
        try:
            event = parse_control(record.value, self.options.limits)
        except InvalidEvent as error:
            self._reject(record, str(error.reason_code), error.detail, edit_id=None)
            return
        if event.model != self.model:
            self.batcher.observe(record)
            return
        self.progress.control += 1
        self.batcher.observe(record)
        try:
            self.apply_control(event, record=record)
        except ValueError as error:
            self.publisher.dead_letter(record, "control_failed", str(error))
            metrics.DLQ.labels(reason="control_failed").inc()
            self.progress.dead_lettered += 1
        self.crash.reached("control")

    def apply_control(self, event: ControlEvent, *, record: SourceRecord | None = None) -> Any:
        """Execute one control event; returns the new manifest for rollback / retract, else None."""
        if event.type == "pause":
            self.source.pause()
            self.paused = True
            self.on_progress(f"model {self.model}: paused ({event.reason})")
            return None
        if event.type == "resume":
            self.source.resume()
            self.paused = False
            self.on_progress(f"model {self.model}: resumed ({event.reason})")
            return None
        if event.type == "rollback":
            assert event.to_version is not None
            # A serving replica's monitor asks through the control channel (ChannelControl marks its reason).
            monitor = event.reason.startswith(MONITOR_REASON_PREFIX)
            return self.rollback(event.to_version, event.reason, request_id=event.request_id, monitor=monitor)
        assert event.edit_id is not None
        return self.retract(event.edit_id, event.reason, request_id=event.request_id)

    def rollback(self, to_version: int, reason: str, *, request_id: str | None = None, monitor: bool = False) -> Any:
        """Publish a new version whose content is ``to_version``'s files; the writer continues from it.
        Receipts mark every edit it undoes ``rolled_back``. Raises ValueError for an unknown version."""
        with self._lock:
            try:
                files = self.snapshots.load_files(self.model, to_version)
            except SnapshotNotFound:
                raise ValueError(
                    f"cannot roll back {self.model} to version {to_version}: no such version "
                    f"(latest is {self.snapshots.latest(self.model)}; `melo snapshots list`)"
                ) from None
            except CorruptSnapshot as error:
                raise ValueError(
                    f"cannot roll back {self.model} to version {to_version}: it does not verify ({error}); "
                    "pick another version (`melo snapshots verify`)"
                ) from None
            restored = self.editors.from_files(files)
            after = applied_by_version(self.snapshots, self.model, to_version)
            try:
                before = applied_by_version(self.snapshots, self.model, self.version)
            except CorruptSnapshot:  # an unreadable CURRENT manifest: which edits it held is lost with it
                before = set(after)
            # A corrupt CURRENT has no editor: its manifests still say which edits it had applied.
            reachable = self.editor.edit_ids() if self.editor is not None else before
            undone = sorted(reachable - restored.edit_ids())
            covered = self.batcher.covered()
            self.crash.reached("blobs")
            try:
                manifest = self.snapshots.restore(
                    self.model, to_version, parent=self.version,
                    meta={"offsets": covered, "writer": {"owner": self.options.owner, "token": int(self.token or 0)},
                          "request_id": request_id, "reason": reason},
                )
            except Fenced as error:
                raise self._fenced_out(error) from error
            except VersionConflict as error:
                self._lease_lost.set()
                raise LeaseLost(f"model {self.model}: another writer published version {(self.version or 0) + 1}") from error
            self.crash.reached("published")
            self.progress.versions_published += 1
            self.editor = restored
            new_version = int(manifest_field(manifest, "version"))
            self._record(new_version, files, applied_ids=sorted(after - before), removed_ids=sorted(before - after))
            for edit_id in undone:
                self.publisher.receipt(edit_id, "rolled_back", version=new_version, reason="rollback", detail=reason)
            metrics.ROLLBACKS.labels(model=self.model, reason="monitor" if monitor else "manual").inc()
            self._announce_and_commit(manifest, covered)
            self.on_progress(f"version {new_version}: rollback to version {to_version} ({reason}); {len(undone)} edits undone")
            return manifest

    def retract(self, edit_id: str, reason: str, *, request_id: str | None = None) -> Any:
        """Publish a new version without ``edit_id`` (its inputs get the base output again).
        Raises ValueError if the edit is not reachable in the current version."""
        with self._lock:
            if self.editor is None:
                raise ValueError(f"version {self.version} of {self.model} does not load: roll back before retracting")
            if edit_id not in self.editor.edit_ids():
                raise ValueError(f"edit {edit_id!r} is not in version {self.version} of {self.model}: nothing to retract")
            candidate = self.editors.from_files(self.editor.export_files())
            candidate.retract(edit_id)
            previous, self.editor = self.editor, candidate
            covered = self.batcher.covered()
            files = candidate.export_files()
            try:
                manifest = self._publish(files, kind="retract", edit_ids=[], offsets=covered,
                                         extra={"request_id": request_id, "reason": reason})
            except BaseException:
                self.editor = previous
                raise
            new_version = int(manifest_field(manifest, "version"))
            self._record(new_version, files, applied_ids=[], removed_ids=[])
            self.publisher.receipt(edit_id, "retracted", version=new_version, reason="retract", detail=reason)
            metrics.RETRACTED.labels(model=self.model).inc()
            self._announce_and_commit(manifest, covered)
            self.on_progress(f"version {new_version}: retracted {edit_id} ({reason})")
            return manifest

    # ----------------------------------------------------------------- scheduler jobs

    def request_flush(self) -> None:
        """Scheduler job: train an overdue partial batch at the next turn of the loop."""
        if self.batcher.overdue():
            self.batcher.request_flush()

    def renew_lease(self) -> None:
        """Scheduler job: renew the writer lease; losing it stops the loop (exit status 3)."""
        if self.token is None or self._lease_lost.is_set():
            return
        try:
            held = self.records.renew_lease(self.model, self.options.owner, self.token, self.options.lease_ttl_s)
        except Retryable as error:
            # Redis down: the loop's own retries decide; the lease is lost only once it could have expired.
            if time.monotonic() - self._last_renewal > self.options.lease_ttl_s:
                log.warning("model %s: lease not renewed for a whole TTL (%s)", self.model, error)
            return
        if held:
            self._last_renewal = time.monotonic()
            metrics.LEASE_HELD.labels(model=self.model).set(1)
        else:
            log.error("model %s: lease renewal refused: another daemon is the writer", self.model)
            metrics.LEASE_HELD.labels(model=self.model).set(0)
            self._lease_lost.set()

    def retain(self, keep_last: int, keep_statuses: frozenset[str]) -> None:
        """Scheduler job: delete old versions, under the loop's lock so no publish races the blob sweep."""
        with self._lock:
            removed = self.snapshots.retain(self.model, keep_last, keep_statuses)
        if removed:
            log.info("model %s: retention removed %s", self.model, removed)

    def refresh_metrics(self) -> None:
        """Scheduler job (and after each publish): gauges from the editor's current stats."""
        editor = self.editor
        if editor is None:
            return
        stats = editor.stats()
        metrics.BLOCKS.labels(model=self.model).set(stats.get("blocks", 0))
        metrics.CLUSTERS.labels(model=self.model).set(stats.get("clusters", 0))


def _manifest_dict(manifest: Any) -> dict[str, Any]:
    if hasattr(manifest, "to_dict"):
        return manifest.to_dict()
    return {name: manifest_field(manifest, name) for name in ("version", "parent", "kind", "created_at", "edit_ids", "stats")}


# --------------------------------------------------------------------------- wiring from Settings


# The local record store lives on this machine's disk: a short lease lets a restarted daemon take
# over seconds after a crash (there is no network partition to ride out).
LOCAL_LEASE_TTL_S = 5.0
LOCAL_RETRY_DEADLINE_S = 60.0


class BackboneEditors:
    """:class:`EditorFactory` over one backbone loaded once (on the GPU when settings.device allows)."""

    def __init__(
        self,
        backbone: str,
        *,
        task: str,
        labels: list[str],
        device: str,
        overrides: dict[str, Any],
        dtype: str = "auto",
        trust_remote_code: bool = False,
    ) -> None:
        from melo_runtime.backbones import load_backbone
        from melo_runtime.families import model_device
        from melo_runtime.pretrained import backbone_fingerprint

        self.task = task
        self.overrides = dict(overrides)
        self.model, self.tokenizer = load_backbone(
            backbone, task=task, labels=labels or None, dtype=dtype, device=device, trust_remote_code=trust_remote_code
        )
        self.device = str(model_device(self.model))
        self.base_model = {"id": backbone, "weights_sha256": backbone_fingerprint(self.model)}

    def fresh(self) -> Any:
        """An empty editor: the backbone's preset with ``settings.melo`` overrides on top."""
        from melo_runtime import MeloEditor
        from melo_runtime.presets import preset_for

        return MeloEditor(self.model, self.tokenizer, preset_for(self.model, self.task, self.overrides))

    def from_files(self, files: dict[str, bytes]) -> Any:
        """The editor a snapshot describes (its own config, whatever the settings say now)."""
        from melo_runtime import MeloEditor

        return MeloEditor.from_files(files, self.model, self.tokenizer)


def topic_names(settings: Settings) -> dict[str, str]:
    """Topic (or spool sub-directory / outbox file) names from settings."""
    from daemon.settings import TopicsSettings

    topics = settings.kafka.topics if settings.kafka is not None else TopicsSettings()
    return topics.model_dump()


def build_records(settings: Settings) -> Any:
    """The record store: Redis when configured, else the local store next to the snapshots."""
    if settings.redis is not None:
        from daemon.records_redis import RedisRecordStore

        return RedisRecordStore(settings.redis.client())
    from daemon.records_local import LocalRecordStore

    return LocalRecordStore(settings.records_dir)


def build_worker(
    settings: Settings,
    *,
    crash: CrashPoints | None = None,
    on_progress: Callable[[str], None] | None = None,
    training_display: Callable[[str], Any] | None = None,
) -> Worker:
    """Assemble a worker from settings: Kafka or spool source, Redis or local records, filesystem
    snapshots, Kafka or file outbox, the configured backbone."""
    import os
    import socket

    from daemon.publish import FileOutbox, KafkaOutbox
    from daemon.snapshot_store_fs import FsSnapshotStore

    topics = topic_names(settings)
    data_dir = Path(settings.data_dir)
    source: EventSource
    if settings.kafka is not None:
        from daemon.source_kafka import KafkaSource

        source = KafkaSource(settings.kafka.consumer_kwargs(), edits_topic=topics["edits"], control_topic=topics["control"])
        outbox: Any = KafkaOutbox(settings.kafka.producer_kwargs())
    else:
        from daemon.source_spool import SpoolSource

        source = SpoolSource(
            Path(settings.spool_dir),
            data_dir / "spool-offsets" / f"{settings.model}.json",
            edits_topic=topics["edits"],
            control_topic=topics["control"],
        )
        outbox = FileOutbox(data_dir / "outbox")
    if settings.redis is not None:
        ttl, renew, retry_s = settings.redis.lease_ttl_s, settings.redis.lease_renew_s, settings.redis.retry_deadline_s
    else:
        ttl, renew, retry_s = LOCAL_LEASE_TTL_S, LOCAL_LEASE_TTL_S / 3, LOCAL_RETRY_DEADLINE_S
    options = WorkerOptions(
        model=settings.model,
        task=settings.task,
        owner=f"{socket.gethostname()}:{os.getpid()}",
        batch_max_size=settings.batch.max_size,
        batch_max_wait_s=settings.batch.max_wait_s,
        lease_ttl_s=ttl,
        lease_renew_s=renew,
        retry_deadline_s=retry_s,
        limits=settings.limits.to_limits(),
        reject_other_models=settings.other_model_events == "dead_letter"
        or (settings.other_model_events == "auto" and settings.kafka is None),
    )
    editors = BackboneEditors(
        settings.backbone or settings.model,
        task=settings.task,
        labels=list(settings.labels),
        device=settings.device,
        overrides=settings.melo,
        dtype=settings.dtype,
        trust_remote_code=settings.trust_remote_code,
    )
    return Worker(
        options,
        source=source,
        snapshots=FsSnapshotStore(settings.snapshot_root),
        records=build_records(settings),
        publisher=Publisher(outbox, settings.model, topics, binary_dlq=settings.kafka is not None),
        editors=editors,
        crash=crash,
        on_progress=on_progress,
        training_display=training_display,
    )
