"""Daemon processes for integration tests and benchmarks: configs, event streams, subprocess daemons, checks.

A test describes one deployment with :class:`Deployment` (Kafka + Redis, or the embedded spool +
local records), feeds it events, runs the daemon (in this process, or as a subprocess where kill -9
matters) and then checks the invariants of DESIGN.md §5 from the stores themselves.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from daemon.settings import Settings
from daemon.snapshot_store_fs import FsSnapshotStore
from melo_testkit.services import create_topics, wait_until

REPO = Path(__file__).resolve().parents[1]
ZSRE = REPO.parent / "shared" / "data" / "zsre" / "zsre_mend_train-1k.json"
MODEL = "it-model"
TOPIC_ROLES = ("edits", "control", "dlq", "results", "forgotten", "snapshots")


# Every daemon start would otherwise pay ~5-8 s of torch/transformers imports on this machine; the
# kill -9 tests start dozens. A fork server imports them once and forks each daemon from there: the
# daemon is still a separate process with its own PID, killed with a real SIGKILL.
_PRELOAD = ["torch", "transformers", "melo_runtime", "melo_runtime.backbones", "daemon.cli", "daemon.worker", "daemon.wiring",
            "daemon.scheduler", "daemon.source_kafka", "daemon.source_spool", "kafka", "redis"]
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(_PRELOAD)


def _daemon_main(argv: list[str], env: dict[str, str], log_path: str) -> None:
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - the process's own stdout
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    import torch

    torch.set_num_threads(1)
    from daemon.cli import main

    code = main(argv)
    sys.stdout.flush()
    os._exit(code)


class DaemonProcess:
    """A ``melo`` process forked from the fork server (Popen-like: pid, poll, wait, send_signal)."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self._proc = _CONTEXT.Process(target=_daemon_main, args=(argv, env, str(log_path)), daemon=False)
        self._proc.start()
        self.pid = self._proc.pid

    def poll(self) -> int | None:
        code = self._proc.exitcode
        if code is None:
            return None
        return 128 - code if code < 0 else code  # -9 (signal) reads as 137, like a shell

    def wait(self, timeout: float | None = None) -> int:
        self._proc.join(timeout)
        code = self.poll()
        if code is None:
            raise subprocess.TimeoutExpired("melo run", timeout or 0)
        return code

    def send_signal(self, sig: int) -> None:
        if self._proc.exitcode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def zsre_events(count: int, *, model: str = MODEL, start: int = 0) -> list[dict[str, Any]]:
    """``count`` real zsRE facts as edit events (ids ``zsre-<n>``), cycling over the 1k file."""
    records = json.loads(ZSRE.read_text(encoding="utf-8"))
    events = []
    for n in range(start, start + count):
        record = records[n % len(records)]
        events.append({
            "edit_id": f"zsre-{n:05d}",
            "model": model,
            "task": "generate",
            "prompt": record["src"][:200],
            "target": record["answers"][0][:60],
            "rephrases": [record["rephrase"][:200]],
            "created_at": "2024-01-01T00:00:00Z",
        })
    return events


def encode(events: list[dict[str, Any] | bytes]) -> list[bytes]:
    """Events as raw lines (bytes are passed through: malformed events on purpose)."""
    return [e if isinstance(e, bytes) else json.dumps(e).encode() for e in events]


@dataclass
class Deployment:
    """One daemon deployment under ``root``: Kafka + Redis when given, else the embedded default."""

    root: Path
    bootstrap: str | None = None
    redis_url: str | None = None
    name: str = "t"
    batch_max_size: int = 10
    lease_ttl_s: float = 4.0
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def topics(self) -> dict[str, str]:
        return {role: f"{self.name}.{role}" for role in TOPIC_ROLES}

    @property
    def config_path(self) -> Path:
        return self.root / "melo.toml"

    def write_config(self) -> Path:
        """Write the TOML for this deployment (tiny-gpt2, 5 iterations per block: seconds, not minutes)."""
        self.root.mkdir(parents=True, exist_ok=True)
        lines = [
            f'model = "{MODEL}"', 'backbone = "tiny-gpt2"', f'data_dir = "{self.root / "data"}"',
            f'spool_dir = "{self.root / "spool"}"',
            "[batch]", f"max_size = {self.batch_max_size}", "max_wait_s = 0.5",
            # Delivery tests: 5 iterations learn nothing on tiny-gpt2, so edits are indexed regardless.
            "[melo]", "iterations = 5", "max_iterations = 1", "retry_rounds = 0", "index_not_learned = true",
            "[metrics]", "enabled = false",
        ]
        if self.bootstrap:
            lines += ["[kafka]", f'bootstrap_servers = ["{self.bootstrap}"]', f'group_id = "{self.name}-group"',
                      "session_timeout_ms = 6000", "heartbeat_interval_ms = 1000", "[kafka.topics]"]
            lines += [f'{role} = "{topic}"' for role, topic in self.topics.items()]
            create_topics(self.bootstrap, list(self.topics.values()))
        if self.redis_url:
            lines += ["[redis]", f'url = "{self.redis_url}"', f"lease_ttl_s = {self.lease_ttl_s}",
                      f"lease_renew_s = {self.lease_ttl_s / 4}", "retry_deadline_s = 60"]
        (self.root / "spool" / "melo.edits").mkdir(parents=True, exist_ok=True)
        self.config_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return self.config_path

    def settings(self) -> Settings:
        return Settings.load(self.config_path)

    # -- feeding

    def feed(self, events: list[dict[str, Any] | bytes], *, file: str = "events.jsonl") -> None:
        """Append events to the edits topic (Kafka) or a spool file (embedded)."""
        raw = encode(events)
        if self.bootstrap:
            producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all")
            for value in raw:
                producer.send(self.topics["edits"], key=MODEL.encode(), value=value)
            producer.flush()
            producer.close()
        else:
            with (self.root / "spool" / "melo.edits" / file).open("ab") as handle:
                handle.write(b"".join(value + b"\n" for value in raw))

    def feed_control(self, event: dict[str, Any]) -> None:
        """Send one control event (control topic, or a file in the spool's control directory)."""
        value = json.dumps(event).encode()
        if self.bootstrap:
            producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all")
            producer.send(self.topics["control"], key=MODEL.encode(), value=value)
            producer.flush()
            producer.close()
        else:
            folder = self.root / "spool" / "melo.control"
            folder.mkdir(parents=True, exist_ok=True)
            with (folder / "control.jsonl").open("ab") as handle:
                handle.write(value + b"\n")

    # -- running

    def env(self, crash_at: str | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MELO_")}
        env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": str(REPO)}, **self.extra_env)
        if crash_at:
            env["MELO_CRASH_AT"] = crash_at
        return env

    def spawn(self, *, until_idle: bool = True, crash_at: str | None = None, log_name: str = "daemon") -> DaemonProcess:
        """Start ``melo run`` in a new process (its output goes to ``<root>/<log_name>.log``)."""
        argv = ["run", "--config", str(self.config_path)]
        if until_idle:
            argv.append("--until-idle")
        return DaemonProcess(argv, self.env(crash_at), self.root / f"{log_name}.log")

    def run(self, *, timeout_s: float = 240, crash_at: str | None = None) -> int:
        """Run ``melo run --until-idle`` to completion; return its exit status."""
        proc = self.spawn(crash_at=crash_at)
        try:
            return proc.wait(timeout=timeout_s)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)

    def log_text(self, log_name: str = "daemon") -> str:
        path = self.root / f"{log_name}.log"
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    # -- reading back

    def store(self) -> FsSnapshotStore:
        return FsSnapshotStore(self.root / "data" / "snapshots")

    def read_topic(self, role: str, *, expect_at_least: int = 0, timeout_s: float = 30) -> list[Any]:
        """Every record of an output topic (Kafka) or outbox file (embedded), decoded as JSON where possible."""
        if not self.bootstrap:
            path = self.root / "data" / "outbox" / f"{self.topics_default[role]}.jsonl"
            if not path.exists():
                return []
            return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, auto_offset_reset="earliest",
                                 enable_auto_commit=False, consumer_timeout_ms=2000)
        tp = TopicPartition(self.topics[role], 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        out: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=500)
            for items in batch.values():
                for item in items:
                    headers = dict(item.headers or [])
                    try:
                        value: Any = json.loads(item.value)
                    except ValueError:
                        value = item.value
                    out.append({"value": value, "headers": headers} if role == "dlq" else value)
            if not batch and len(out) >= expect_at_least:
                break
        consumer.close()
        return out

    @property
    def topics_default(self) -> dict[str, str]:
        from daemon.settings import TopicsSettings

        return TopicsSettings().model_dump()

    def committed_edits_offset(self) -> int:
        """Committed position of the edits source (Kafka group offset, or the spool's committed byte)."""
        if self.bootstrap:
            consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, group_id=f"{self.name}-group",
                                     enable_auto_commit=False)
            value = consumer.committed(TopicPartition(self.topics["edits"], 0)) or 0
            consumer.close()
            return value
        state = json.loads((self.root / "data" / "spool-offsets" / f"{MODEL}.json").read_text())
        return state["offsets"].get("melo.edits/events.jsonl", {}).get("0", 0)

    def edits_end(self) -> int:
        """Where the edits source ends (number of records / file size)."""
        if self.bootstrap:
            return self._kafka_count()
        return (self.root / "spool" / "melo.edits" / "events.jsonl").stat().st_size

    def _kafka_count(self) -> int:
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        tp = TopicPartition(self.topics["edits"], 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        count = 0
        while True:
            batch = consumer.poll(timeout_ms=1500)
            if not batch:
                break
            count = max(count, *(items[-1].offset + 1 for items in batch.values()))
        consumer.close()
        return count


def applied_edit_ids(store: FsSnapshotStore) -> Counter:
    """How many times each edit id was applied across every published version."""
    counts: Counter = Counter()
    for manifest in store.versions(MODEL):
        counts.update(manifest.edit_ids)
    return counts


def assert_exactly_once_and_verified(deployment: Deployment, expected_ids: set[str]) -> None:
    """Invariant 2: each accepted edit in exactly one version; every version verifies; the record
    store agrees with the snapshots."""
    store = deployment.store()
    counts = applied_edit_ids(store)
    twice = sorted(i for i, c in counts.items() if c > 1)
    assert not twice, f"edits applied more than once: {twice[:10]}"
    missing = sorted(expected_ids - set(counts))
    assert not missing, f"{len(missing)} accepted edits never applied, e.g. {missing[:10]}"
    assert set(counts) == expected_ids
    versions = [m.version for m in store.versions(MODEL)]
    assert versions == list(range(1, len(versions) + 1)), f"version numbers have gaps: {versions}"
    for version in versions:
        assert store.verify(MODEL, version) == [], f"version {version} does not verify"
    assert store.current(MODEL) == versions[-1]
    from daemon.wiring import build_records

    records = build_records(deployment.settings())
    assert records.current_version(MODEL) == versions[-1]
    assert records.applied(MODEL, expected_ids) == expected_ids


def wait_for_log(
    deployment: Deployment, needle: str, count: int, proc: DaemonProcess, timeout_s: float, log_name: str = "daemon"
) -> None:
    """Wait until ``needle`` appears ``count`` times in the daemon log (or the daemon exits)."""
    wait_until(lambda: deployment.log_text(log_name).count(needle) >= count or proc.poll() is not None, timeout_s,
               f"{count}x {needle!r} in the {log_name} log")


def kill9(proc: DaemonProcess) -> None:
    """SIGKILL by PID and reap."""
    proc.kill()
    proc.wait(30)
