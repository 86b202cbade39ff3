"""Control events on the writer: pause, resume, rollback, retract.

The worker hands each ``melo.control`` record here in stream order, after publishing every edit
before it. Rollback and retract are also what the HTTP admin API and the monitor call on the running
writer; each takes the writer's lock, so one writer stays one writer. Both publish a new version
through :class:`daemon.version_commit.VersionCommitter`, like an edit batch.
"""

from __future__ import annotations

from daemon import metrics
from daemon.edit_outcomes import OutcomeReporter
from daemon.errors import CorruptSnapshot, Fenced, SnapshotNotFound, VersionConflict
from daemon.recovery import applied_by_version
from daemon.snapshots import Manifest
from daemon.sources import SourceRecord
from daemon.version_commit import VersionCommitter
from daemon.writer_state import WriterState
from schemas import InvalidEvent, parse_control
from schemas.events import MONITOR_REASON_PREFIX, ControlEvent


class ControlHandler:
    """Executes control events for one model's writer."""

    def __init__(self, state: WriterState, committer: VersionCommitter, outcomes: OutcomeReporter) -> None:
        self.state = state
        self.committer = committer
        self.outcomes = outcomes

    def handle(self, record: SourceRecord) -> None:
        """Validate and execute one control record; a control that fails is dead-lettered."""
        s = self.state
        try:
            event = parse_control(record.value, s.options.limits)
        except InvalidEvent as error:
            self.outcomes.reject(record, str(error.reason_code), error.detail, edit_id=None)
            return
        if event.model != s.model:
            s.batcher.observe(record)
            return
        s.progress.control += 1
        s.batcher.observe(record)
        try:
            self.apply(event, record=record)
        except ValueError as error:
            s.publisher.dead_letter(record, "control_failed", str(error))
            metrics.DLQ.labels(reason="control_failed").inc()
            s.progress.dead_lettered += 1
        s.crash.reached("control")

    def apply(self, event: ControlEvent, *, record: SourceRecord | None = None) -> Manifest | None:
        """Execute one control event; returns the new manifest for rollback / retract, else None."""
        s = self.state
        if event.type == "pause":
            s.source.pause()
            s.paused = True
            s.on_progress(f"model {s.model}: paused ({event.reason})")
            return None
        if event.type == "resume":
            s.source.resume()
            s.paused = False
            s.on_progress(f"model {s.model}: resumed ({event.reason})")
            return None
        if event.type == "rollback":
            assert event.to_version is not None
            # A serving replica's monitor asks through the control channel (ChannelControl marks its reason).
            monitor = event.reason.startswith(MONITOR_REASON_PREFIX)
            return self.rollback(event.to_version, event.reason, request_id=event.request_id, monitor=monitor)
        assert event.edit_id is not None
        return self.retract(event.edit_id, event.reason, request_id=event.request_id)

    def rollback(self, to_version: int, reason: str, *, request_id: str | None = None, monitor: bool = False) -> Manifest:
        """Publish a new version whose content is ``to_version``'s files; the writer continues from it.
        Receipts mark every edit it undoes ``rolled_back``. Raises ValueError for an unknown version."""
        s = self.state
        with s.lock:
            try:
                files = s.snapshots.load_files(s.model, to_version)
            except SnapshotNotFound:
                raise ValueError(
                    f"cannot roll back {s.model} to version {to_version}: no such version "
                    f"(latest is {s.snapshots.latest(s.model)}; `melo snapshots list`)"
                ) from None
            except CorruptSnapshot as error:
                raise ValueError(
                    f"cannot roll back {s.model} to version {to_version}: it does not verify ({error}); "
                    "pick another version (`melo snapshots verify`)"
                ) from None
            restored = s.editors.from_files(files)
            after = applied_by_version(s.snapshots, s.model, to_version)
            try:
                before = applied_by_version(s.snapshots, s.model, s.version)
            except CorruptSnapshot:  # an unreadable CURRENT manifest: which edits it held is lost with it
                before = set(after)
            # A corrupt CURRENT has no editor: its manifests still say which edits it had applied.
            reachable = s.editor.edit_ids() if s.editor is not None else before
            undone = sorted(reachable - restored.edit_ids())
            covered = s.batcher.covered()
            s.crash.reached("blobs")
            try:
                manifest = s.snapshots.restore(
                    s.model, to_version, parent=s.version,
                    meta={"offsets": covered, "writer": {"owner": s.options.owner, "token": int(s.token or 0)},
                          "request_id": request_id, "reason": reason},
                )
            except Fenced as error:
                raise self.committer.fenced_out(error) from error
            except VersionConflict as error:
                raise self.committer.overtaken() from error
            s.crash.reached("published")
            s.progress.versions_published += 1
            s.editor = restored
            new_version = manifest.version
            self.committer.record(new_version, files, applied_ids=sorted(after - before), removed_ids=sorted(before - after))
            for edit_id in undone:
                s.publisher.receipt(edit_id, "rolled_back", version=new_version, reason="rollback", detail=reason)
            metrics.ROLLBACKS.labels(model=s.model, reason="monitor" if monitor else "manual").inc()
            self.committer.announce_and_commit(manifest, covered)
            s.on_progress(f"version {new_version}: rollback to version {to_version} ({reason}); {len(undone)} edits undone")
            return manifest

    def retract(self, edit_id: str, reason: str, *, request_id: str | None = None) -> Manifest:
        """Publish a new version without ``edit_id`` (its inputs get the base output again).
        Raises ValueError if the edit is not reachable in the current version."""
        s = self.state
        with s.lock:
            if s.editor is None:
                raise ValueError(f"version {s.version} of {s.model} does not load: roll back before retracting")
            if edit_id not in s.editor.edit_ids():
                raise ValueError(f"edit {edit_id!r} is not in version {s.version} of {s.model}: nothing to retract")
            candidate = s.editors.from_files(s.editor.export_files())
            candidate.retract(edit_id)
            previous, s.editor = s.editor, candidate
            covered = s.batcher.covered()
            files = candidate.export_files()
            try:
                manifest = self.committer.publish(files, kind="retract", edit_ids=[], offsets=covered,
                                                  extra={"request_id": request_id, "reason": reason})
            except BaseException:
                s.editor = previous
                raise
            new_version = manifest.version
            self.committer.record(new_version, files, applied_ids=[], removed_ids=[])
            s.publisher.receipt(edit_id, "retracted", version=new_version, reason="retract", detail=reason)
            metrics.RETRACTED.labels(model=s.model).inc()
            self.committer.announce_and_commit(manifest, covered)
            s.on_progress(f"version {new_version}: retracted {edit_id} ({reason})")
            return manifest
