"""``POST /v1/edits`` and ``GET /v1/edits/{edit_id}``: feed the writer over HTTP and ask what happened.

- ``POST /v1/edits`` (producer token): one edit event (``schemas/edit.v1.json``) or a JSON array
  of them. Every event is validated as the stream validates it (daemon/edit_intake.py); if any
  fails, 422 lists each refused event with its reason and nothing is appended. Otherwise the
  events are appended durably to the writer's edit source and the answer is 202
  ``{"model", "accepted": [edit ids], "destination"}``.
- ``GET /v1/edits/{edit_id}`` (producer or admin token): ``{"edit_id", "status", "version",
  "reason", "detail"}`` from the receipts (daemon/receipts.py). ``?wait=SECONDS`` long-polls until
  a receipt decides the edit (at most ``serve.max_status_wait_s``), and then, within the same
  deadline, until this server serves the receipt's version -- so a query sent right after the
  answer sees the edit. ``serving`` in the answer is the version this server serves now. Still
  undecided after the wait → 200 with ``pending``. An id with no receipt that this process did not
  accept is 404.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from daemon.api_auth import RoleTokens
from daemon.edit_intake import EditSink, EditsRefused, decode_edits
from daemon.receipts import EditStatus, ReceiptIndex, edit_status
from schemas import Limits

_POLL_S = 0.1  # how often a long-poll re-reads the receipts
_REMEMBERED = 100_000  # ids accepted here that may still be pending


@dataclass(frozen=True)
class EditsApiConfig:
    """What the edit routes need to know about the served model."""

    model: str
    task: str
    limits: Limits
    max_events: int = 64
    max_wait_s: float = 120.0


class _Accepted:
    """Ids this process appended, newest kept: a GET for them says ``pending`` rather than 404."""

    def __init__(self, size: int = _REMEMBERED) -> None:
        self.size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, ids: list[str]) -> None:
        for edit_id in ids:
            self._ids[edit_id] = None
            self._ids.move_to_end(edit_id)
        while len(self._ids) > self.size:
            self._ids.popitem(last=False)

    def __contains__(self, edit_id: str) -> bool:
        return edit_id in self._ids


def edits_router(
    config: EditsApiConfig,
    sink: EditSink,
    receipts: ReceiptIndex,
    tokens: RoleTokens,
    serving: Callable[[], int | None] = lambda: None,
) -> APIRouter:
    """The router of the two edit routes (``create_app(..., routers=[...])`` includes it);
    ``serving()`` is the version this server answers with now (None before the first)."""
    router = APIRouter(tags=["edits"])
    accepted = _Accepted()

    @router.post("/v1/edits", status_code=202, dependencies=[Depends(tokens.require("producer"))])
    async def submit_edits(request: Request) -> JSONResponse:
        """Validate and append one edit event or a list of them; 202 once they are durable in the stream."""
        body = await request.body()
        try:
            edits = decode_edits(body, model=config.model, task=config.task, limits=config.limits,
                                 max_events=config.max_events)
        except EditsRefused as exc:
            return JSONResponse({"detail": "no edit was accepted: fix the refused events and send the request again",
                                 "refused": [p.to_json() for p in exc.problems]}, status_code=422)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from exc
        try:
            await run_in_threadpool(sink.append, edits)
        except Exception as exc:  # noqa: BLE001 - OSError or a Kafka error: the stream is unavailable
            raise HTTPException(503, f"could not append to {sink.destination}: {exc}; nothing was accepted, retry") from exc
        ids = [edit.event.edit_id for edit in edits]
        accepted.add(ids)
        return JSONResponse({"model": config.model, "accepted": ids, "destination": sink.destination}, status_code=202)

    @router.get("/v1/edits/{edit_id}", dependencies=[Depends(tokens.require("producer", "admin"))])
    async def show_edit(
        edit_id: str,
        wait: float = Query(0.0, ge=0, description="Seconds to wait for a receipt (long poll)."),
    ) -> dict[str, Any]:
        """The edit's state from its receipts; ``wait`` long-polls until it is decided."""
        if wait > config.max_wait_s:
            raise HTTPException(422, f"wait={wait:g}, at most {config.max_wait_s:g} s (serve.max_status_wait_s)")
        deadline = time.monotonic() + wait
        status = await _lookup(receipts, edit_id)
        while not status.final and time.monotonic() < deadline:
            await asyncio.sleep(min(_POLL_S, max(deadline - time.monotonic(), 0.0)))
            status = await _lookup(receipts, edit_id)
        if not status.final and edit_id not in accepted:
            raise HTTPException(404, f"no receipt for edit {edit_id!r}, and it was not submitted through this "
                                     "server: check the id, or wait (?wait=SECONDS) if it was sent to the stream")
        while _behind(serving(), status) and time.monotonic() < deadline:
            await asyncio.sleep(min(_POLL_S, max(deadline - time.monotonic(), 0.0)))
        return status.to_json() | {"serving": serving()}

    return router


def _behind(served: int | None, status: EditStatus) -> bool:
    """True while this server answers with a version older than the one the receipt names."""
    if status.status in ("pending", "rejected", "duplicate") or status.version is None:
        return False
    return served is None or served < status.version


async def _lookup(receipts: ReceiptIndex, edit_id: str) -> EditStatus:
    return edit_status(edit_id, await run_in_threadpool(receipts.receipts, edit_id))
