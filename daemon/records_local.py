"""Record store in local files: the embedded default when no Redis is configured.

```
<dir>/<model>/state.json   {version, applied[], removed[], clusters[], last_commit}
<dir>/<model>/lease.json   {fence, owner, token, expires_at}
<dir>/<model>/.lock        flock held for every read-modify-write
```

Same semantics as `RedisRecordStore`: each change rewrites one file via temp + fsync + rename, so
kill -9 leaves either the old or the new state. Lease expiry uses the wall clock, so daemons on one
host (or sharing a filesystem with synchronised clocks) fence each other as they would through Redis.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from daemon.durable import locked, replace_file
from daemon.errors import Fenced, VersionMoved
from daemon.records import Lease, encode_clusters
from schemas import MODEL_NAME

_EMPTY_STATE: dict[str, Any] = {"version": 0, "applied": [], "removed": [], "clusters": [], "last_commit": None}
_NO_LEASE: dict[str, Any] = {"fence": 0, "owner": None, "token": 0, "expires_at": 0.0}


class LocalRecordStore:
    """`RecordStore` persisted as JSON files under `directory` (one sub-directory per model)."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)

    def acquire_lease(self, model: str, owner: str, ttl_s: float, *, above: int = 0) -> int | None:
        """Take the lease if free, lapsed or ours; return a new fencing token (> ``above``), else None."""
        _check_ttl(ttl_s)
        with self._locked(model):
            lease = self._read(model, "lease.json", _NO_LEASE)
            now = time.time()
            if lease["owner"] not in (None, owner) and lease["expires_at"] > now:
                return None
            token = max(lease["fence"], above) + 1
            self._write(
                model, "lease.json", {"fence": token, "owner": owner, "token": token, "expires_at": now + ttl_s}
            )
            return token

    def renew_lease(self, model: str, owner: str, token: int, ttl_s: float) -> bool:
        """Extend the lease; False once another owner has acquired it."""
        _check_ttl(ttl_s)
        with self._locked(model):
            lease = self._read(model, "lease.json", _NO_LEASE)
            if lease["fence"] != token or lease["owner"] not in (owner, None):
                return False
            self._write(
                model, "lease.json", lease | {"owner": owner, "token": token, "expires_at": time.time() + ttl_s}
            )
            return True

    def release_lease(self, model: str, owner: str, token: int) -> None:
        """Drop the lease now if we still hold it (the fence keeps its value)."""
        with self._locked(model):
            lease = self._read(model, "lease.json", _NO_LEASE)
            if lease["owner"] == owner and lease["token"] == token:
                self._write(model, "lease.json", lease | {"owner": None, "token": 0, "expires_at": 0.0})

    def lease_holder(self, model: str) -> Lease | None:
        """The live lease, or None."""
        with self._locked(model):
            lease = self._read(model, "lease.json", _NO_LEASE)
        if lease["owner"] is None or lease["expires_at"] <= time.time():
            return None
        return Lease(lease["owner"], lease["token"], lease["expires_at"])

    def current_version(self, model: str) -> int:
        """The last committed version (0 before the first commit)."""
        return self._state(model)["version"]

    def applied(self, model: str, edit_ids: Iterable[str]) -> set[str]:
        """The subset of `edit_ids` already applied."""
        return set(edit_ids) & set(self._state(model)["applied"])

    def removed(self, model: str) -> set[str]:
        """Applied edit ids that have left the index."""
        return set(self._state(model)["removed"])

    def clusters(self, model: str) -> list[dict[str, Any]]:
        """The cluster records as of the committed version."""
        return self._state(model)["clusters"]

    def commit_version(
        self,
        model: str,
        token: int,
        expected_version: int,
        new_version: int,
        *,
        applied_ids: Iterable[str],
        clusters: list[dict[str, Any]],
        removed_ids: Iterable[str],
    ) -> None:
        """Atomically move from `expected_version` to `new_version`; see `RecordStore.commit_version`."""
        _check_versions(expected_version, new_version)
        encode_clusters(clusters)
        marker = f"{token}:{new_version}"
        with self._locked(model):
            state = self._read(model, "state.json", _EMPTY_STATE)
            if state["version"] == new_version and state["last_commit"] == marker:
                return
            fence = self._read(model, "lease.json", _NO_LEASE)["fence"]
            if token < 1 or fence != token:
                raise Fenced(f"{model}: fencing token {token} is stale (newest is {fence}); another writer took over")
            if state["version"] != expected_version:
                found = state["version"]
                raise VersionMoved(f"{model}: records are at version {found}, not {expected_version}; reload first")
            applied = list(dict.fromkeys([*state["applied"], *applied_ids]))
            removed = list(dict.fromkeys([*state["removed"], *removed_ids]))
            self._write(
                model,
                "state.json",
                {
                    "version": new_version,
                    "applied": applied,
                    "removed": removed,
                    "clusters": clusters,
                    "last_commit": marker,
                },
            )

    def _state(self, model: str) -> dict[str, Any]:
        with self._locked(model):
            return self._read(model, "state.json", _EMPTY_STATE)

    def _read(self, model: str, name: str, default: dict[str, Any]) -> dict[str, Any]:
        path = self._model_dir(model) / name
        try:
            return json.loads(path.read_bytes())
        except FileNotFoundError:
            return dict(default)

    def _write(self, model: str, name: str, doc: dict[str, Any]) -> None:
        replace_file(self._model_dir(model) / name, json.dumps(doc, separators=(",", ":")).encode("utf-8"))

    def _locked(self, model: str) -> AbstractContextManager[None]:
        return locked(self._model_dir(model))

    def _model_dir(self, model: str) -> Path:
        if not isinstance(model, str) or not MODEL_NAME.match(model):
            raise ValueError(f"model name {model!r} is not a valid namespace (pattern {MODEL_NAME.pattern})")
        return self.directory / model


def _check_ttl(ttl_s: float) -> None:
    if not ttl_s > 0:
        raise ValueError(f"lease ttl_s must be positive, got {ttl_s!r}")


def _check_versions(expected_version: int, new_version: int) -> None:
    if new_version <= expected_version:
        raise ValueError(f"new_version {new_version} must be greater than expected_version {expected_version}")
