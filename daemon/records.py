"""Per-model records the writer keeps beside the snapshots, and the `RecordStore` protocol.

A record store holds, per model: the committed version, the ids of every edit ever applied
(the idempotency set: a redelivered edit is a duplicate), the ids removed from the index since
(forgotten or retracted: they stay "applied"), the cluster records, and the writer lease with
its fencing counter.

Writer protocol (DESIGN.md invariant 4): `acquire_lease` returns a fencing token, strictly larger
than any token handed out before for that model. `commit_version` writes one batch's records in
one atomic step and refuses it when the token is no longer the newest (`Fenced`: another daemon
took over) or the version is not the one the writer built on (`VersionMoved`). A lease that
expired is still safe to use while nobody else acquired it, because the fence has not moved.

Implementations: `daemon.records_redis.RedisRecordStore` and `daemon.records_local.LocalRecordStore`
(the embedded default). Redis failures surface as `RecordStoreUnavailable` (retryable).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Lease:
    """Who may write a model: `owner`, its fencing `token`, and when the lease lapses (Unix seconds)."""

    owner: str
    token: int
    expires_at: float


class RecordStore(Protocol):
    """Durable per-model records with a fenced single-writer lease."""

    def acquire_lease(self, model: str, owner: str, ttl_s: float, *, above: int = 0) -> int | None:
        """Take the writer lease if it is free, lapsed or already ours; return the new fencing token.

        Returns None while another owner holds a live lease. Every successful call issues a
        larger token, so a re-acquiring owner fences its own older token too. The token is also
        larger than `above` (the snapshot store's fence): a store that lost its counter (Redis back
        empty) never issues a token the snapshot store would refuse.
        """
        ...

    def renew_lease(self, model: str, owner: str, token: int, ttl_s: float) -> bool:
        """Extend our lease by `ttl_s`; False means it is lost (another owner acquired it): stop writing."""
        ...

    def release_lease(self, model: str, owner: str, token: int) -> None:
        """Give the lease up now (on shutdown) so another daemon need not wait for it to lapse."""
        ...

    def lease_holder(self, model: str) -> Lease | None:
        """The live lease, or None when nobody holds one."""
        ...

    def current_version(self, model: str) -> int:
        """The last committed snapshot version (0 before the first commit)."""
        ...

    def applied(self, model: str, edit_ids: Iterable[str]) -> set[str]:
        """The subset of `edit_ids` already applied (in any version, including ones forgotten since)."""
        ...

    def removed(self, model: str) -> set[str]:
        """Applied edit ids whose keys have left the index (forgotten or retracted)."""
        ...

    def clusters(self, model: str) -> list[dict[str, Any]]:
        """The cluster records as of the committed version."""
        ...

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
        """Atomically move the model from `expected_version` to `new_version`.

        Adds `applied_ids` to the applied set, adds `removed_ids` to the removed set and replaces
        the cluster records with `clusters` (JSON-serialisable dicts). Raises `Fenced` if `token`
        is not the newest fencing token, `VersionMoved` if the version is not `expected_version`;
        then nothing changed. Repeating a commit that already succeeded (a retry after a lost
        reply) is a no-op.
        """
        ...


def encode_clusters(clusters: list[dict[str, Any]]) -> list[str]:
    """Each cluster record as compact JSON; ValueError names the first record that is not JSON data."""
    encoded = []
    for i, record in enumerate(clusters):
        if not isinstance(record, dict):
            raise ValueError(f"cluster record {i} is a {type(record).__name__}, expected a dict")
        try:
            encoded.append(json.dumps(record, separators=(",", ":"), allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"cluster record {i} is not JSON data ({exc}): convert arrays to lists first") from None
    return encoded
