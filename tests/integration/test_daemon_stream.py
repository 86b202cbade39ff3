"""Issue 4 tests 1–4 and 7: the daemon end to end on Kafka + Redis and on the embedded default.

Every test runs the real ``melo run`` as a subprocess (tiny-gpt2, 5 iterations per block) and checks
the invariants of DESIGN.md §5 from the stores: snapshot manifests, the record store, receipts,
the DLQ and committed source offsets.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from daemon.crash import STAGES
from melo_testkit.daemon_harness import (
    Deployment,
    assert_exactly_once_and_verified,
    kill9,
    wait_for_log,
    zsre_events,
)


@pytest.fixture(params=["kafka", "embedded"])
def deployment(request: pytest.FixtureRequest, tmp_path: Path, unique_name) -> Deployment:
    """A Kafka + Redis deployment, or the embedded default (spool + local records)."""
    if request.param == "kafka":
        broker = request.getfixturevalue("kafka_broker")
        redis = request.getfixturevalue("redis_server")
        d = Deployment(tmp_path, bootstrap=broker.bootstrap, redis_url=redis.url, name=unique_name("melo"))
    else:
        d = Deployment(tmp_path)
    d.write_config()
    return d


def _receipts_by_status(deployment: Deployment, expect: int) -> dict[str, list[str]]:
    by_status: dict[str, list[str]] = {}
    for receipt in deployment.read_topic("results", expect_at_least=expect):
        by_status.setdefault(receipt["status"], []).append(receipt["edit_id"])
    return by_status


def test_500_events_are_applied_once_with_receipts_and_committed_offsets(deployment: Deployment) -> None:
    events = zsre_events(500)
    deployment.feed(events)
    assert deployment.run() == 0, deployment.log_text()[-3000:]
    ids = {e["edit_id"] for e in events}
    assert_exactly_once_and_verified(deployment, ids)
    receipts = _receipts_by_status(deployment, expect=500)
    assert sorted(receipts["applied"]) == sorted(ids), "exactly one 'applied' receipt per edit"
    current = deployment.store().manifest("it-model", deployment.store().current("it-model"))
    assert deployment.committed_edits_offset() == deployment.edits_end()
    assert any(parts for parts in current.offsets.values()), "the manifest records the offsets it covers"
    announcements = deployment.read_topic("snapshots", expect_at_least=len(deployment.store().versions("it-model")))
    assert [a["version"] for a in announcements] == [m.version for m in deployment.store().versions("it-model")]


def test_poison_events_go_to_the_dlq_with_reasons_and_the_stream_continues(deployment: Deployment) -> None:
    good = zsre_events(20)
    poison: list[dict | bytes] = [
        b"{this is not json",
        {**zsre_events(1, start=900)[0], "prompt": 42},
        {**zsre_events(1, start=901)[0], "metadata": {"blob": "x" * 70_000}},
        {**zsre_events(1, start=902)[0], "task": "summarize"},
        {**zsre_events(1, start=903)[0], "target": ""},
        b"\xff\xfe binary garbage",
    ]
    stream: list[dict | bytes] = []
    for i, event in enumerate(good):
        stream.append(event)
        if i % 3 == 0 and poison:
            stream.append(poison.pop(0))
    stream += poison
    deployment.feed(stream)
    assert deployment.run() == 0, deployment.log_text()[-3000:]
    assert_exactly_once_and_verified(deployment, {e["edit_id"] for e in good})
    dlq = deployment.read_topic("dlq", expect_at_least=6)
    if deployment.bootstrap:
        reasons = [record["headers"]["melo.reason"].decode() for record in dlq]
        assert b"{this is not json" in [r["value"] if isinstance(r["value"], bytes) else b"" for r in dlq]
    else:
        reasons = [record["reason"] for record in dlq]
    assert sorted(reasons) == sorted(["invalid_json", "schema", "oversize", "unknown_task", "empty_target", "invalid_utf8"])
    assert deployment.committed_edits_offset() == deployment.edits_end(), "dead-lettered tails are committed too"


def test_redelivered_edit_ids_are_not_applied_twice(deployment: Deployment) -> None:
    first = zsre_events(30)
    deployment.feed(first + first[:5])  # within-stream duplicates
    assert deployment.run() == 0, deployment.log_text()[-3000:]
    second = zsre_events(10, start=30)
    deployment.feed(first + second)  # a whole redelivery, then new edits
    assert deployment.run() == 0, deployment.log_text()[-3000:]
    assert_exactly_once_and_verified(deployment, {e["edit_id"] for e in first + second})
    receipts = _receipts_by_status(deployment, expect=40 + 35)
    assert sorted(receipts["duplicate"]) == sorted([e["edit_id"] for e in first[:5] + first])


def test_kill9_at_random_points_converges_to_exactly_once(deployment: Deployment) -> None:
    rng = random.Random(4)
    events = zsre_events(220)
    kills = 0
    for attempt in range(22):
        deployment.feed(events[attempt * 10:(attempt + 1) * 10])
        if attempt % 3 == 2:
            # A real SIGKILL at a random moment of a daemon that is not going to exit by itself.
            starts = deployment.log_text().count("writer token")
            proc = deployment.spawn(until_idle=False)
            wait_for_log(deployment, "writer token", starts + 1, proc, 120)
            _random_moment(rng)
            kill9(proc)
            kills += 1
        else:
            stage = rng.choice(STAGES[:-1])  # every stage of the loop except control
            status = deployment.run(crash_at=f"{stage}:1")  # each attempt has new edits: every stage is reached
            assert status in (0, 137), deployment.log_text()[-3000:]
            kills += status == 137
    assert deployment.run() == 0, deployment.log_text()[-3000:]
    assert_exactly_once_and_verified(deployment, {e["edit_id"] for e in events})
    assert kills >= 20, f"only {kills} of the runs were killed"
    assert deployment.committed_edits_offset() == deployment.edits_end()


def _random_moment(rng: random.Random) -> None:
    """Let the daemon run on for a random 0–3 s: this picks WHEN to kill, it waits for nothing."""
    time.sleep(rng.uniform(0.0, 3.0))


def test_manifest_offsets_never_lag_committed_offsets(deployment: Deployment) -> None:
    """Invariant 1 on the committed state: the committed edits offset is exactly the one the CURRENT
    manifest covers once the stream is drained."""
    events = zsre_events(25)
    deployment.feed(events)
    assert deployment.run() == 0, deployment.log_text()[-3000:]
    store = deployment.store()
    current = store.manifest("it-model", store.current("it-model"))
    covered = max(offset for parts in current.offsets.values() for offset in parts.values())
    assert deployment.committed_edits_offset() == covered == deployment.edits_end()
    assert json.loads(json.dumps(current.offsets)) == current.offsets


def test_control_rollback_and_retract_publish_new_versions_in_stream_order(deployment: Deployment) -> None:
    events = zsre_events(20)
    deployment.feed(events)
    assert deployment.run() == 0, deployment.log_text()[-3000:]
    store = deployment.store()
    assert store.current("it-model") == 2
    deployment.feed_control({"type": "rollback", "model": "it-model", "to_version": 1, "request_id": "r-1",
                             "reason": "bad batch"})
    deployment.feed_control({"type": "retract", "model": "it-model", "edit_id": events[0]["edit_id"],
                             "request_id": "r-2", "reason": "wrong fact"})
    assert deployment.run() == 0, deployment.log_text()[-3000:]
    rollback, retract = store.manifest("it-model", 3), store.manifest("it-model", 4)
    assert (rollback.kind, rollback.restores_version, rollback.request_id) == ("rollback", 1, "r-1")
    assert rollback.files == store.manifest("it-model", 1).files, "rollback to v serves exactly v's content"
    assert (retract.kind, retract.request_id) == ("retract", "r-2")
    receipts = _receipts_by_status(deployment, expect=20 + 11)
    second_batch = {e["edit_id"] for e in events[10:]}
    assert set(receipts["rolled_back"]) == second_batch
    assert receipts["retracted"] == [events[0]["edit_id"]]
    for version in (3, 4):
        assert store.verify("it-model", version) == []
