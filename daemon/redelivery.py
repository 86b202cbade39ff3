"""Re-send what a published version's outbox flush would have sent, after a crash interrupted it.

A version is durable once its manifest is written; its receipts and announcement go out afterwards.
The writer records each version whose outbox flush completed with `SnapshotStore.mark_announced`.
On start, every version after the last one so marked is re-announced with its receipts (DESIGN.md
invariant 6: at-least-once; consumers key receipts on ``edit_id`` + ``status``):

- ``applied`` for each edit the version added (``detail`` says the receipt is a re-send: whether the
  trainer reported it learned is not in the manifest);
- for each edit reachable in the parent (or added here) but not in this version: ``forgotten`` (an
  edit version), ``rolled_back`` (a rollback) or ``retracted`` (a retraction);
- the snapshot announcement.

A store that never recorded an announcement (written before this existed) re-sends CURRENT only.
"""

from __future__ import annotations

import logging

from daemon.errors import CorruptSnapshot, SnapshotNotFound
from daemon.publish import Publisher
from daemon.recovery import cluster_records
from daemon.snapshots import SnapshotStore

log = logging.getLogger("melo.redelivery")

RESENT_DETAIL = "re-sent after a restart: the first send was interrupted"
_GONE_STATUS = {"edit": "forgotten", "rollback": "rolled_back", "retract": "retracted"}


def unannounced_versions(snapshots: SnapshotStore, model: str, current: int | None) -> list[int]:
    """Versions up to ``current`` whose receipts and announcement may not have been sent."""
    if current is None:
        return []
    announced = snapshots.announced(model)
    start = current if announced is None else announced + 1
    return list(range(start, current + 1))


def reachable_edit_ids(snapshots: SnapshotStore, model: str, version: int | None) -> set[str] | None:
    """Edit ids reachable in ``version`` (its clusters' members); None if it cannot be read."""
    if version is None:
        return set()
    try:
        files = snapshots.load_files(model, version)
    except (SnapshotNotFound, CorruptSnapshot) as error:
        log.warning("model %s: cannot read version %s to list its edits (%s)", model, version, error)
        return None
    return {str(e) for cluster in cluster_records(files) for e in cluster.get("edit_ids") or []}


def resend_version(publisher: Publisher, snapshots: SnapshotStore, model: str, version: int) -> int:
    """Queue the receipts and announcement of ``version``; return how many receipts were queued."""
    manifest = snapshots.manifest(model, version)
    doc = manifest.to_dict()
    added = list(manifest.edit_ids)
    kind = manifest.kind
    for edit_id in added:
        publisher.receipt(edit_id, "applied", version=version, detail=RESENT_DETAIL)
    sent = len(added)
    before, after = reachable_edit_ids(snapshots, model, manifest.parent), reachable_edit_ids(snapshots, model, version)
    if before is not None and after is not None:
        for edit_id in sorted((before | set(added)) - after):
            publisher.receipt(edit_id, _GONE_STATUS.get(kind, "forgotten"), version=version, reason=kind,
                              detail=RESENT_DETAIL)
            if kind == "edit":
                publisher.forgotten(edit_id, version, None)
            sent += 1
    publisher.announce(doc)
    return sent


def redeliver(publisher: Publisher, snapshots: SnapshotStore, model: str, current: int | None) -> list[int]:
    """Re-send every unannounced version's receipts and announcement, flush, then mark them announced.

    Returns the versions re-sent (oldest first).
    """
    versions = unannounced_versions(snapshots, model, current)
    if not versions:
        return []
    receipts, resent = 0, []
    for version in versions:
        try:
            receipts += resend_version(publisher, snapshots, model, version)
            resent.append(version)
        except (SnapshotNotFound, CorruptSnapshot) as error:  # retained away, or unreadable: nothing to say
            log.warning("model %s: cannot re-send version %s (%s)", model, version, error)
    publisher.flush()
    snapshots.mark_announced(model, versions[-1])
    log.warning("model %s: re-sent %d receipts and the announcement of version(s) %s (their first send was "
                "interrupted)", model, receipts, resent)
    return resent
