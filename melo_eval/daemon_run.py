"""The real writer as ``melo run`` wires it, run inside a benchmark on local services.

``daemon.wiring.build_worker`` + the scheduler's jobs, reading a real Kafka-protocol broker (Tansu)
and writing a real Redis, both started on loopback by ``melo_testkit.services``, with a filesystem
snapshot store in a temporary directory. bench/perf_daemon.py times the pipeline with it;
melo_eval/quality_daemon.py replays a quality stream through it.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from daemon.scheduler import start_scheduler
from daemon.settings import Settings
from daemon.snapshots import Manifest
from daemon.worker import EXIT_OK, Worker
from melo_testkit.services import FAST_GROUP_CONSUMER, KafkaBroker, RedisServer

TOPIC_ROLES = ("edits", "control", "dlq", "results", "forgotten", "snapshots")
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Services:
    """Where the local broker, Redis and scratch directory of one benchmark live."""

    bootstrap: str
    redis_url: str
    root: Path


@contextmanager
def local_services(prefix: str) -> Iterator[Services]:
    """A Kafka-protocol broker, a Redis and a temporary directory; all stopped / removed on exit."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp, KafkaBroker() as broker, RedisServer() as redis:
        yield Services(broker.bootstrap, redis.url, Path(tmp))


def edit_event(
    edit_id: str, model: str, prompt: str, target: str, *, source: str, subject: str | None = None
) -> bytes:
    """An edit event (schemas/edit.v1.json) stamped with the current time."""
    created = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    doc = {"edit_id": edit_id, "model": model, "task": "generate", "prompt": prompt, "target": target,
           "source": source, "created_at": created}
    if subject:
        doc["subject"] = subject
    return json.dumps(doc).encode()


def writer_settings(
    run: str,
    services: Services,
    *,
    backbone: str,
    batch: dict[str, Any],
    melo: dict[str, Any] | None = None,
    **sections: Any,
) -> Settings:
    """Settings as a deployment would write them, for ``run``'s own model namespace and topics.

    ``batch`` is the ``[batch]`` table, ``melo`` the MeloConfig overrides; ``sections`` are further
    tables (``limits``, ``retention``) passed through unchanged.
    """
    return Settings(
        model=run,
        backbone=backbone,
        task="generate",
        melo=melo or {},
        data_dir=services.root / run,
        batch=batch,
        kafka={"bootstrap_servers": [services.bootstrap], "group_id": f"{run}-writer",
               "topics": {role: f"{run}.{role}" for role in TOPIC_ROLES}, **FAST_GROUP_CONSUMER},
        redis={"url": services.redis_url, "lease_ttl_s": 30.0, "lease_renew_s": 5.0, "retry_deadline_s": 60.0},
        metrics={"enabled": False},
        **({"device": "cpu"} | sections),  # the CPU unless a caller (melo eval --device) says otherwise
    )


class TimedSnapshots:
    """The worker's real snapshot store, with the wall time at which each ``publish`` returned.

    Delegates everything; a version counts as published once ``publish`` returns (blobs, manifest
    and CURRENT are durable then).
    """

    def __init__(self, store: Any) -> None:
        self._store = store
        self.published: dict[int, tuple[float, tuple[str, ...]]] = {}  # version -> (time.time(), edit ids)
        self._lock = threading.Lock()

    def publish(self, model: str, files: dict[str, bytes], **kwargs: Any) -> Manifest:
        """Publish through the real store and record when it returned."""
        manifest = self._store.publish(model, files, **kwargs)
        with self._lock:
            self.published[manifest.version] = (time.time(), manifest.edit_ids)
        return manifest

    def published_at(self) -> dict[str, float]:
        """edit id -> time its version was published."""
        with self._lock:
            return {edit_id: at for at, ids in self.published.values() for edit_id in ids}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


class RunningWriter:
    """``worker.run()`` on a thread of its own, with the scheduler's jobs beside it.

    :meth:`stop` ends both, closes the outbox and raises if the writer failed; call it in a
    ``finally``.
    """

    def __init__(self, worker: Worker, settings: Settings, *, until_idle: bool = False) -> None:
        self.worker = worker
        self.status: dict[str, int] = {}
        self.scheduler = start_scheduler(worker, settings)
        self.thread = threading.Thread(
            target=lambda: self.status.update(code=worker.run(until_idle=until_idle)),
            name=f"writer-{worker.model}", daemon=True,
        )
        self.thread.start()

    def check_running(self) -> None:
        """Raise if the writer's loop has ended."""
        if not self.thread.is_alive():
            raise RuntimeError(f"writer of {self.worker.model} stopped early with status {self.status.get('code')}")

    def wait_idle(self, progress: Callable[[], object], stall_s: float) -> None:
        """Wait for a writer started ``until_idle`` to finish; raise if ``progress()`` stays the same
        for ``stall_s`` seconds while it runs."""
        last, since = progress(), time.monotonic()
        while self.thread.is_alive():
            self.thread.join(0.5)
            now = progress()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since > stall_s:
                raise RuntimeError(f"writer of {self.worker.model} made no progress for {stall_s:.0f}s (at {now})")

    def stop(self) -> None:
        """Stop the loop and the jobs; raise if the writer did not stop or exited with an error."""
        self.worker.stop()
        self.thread.join(STOP_TIMEOUT_S)
        self.scheduler.shutdown(wait=False)
        self.worker.publisher.outbox.close()
        if self.thread.is_alive():
            raise RuntimeError(f"writer of {self.worker.model} did not stop within {STOP_TIMEOUT_S:.0f}s")
        if self.status.get("code", EXIT_OK) != EXIT_OK:
            raise RuntimeError(f"writer of {self.worker.model} exited with status {self.status['code']}")


def read_topic(bootstrap: str, topic: str, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Every record of single-partition ``topic`` up to its current end, decoded from JSON."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        end = consumer.end_offsets([tp])[tp]
        records: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout_s
        while consumer.position(tp) < end:
            if time.monotonic() > deadline:
                raise RuntimeError(f"read {len(records)} of the {end} records of {topic} in {timeout_s:.0f}s")
            for items in consumer.poll(timeout_ms=1000).values():
                records.extend(json.loads(item.value) for item in items)
        return records
    finally:
        consumer.close()
