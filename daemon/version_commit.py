"""Steps 3-6 of a batch (daemon/worker.py's docstring): publish the snapshot, commit the record store,
announce, commit the source positions the version covers.

Every version the writer makes goes through here: an edit batch, a rollback, a retraction. A store
that sees a newer writer (``Fenced``, ``VersionConflict``) turns into :class:`LeaseLost`: this
writer stops without touching the stores again.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from daemon import metrics
from daemon.errors import Fenced, VersionConflict, VersionMoved
from daemon.recovery import RecoveryError, cluster_records, fence_snapshots, reconcile, retry
from daemon.snapshots import Manifest
from daemon.sources import Offsets
from daemon.writer_state import LeaseLost, WriterState

log = logging.getLogger("melo.worker")


class VersionCommitter:
    """Makes one new version durable and visible, in the order DESIGN.md §5 requires."""

    def __init__(self, state: WriterState) -> None:
        self.state = state

    def publish(
        self,
        files: dict[str, bytes],
        *,
        kind: str,
        edit_ids: list[str],
        offsets: Offsets,
        extra: dict[str, Any] | None = None,
    ) -> Manifest:
        """Publish ``files`` as version ``state.version + 1`` with the editor's stats in its manifest."""
        s = self.state
        assert s.editor is not None
        stats = s.editor.stats()
        meta: dict[str, Any] = {
            "base_model": s.editors.base_model,
            "melo_config": s.editor.config.to_dict(),
            "edit_counts": {"total": len(s.editor.edit_ids()), "new": len(edit_ids)},
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
            "writer": {"owner": s.options.owner, "token": int(s.token or 0)},
        }
        meta.update(extra or {})
        s.crash.reached("blobs")
        started = time.perf_counter()
        try:
            manifest = s.snapshots.publish(s.model, files, parent=s.version, meta=meta)
        except Fenced as error:
            metrics.PUBLISH_FAILURES.labels(model=s.model).inc()
            raise self.fenced_out(error) from error
        except VersionConflict as error:
            metrics.PUBLISH_FAILURES.labels(model=s.model).inc()
            raise self.overtaken() from error
        metrics.PUBLISH_SECONDS.labels(model=s.model).observe(time.perf_counter() - started)
        s.crash.reached("published")
        s.progress.versions_published += 1
        return manifest

    def record(self, new_version: int, files: dict[str, bytes], *, applied_ids: list[str], removed_ids: list[str]) -> None:
        """Commit ``new_version`` to the record store (retried while it is down) and make it the writer's version."""
        s = self.state
        expected = s.version or 0
        try:
            retry(
                lambda: s.records.commit_version(
                    s.model, s.token, expected, new_version,
                    applied_ids=applied_ids, clusters=cluster_records(files), removed_ids=removed_ids,
                ),
                what=f"committing version {new_version} to the record store",
                deadline_s=s.options.retry_deadline_s,
                stop=s.stopping,
                on_retry=s.log_retry,
            )
        except (Fenced, VersionMoved) as error:
            self._resync(new_version, files, error)
        s.version = new_version
        s.crash.reached("recorded")
        metrics.SNAPSHOT_VERSION.labels(model=s.model).set(new_version)
        metrics.LAST_COMMIT.labels(model=s.model).set(time.time())

    def _resync(self, new_version: int, files: dict[str, bytes], cause: Exception) -> None:
        """The record store refused our commit after the snapshot was published (our lease expired
        while Redis was down, or the store restarted behind us): take the lease again and let
        recovery's reconcile bring the store up to the published version."""
        s = self.state
        log.warning("model %s: record store refused version %s (%s); re-acquiring the lease", s.model, new_version, cause)
        token = retry(
            lambda: s.records.acquire_lease(s.model, s.options.owner, s.options.lease_ttl_s,
                                            above=s.snapshots.fence_token(s.model)),
            what="re-acquiring the writer lease", deadline_s=s.options.retry_deadline_s, stop=s.stopping,
        )
        if token is None or s.snapshots.current(s.model) != new_version:
            s.lease_lost.set()
            raise LeaseLost(f"model {s.model}: another daemon holds the lease now") from cause
        try:
            fence_snapshots(s.snapshots, s.model, int(token), s.options.owner)
        except RecoveryError as error:
            s.lease_lost.set()
            raise LeaseLost(str(error)) from cause
        s.token = int(token)
        s.last_renewal = time.monotonic()
        reconcile(s.records, s.snapshots, s.model, s.token, new_version, files,
                  retry_deadline_s=s.options.retry_deadline_s, stop=s.stopping)

    def fenced_out(self, error: Fenced) -> LeaseLost:
        """The snapshot store saw a newer writer token: this writer was paused past its lease and a
        successor took over. Nothing was published; stop without touching the stores again."""
        self.state.lease_lost.set()
        return LeaseLost(f"model {self.state.model}: fenced out by a newer writer ({error})")

    def overtaken(self) -> LeaseLost:
        """Another writer published the version this one was about to: stop (the lease is theirs)."""
        s = self.state
        s.lease_lost.set()
        return LeaseLost(f"model {s.model}: another writer published version {(s.version or 0) + 1}")

    def announce_and_commit(self, manifest: Manifest, covered: Offsets) -> None:
        """Announce ``manifest``, flush the outbox (receipts included), then commit ``covered``."""
        s = self.state
        s.publisher.announce(manifest.to_dict())
        s.publisher.flush()
        s.snapshots.mark_announced(s.model, manifest.version)
        s.crash.reached("announced")
        self.commit_source(covered)
        self.refresh_gauges()

    def commit_source(self, offsets: Offsets) -> None:
        """Commit source positions (only ones a published manifest covers, or records needing no version)."""
        s = self.state
        if offsets and offsets != s.committed:
            s.source.commit(offsets)
            s.committed = offsets
            s.crash.reached("committed")

    def commit_done_records(self) -> None:
        """Idle: commit positions of records that needed no version (duplicates, DLQ) once their
        receipts / DLQ records are durable."""
        s = self.state
        covered = s.batcher.covered()
        if covered != s.committed:
            s.publisher.flush()
            self.commit_source(covered)

    def refresh_gauges(self) -> None:
        """Block and cluster gauges from the editor's current stats."""
        editor = self.state.editor
        if editor is None:
            return
        stats = editor.stats()
        metrics.BLOCKS.labels(model=self.state.model).set(stats.get("blocks", 0))
        metrics.CLUSTERS.labels(model=self.state.model).set(stats.get("clusters", 0))
