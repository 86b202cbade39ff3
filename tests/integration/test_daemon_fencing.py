"""Issue 12 item 1: a writer paused past its lease publishes nothing; the new writer carries on.

Two real ``melo run`` processes on one model, Kafka + Redis and the embedded default. The first
writer stops itself (SIGSTOP) right after training its second batch, before publishing it; the
second takes the lease once it lapses and stops itself (SIGSTOP) as soon as it has read that same
batch. The first is resumed (SIGCONT) and tries to publish with its old token: the snapshot store
must refuse it. Then the second is resumed and must publish and keep consuming.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from melo_testkit.daemon_harness import (
    MODEL,
    Deployment,
    assert_exactly_once_and_verified,
    kill9,
    wait_for_log,
    zsre_events,
)
from melo_testkit.services import wait_until


@pytest.fixture(params=["kafka", "embedded"])
def deployment(request: pytest.FixtureRequest, tmp_path: Path, unique_name) -> Deployment:
    if request.param == "kafka":
        broker = request.getfixturevalue("kafka_broker")
        redis = request.getfixturevalue("redis_server")
        d = Deployment(tmp_path, bootstrap=broker.bootstrap, redis_url=redis.url, name=unique_name("melo"),
                       lease_ttl_s=4.0)
    else:
        d = Deployment(tmp_path)
    d.write_config()
    return d


def test_writer_paused_past_its_lease_publishes_nothing_and_the_new_writer_carries_on(deployment: Deployment) -> None:
    first_batches = zsre_events(20)
    deployment.feed(first_batches)
    first = deployment.spawn(until_idle=False, crash_at="trained:2:stop", log_name="first")
    second = None
    try:
        wait_for_log(deployment, "injected pause at trained:2", 1, first, 180, log_name="first")
        store = deployment.store()
        assert [m.version for m in store.versions(MODEL)] == [1]
        second = deployment.spawn(until_idle=False, crash_at="polled:1:stop", log_name="second")
        wait_for_log(deployment, "injected pause at polled:1", 1, second, 180, log_name="second")
        assert "writer token 2" in deployment.log_text("second")
        assert store.fence_token(MODEL) == 2

        first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=120) == 3, deployment.log_text("first")[-3000:]
        assert "fenced out by a newer writer" in deployment.log_text("first")
        assert [m.version for m in store.versions(MODEL)] == [1], "the stale writer published a version"
        assert store.current(MODEL) == 1

        second.send_signal(signal.SIGCONT)
        later = zsre_events(10, start=20)
        deployment.feed(later)
        expected = {e["edit_id"] for e in first_batches + later}
        wait_until(lambda: {i for m in store.versions(MODEL) for i in m.edit_ids} >= expected or second.poll() is not None,
                   180, "the new writer to publish every edit")
        assert second.poll() is None, deployment.log_text("second")[-3000:]
        owners = [m.writer for m in store.versions(MODEL)]
        assert all(w["token"] == 2 for w in owners[1:]), owners
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=60) == 0, deployment.log_text("second")[-3000:]
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.send_signal(signal.SIGCONT)
                kill9(proc)
    assert_exactly_once_and_verified(deployment, expected)
