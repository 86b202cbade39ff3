"""A real writer and a real `melo serve` app on a uvicorn socket, for the daily-interface tests (issue 14).

The writer is ``build_worker(settings)`` running its loop in a thread (embedded spool, local record
store, filesystem snapshots, file outbox, tiny-gpt2) and the server is ``build_app(settings)`` --
what `melo serve` runs -- on its own copy of the backbone, served by uvicorn on a free loopback
port. Both read the same settings, so edits POSTed to the server reach the writer through the
spool and the receipts come back through the outbox, exactly as in a deployment.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import uvicorn

from daemon.server import build_app
from daemon.settings import Settings
from daemon.wiring import build_worker
from melo_testkit.services import free_port, wait_until

MODEL = "tiny-gpt2"
PRODUCER = "producer-token-for-tests"
ADMIN = "admin-token-for-tests"
# Enough capacity and iterations that a tiny-gpt2 block learns a short target in about a second.
OVERRIDES = {"rank_per_block": 8, "iterations": 100, "lr": 0.02, "lr_step": 50}


def api_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Embedded deployment under ``data_dir`` with both tokens set and a short batch wait."""
    values: dict[str, Any] = {
        "model": MODEL, "data_dir": data_dir, "melo": OVERRIDES,
        "batch": {"max_size": 4, "max_wait_s": 0.3},
        "metrics": {"enabled": False},
        "serve": {"producer_token": PRODUCER, "admin_token": ADMIN, "poll_s": 0.05, "control_wait_s": 60},
    }
    values.update(overrides)
    settings = Settings(**values)
    (Path(settings.spool_dir) / "melo.edits").mkdir(parents=True, exist_ok=True)
    return settings


class WriterThread:
    """The daemon's worker loop in a thread of this process."""

    def __init__(self, settings: Settings) -> None:
        self.worker = build_worker(settings)
        self.thread = threading.Thread(target=self.worker.run, name="melo-writer", daemon=True)

    def __enter__(self) -> WriterThread:
        self.thread.start()
        wait_until(lambda: self.worker.token is not None, 60, "the writer to take the lease")
        return self

    def __exit__(self, *exc: object) -> None:
        self.worker.stop()
        self.thread.join(30)


class LiveServer:
    """An app on uvicorn, on a free loopback port, in a thread of this process."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    @classmethod
    def for_settings(cls, settings: Settings) -> LiveServer:
        """What `melo serve` would serve for ``settings``."""
        return cls(build_app(settings))

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_until(lambda: self.server.started, 30, "uvicorn to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(20)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"
