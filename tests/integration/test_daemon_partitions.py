"""Issue 12 item 6: a writer that holds the lease but is assigned no partition says so.

Real broker + Redis; the writer is a ``Worker`` from ``build_worker`` turned by hand in this process
(so the test reads its Prometheus registry and its log). Another member of the same consumer group
holds the only partitions, as a group stuck after a rebalance would.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer

from daemon import metrics
from daemon.wiring import build_worker
from melo_testkit.daemon_harness import MODEL, Deployment


def gauge(metric, model: str = MODEL) -> float:
    return metric.labels(model=model)._value.get()


def test_a_writer_with_the_lease_and_no_partition_exports_it_and_logs_it(
    tmp_path: Path, kafka_broker, redis_server, unique_name, caplog: pytest.LogCaptureFixture
) -> None:
    d = Deployment(tmp_path, bootstrap=kafka_broker.bootstrap, redis_url=redis_server.url, name=unique_name("melo"))
    d.write_config()
    settings = d.settings()
    # Range assignment gives each single-partition topic to the first member by id: "a-..." sorts first.
    hog = KafkaConsumer(**settings.kafka.consumer_kwargs() | {"client_id": "a-partition-hog"})
    hog.subscribe([d.topics["edits"], d.topics["control"]])
    deadline = time.monotonic() + 60
    while not hog.assignment():
        assert time.monotonic() < deadline, "the hog never got its partitions"
        hog.poll(timeout_ms=200)
    worker = build_worker(settings)
    worker.options = dataclasses.replace(worker.options, partitionless_warn_s=1.0)
    try:
        assert worker.start()
        caplog.set_level(logging.WARNING, logger="melo.worker")
        deadline = time.monotonic() + 90
        while "no partition assigned" not in caplog.text:
            assert time.monotonic() < deadline, "no warning about the missing partitions"
            hog.poll(timeout_ms=50)  # keep the hog in the group
            worker.step()
        assert gauge(metrics.ASSIGNED_PARTITIONS) == 0
        assert gauge(metrics.SECONDS_WITHOUT_PARTITIONS) >= 1.0

        worker.close()
        assert gauge(metrics.SECONDS_WITHOUT_PARTITIONS) == 0, "a process that is not the writer reports 0"
    finally:
        worker.close()
        hog.close()
