"""The version a serving replica answers with, swapped atomically while requests are in flight.

One base model (weights + tokenizer) is loaded once per process and shared by every loaded version;
a version adds only its LoRA blocks and its cluster index (``MeloEditor.from_files``), so keeping
two versions alive during a swap costs two adapters, not two models.

Swap protocol: the new version is read from the snapshot store (every blob's sha256 verified),
built into an editor and checked for the base model it belongs to -- all on the caller's thread,
off the request path -- and only then is one reference replaced. A request reads that reference
once, at its start, and uses the :class:`LoadedVersion` it got until it answers, so requests in
flight finish on the version they started with and every response names it. Replacing a Python
attribute is atomic, so readers take no lock; loaders serialise on a lock so two followers cannot
interleave.

Before the first version is published, a state given ``base_config`` serves the unedited model as
version 0 (an editor with no blocks: every route is ``null``), so a replica is useful, and ready,
as soon as the model is loaded; the first published version replaces it like any other swap.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from melo_runtime import MeloConfig, MeloEditor

from daemon import metrics
from daemon.snapshots import Manifest, SnapshotStore

log = logging.getLogger(__name__)


class NotReady(RuntimeError):
    """No verified snapshot has been loaded yet (``/readyz`` is false)."""


class WrongBaseModel(RuntimeError):
    """A snapshot was trained on different base weights than the ones this process serves."""


@dataclass(frozen=True)
class LoadedVersion:
    """One immutable, fully loaded snapshot version: what a request is answered with."""

    version: int  # 0: the unedited base model (no version published yet)
    manifest: Manifest | None  # None for version 0
    editor: MeloEditor
    loaded_at: float

    @property
    def unedited(self) -> bool:
        """True while serving the base model because no version has been published."""
        return self.manifest is None


class ServingState:
    """Holds the shared base model and the one version that new requests are answered with."""

    def __init__(
        self,
        store: SnapshotStore,
        model_name: str,
        model: Any,
        tokenizer: Any,
        *,
        weights_sha256: str | None = None,
        base_config: MeloConfig | None = None,
    ) -> None:
        """Serve ``model_name`` from ``store`` on the already loaded ``model``/``tokenizer``.

        ``weights_sha256`` (``backbone_fingerprint(model)``), when given, must match the manifest's
        ``base_model.weights_sha256`` or the version is refused: adapters trained on other weights
        would silently answer wrong. Swaps are counted in ``melo_swaps_total`` and shown in
        ``melo_serving_ready`` / ``melo_serving_version``. ``base_config`` (the backbone's preset):
        serve the unedited model as version 0 while the store has no version (``None``: not ready
        until the first version loads).
        """
        self.store = store
        self.model_name = model_name
        self.model = model
        self.tokenizer = tokenizer
        self.weights_sha256 = weights_sha256
        self.base_config = base_config
        self._current: LoadedVersion | None = None
        self._load_lock = threading.Lock()

    @property
    def ready(self) -> bool:
        """True once a verified snapshot is loaded."""
        return self._current is not None

    def loaded(self) -> LoadedVersion | None:
        """The version new requests use, or ``None`` before the first load."""
        return self._current

    def current(self) -> LoadedVersion:
        """The version new requests use; raise :class:`NotReady` before the first load."""
        loaded = self._current
        if loaded is None:
            raise NotReady(
                f"no snapshot of model {self.model_name!r} is loaded yet; "
                "wait for /readyz or publish a version"
            )
        return loaded

    def load(self, version: int) -> LoadedVersion:
        """Read, verify and build ``version`` without touching what is being served."""
        manifest = self.store.manifest(self.model_name, version)
        recorded = manifest.base_model.get("weights_sha256")
        if self.weights_sha256 and recorded and recorded != self.weights_sha256:
            raise WrongBaseModel(
                f"version {version} of {self.model_name!r} was made for base weights {recorded} "
                f"({manifest.base_model.get('id')}), but this process serves {self.weights_sha256}; start the "
                "server with the backbone and dtype the writer uses"
            )
        files = self.store.load_files(self.model_name, version)
        editor = MeloEditor.from_files(files, self.model, self.tokenizer)
        return LoadedVersion(version=version, manifest=manifest, editor=editor, loaded_at=time.time())

    def swap_to(self, version: int) -> LoadedVersion:
        """Load ``version`` (unless it is already served) and make it the one new requests use."""
        with self._load_lock:
            served = self._current
            if served is not None and served.version == version:
                return served
            loaded = self.load(version)
            self._current = loaded  # the one atomic step: readers see the old or the new version
        log.info("serving %s version %d", self.model_name, version)
        metrics.SERVING_READY.labels(model=self.model_name).set(1)
        metrics.SERVING_VERSION.labels(model=self.model_name).set(version)
        metrics.SWAPS.labels(model=self.model_name).inc()
        return loaded

    def refresh(self) -> bool:
        """Swap to the store's CURRENT version if it differs from the one served; True if swapped."""
        target = self.store.current(self.model_name)
        served = self._current
        if target is None:
            return self._serve_base() if served is None and self.base_config is not None else False
        if served is not None and served.version == target:
            return False
        self.swap_to(target)
        return True

    def _serve_base(self) -> bool:
        with self._load_lock:
            if self._current is not None:
                return False
            editor = MeloEditor(self.model, self.tokenizer, self.base_config)
            self._current = LoadedVersion(version=0, manifest=None, editor=editor, loaded_at=time.time())
        log.info("serving %s unedited (version 0): no version is published yet", self.model_name)
        metrics.SERVING_READY.labels(model=self.model_name).set(1)
        metrics.SERVING_VERSION.labels(model=self.model_name).set(0)
        return True


class CurrentFollower:
    """A daemon thread that keeps a :class:`ServingState` on the store's CURRENT version.

    It polls CURRENT every ``poll_s`` seconds; :meth:`nudge` wakes it at once (called when an
    announcement arrives on the snapshots topic), so announcements cut latency while polling
    stays the source of truth -- a lost announcement only delays a swap by one poll.
    A version that fails to load (corrupt blob, wrong base) is logged and retried on the next
    poll; the served version is left untouched.
    """

    def __init__(self, state: ServingState, poll_s: float, on_error: Callable[[Exception], None] | None = None):
        """Follow CURRENT of ``state``'s model every ``poll_s`` seconds once started."""
        if poll_s <= 0:
            raise ValueError(f"poll_s must be > 0 seconds, got {poll_s}")
        self.state = state
        self.poll_s = poll_s
        self._on_error = on_error
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: Exception | None = None

    def start(self) -> CurrentFollower:
        """Start following in a background thread; returns self."""
        self._thread = threading.Thread(target=self._run, name=f"follow-{self.state.model_name}", daemon=True)
        self._thread.start()
        return self

    def nudge(self) -> None:
        """Check CURRENT now instead of at the next poll."""
        self._wake.set()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the thread and wait for it (a swap in progress completes first)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.state.refresh()
                self.last_error = None
            except Exception as exc:  # noqa: BLE001 -- keep serving the old version whatever the new one did
                self.last_error = exc
                log.warning("could not swap %s to CURRENT: %s", self.state.model_name, exc)
                if self._on_error is not None:
                    self._on_error(exc)
            self._wake.wait(self.poll_s)
            self._wake.clear()


class VersionHistory:
    """Read-only views of a model's versions for the API: summaries, details and changes.

    "What changed" compares the edits reachable in a version with those reachable in its parent
    (``MeloEditor.edit_ids``): added (first applied here, from the manifest), removed -- named by
    the version's kind: retracted (retract), rolled_back (rollback), forgotten (an edit batch whose
    conflicts shrank clusters) -- and restored (reachable again after a rollback). Versions are
    immutable, so each version's reachable set is computed once and cached.
    """

    def __init__(self, state: ServingState) -> None:
        """Describe the versions of ``state``'s model, loading editors on ``state``'s base model."""
        self.state = state
        self._reachable: dict[int, frozenset[str]] = {}
        self._lock = threading.Lock()

    def current(self) -> int | None:
        """The version CURRENT names in the store."""
        return self.state.store.current(self.state.model_name)

    def summaries(self) -> list[dict[str, Any]]:
        """One line per stored version, newest first."""
        current = self.current()
        return [
            {
                "version": m.version,
                "parent": m.parent,
                "created_at": m.created_at,
                "kind": m.kind,
                "status": m.status,
                "current": m.version == current,
                "edit_counts": m.edit_counts,
                "restores_version": m.restores_version,
                "reason": m.reason,
            }
            for m in reversed(self.state.store.versions(self.state.model_name))
        ]

    def reachable(self, version: int) -> frozenset[str]:
        """Edit ids reachable (not forgotten, not retracted) in ``version``."""
        with self._lock:
            cached = self._reachable.get(version)
        if cached is not None:
            return cached
        served = self.state.loaded()
        if served is not None and served.version == version:
            ids = frozenset(served.editor.edit_ids())
        else:
            ids = frozenset(self.state.load(version).editor.edit_ids())
        with self._lock:
            self._reachable[version] = ids
        return ids

    def changes(self, manifest: Manifest) -> dict[str, list[str]]:
        """Edits added / removed (by cause) / restored by ``manifest`` against its parent."""
        added = set(manifest.edit_ids)
        now = self.reachable(manifest.version)
        before = self.reachable(manifest.parent) if manifest.parent is not None else frozenset()
        removed = sorted(before - now)
        cause = {"retract": "retracted", "rollback": "rolled_back"}.get(manifest.kind, "forgotten")
        changes: dict[str, list[str]] = {"added": sorted(added), "forgotten": [], "retracted": [], "rolled_back": []}
        changes[cause] = removed
        changes["restored"] = sorted(now - before - added)
        return changes

    def detail(self, version: int) -> dict[str, Any]:
        """The manifest of ``version`` (effective status included), and its changes against its parent.

        Raises ``SnapshotNotFound`` for a version the store does not hold.
        """
        manifest = self.state.store.manifest(self.state.model_name, version)
        return {
            "manifest": manifest.to_dict(),
            "current": version == self.current(),
            "serving": (served := self.state.loaded()) is not None and served.version == version,
            "stats": manifest.stats,
            "changes": self.changes(manifest),
        }
