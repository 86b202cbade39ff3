"""Errors the daemon's storage layer raises. Callers branch on the type, people read the message.

`Retryable` errors mean "the same call may succeed later" (a backend is down or restarting); the
worker waits and retries them. Everything else is a verdict: retrying the same call cannot help.
"""

from __future__ import annotations


class DaemonError(Exception):
    """Base of every error raised on purpose by `daemon`."""


class Retryable(DaemonError):
    """A transient failure: wait and call again (the worker does, up to redis.retry_deadline_s)."""


class RecordStoreUnavailable(Retryable):
    """The record store could not be reached or is still loading its data (e.g. Redis restarting)."""


class SnapshotNotFound(DaemonError, LookupError):
    """A model or version that the snapshot store does not have."""


class VersionConflict(DaemonError):
    """Another writer already published this version number: reload the latest version and redo."""


class CorruptSnapshot(DaemonError):
    """A manifest or blob does not match what was published (bad JSON, wrong sha256, missing file)."""


class Fenced(DaemonError):
    """This writer's lease token is no longer the newest: another daemon took over the model. Stop writing."""


class VersionMoved(DaemonError):
    """The record store's version is not the one this writer expected: reload state before committing."""


class WrongBaseWeights(DaemonError):
    """The snapshot history was trained on other base weights than the backbone this process loaded."""
