"""Issue 14: the official `openai` package against `melo serve` (real uvicorn socket) over an edited model.

The edits are POSTed over HTTP to the server, learned by the real writer and published; the
`openai` client then completes and chats, streamed and not, and sees the edited answers, with the
served version and per-prompt routes in the extra `melo` field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from daemon.api_openai import StopCutter
from tests.integration.api_harness import MODEL, PRODUCER, LiveServer, WriterThread, api_settings
from melo_testkit.services import wait_until

# Asked as a chat, the edit below is routed on the user's question (not the rendered template).
CHAT = [{"role": "user", "content": "Who founded Zorblax?"}]


@pytest.fixture(scope="module")
def edited(tmp_path_factory) -> Iterator[tuple[str, int]]:
    """A server whose CURRENT version holds two edits: a completion prompt and a chat prompt."""
    settings = api_settings(tmp_path_factory.mktemp("openai") / "melo")
    edits = [
        {"edit_id": "sky", "model": MODEL, "task": "generate", "prompt": "The sky is", "target": " green"},
        {"edit_id": "zorblax", "model": MODEL, "task": "generate", "prompt": "Q: Who founded Zorblax? A:",
         "target": " plaid", "subject": "Zorblax"},
    ]
    with WriterThread(settings), LiveServer.for_settings(settings) as server, \
            httpx.Client(base_url=server.url, timeout=90) as http:
        auth = {"Authorization": f"Bearer {PRODUCER}"}
        assert http.post("/v1/edits", json=edits, headers=auth).status_code == 202
        status = http.get("/v1/edits/zorblax", params={"wait": 60}, headers=auth).json()
        assert status["status"] == "applied", status
        wait_until(lambda: http.get("/readyz").json().get("version") == status["version"], 30, "the edited version")
        yield server.url, status["version"]


@pytest.fixture
def client(edited) -> openai.OpenAI:
    url, _ = edited
    return openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0, timeout=60)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_answers_the_edit_with_version_and_route(client, edited):
    _, version = edited
    response = client.completions.create(model=MODEL, prompt=["The sky is", "Numbers like 7"], max_tokens=6,
                                         temperature=0)
    assert response.choices[0].text.startswith(" green")
    assert response.model_extra["melo"]["version"] == version
    routes = response.model_extra["melo"]["routes"]
    assert routes[0] is not None and routes[0]["block"] == 0
    assert routes[1] is None  # an unrelated prompt: the base model answered
    assert response.usage.completion_tokens > 0


def test_streamed_completion_sends_the_same_text_as_server_sent_events(client, edited):
    whole = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=0).choices[0].text
    chunks = list(client.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.model_extra["melo"]["version"] == edited[1] for c in chunks)


def test_chat_uses_the_chat_template_and_sees_the_chat_edit_streamed_and_not(client):
    response = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0)
    message = response.choices[0].message
    # tiny-gpt2 has no chat template (role lines; no chat-form training rows): the chat is routed to
    # the edit's block on its user question; test_scope.py shows a templated model answer the edit.
    assert message.role == "assistant" and message.content
    assert response.model_extra["melo"]["routes"][0] is not None
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == message.content


def test_stop_cuts_the_text_and_a_seed_makes_sampling_reproducible(client):
    cut = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=0, stop=["ee"])
    assert cut.choices[0].text == " gr" and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=0, stop="ee",
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == " gr"
    sampled = [client.completions.create(model=MODEL, prompt="Numbers like 7", max_tokens=12, temperature=1.5,
                                         top_p=0.9, seed=7).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"model": "gpt-4"}, openai.NotFoundError),
        ({"max_tokens": 100_000}, openai.UnprocessableEntityError),
        ({"n": 2}, openai.UnprocessableEntityError),
        ({"temperature": -1}, openai.UnprocessableEntityError),
        ({"top_p": 0}, openai.UnprocessableEntityError),
        ({"prompt": ["a", "b"], "stream": True}, openai.UnprocessableEntityError),
        ({"prompt": "   "}, openai.UnprocessableEntityError),
        ({"stop": ["a", "b", "c", "d", "e"]}, openai.UnprocessableEntityError),
        ({"extra_body": {"frobnicate": True}}, openai.UnprocessableEntityError),
    ],
)
def test_bad_completion_requests_are_4xx(client, kwargs, error):
    request = {"model": MODEL, "prompt": "The sky is", "max_tokens": 4} | kwargs
    with pytest.raises(error):
        client.completions.create(**request)


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "tiny-gpt2", "prompt": "a", "temperature": NaN}',
        b'{"model": "tiny-gpt2", "messages": []}',
        b'{"model": "tiny-gpt2", "messages": [{"role": "wizard", "content": "hi"}]}',
        b'{"model": "tiny-gpt2", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
        b"not json",
        b"[]",
        b'{"model": "tiny-gpt2", "prompt": "\\ud800 sky", "max_tokens": 2}',
        b'{"model": "tiny-gpt2", "prompt": "\\ud800 sky", "max_tokens": 2, "stream": true}',
        b'{"model": "tiny-gpt2", "prompt": "sky", "stop": ["\\udfff"]}',
        b'{"model": "tiny-gpt2", "messages": [{"role": "user", "content": "\\ud800"}]}',
    ],
)
def test_malformed_bodies_are_422_never_5xx(edited, body):
    url, _ = edited
    path = "/v1/completions" if b'"prompt"' in body else "/v1/chat/completions"
    response = httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 422, response.text
    json.loads(response.text)  # a JSON error body


def test_stop_cutter_holds_back_a_partial_stop_string():
    cutter = StopCutter(["END"])
    assert cutter.feed("abcE") == "ab"  # the last two characters could still start "END": held back
    assert cutter.feed("N") == "c"  # "EN" may still be a stop: held
    assert cutter.feed("Dzz") == ""
    assert cutter.stopped and cutter.text.startswith("abcEND")
