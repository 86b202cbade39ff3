"""Where `daemon.snapshot_store_fs.FsSnapshotStore` keeps each file of a model, and the single-file
reads and atomic writes it builds on (layout in that module's docstring).

Everything here is one file at a time; what must happen together (a publish, a mark, retention)
is the store's, under the model's lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from daemon.durable import TMP_PREFIX, fsync_dir, locked, write_temp
from daemon.errors import CorruptSnapshot
from daemon.snapshots import MARK_STATUSES, FileRef, Status
from schemas import MODEL_NAME

MANIFEST_NAME = re.compile(r"^([1-9][0-9]*)\.json$")
READ_CHUNK = 1 << 20


class SnapshotLayout:
    """Paths and single-file operations under one store root."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def version_numbers(self, model: str) -> list[int]:
        """Numbers of the manifests present, ascending."""
        directory = self.versions_dir(model)
        if not directory.is_dir():
            return []
        return sorted(int(m.group(1)) for p in directory.iterdir() if (m := MANIFEST_NAME.match(p.name)))

    def locked(self, model: str) -> AbstractContextManager[None]:
        """The model's flock, held while publishing, marking or deleting."""
        return locked(self.model_dir(model))

    def model_dir(self, model: str) -> Path:
        """``<root>/<model>``; ValueError for a name that is not a valid namespace."""
        if not isinstance(model, str) or not MODEL_NAME.match(model):
            raise ValueError(f"model name {model!r} is not a valid namespace (pattern {MODEL_NAME.pattern})")
        return self.root / model

    def versions_dir(self, model: str) -> Path:
        """Where manifests and their marks live."""
        return self.model_dir(model) / "versions"

    def blob_dir(self, model: str) -> Path:
        """Where blobs live, named by their sha256."""
        return self.model_dir(model) / "blobs" / "sha256"

    def blob_path(self, model: str, digest: str) -> Path:
        """The blob holding the content that hashes to ``digest``."""
        return self.blob_dir(model) / digest

    def manifest_path(self, model: str, version: int) -> Path:
        """Manifest file of ``version``."""
        return self.versions_dir(model) / f"{int(version)}.json"

    def marks_path(self, model: str, version: int) -> Path:
        """Append-only status marks of ``version``."""
        return self.versions_dir(model) / f"{int(version)}.marks.jsonl"


    @staticmethod
    def read_json(path: Path) -> dict[str, Any]:
        """A JSON object file's content; {} when it is missing or not an object."""
        try:
            doc = json.loads(path.read_bytes())
        except (FileNotFoundError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def manifest_sha256(self, model: str, version: int) -> str | None:
        """sha256 of ``version``'s manifest file (the hash chain's link); None if it is missing."""
        try:
            return hashlib.sha256(self.manifest_path(model, version).read_bytes()).hexdigest()
        except FileNotFoundError:
            return None

    def read_fence(self, model: str) -> int:
        """The token in FENCE (0 before any); CorruptSnapshot for a damaged record."""
        path = self.model_dir(model) / "FENCE"
        try:
            token = json.loads(path.read_bytes())["token"]
        except FileNotFoundError:
            return 0
        except (ValueError, KeyError, TypeError):
            raise CorruptSnapshot(
                f"{path} is not a fence record; stop every writer of {model}, then rewrite it as "
                '{"token": <the record store\'s newest token>}'
            ) from None
        if not isinstance(token, int) or token < 0:
            raise CorruptSnapshot(f"{path} holds token {token!r}, expected a non-negative integer")
        return token

    def status(self, model: str, version: int) -> Status | None:
        """The last complete status mark of ``version``; None when unmarked."""
        path = self.marks_path(model, version)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        status = None
        lines = text.split("\n")
        # A crash mid-append leaves a last line without its newline: that mark never happened.
        for number, line in enumerate(lines[:-1], start=1):
            try:
                status = json.loads(line)["status"]
            except (ValueError, KeyError, TypeError):
                raise CorruptSnapshot(f"{path} line {number} is not a status mark: {line[:80]!r}") from None
            if status not in MARK_STATUSES:
                raise CorruptSnapshot(f"{path} line {number} has unknown status {status!r}")
        return status

    def put_blob(self, model: str, ref: FileRef, data: bytes) -> None:
        """Write ``data`` as blob ``ref`` (read-only) unless an intact copy is there already."""
        path = self.blob_path(model, ref.sha256)
        try:
            existing = hash_file(path)
        except FileNotFoundError:
            existing = None
        # An existing blob is re-hashed, not trusted: a damaged copy is replaced instead of reused.
        if existing != (ref.bytes, ref.sha256):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = write_temp(path.parent, data)
            os.chmod(tmp, 0o444)
            os.replace(tmp, path)

    def write_current(self, model: str, version: int) -> None:
        """Atomically point CURRENT at ``version`` (the caller holds the lock and checked the fence)."""
        directory = self.model_dir(model)
        tmp = write_temp(directory, f"{version}\n".encode("ascii"))
        os.replace(tmp, directory / "CURRENT")
        fsync_dir(directory)


def remove_temp_files(*directories: Path) -> int:
    """Delete leftovers of writes interrupted by a crash; the caller holds the lock, so none is live."""
    freed = 0
    for directory in directories:
        for path in directory.glob(f"{TMP_PREFIX}*") if directory.is_dir() else []:
            freed += path.stat().st_size
            path.unlink()
    return freed


def hash_file(path: Path) -> tuple[int, str]:
    """(size, sha256 hex) of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(READ_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def now() -> str:
    """The current UTC time as an ISO 8601 string with milliseconds (manifests, marks, FENCE)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
