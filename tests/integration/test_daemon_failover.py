"""Issue 4 tests 5 and 6: Redis dies mid-stream; two daemons compete for one model."""

from __future__ import annotations

import signal
from pathlib import Path

from melo_testkit.daemon_harness import (
    MODEL,
    Deployment,
    assert_exactly_once_and_verified,
    kill9,
    wait_for_log,
    zsre_events,
)
from melo_testkit.services import wait_until


def test_redis_killed_mid_stream_daemon_waits_and_loses_nothing(tmp_path: Path, kafka_broker, redis_server, unique_name) -> None:
    d = Deployment(tmp_path, bootstrap=kafka_broker.bootstrap, redis_url=redis_server.url, name=unique_name("melo"),
                   lease_ttl_s=30.0)
    d.write_config()
    events = zsre_events(150)
    d.feed(events)
    proc = d.spawn()
    try:
        wait_for_log(d, "version 2:", 1, proc, 120)
        redis_server.kill9()
        wait_for_log(d, "retrying", 1, proc, 60)
        store = d.store()
        # While Redis is down nothing new may be committed beyond what CURRENT covers.
        current = store.manifest(MODEL, store.current(MODEL))
        covered = current.offsets.get(d.topics["edits"], {}).get("0", 0)
        assert d.committed_edits_offset() <= covered
        redis_server.restart()
        assert proc.wait(timeout=240) == 0, d.log_text()[-3000:]
    finally:
        kill9(proc)
    assert_exactly_once_and_verified(d, {e["edit_id"] for e in events})
    assert d.committed_edits_offset() == len(events)


def test_two_daemons_one_model_only_one_publishes_and_the_other_takes_over(
    tmp_path: Path, kafka_broker, redis_server, unique_name
) -> None:
    d = Deployment(tmp_path, bootstrap=kafka_broker.bootstrap, redis_url=redis_server.url, name=unique_name("melo"),
                   lease_ttl_s=4.0)
    d.write_config()
    first = d.spawn(until_idle=False, log_name="first")
    second = None
    try:
        wait_for_log(d, "writer token", 1, first, 120, log_name="first")
        second = d.spawn(until_idle=False, log_name="second")
        wait_for_log(d, "waiting for the writer lease", 1, second, 120, log_name="second")
        batch_one = zsre_events(40)
        d.feed(batch_one)
        store = d.store()
        wait_until(lambda: set(batch_one_ids(store)) >= {e["edit_id"] for e in batch_one}, 120, "the first daemon to publish")
        assert "writer token" not in d.log_text("second"), "the standby must not become a writer while the lease is held"
        owners = {m.writer["owner"] for m in store.versions(MODEL)}
        assert len(owners) == 1, f"more than one writer published: {owners}"

        kill9(first)
        wait_for_log(d, "writer token", 1, second, 60, log_name="second")
        batch_two = zsre_events(30, start=40)
        d.feed(batch_two)
        expected = {e["edit_id"] for e in batch_one + batch_two}
        wait_until(lambda: set(batch_one_ids(store)) >= expected, 120, "the second daemon to publish")
        owners = [m.writer["owner"] for m in store.versions(MODEL)]
        assert len(set(owners)) == 2 and owners == sorted(owners, key=owners.index), f"writers interleaved: {owners}"
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=60) == 0, d.log_text("second")[-3000:]
    finally:
        kill9(first)
        if second is not None:
            kill9(second)
    assert_exactly_once_and_verified(d, expected)


def batch_one_ids(store) -> list[str]:
    """Every edit id published so far."""
    return [i for m in store.versions(MODEL) for i in m.edit_ids] if store.current(MODEL) else []
