"""Issue 12 item 4: hostile HTTP bodies get a 4xx with a reason, never a 5xx.

A lone UTF-16 surrogate in a prompt used to reach the tokenizer (500); NaN / Infinity in a body that
fails validation used to crash the validation-error handler ("Out of range float values are not
JSON compliant"). Admin routes still answer 401 before reading the body when no token is sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from daemon.control_ops import ChannelControl, SpoolControlSender
from daemon.server import ServeLimits, create_app
from daemon.serving_state import ServingState, VersionHistory
from tests.unit import test_server_api as api

TOKEN = api.TOKEN
# The serving API tests' fixtures: a real store of tiny-gpt2 versions and an app over it.
backbone, store, state, client = api.backbone, api.store, api.state, api.client


@pytest.fixture
def admin_client(state: ServingState, tmp_path: Path) -> Iterator[TestClient]:
    """An app whose admin routes reach a real control channel (the spool), answering at once."""
    state.refresh()
    history = VersionHistory(state)
    control = ChannelControl(SpoolControlSender(tmp_path / "spool", "melo.control"), history, wait_s=0)
    app = create_app(state, history=history, control=control, admin_token=TOKEN, limits=ServeLimits(max_body_bytes=4096))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client

ADMIN = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
HOSTILE = [
    ("/v1/generate", rb'{"prompts": ["\ud800 x"]}', False),
    ("/v1/generate", rb'{"prompts": ["fine", "\udfff"], "max_new_tokens": 2}', False),
    ("/v1/generate", b'{"prompts": ["x"], "max_new_tokens": NaN}', False),
    ("/v1/generate", b'{"prompts": [Infinity]}', False),
    ("/v1/rollback", b'{"to_version": NaN, "reason": "x"}', True),
    ("/v1/retract", b'{"edit_id": "grass", "reason": "x", "weight": -Infinity}', True),
    ("/v1/rollback", rb'{"to_version": 1, "reason": "\ud800"}', True),
]


@pytest.mark.parametrize(("path", "raw", "admin"), HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_bodies_get_a_4xx_with_a_reason(admin_client: TestClient, path: str, raw: bytes, admin: bool) -> None:
    headers = ADMIN if admin else {"Content-Type": "application/json"}
    response = admin_client.post(path, content=raw, headers=headers)
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    assert response.json()["detail"]


def test_a_lone_surrogate_is_named_in_the_answer(client: TestClient) -> None:
    response = client.post("/v1/generate", content=rb'{"prompts": ["ok", "\ud800 x"]}',
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "prompts", 1] and "lone UTF-16 surrogate" in error["msg"]
    assert error["input"] == "\\ud800 x", "the offending input is echoed, escaped"


@pytest.mark.parametrize("path", ["/v1/rollback", "/v1/retract"])
def test_admin_routes_answer_401_before_reading_a_hostile_body(client: TestClient, path: str) -> None:
    response = client.post(path, content=b'{"to_version": NaN, "reason": "\\ud800"}',
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 401
