"""Fault injection for the kill -9 tests: die at a named stage of the worker loop.

``MELO_CRASH_AT=<stage>:<n>`` (read once by the CLI, never deep in the code) makes the process
``os._exit(137)`` — no cleanup, no flush, exactly like SIGKILL — the n-th time the worker reaches
``stage``. Several points may be given comma-separated. ``<stage>:<n>:stop`` instead stops the
process with SIGSTOP there (all its threads, lease renewal included), so a test can resume it with
SIGCONT once another writer has taken over: a writer paused past its lease. Stages, in loop order:

- ``polled``: records read, nothing processed yet
- ``outbox``: DLQ records / receipts queued but not flushed
- ``trained``: a block trained in memory, nothing published
- ``blobs``: just before the manifest is written (the snapshot store may hold orphan blobs)
- ``published``: manifest + CURRENT written, record store not updated
- ``recorded``: record store committed, no announcement or receipts sent
- ``announced``: announcement + receipts flushed, source offsets not committed
- ``committed``: source offsets committed
- ``control``: a control event executed
"""

from __future__ import annotations

import os
import signal
import sys

STAGES = ("polled", "outbox", "trained", "blobs", "published", "recorded", "announced", "committed", "control")


class CrashPoints:
    """Counts arrivals at each stage and exits hard at the configured one."""

    def __init__(self, spec: str | None = None) -> None:
        self._targets: dict[str, int] = {}
        self._counts: dict[str, int] = {}
        self._stops: set[str] = set()
        for item in filter(None, (part.strip() for part in (spec or "").split(","))):
            stage, _, rest = item.partition(":")
            count, _, action = rest.partition(":")
            if stage not in STAGES or not count.isdigit() or int(count) < 1 or action not in ("", "stop"):
                raise ValueError(
                    f"crash point {item!r} is not <stage>:<n>[:stop] with stage in {STAGES} and n >= 1"
                )
            self._targets[stage] = int(count)
            if action == "stop":
                self._stops.add(stage)

    def reached(self, stage: str) -> None:
        """Record one arrival at ``stage``; exit the process with status 137 (or stop it) if it is the chosen one."""
        if stage not in self._targets:
            return
        self._counts[stage] = self._counts.get(stage, 0) + 1
        if self._counts[stage] == self._targets[stage] and stage in self._stops:
            sys.stdout.flush()
            sys.stderr.write(f"melo: injected pause at {stage}:{self._counts[stage]}\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGSTOP)
        elif self._counts[stage] == self._targets[stage]:
            sys.stderr.write(f"melo: injected crash at {stage}:{self._counts[stage]}\n")
            sys.stderr.flush()
            os._exit(137)
