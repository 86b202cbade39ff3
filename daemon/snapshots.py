"""Versioned adapter snapshots: the manifest type and the `SnapshotStore` protocol (DESIGN.md §5).

A version is an immutable manifest naming content-addressed blobs. Publishing n+1 never touches n;
a rollback is a *new* version whose files are an old version's blobs, so history is append-only
and "which weights served at time t" always has an answer. CURRENT names the serving version.

Manifests never change once written, but a version's *status* does (an operator or the monitor
judges it good or bad, or pins it). Statuses are kept as an append-only list of marks beside the
manifest (`versions/<n>.marks.jsonl`); the last mark is the effective status, "new" when unmarked.

`daemon.snapshot_store_fs.FsSnapshotStore` is the filesystem implementation; an object-storage
one would implement the same protocol.

Fencing (DESIGN.md invariant 4): a store remembers the newest writer fencing token it has seen
(`fence`, and the `writer.token` of every manifest it publishes) and refuses a manifest write or a
CURRENT move under an older token with `daemon.errors.Fenced`. The record store's fence alone is not
enough: a writer paused past its lease would publish a snapshot before its record commit is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

Status = Literal["new", "good", "bad", "pinned"]
Kind = Literal["edit", "rollback", "retract"]
MARK_STATUSES: frozenset[str] = frozenset({"good", "bad", "pinned"})
MANIFEST_FORMAT = "melo.manifest.v1"

# Keys `publish(meta=...)` accepts; everything else in a manifest is derived by the store.
META_KEYS: frozenset[str] = frozenset(
    {
        "base_model",
        "melo_config",
        "edit_counts",
        "edit_ids",
        "offsets",
        "stats",
        "kind",
        "rollback_of",
        "restores_version",
        "request_id",
        "reason",
        "writer",
    }
)


@dataclass(frozen=True)
class FileRef:
    """Where one snapshot file's bytes live: its sha256 (the blob name) and length."""

    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """One published version (schemas/manifest.v1.json). `status` is the effective status (last mark)."""

    version: int
    parent: int | None
    created_at: str
    model: str
    base_model: dict[str, Any]
    melo_config: dict[str, Any]
    files: dict[str, FileRef]
    edit_counts: dict[str, int]
    edit_ids: tuple[str, ...]
    offsets: dict[str, dict[str, int]]
    stats: dict[str, int]
    kind: Kind
    writer: dict[str, Any]
    status: Status = "new"
    rollback_of: int | None = None
    restores_version: int | None = None
    request_id: str | None = None
    reason: str | None = None
    # sha256 of the parent's manifest file: the hash chain `verify` checks (None: the chain starts here).
    parent_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The manifest as JSON data valid against schemas/manifest.v1.json."""
        return {
            "format": MANIFEST_FORMAT,
            "version": self.version,
            "parent": self.parent,
            "parent_sha256": self.parent_sha256,
            "created_at": self.created_at,
            "model": self.model,
            "base_model": self.base_model,
            "melo_config": self.melo_config,
            "files": {name: {"sha256": ref.sha256, "bytes": ref.bytes} for name, ref in self.files.items()},
            "edit_counts": self.edit_counts,
            "edit_ids": list(self.edit_ids),
            "offsets": self.offsets,
            "stats": self.stats,
            "status": self.status,
            "kind": self.kind,
            "rollback_of": self.rollback_of,
            "restores_version": self.restores_version,
            "request_id": self.request_id,
            "reason": self.reason,
            "writer": self.writer,
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any], status: Status | None = None) -> Manifest:
        """Build from schema-valid JSON data; `status` (the last mark) overrides the written one."""
        return cls(
            version=doc["version"],
            parent=doc["parent"],
            created_at=doc["created_at"],
            model=doc["model"],
            base_model=doc["base_model"],
            melo_config=doc["melo_config"],
            files={name: FileRef(ref["sha256"], ref["bytes"]) for name, ref in doc["files"].items()},
            edit_counts=doc["edit_counts"],
            edit_ids=tuple(doc["edit_ids"]),
            offsets=doc["offsets"],
            stats=doc["stats"],
            kind=doc["kind"],
            writer=doc["writer"],
            status=status or doc["status"],
            rollback_of=doc.get("rollback_of"),
            restores_version=doc.get("restores_version"),
            request_id=doc.get("request_id"),
            reason=doc.get("reason"),
            parent_sha256=doc.get("parent_sha256"),
        )

    @property
    def total_bytes(self) -> int:
        """Sum of the sizes of every file in this version."""
        return sum(ref.bytes for ref in self.files.values())


@dataclass(frozen=True)
class RetentionReport:
    """What one `retain` call deleted."""

    removed_versions: list[int]
    removed_blobs: list[str]
    freed_bytes: int


class SnapshotStore(Protocol):
    """Content-addressed, versioned snapshots of one or more models' editor state."""

    def publish(
        self,
        model: str,
        files: dict[str, bytes],
        *,
        parent: int | None,
        meta: dict[str, Any],
        make_current: bool = True,
    ) -> Manifest:
        """Publish version parent+1 (1 when parent is None) holding `files`.

        `meta` holds the manifest fields the caller knows (see `META_KEYS`). Only blobs the store
        lacks are written. Raises `Fenced` if `meta["writer"]["token"]` is older than the newest token
        the store has seen, `VersionConflict` if that version already exists (another writer got
        there first), `ValueError` if the manifest would not be schema-valid.
        """
        ...

    def restore(
        self, model: str, to_version: int, *, parent: int, meta: dict[str, Any], make_current: bool = True
    ) -> Manifest:
        """Publish version parent+1 (kind "rollback") whose files and stats are version `to_version`'s.

        No blob is copied: the new manifest points at the old blobs. Fenced like `publish`.
        """
        ...

    def current(self, model: str) -> int | None:
        """The version CURRENT names, or None before the first publish."""
        ...

    def set_current(self, model: str, version: int, *, token: int | None = None) -> None:
        """Atomically point CURRENT at an existing version; refused (`Fenced`) under a stale writer `token`."""
        ...

    def fence(self, model: str, token: int, *, owner: str = "") -> None:
        """Record `token`, just issued with the writer lease, as the newest; `Fenced` if a newer one was seen."""
        ...

    def fence_token(self, model: str) -> int:
        """The newest writer token the store has seen (0 before any)."""
        ...

    def mark_announced(self, model: str, version: int) -> None:
        """Record that the receipts and announcement of versions up to `version` were sent (never lowers)."""
        ...

    def announced(self, model: str) -> int | None:
        """The newest version marked announced; None if none was ever recorded (see daemon.redelivery)."""
        ...

    def latest(self, model: str) -> int | None:
        """The highest published version (may be ahead of CURRENT), or None."""
        ...

    def manifest(self, model: str, version: int) -> Manifest:
        """The manifest of `version` with its effective status. Raises SnapshotNotFound / CorruptSnapshot."""
        ...

    def versions(self, model: str) -> list[Manifest]:
        """Every retained version's manifest, oldest first."""
        ...

    def load_files(self, model: str, version: int) -> dict[str, bytes]:
        """Every file of `version`, each checked against its sha256 (CorruptSnapshot names the bad blob)."""
        ...

    def verify(self, model: str, version: int) -> list[str]:
        """Problems found re-reading `version` completely; an empty list means it is intact."""
        ...

    def mark(self, model: str, version: int, status: Status, *, reason: str = "") -> None:
        """Record a new status (good | bad | pinned) for `version`; the manifest itself is not touched."""
        ...

    def retain(self, model: str, keep_last: int, keep_statuses: frozenset[str]) -> RetentionReport:
        """Delete old versions and the blobs only they used.

        Keeps the newest `keep_last` versions, CURRENT, and every version whose status is in
        `keep_statuses` (pinned is always kept).
        """
        ...
