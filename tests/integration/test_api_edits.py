"""Issue 14: edits over HTTP and their status, against the real server and the real writer.

An edit POSTed to `melo serve` is appended to the writer's spool, learned, published, served by
the server once it hot-swaps to that version, and `GET /v1/edits/{id}?wait=` reports it applied in
that very version. Bad tokens are 401/403 and bad bodies 4xx with a reason, never a 5xx.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.api_harness import ADMIN, MODEL, PRODUCER, LiveServer, WriterThread, api_settings
from melo_testkit.services import wait_until

AS_PRODUCER = {"Authorization": f"Bearer {PRODUCER}"}
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}


def edit(edit_id: str, prompt: str, target: str, **extra: object) -> dict:
    return {"edit_id": edit_id, "model": MODEL, "task": "generate", "prompt": prompt, "target": target, **extra}


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[tuple[object, httpx.Client]]:
    settings = api_settings(tmp_path / "melo")
    with WriterThread(settings), LiveServer.for_settings(settings) as server, \
            httpx.Client(base_url=server.url, timeout=90) as client:
        yield settings, client


@pytest.fixture
def server_only(tmp_path: Path) -> Iterator[tuple[object, httpx.Client]]:
    settings = api_settings(tmp_path / "melo")
    with LiveServer.for_settings(settings) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        yield settings, client


def spooled_lines(settings) -> list[bytes]:
    folder = Path(settings.spool_dir) / "melo.edits"
    return [line for path in sorted(folder.glob("http-*.jsonl")) for line in path.read_bytes().splitlines()]


def test_posted_edit_is_served_after_its_version_publishes_and_wait_reports_applied(deployment):
    settings, client = deployment
    response = client.post("/v1/edits", json=[edit("sky", "The sky is", " green"), edit("car", "My car is", " fast")],
                           headers=AS_PRODUCER)
    assert response.status_code == 202, response.text
    assert response.json()["accepted"] == ["sky", "car"]
    assert len(spooled_lines(settings)) == 2  # durable in the stream before the 202

    status = client.get("/v1/edits/sky", params={"wait": 60}, headers=AS_PRODUCER).json()
    assert status["status"] == "applied" and isinstance(status["version"], int), status
    version = status["version"]
    assert status["serving"] == version  # the wait also covers this server's swap to that version

    served = client.post("/v1/generate", json={"prompts": ["The sky is"], "max_new_tokens": 6}).json()
    assert served["version"] == version
    assert served["results"][0]["output"].startswith(" green")
    assert served["results"][0]["route"] is not None
    assert client.get("/v1/edits/car", headers=AS_ADMIN).json()["version"] == version  # admin may read too

    # A second copy gets a duplicate receipt, which must not hide that the first was applied.
    assert client.post("/v1/edits", json=edit("sky", "The sky is", " green"), headers=AS_PRODUCER).status_code == 202
    results = Path(settings.data_dir) / "outbox" / "melo.edit-results.jsonl"
    wait_until(lambda: '"duplicate"' in results.read_text(), 30, "the duplicate receipt")
    again = client.get("/v1/edits/sky", headers=AS_PRODUCER).json()
    assert (again["status"], again["version"]) == ("applied", version)


def test_an_event_the_writer_rejects_reports_rejected_with_its_reason(deployment):
    settings, client = deployment
    # Written straight into the stream (not through the API, which would refuse it up front).
    bad = json.dumps(edit("blank", "   ", " x")) + "\n"
    (Path(settings.spool_dir) / "melo.edits" / "direct.jsonl").write_text(bad)
    status = client.get("/v1/edits/blank", params={"wait": 30}, headers=AS_PRODUCER).json()
    assert status["status"] == "rejected" and status["reason"] == "empty_prompt", status


def test_edit_routes_answer_401_without_a_known_token_and_403_for_the_wrong_role(server_only):
    _, client = server_only
    body = edit("e1", "The sky is", " green")
    assert client.post("/v1/edits", json=body).status_code == 401
    assert client.post("/v1/edits", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.post("/v1/edits", json=body, headers={"Authorization": "Basic abc"}).status_code == 401
    assert client.post("/v1/edits", json=body, headers=AS_ADMIN).status_code == 403
    assert client.get("/v1/edits/e1").status_code == 401
    assert client.post("/v1/rollback", json={"to_version": 1, "reason": "x"}, headers=AS_PRODUCER).status_code == 403


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (json.dumps([edit("ok1", "The sky is", " green"), edit("bad", "  ", " x")]), "empty_prompt"),
        (json.dumps(edit("other", "The sky is", " x") | {"model": "another-model"}), "wrong_model"),
        (json.dumps(edit("cls", "The sky is", "x") | {"task": "classify"}), "wrong_task"),
        (json.dumps([edit("twice", "A", " b"), edit("twice", "A", " c")]), "duplicate_in_request"),
        (json.dumps(edit("long", "x" * 2001, " y")), "field_too_long"),
        (json.dumps(edit("extra", "A", " b") | {"colour": "red"}), "schema"),
        ('{"edit_id": "s", "model": "tiny-gpt2", "task": "generate", "prompt": "\\ud800", "target": " x"}', "invalid_utf8"),
        ('[{"edit_id": "n", "model": "tiny-gpt2", "task": "generate", "prompt": "A", "target": " x", "metadata": {"v": NaN}}]', None),
        ('{"edit_id": "d", "edit_id": "e", "model": "tiny-gpt2"}', None),
        ("[]", None),
        ("not json", None),
        (json.dumps(["a string"]), "not_object"),
    ],
)
def test_invalid_edit_bodies_are_422_with_a_reason_and_nothing_is_appended(server_only, body, reason):
    settings, client = server_only
    response = client.post("/v1/edits", content=body.encode(), headers=AS_PRODUCER | {"content-type": "application/json"})
    assert response.status_code == 422, response.text
    if reason is not None:
        assert reason in {p["reason"] for p in response.json()["refused"]}, response.json()
    assert spooled_lines(settings) == []


def test_status_of_an_unknown_edit_is_404_and_an_overlong_wait_is_422(server_only):
    _, client = server_only
    assert client.get("/v1/edits/never-sent", headers=AS_PRODUCER).status_code == 404
    assert client.get("/v1/edits/never-sent", params={"wait": 10_000}, headers=AS_PRODUCER).status_code == 422
    assert client.get("/v1/edits/never-sent", params={"wait": "nan"}, headers=AS_PRODUCER).status_code == 422
    # Accepted here but not yet decided (no writer runs): pending, not 404.
    assert client.post("/v1/edits", json=edit("queued", "A", " b"), headers=AS_PRODUCER).status_code == 202
    assert client.get("/v1/edits/queued", params={"wait": 0.3}, headers=AS_PRODUCER).json()["status"] == "pending"


def test_posted_edit_goes_through_kafka_and_its_receipt_comes_back_from_the_results_topic(tmp_path: Path, kafka_broker):
    from melo_testkit.services import create_topics

    topics = {role: f"api14.{role}" for role in ("edits", "control", "dlq", "results", "forgotten", "snapshots")}
    create_topics(kafka_broker.bootstrap, list(topics.values()))
    settings = api_settings(tmp_path / "melo", kafka={
        "bootstrap_servers": [kafka_broker.bootstrap], "group_id": "api14-writer", "topics": topics,
        "session_timeout_ms": 6000, "heartbeat_interval_ms": 1000,
    })
    with WriterThread(settings), LiveServer.for_settings(settings) as server, \
            httpx.Client(base_url=server.url, timeout=90) as client:
        response = client.post("/v1/edits", json=edit("sky", "The sky is", " green"), headers=AS_PRODUCER)
        assert response.status_code == 202, response.text
        assert response.json()["destination"] == "Kafka topic api14.edits"
        status = client.get("/v1/edits/sky", params={"wait": 90}, headers=AS_PRODUCER).json()
        assert status["status"] == "applied" and status["serving"] == status["version"], status
        served = client.post("/v1/generate", json={"prompts": ["The sky is"], "max_new_tokens": 6}).json()
        assert served["results"][0]["output"].startswith(" green")
