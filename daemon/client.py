"""A small typed Python client for `melo serve` (httpx only: importing it loads no torch).

    from daemon.client import MeloClient

    with MeloClient("http://127.0.0.1:8080", producer_token="...", admin_token="...") as melo:
        melo.edit("sky-1", "The sky is", " green")
        print(melo.status("sky-1", wait=60))          # EditStatus(status='applied', version=7, ...)
        print(melo.generate(["The sky is"]).outputs)   # [' green']
        melo.retract("sky-1", reason="wrong")
        melo.rollback(6, reason="bad batch")

Every non-2xx answer raises :class:`MeloError` with the status code and the server's message.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx


class MeloError(Exception):
    """The server refused a request: ``status`` is the HTTP status, ``detail`` its explanation."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class Route:
    """The edit block that answered a row: its cluster and the key's distance from the centre."""

    block: int
    cluster: int
    distance: float


@dataclass(frozen=True)
class EditStatus:
    """What happened to an edit (see daemon/receipts.py for the states)."""

    edit_id: str
    status: str
    version: int | None
    reason: str | None = None
    detail: str | None = None
    serving: int | None = None  # the version the server answered with at that moment


@dataclass(frozen=True)
class Generation:
    """Answers of one version: ``outputs[i]`` and ``routes[i]`` (None: the base model answered) per prompt."""

    version: int
    outputs: list[str]
    routes: list[Route | None]


@dataclass(frozen=True)
class ControlResult:
    """A rollback or retract: ``published`` with its version, or ``accepted`` (queued for the writer)."""

    request_id: str
    status: str
    version: int | None


def _route(raw: Mapping[str, Any] | None) -> Route | None:
    return None if raw is None else Route(int(raw["block"]), int(raw["cluster"]), float(raw["distance"]))


class MeloClient:
    """Edits, status, generation, chat and version control against one `melo serve` URL."""

    def __init__(
        self,
        base_url: str,
        *,
        producer_token: str | None = None,
        admin_token: str | None = None,
        timeout_s: float = 120.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """``producer_token`` is needed by :meth:`edit` / :meth:`submit` / :meth:`status`,
        ``admin_token`` by :meth:`rollback` / :meth:`retract` (and it may read status too)."""
        self._http = httpx.Client(base_url=base_url, timeout=timeout_s, transport=transport)
        self.timeout_s = timeout_s
        self.producer_token = producer_token
        self.admin_token = admin_token
        self._model: str | None = None

    def __enter__(self) -> MeloClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    # ------------------------------------------------------------------------- plumbing

    def _request(self, method: str, path: str, *, token: str | None = None, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = self._http.request(method, path, headers=headers, **kwargs)
        if response.status_code >= 400:
            try:
                body = response.json()
                detail = body.get("refused") or body.get("detail") or body
            except ValueError:
                detail = response.text
            raise MeloError(response.status_code, detail)
        return response.json()

    @property
    def base_url(self) -> str:
        """The server this client talks to."""
        return str(self._http.base_url)

    @property
    def model(self) -> str:
        """The model the server serves (asked once, from /v1/models)."""
        if self._model is None:
            self._model = str(self._request("GET", "/v1/models")["data"][0]["id"])
        return self._model

    # ------------------------------------------------------------------------- edits

    def edit(
        self,
        edit_id: str,
        prompt: str,
        target: str,
        *,
        rephrases: Sequence[str] = (),
        locality: Sequence[str] = (),
        task: str = "generate",
        source: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> str:
        """Submit one edit for the served model; returns its id once it is durable in the stream."""
        event: dict[str, Any] = {"edit_id": edit_id, "model": self.model, "task": task, "prompt": prompt, "target": target}
        if rephrases:
            event["rephrases"] = list(rephrases)
        if locality:
            event["locality"] = [{"prompt": p} for p in locality]
        if source is not None:
            event["source"] = source
        if metadata is not None:
            event["metadata"] = dict(metadata)
        return self.submit([event])[0]

    def submit(self, events: Iterable[Mapping[str, Any]]) -> list[str]:
        """Submit edit events as they are (``schemas/edit.v1.json``); all or none are accepted."""
        body = self._request("POST", "/v1/edits", token=self.producer_token, json=[dict(e) for e in events])
        return list(body["accepted"])

    def status(self, edit_id: str, *, wait: float = 0.0) -> EditStatus:
        """The edit's state; ``wait`` seconds long-polls until a receipt decides it and the server
        serves the receipt's version (so :meth:`generate` right after sees the edit)."""
        body = self._request("GET", f"/v1/edits/{quote(edit_id, safe='')}", token=self.producer_token or self.admin_token,
                             params={"wait": wait}, timeout=self.timeout_s + wait)
        return EditStatus(body["edit_id"], body["status"], body.get("version"), body.get("reason"), body.get("detail"),
                          body.get("serving"))

    # ------------------------------------------------------------------------- serving

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int = 16) -> Generation:
        """Greedy continuations of ``prompts`` by the served version."""
        body = self._request("POST", "/v1/generate", json={"prompts": list(prompts), "max_new_tokens": max_new_tokens})
        results = body["results"]
        return Generation(int(body["version"]), [r["output"] for r in results], [_route(r["route"]) for r in results])

    def chat(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        max_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> tuple[str, Generation]:
        """The assistant's reply to ``messages`` (through the model's chat template), and the
        :class:`Generation` that produced it (version and route)."""
        request: dict[str, Any] = {"model": self.model, "messages": [dict(m) for m in messages], "max_tokens": max_tokens,
                                   "temperature": temperature, "top_p": top_p}
        if stop:
            request["stop"] = list(stop)
        if seed is not None:
            request["seed"] = seed
        body = self._request("POST", "/v1/chat/completions", json=request)
        reply = str(body["choices"][0]["message"]["content"])
        melo = body["melo"]
        return reply, Generation(int(melo["version"]), [reply], [_route(r) for r in melo["routes"]])

    # ------------------------------------------------------------------------- versions

    def versions(self) -> list[dict[str, Any]]:
        """Every stored version, newest first, with its status, stats and kind."""
        return list(self._request("GET", "/v1/versions")["versions"])

    def rollback(self, to_version: int, *, reason: str) -> ControlResult:
        """Publish a new version with ``to_version``'s content (admin token)."""
        body = self._request("POST", "/v1/rollback", token=self.admin_token,
                             json={"to_version": to_version, "reason": reason})
        return ControlResult(body["request_id"], body["status"], body.get("version"))

    def retract(self, edit_id: str, *, reason: str) -> ControlResult:
        """Publish a new version without ``edit_id`` (admin token)."""
        body = self._request("POST", "/v1/retract", token=self.admin_token, json={"edit_id": edit_id, "reason": reason})
        return ControlResult(body["request_id"], body["status"], body.get("version"))
