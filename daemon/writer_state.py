"""What the parts of one model's writer share: its options, its stores, and the mutable state of the
single writer (lease token, serving version, editor).

:class:`daemon.worker.Worker` (the consume/apply loop) is a :class:`WriterState`; the parts it hands
work to (:class:`daemon.version_commit.VersionCommitter`, :class:`daemon.edit_outcomes.OutcomeReporter`,
:class:`daemon.control_handler.ControlHandler`) take the same object, so a store replaced on the
worker (a benchmark wraps its snapshot store) is the store every part uses.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from daemon.batcher import MicroBatcher
from daemon.crash import CrashPoints
from daemon.publish import Publisher
from daemon.records import RecordStore
from daemon.snapshots import SnapshotStore
from daemon.sources import EventSource, Offsets, SourceRecord
from schemas import Limits
from schemas.events import EditEvent

if TYPE_CHECKING:
    from melo_runtime.editor import MeloEditor

log = logging.getLogger("melo.worker")


class LeaseLost(RuntimeError):
    """Another daemon became the writer of this model: stop publishing and consuming."""


class BatchAbandoned(RuntimeError):
    """Shutdown was asked while a block trained; nothing of the batch was published or committed."""


class EditorFactory(Protocol):
    """Builds MeloEditors over the one loaded backbone."""

    base_model: dict[str, Any]  # {"id", "weights_sha256"} recorded in every manifest

    def fresh(self) -> MeloEditor:
        """An editor with no edits, configured by the backbone's preset and the settings overrides."""
        ...

    def from_files(self, files: dict[str, bytes]) -> MeloEditor:
        """The editor a snapshot's files describe."""
        ...


@dataclass(frozen=True)
class WorkerOptions:
    """Knobs of the loop (filled from Settings by :func:`daemon.wiring.build_worker`)."""

    model: str
    task: str
    owner: str
    batch_max_size: int = 16
    batch_max_wait_s: float = 5.0
    lease_ttl_s: float = 30.0
    lease_renew_s: float = 10.0
    retry_deadline_s: float = 300.0
    poll_timeout_s: float = 0.5
    poll_max_records: int = 500
    limits: Limits = field(default_factory=Limits)
    reject_other_models: bool = False  # dead-letter events of other models instead of leaving them to their writer
    # A writer holding the lease with no partition this long logs a warning (and again at this interval).
    partitionless_warn_s: float = 60.0


@dataclass
class PendingEdit:
    """An accepted edit waiting in the micro-batcher."""

    event: EditEvent
    record: SourceRecord


@dataclass
class Progress:
    """Running totals for the CLI's summary."""

    events: int = 0
    applied: int = 0
    duplicates: int = 0
    rejected: int = 0
    dead_lettered: int = 0
    forgotten: int = 0
    not_learned: int = 0
    versions_published: int = 0
    conflicts: int = 0
    control: int = 0


class WriterState:
    """The stores, options and single-writer state of one model's writer (see the module docstring)."""

    def __init__(
        self,
        options: WorkerOptions,
        *,
        source: EventSource,
        snapshots: SnapshotStore,
        records: RecordStore,
        publisher: Publisher,
        editors: EditorFactory,
        crash: CrashPoints | None = None,
        on_progress: Callable[[str], None] | None = None,
    ) -> None:
        self.options = options
        self.model = options.model
        self.source = source
        self.snapshots = snapshots
        self.records = records
        self.publisher = publisher
        self.editors = editors
        self.crash = crash or CrashPoints()
        self.on_progress = on_progress or (lambda line: log.info("%s", line))
        self.batcher: MicroBatcher[PendingEdit] = MicroBatcher(options.batch_max_size, options.batch_max_wait_s)
        self.progress = Progress()
        self.editor: MeloEditor | None = None  # None only while a corrupt CURRENT waits for its rollback
        self.version: int | None = None
        self.token: int | None = None
        self.paused = False
        self.committed: Offsets = {}  # source positions committed so far
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        self.lease_lost = threading.Event()
        self.last_renewal = time.monotonic()

    def log_retry(self, error: Exception, waited: float) -> None:
        """``on_retry`` of :func:`daemon.recovery.retry`: one warning per failed attempt."""
        log.warning("model %s: %s — retrying (%.1fs so far)", self.model, error, waited)
