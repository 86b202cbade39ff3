"""Start-up recovery: become the single writer, load the serving version, repair the record store.

The snapshot store is the source of truth. Versions are created with O_EXCL manifests, so two
writers can never both publish version n, and a version exists only once all its blobs do. The
record store (Redis or local) is a derived index that may lag the snapshots after a crash between
"manifest written" and "records committed"; recovery replays what it missed. Recovery never
trains: every accepted edit lives in exactly one published version, so replay is exactly-once.

Steps (DESIGN.md invariant 2):
1. acquire the writer lease, waiting while another daemon holds it, and record its token in the
   snapshot store, which from then on refuses the previous writer's publishes (invariant 4);
2. adopt the newest complete version if a crash left CURRENT one step behind a written manifest;
3. load CURRENT's files (every sha256 verified) — the caller builds the editor from them;
4. bring the record store up to that version (applied edit ids, cluster records, version number);
5. return the source positions the version covers; the worker seeks there.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from daemon.errors import CorruptSnapshot, Fenced, Retryable
from daemon.records import RecordStore
from daemon.snapshots import SnapshotStore
from daemon.sources import Offsets

log = logging.getLogger("melo.recovery")
T = TypeVar("T")


class RecoveryError(RuntimeError):
    """The stores disagree in a way recovery cannot repair by itself (an operator must look)."""


def retry(
    call: Callable[[], T],
    *,
    what: str,
    deadline_s: float,
    stop: threading.Event | None = None,
    on_retry: Callable[[Exception, float], None] | None = None,
) -> T:
    """Call ``call`` until it stops raising :class:`Retryable`, backing off 0.1 s → 5 s, for at most
    ``deadline_s``; then re-raise the last error naming ``what``. A set ``stop`` event ends early."""
    started = time.monotonic()
    delay = 0.1
    while True:
        try:
            return call()
        except Retryable as error:
            waited = time.monotonic() - started
            if waited >= deadline_s or (stop is not None and stop.is_set()):
                raise Retryable(f"{what}: still failing after {waited:.1f}s ({error}); giving up") from error
            if on_retry is not None:
                on_retry(error, waited)
            time.sleep(min(delay, max(deadline_s - waited, 0.0)))
            delay = min(delay * 2, 5.0)


def wait_for_lease(
    records: RecordStore,
    snapshots: SnapshotStore,
    model: str,
    owner: str,
    ttl_s: float,
    *,
    stop: threading.Event,
    poll_s: float = 1.0,
    retry_deadline_s: float = 60.0,
) -> int | None:
    """Block until this process holds the writer lease for ``model``; return its fencing token
    (None if ``stop`` was set first). Another holder's lease must expire or be released. The token
    is newer than any the snapshot store has seen, even if the record store lost its counter."""
    announced = False
    while not stop.is_set():
        token = retry(
            lambda: records.acquire_lease(model, owner, ttl_s, above=snapshots.fence_token(model)),
            what=f"acquiring the writer lease of {model!r}",
            deadline_s=retry_deadline_s,
            stop=stop,
        )
        if token is not None:
            return int(token)
        if not announced:
            holder = records.lease_holder(model)
            log.info("model %s: writer lease held by %s; standing by until it is released or expires", model, holder)
            announced = True
        stop.wait(poll_s)
    return None


def fence_snapshots(snapshots: SnapshotStore, model: str, token: int, owner: str) -> None:
    """Tell the snapshot store that ``token`` is the newest writer's, fencing out every older writer.

    The lease was acquired above the store's fence, so the store can only have seen a newer token if
    a writer that is not this process took over in between.
    """
    try:
        snapshots.fence(model, token, owner=owner)
    except Fenced as error:
        raise RecoveryError(
            f"model {model}: writer token {token} is already fenced out ({error}); another writer took over "
            "while this one started. Nothing was published; restart this process to stand by"
        ) from None


def adopt_latest(snapshots: SnapshotStore, model: str, token: int | None = None) -> int | None:
    """Return the serving version, first moving CURRENT to the newest manifest if a crash left it behind.

    A manifest is written only after all its blobs, so a manifest newer than CURRENT is a complete
    version whose publisher died before renaming CURRENT; it is adopted if it verifies. So is the
    newest version when the CURRENT file itself is unreadable.
    """
    try:
        current = snapshots.current(model)
    except CorruptSnapshot as error:  # an unreadable CURRENT file: the newest complete version replaces it
        log.warning("model %s: %s; treating CURRENT as missing", model, error)
        current = None
    newest = snapshots.latest(model)  # by name: one unreadable old manifest must not stop the writer
    if newest is None:
        return current
    if current is not None and newest <= current:
        return current
    problems = snapshots.verify(model, newest)
    if problems:
        raise RecoveryError(
            f"model {model}: version {newest} is newer than CURRENT ({current}) but does not verify: "
            f"{problems[:3]}; inspect with `melo snapshots verify {newest}` before restarting"
        )
    log.warning("model %s: CURRENT was %s but version %s is complete; adopting it", model, current, newest)
    snapshots.set_current(model, newest, token=token)
    return newest


def applied_by_version(snapshots: SnapshotStore, model: str, version: int | None) -> set[str]:
    """Edit ids the record store must list as applied once it is at ``version``.

    Edits stay applied when later forgotten or retracted (a redelivery must not bring them back);
    a rollback to r makes the applied set r's again (its receipts say rolled_back).
    """
    memo: dict[int, set[str]] = {}

    def walk(v: int | None) -> set[str]:
        if v is None or v < 1:
            return set()
        if v in memo:
            return memo[v]
        manifest = snapshots.manifest(model, v)
        if manifest.kind == "rollback":
            result = set(walk(manifest.restores_version))
        else:
            result = walk(manifest.parent) | set(manifest.edit_ids or [])
        memo[v] = result
        return result

    # Walk iteratively from the oldest so long histories never hit the recursion limit.
    if version is not None:
        for v in range(1, version + 1):
            try:
                walk(v)
            except (LookupError, CorruptSnapshot):
                continue  # removed by retention or unreadable; only versions built on it need it
    return walk(version)


def cluster_records(files: dict[str, bytes]) -> list[dict]:
    """Cluster records for the record store, read from the editor's ``index.json``."""
    raw = files.get("index.json")
    if raw is None:
        return []
    index = json.loads(raw)
    state = index.get("db", index) if isinstance(index, dict) else {}  # melo_runtime.serialization layout
    clusters = state.get("clusters", []) if isinstance(state, dict) else []
    return [c for c in clusters if isinstance(c, dict)]


def reconcile(
    records: RecordStore,
    snapshots: SnapshotStore,
    model: str,
    token: int,
    version: int | None,
    files: dict[str, bytes],
    *,
    retry_deadline_s: float,
    stop: threading.Event | None = None,
) -> bool:
    """Make the record store describe ``version``; return True if anything had to be replayed."""
    recorded = retry(lambda: records.current_version(model), what="reading the record store version",
                     deadline_s=retry_deadline_s, stop=stop)
    target = version or 0
    if recorded == target:
        return False
    if recorded > target:
        raise RecoveryError(
            f"model {model}: the record store is at version {recorded} but the snapshot store's CURRENT is "
            f"{target}; the snapshot store is the source of truth — restore its versions or reset the record "
            "store for this model"
        )
    desired = applied_by_version(snapshots, model, version)
    before = applied_by_version(snapshots, model, recorded) if recorded else set()
    log.warning("model %s: record store at version %s, snapshots at %s; replaying", model, recorded, target)
    retry(
        lambda: records.commit_version(
            model,
            token,
            recorded,
            target,
            applied_ids=sorted(desired - before),
            clusters=cluster_records(files),
            removed_ids=sorted(before - desired),
        ),
        what=f"replaying versions {recorded + 1}..{target} into the record store",
        deadline_s=retry_deadline_s,
        stop=stop,
    )
    return True


@dataclass
class Recovered:
    """What the worker resumes from. ``corrupt`` says why CURRENT did not load (then ``files`` is
    None and ``version`` is the newest version, the parent of the rollback that repairs it)."""

    token: int
    version: int | None
    files: dict[str, bytes] | None
    offsets: Offsets
    replayed: bool
    corrupt: str | None = None


def newest_verified(snapshots: SnapshotStore, model: str, below: int) -> int | None:
    """The newest version older than ``below`` whose manifest and blobs verify, or None."""
    for version in range(below - 1, 0, -1):
        if not snapshots.verify(model, version):  # a missing or unreadable manifest is a problem too
            return version
    return None


def corrupt_current_message(snapshots: SnapshotStore, model: str, latest: int, problem: str) -> str:
    """One line for an operator: what is broken and the exact command that repairs it."""
    good = newest_verified(snapshots, model, latest)
    if good is None:
        fix = "no older version verifies: restore the snapshot store from a backup (`melo snapshots verify` lists each)"
    else:
        fix = (f'roll back to the newest version that verifies: melo rollback --to {good} --reason "version {latest} '
               'is corrupt" (same --config), then start melo run again')
    return f"model {model}: the serving version does not load ({problem}); {fix}"


def _load_current(
    snapshots: SnapshotStore, model: str, token: int, *, tolerate_corrupt: bool
) -> tuple[int | None, dict[str, bytes] | None, str | None]:
    """(version, its files, None), or with ``tolerate_corrupt`` (latest version, None, problem)."""
    try:
        version = adopt_latest(snapshots, model, token)
        return version, (snapshots.load_files(model, version) if version is not None else None), None
    except (CorruptSnapshot, RecoveryError) as error:
        latest = snapshots.latest(model)
        if latest is None:
            raise
        if not tolerate_corrupt:
            raise RecoveryError(corrupt_current_message(snapshots, model, latest, str(error))) from None
        return latest, None, str(error)


def _covered_offsets(snapshots: SnapshotStore, model: str, version: int | None) -> Offsets:
    """The source positions ``version`` covers; for an unreadable manifest, those of the newest
    readable one below it (its events are read again and deduplicated by the record store)."""
    for v in range(version or 0, 0, -1):
        try:
            return snapshots.manifest(model, v).offsets or {}
        except (CorruptSnapshot, LookupError):
            continue
    return {}


def recover(
    records: RecordStore,
    snapshots: SnapshotStore,
    model: str,
    owner: str,
    *,
    lease_ttl_s: float,
    retry_deadline_s: float,
    stop: threading.Event,
    tolerate_corrupt: bool = False,
) -> Recovered | None:
    """Run the start-up steps of the module docstring; None if ``stop`` was set while waiting.

    A CURRENT that does not load raises `RecoveryError` naming the rollback that repairs it; with
    ``tolerate_corrupt`` (a rollback is all the caller will do) recovery goes on without its files.
    The lease is released when recovery fails, so that rollback can run at once.
    """
    token = wait_for_lease(records, snapshots, model, owner, lease_ttl_s, stop=stop, retry_deadline_s=retry_deadline_s)
    if token is None:
        return None
    try:
        fence_snapshots(snapshots, model, token, owner)
        version, files, corrupt = _load_current(snapshots, model, token, tolerate_corrupt=tolerate_corrupt)
        offsets = _covered_offsets(snapshots, model, version)
    except (RecoveryError, CorruptSnapshot):
        records.release_lease(model, owner, token)
        raise
    replayed = reconcile(
        records, snapshots, model, token, version, files or {}, retry_deadline_s=retry_deadline_s, stop=stop
    )
    return Recovered(token=token, version=version, files=files, offsets=offsets, replayed=replayed, corrupt=corrupt)
