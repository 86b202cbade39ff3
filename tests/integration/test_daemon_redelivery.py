"""Issue 12 item 2: a crash between publishing a version and flushing its outbox loses no receipt.

``melo run`` (tiny-gpt2) is killed (``MELO_CRASH_AT``) right after version 1's manifest is written
(``published``) or after its record commit (``recorded``), before its receipts and announcement go
out; a clean restart must re-send them (at-least-once) and judge the version (status not "new").
"""

from __future__ import annotations

from pathlib import Path

import pytest

from melo_testkit.daemon_harness import (
    MODEL,
    Deployment,
    assert_exactly_once_and_verified,
    zsre_events,
)


@pytest.fixture(params=["kafka", "embedded"])
def deployment(request: pytest.FixtureRequest, tmp_path: Path, unique_name) -> Deployment:
    if request.param == "kafka":
        broker = request.getfixturevalue("kafka_broker")
        redis = request.getfixturevalue("redis_server")
        d = Deployment(tmp_path, bootstrap=broker.bootstrap, redis_url=redis.url, name=unique_name("melo"),
                       batch_max_size=4)
    else:
        d = Deployment(tmp_path, batch_max_size=4)
    d.write_config()
    return d


@pytest.mark.parametrize("stage", ["published", "recorded"])
def test_crash_before_the_outbox_flush_then_restart_sends_every_receipt_and_announcement(
    deployment: Deployment, stage: str
) -> None:
    events = zsre_events(8)
    deployment.feed(events)
    assert deployment.run(crash_at=f"{stage}:1") == 137, deployment.log_text()[-3000:]
    assert deployment.read_topic("results", timeout_s=3) == [], "nothing was sent before the crash"

    assert deployment.run() == 0, deployment.log_text()[-3000:]

    ids = {e["edit_id"] for e in events}
    assert_exactly_once_and_verified(deployment, ids)
    applied = {r["edit_id"] for r in deployment.read_topic("results", expect_at_least=8) if r["status"] == "applied"}
    assert applied == ids, f"missing applied receipts: {sorted(ids - applied)}"
    store = deployment.store()
    versions = [m.version for m in store.versions(MODEL)]
    announced = {a["version"] for a in deployment.read_topic("snapshots", expect_at_least=len(versions))}
    assert announced == set(versions), f"versions never announced: {set(versions) - announced}"
    assert store.announced(MODEL) == versions[-1]
    assert all(m.status != "new" for m in store.versions(MODEL)), [(m.version, m.status) for m in store.versions(MODEL)]
    assert "re-sent receipts and announcements of version(s) [1]" in deployment.log_text()
