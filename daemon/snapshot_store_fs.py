"""Filesystem snapshot store (DESIGN.md §5): crash-safe with only rename, link and fsync.

```
<root>/<model>/blobs/sha256/<hex>          immutable file contents, named by their sha256
<root>/<model>/versions/<n>.json           immutable manifest of version n
<root>/<model>/versions/<n>.marks.jsonl    append-only status marks of version n
<root>/<model>/CURRENT                     "<n>\n": the serving version
<root>/<model>/FENCE                       {"token", "owner", "at"}: the newest writer token seen
<root>/<model>/HEAD                        {"version", "sha256"}: the newest manifest's hash (chain tip)
<root>/<model>/ANNOUNCED                   "<n>\n": receipts + announcement of versions <= n were sent
<root>/<model>/.lock                       flock held while publishing, marking or deleting
```

Each manifest records the sha256 of its parent's manifest file (`parent_sha256`), so manifests form a
hash chain, anchored by HEAD (the newest manifest's hash): `verify(n)` reports manifest n changed
after version n+1 (or HEAD) recorded its hash.

Every file is written to a temporary name, fsynced, then moved into place, and the directory is
fsynced; a reader (or a process restarted after kill -9) sees a file completely or not at all.
A manifest is moved into place with link(2), which fails if the name exists: two writers can never
both publish version n, and the loser gets `VersionConflict`. Publishing and retention hold the
model's lock, so retention can never delete a blob that a manifest being published is about to use.

Fencing (DESIGN.md invariant 4): every manifest records its writer's fencing token, and FENCE keeps
the newest token the store has seen (raised by `fence` when a writer takes the lease, and by every
publish). Under the model's lock, a manifest write or a CURRENT move carrying an older token is
refused with `Fenced`, so a writer paused past its lease cannot publish after its successor started.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from daemon.durable import fsync_dir, replace_file, write_temp
from daemon.errors import CorruptSnapshot, Fenced, SnapshotNotFound, VersionConflict
from daemon.snapshot_layout import SnapshotLayout, hash_file, now, remove_temp_files
from daemon.snapshots import (
    MANIFEST_FORMAT,
    MARK_STATUSES,
    META_KEYS,
    FileRef,
    Manifest,
    RetentionReport,
    Status,
)
from schemas import manifest_problems

log = logging.getLogger("melo.snapshots")


class FsSnapshotStore:
    """`SnapshotStore` on a local or shared (POSIX) filesystem rooted at `root`."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.layout = SnapshotLayout(self.root)

    def publish(
        self,
        model: str,
        files: dict[str, bytes],
        *,
        parent: int | None,
        meta: dict[str, Any],
        make_current: bool = True,
    ) -> Manifest:
        """Publish version parent+1 holding `files`; see `SnapshotStore.publish`."""
        refs = {name: FileRef(hashlib.sha256(data).hexdigest(), len(data)) for name, data in files.items()}
        with self.layout.locked(model):
            manifest = self._build_manifest(model, refs, parent=parent, meta=meta)
            self._check_fence_locked(
                model, int(manifest.writer.get("token", 0)), f"publish v{manifest.version}",
                owner=str(manifest.writer.get("owner", "")),
            )
            for name, data in files.items():
                self.layout.put_blob(model, refs[name], data)
            fsync_dir(self.layout.blob_dir(model))
            return self._commit_manifest(manifest, make_current=make_current)

    def restore(
        self, model: str, to_version: int, *, parent: int, meta: dict[str, Any], make_current: bool = True
    ) -> Manifest:
        """Publish version parent+1 reproducing `to_version`'s content; see `SnapshotStore.restore`."""
        with self.layout.locked(model):
            old = self.manifest(model, to_version)
            problems = self.verify(model, to_version)
            if problems:
                raise CorruptSnapshot(
                    f"cannot restore {model} v{to_version}: {problems[0]} ({len(problems)} problems); "
                    "pick another version (`melo snapshots verify`)"
                )
            content = {
                "base_model": old.base_model,
                "melo_config": old.melo_config,
                "stats": old.stats,
                "edit_counts": {"total": old.edit_counts["total"], "new": 0},
                "edit_ids": [],
                "kind": "rollback",
                "restores_version": to_version,
                "rollback_of": parent,
            }
            manifest = self._build_manifest(model, dict(old.files), parent=parent, meta=content | meta)
            self._check_fence_locked(
                model, int(manifest.writer.get("token", 0)), f"publish v{manifest.version}",
                owner=str(manifest.writer.get("owner", "")),
            )
            return self._commit_manifest(manifest, make_current=make_current)

    def current(self, model: str) -> int | None:
        """The version CURRENT names, or None before the first publish."""
        path = self.layout.model_dir(model) / "CURRENT"
        try:
            text = path.read_text(encoding="ascii")
        except FileNotFoundError:
            return None
        except UnicodeDecodeError:
            raise CorruptSnapshot(f"{path} is not ASCII: rewrite it with `melo snapshots set-current`") from None
        if not text.strip().isdigit():
            raise CorruptSnapshot(f"{path} holds {text[:40]!r}, expected a version number")
        return int(text)

    def set_current(self, model: str, version: int, *, token: int | None = None) -> None:
        """Atomically point CURRENT at an existing version; a writer passes its fencing `token`
        (an operator's manual move passes none and is not fenced)."""
        with self.layout.locked(model):
            self.manifest(model, version)
            if token is not None:
                self._check_fence_locked(model, token, f"move CURRENT to v{version}")
            self.layout.write_current(model, version)

    def fence(self, model: str, token: int, *, owner: str = "") -> None:
        """Record `token` (just issued with the writer lease) as the newest writer token.

        Raises `Fenced` if the store has already seen a newer token. From now on a publish or
        CURRENT move under an older token is refused.
        """
        with self.layout.locked(model):
            self._check_fence_locked(model, token, "take over as writer", owner=owner)

    def mark_announced(self, model: str, version: int) -> None:
        """Record that the receipts and announcement of every version up to `version` are durable."""
        with self.layout.locked(model):
            if (self.announced(model) or 0) < version:
                replace_file(self.layout.model_dir(model) / "ANNOUNCED", f"{int(version)}\n".encode("ascii"))

    def announced(self, model: str) -> int | None:
        """The newest version marked announced; None if the store never recorded one."""
        path = self.layout.model_dir(model) / "ANNOUNCED"
        try:
            text = path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return None
        except UnicodeDecodeError:
            text = ""
        if not text.isdigit():
            log.warning("%s holds %r, not a version number; treating it as missing", path, text[:40])
            return None
        return int(text)

    def fence_token(self, model: str) -> int:
        """The newest writer token this store has seen (0 before any)."""
        return self.layout.read_fence(model)

    def latest(self, model: str) -> int | None:
        """The highest published version (may be ahead of CURRENT), or None."""
        numbers = self.layout.version_numbers(model)
        return numbers[-1] if numbers else None

    def manifest(self, model: str, version: int) -> Manifest:
        """The manifest of `version` with its effective status."""
        path = self.layout.manifest_path(model, version)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise SnapshotNotFound(
                f"{model} has no version {version} under {self.root}: `melo snapshots list` shows what exists"
            ) from None
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise CorruptSnapshot(f"manifest {path} is not JSON: {exc}") from None
        problems = manifest_problems(doc)
        if problems:
            raise CorruptSnapshot(f"manifest {path} violates schemas/manifest.v1.json: {'; '.join(problems[:3])}")
        if doc["version"] != version or doc["model"] != model:
            raise CorruptSnapshot(f"manifest {path} describes {doc['model']} v{doc['version']}, not {model} v{version}")
        return Manifest.from_dict(doc, status=self.layout.status(model, version))

    def versions(self, model: str) -> list[Manifest]:
        """Every retained version's manifest, oldest first."""
        return [self.manifest(model, n) for n in self.layout.version_numbers(model)]

    def load_files(self, model: str, version: int) -> dict[str, bytes]:
        """Every file of `version`, each checked against its sha256."""
        manifest = self.manifest(model, version)
        files: dict[str, bytes] = {}
        for name, ref in manifest.files.items():
            path = self.layout.blob_path(model, ref.sha256)
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise CorruptSnapshot(f"{model} v{version}: blob {ref.sha256} of {name} is missing ({path})") from None
            if hashlib.sha256(data).hexdigest() != ref.sha256:
                raise CorruptSnapshot(
                    f"{model} v{version}: blob {ref.sha256} of {name} does not match its sha256 ({path}); "
                    "refusing to load it — restore the blob or roll back to another version"
                )
            files[name] = data
        return files

    def verify(self, model: str, version: int) -> list[str]:
        """Problems found re-reading `version` completely; [] means intact."""
        try:
            manifest = self.manifest(model, version)
        except (SnapshotNotFound, CorruptSnapshot) as exc:
            return [str(exc)]
        problems = self._chain_problems(model, version)
        for name, ref in sorted(manifest.files.items()):
            path = self.layout.blob_path(model, ref.sha256)
            try:
                size, digest = hash_file(path)
            except FileNotFoundError:
                problems.append(f"{name}: blob {ref.sha256} is missing")
                continue
            if size != ref.bytes:
                problems.append(f"{name}: blob {ref.sha256} has {size} bytes, manifest says {ref.bytes}")
            elif digest != ref.sha256:
                problems.append(f"{name}: blob {ref.sha256} content hashes to {digest}")
        return problems

    def _chain_problems(self, model: str, version: int) -> list[str]:
        """The hash chain at `version`: its manifest file must still hash to what its child recorded."""
        child_path = self.layout.manifest_path(model, version + 1)
        try:
            child = json.loads(child_path.read_bytes())
            recorded, by = (child.get("parent_sha256"), f"v{version + 1}") if child.get("parent") == version else (None, "")
        except FileNotFoundError:  # the newest version: HEAD holds its hash
            head = self.layout.read_json(self.layout.model_dir(model) / "HEAD")
            recorded, by = (head.get("sha256"), "HEAD") if head.get("version") == version else (None, "")
        except (ValueError, AttributeError):
            return []  # a child that is not a manifest: its own verify reports it
        if recorded is None:
            return []  # chain start: written before manifests were chained
        actual = self.layout.manifest_sha256(model, version)
        if actual != recorded:
            path = self.layout.manifest_path(model, version)
            return [f"manifest {path} was changed after it was published: it hashes to {actual}, but {by} recorded {recorded}"]
        return []

    def mark(self, model: str, version: int, status: Status, *, reason: str = "") -> None:
        """Append a status mark (good | bad | pinned) for `version`."""
        if status not in MARK_STATUSES:
            raise ValueError(f"cannot mark a version {status!r}: use one of {sorted(MARK_STATUSES)}")
        with self.layout.locked(model):
            self.manifest(model, version)
            line = json.dumps({"status": status, "at": now(), "reason": reason[:1000]}) + "\n"
            path = self.layout.marks_path(model, version)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, line.encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(path.parent)

    def retain(self, model: str, keep_last: int, keep_statuses: frozenset[str]) -> RetentionReport:
        """Delete old versions and the blobs only they used; see `SnapshotStore.retain`."""
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        with self.layout.locked(model):
            numbers = self.layout.version_numbers(model)
            keep = set(numbers[-keep_last:])
            current = self.current(model)
            if current is not None:
                keep.add(current)
            statuses = keep_statuses | {"pinned"}
            keep.update(n for n in numbers if self.layout.status(model, n) in statuses)
            referenced: set[str] = set()
            for n in keep:
                referenced.update(ref.sha256 for ref in self.manifest(model, n).files.values())

            removed_versions = [n for n in numbers if n not in keep]
            for n in removed_versions:
                self.layout.manifest_path(model, n).unlink()
                self.layout.marks_path(model, n).unlink(missing_ok=True)
            fsync_dir(self.layout.versions_dir(model))

            blob_dir = self.layout.blob_dir(model)
            freed = remove_temp_files(blob_dir, self.layout.versions_dir(model), self.layout.model_dir(model))
            removed_blobs = []
            for path in sorted(blob_dir.iterdir()) if blob_dir.is_dir() else []:
                if path.name not in referenced:
                    freed += path.stat().st_size
                    path.unlink()
                    removed_blobs.append(path.name)
            fsync_dir(blob_dir)
            return RetentionReport(removed_versions, removed_blobs, freed)

    def _build_manifest(
        self, model: str, refs: dict[str, FileRef], *, parent: int | None, meta: dict[str, Any]
    ) -> Manifest:
        """The manifest of version parent+1, checked against the schema before anything is written."""
        unknown = set(meta) - META_KEYS
        if unknown:
            raise ValueError(f"unknown manifest meta keys {sorted(unknown)}: allowed are {sorted(META_KEYS)}")
        if parent is not None and not self.layout.manifest_path(model, parent).is_file():
            # The parent must exist (a typo'd parent is a bug, not a new chain); it may be unreadable:
            # a rollback is how a corrupt newest version is repaired.
            raise SnapshotNotFound(f"{model} has no version {parent} under {self.root}: cannot publish on top of it")
        version = 1 if parent is None else parent + 1
        edit_ids = list(meta.get("edit_ids", []))
        manifest = Manifest.from_dict(
            {
                "format": MANIFEST_FORMAT,
                "version": version,
                "parent": parent,
                "parent_sha256": None if parent is None else self.layout.manifest_sha256(model, parent),
                "created_at": now(),
                "model": model,
                "base_model": meta.get("base_model", {"id": "unknown", "weights_sha256": None}),
                "melo_config": meta.get("melo_config", {}),
                "files": {name: {"sha256": r.sha256, "bytes": r.bytes} for name, r in refs.items()},
                "edit_counts": meta.get("edit_counts", {"total": len(edit_ids), "new": len(edit_ids)}),
                "edit_ids": edit_ids,
                "offsets": meta.get("offsets", {}),
                "stats": meta.get("stats", {"blocks": 0, "clusters": 0, "conflicts": 0, "forgotten": 0}),
                "status": "new",
                "kind": meta.get("kind", "edit"),
                "rollback_of": meta.get("rollback_of"),
                "restores_version": meta.get("restores_version"),
                "request_id": meta.get("request_id"),
                "reason": meta.get("reason"),
                "writer": meta.get("writer", {"owner": "unknown", "token": 0}),
            }
        )
        problems = manifest_problems(manifest.to_dict())
        if problems:
            raise ValueError(f"manifest for {model} v{version} would be invalid: {'; '.join(problems[:5])}")
        return manifest

    def _commit_manifest(self, manifest: Manifest, *, make_current: bool) -> Manifest:
        """Move the manifest into place exclusively, then (optionally) point CURRENT at it."""
        model, version = manifest.model, manifest.version
        doc = manifest.to_dict()
        versions_dir = self.layout.versions_dir(model)
        versions_dir.mkdir(parents=True, exist_ok=True)
        tmp = write_temp(versions_dir, json.dumps(doc, indent=1, sort_keys=True).encode("utf-8"))
        final = self.layout.manifest_path(model, version)
        try:
            os.link(tmp, final)  # atomic and exclusive: fails if version n exists
        except FileExistsError:
            raise VersionConflict(
                f"{model} v{version} already exists (latest is v{self.latest(model)}): another writer published "
                "it; reload the latest version and redo the batch on top of it"
            ) from None
        finally:
            tmp.unlink()
        fsync_dir(versions_dir)
        head = {"version": version, "sha256": hashlib.sha256(final.read_bytes()).hexdigest()}
        replace_file(self.layout.model_dir(model) / "HEAD", json.dumps(head).encode("utf-8"))
        if make_current:
            self.layout.write_current(model, version)
        return manifest

    def _check_fence_locked(self, model: str, token: int, action: str, *, owner: str = "") -> None:
        """Refuse `action` under a token older than FENCE; raise FENCE to a newer token (lock held)."""
        newest = self.layout.read_fence(model)
        if token < newest:
            raise Fenced(
                f"{model}: the snapshot store refuses to {action} under writer token {token}: it has seen token "
                f"{newest}, so another writer took the lease; this writer must stop publishing"
            )
        if token > newest:
            doc = {"token": token, "owner": owner, "at": now()}
            replace_file(self.layout.model_dir(model) / "FENCE", json.dumps(doc).encode("utf-8"))

