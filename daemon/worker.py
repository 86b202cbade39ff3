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

The loop is here; its parts share one :class:`daemon.writer_state.WriterState` (the worker itself):
step 2 is ``daemon/batch_training.py``, steps 3-6 ``daemon/version_commit.py``, receipts and dead
letters ``daemon/edit_outcomes.py``, control events ``daemon/control_handler.py``. The wiring from
Settings is ``daemon/wiring.py``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from daemon import metrics
from daemon.batch_training import BatchTrainer
from daemon.control_handler import ControlHandler
from daemon.crash import CrashPoints
from daemon.edit_outcomes import OutcomeReporter
from daemon.errors import CorruptSnapshot, Retryable, WrongBaseWeights
from daemon.partition_watch import PartitionWatch
from daemon.publish import Publisher
from daemon.records import RecordStore
from daemon.recovery import Recovered, RecoveryError, recover, retry
from daemon.redelivery import redeliver
from daemon.snapshots import Manifest, SnapshotStore
from daemon.sources import EventSource, SourceRecord
from daemon.version_commit import VersionCommitter
from daemon.writer_state import BatchAbandoned, EditorFactory, LeaseLost, PendingEdit, WorkerOptions, WriterState
from schemas import InvalidEvent, Reason, parse_edit
from schemas.events import ControlEvent, EditEvent

if TYPE_CHECKING:
    from melo_runtime.edits import Edit

log = logging.getLogger("melo.worker")

EXIT_OK = 0
EXIT_LEASE_LOST = 3
EXIT_BACKEND_DOWN = 4
# Recovery cannot go on by itself (e.g. CURRENT does not load); the log line names the fix.
EXIT_RECOVERY = 5

# Called after each edit version: (its manifest, the applied edit events, ids of the edits the
# trainer reports learned).
PublishHook = Callable[[Manifest, Sequence[EditEvent], frozenset[str]], object]


def _to_edit(event: EditEvent) -> Edit:
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


class Worker(WriterState):
    """The single writer of one model. Construct, then :meth:`run` (blocks until stopped or idle).

    The loop is here; blocks train in :attr:`trainer`, a version is made durable by :attr:`committer`
    (publish, record, announce, commit), edit outcomes are told by :attr:`outcomes`, control events
    run in :attr:`control`.
    """

    def __init__(
        self,
        options: WorkerOptions,
        *,
        source: EventSource,
        snapshots: SnapshotStore,
        records: RecordStore,
        publisher: Publisher,
        editors: EditorFactory,
        crash: CrashPoints | None = None,
        on_progress: Callable[[str], None] | None = None,
        training_display: Callable[[str], Any] | None = None,
    ) -> None:
        """``training_display``: see :class:`daemon.batch_training.BatchTrainer`. :attr:`lock` is held
        while a batch or control event is processed: whoever holds it acts between two turns of the
        loop (the monitor takes it before probing and rolling back)."""
        super().__init__(options, source=source, snapshots=snapshots, records=records, publisher=publisher,
                         editors=editors, crash=crash, on_progress=on_progress)
        self.trainer = BatchTrainer(self, training_display)
        self.committer = VersionCommitter(self)
        self.outcomes = OutcomeReporter(self)
        self.control = ControlHandler(self, self.committer, self.outcomes)
        self.partitions = PartitionWatch(self.model, options.partitionless_warn_s)
        self._publish_hooks: list[PublishHook] = []

    # ----------------------------------------------------------------- lifecycle

    def on_edit_published(self, hook: PublishHook) -> None:
        """Run ``hook(manifest, events, learned_ids)`` on the loop thread after every edit version."""
        self._publish_hooks.append(hook)

    def stop(self) -> None:
        """Ask the loop to finish (signal-safe): pending edits are abandoned, nothing unpublished is committed."""
        self.stopping.set()

    @property
    def training_abandoned(self) -> bool:
        """True if a training thread is still running after the loop stopped (the CLI exits without it)."""
        return self.trainer.abandoned

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
            stop=self.stopping,
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
        recorded = self.snapshots.manifest(self.model, version).base_model or {}
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
        self.last_renewal = time.monotonic()
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
        self.committed = recovered.offsets
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
            if manifest.kind == "edit":
                self._run_publish_hooks(manifest, [], frozenset())

    def run(self, *, until_idle: bool = False) -> int:
        """Recover, then loop until stopped (or, with ``until_idle``, until the source is drained and
        everything read is published and committed). Returns the process exit status."""
        try:
            if not self.start():
                return EXIT_OK
            while not self.stopping.is_set():
                if self.lease_lost.is_set():
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
        if self.token is not None and not self.lease_lost.is_set():
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
        self.partitions.observe(self.source.assigned_partitions())
        with self.lock:
            if records:
                self.crash.reached("polled")
                self._handle(records)
            while self.batcher.due() and not self.stopping.is_set():
                self._process_batch()
            if records or not self.source.at_end():
                return False
            if len(self.batcher):
                self.batcher.request_flush()  # drained: no reason to wait out max_wait_s
                return False
            self.committer.commit_done_records()
            return True

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
                self.control.handle(record)
                continue
            try:
                event = parse_edit(record.value, self.options.limits)
            except InvalidEvent as error:
                self.outcomes.reject(record, str(error.reason_code), error.detail, edit_id=_edit_id_of(record.value))
                continue
            if event.model != self.model:
                if self.options.reject_other_models:
                    self.outcomes.reject(record, "wrong_model",
                                         f"model {event.model!r}, but this daemon edits {self.model!r}",
                                         edit_id=event.edit_id)
                else:
                    self.batcher.observe(record)  # another model's event: its own daemon handles it
                continue
            if event.task != self.options.task:
                self.outcomes.reject(record, "wrong_task",
                                     f"task {event.task!r} but model {self.model} edits {self.options.task!r}",
                                     edit_id=event.edit_id)
                continue
            accepted.append((event, record))
        self._enqueue(accepted)

    def _enqueue(self, accepted: list[tuple[EditEvent, SourceRecord]]) -> None:
        if not accepted:
            return
        ids = [event.edit_id for event, _ in accepted]
        applied = retry(
            lambda: set(self.records.applied(self.model, ids)),
            what="checking applied edit ids in the record store",
            deadline_s=self.options.retry_deadline_s,
            stop=self.stopping,
            on_retry=self.log_retry,
        )
        for event, record in accepted:
            if event.edit_id in applied or self.batcher.holds(event.edit_id):
                self.outcomes.duplicate(event.edit_id, record)
            elif (refusal := self._editor_refusal(event)) is not None:
                self.outcomes.reject(record, *refusal, edit_id=event.edit_id)
            else:
                self.batcher.add(PendingEdit(event, record), event.edit_id, record)
        self.crash.reached("outbox")

    def _editor_refusal(self, event: EditEvent) -> tuple[str, str] | None:
        """(reason, detail) if the editor would refuse this edit, e.g. over its token budget: the
        character limits of schemas/ cannot see tokens, so the budget is checked here, at intake,
        and a refused edit never enters (and never splits) a batch."""
        from melo_runtime.validation import TokenLimitError

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
        results, rejected = self.trainer.apply([_to_edit(p.event) for p in pending])
        self.crash.reached("trained")
        by_id = {p.event.edit_id: p for p in pending}
        self.outcomes.refused_by_editor(rejected, by_id)
        not_learned = self.outcomes.not_learned(results, by_id)
        applied_ids = [edit_id for result in results for edit_id in result.edit_ids if edit_id not in not_learned]
        if not applied_ids:
            self.publisher.flush()
            self.committer.commit_source(covered)
            return
        forgotten = [edit_id for result in results for edit_id in result.forgotten]
        assert self.editor is not None
        files = self.editor.export_files()
        manifest = self.committer.publish(files, kind="edit", edit_ids=applied_ids, offsets=covered)
        new_version = manifest.version
        self.committer.record(new_version, files, applied_ids=applied_ids, removed_ids=[])
        self.outcomes.applied(results, by_id, not_learned=not_learned, version=new_version)
        self.outcomes.forgotten(forgotten, version=new_version)
        self.progress.applied += len(applied_ids)
        self.progress.forgotten += len(forgotten)
        metrics.EDITS_APPLIED.labels(model=self.model).inc(len(applied_ids))
        metrics.FORGOTTEN.labels(model=self.model).inc(len(forgotten))
        self.committer.announce_and_commit(manifest, covered)
        stats = self.editor.stats()
        self.on_progress(
            f"version {new_version}: +{len(applied_ids)} edits (total {self.progress.applied}), "
            f"blocks {stats.get('blocks')}, clusters {stats.get('clusters')}, conflicts {stats.get('conflicts_total')}, "
            f"forgotten {len(forgotten)}, trained in {sum(r.seconds for r in results):.1f}s"
        )
        learned = frozenset(i for result in results for i, ok in result.learned.items() if ok)
        self._run_publish_hooks(manifest, [by_id[i].event for i in applied_ids], learned)

    def _run_publish_hooks(self, manifest: Manifest, events: list[EditEvent], learned: frozenset[str]) -> None:
        for hook in self._publish_hooks:
            try:
                hook(manifest, events, learned)
            except (LeaseLost, BatchAbandoned, Retryable):
                raise  # the writer's own failures (e.g. from a rollback the hook asked for) stop the loop
            except Exception:  # noqa: BLE001 - the version is durable already; a failing observer must not stop the writer
                log.exception("model %s: after-publish hook %r failed on version %s", self.model, hook, self.version)

    # ----------------------------------------------------------------- control (daemon/control_handler.py)

    def apply_control(self, event: ControlEvent, *, record: SourceRecord | None = None) -> Manifest | None:
        """Execute one control event; returns the new manifest for rollback / retract, else None."""
        return self.control.apply(event, record=record)

    def rollback(self, to_version: int, reason: str, *, request_id: str | None = None, monitor: bool = False) -> Manifest:
        """Publish a new version whose content is ``to_version``'s files (:meth:`ControlHandler.rollback`)."""
        return self.control.rollback(to_version, reason, request_id=request_id, monitor=monitor)

    def retract(self, edit_id: str, reason: str, *, request_id: str | None = None) -> Manifest:
        """Publish a new version without ``edit_id`` (:meth:`ControlHandler.retract`)."""
        return self.control.retract(edit_id, reason, request_id=request_id)

    # ----------------------------------------------------------------- scheduler jobs

    def request_flush(self) -> None:
        """Scheduler job: train an overdue partial batch at the next turn of the loop."""
        if self.batcher.overdue():
            self.batcher.request_flush()

    def renew_lease(self) -> None:
        """Scheduler job: renew the writer lease; losing it stops the loop (exit status 3)."""
        if self.token is None or self.lease_lost.is_set():
            return
        try:
            held = self.records.renew_lease(self.model, self.options.owner, self.token, self.options.lease_ttl_s)
        except Retryable as error:
            # Redis down: the loop's own retries decide; the lease is lost only once it could have expired.
            if time.monotonic() - self.last_renewal > self.options.lease_ttl_s:
                log.warning("model %s: lease not renewed for a whole TTL (%s)", self.model, error)
            return
        if held:
            self.last_renewal = time.monotonic()
            metrics.LEASE_HELD.labels(model=self.model).set(1)
        else:
            log.error("model %s: lease renewal refused: another daemon is the writer", self.model)
            metrics.LEASE_HELD.labels(model=self.model).set(0)
            self.lease_lost.set()

    def retain(self, keep_last: int, keep_statuses: frozenset[str]) -> None:
        """Scheduler job: delete old versions, under the loop's lock so no publish races the blob sweep."""
        with self.lock:
            removed = self.snapshots.retain(self.model, keep_last, keep_statuses)
        if removed:
            log.info("model %s: retention removed %s", self.model, removed)

    def refresh_metrics(self) -> None:
        """Scheduler job (and after each publish): gauges from the editor's current stats."""
        self.committer.refresh_gauges()
