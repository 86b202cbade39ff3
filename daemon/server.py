"""`melo serve`: the HTTP serving and admin API over a snapshot store (FastAPI + uvicorn).

Routes (OpenAPI at /openapi.json, docs at /docs):

- ``POST /v1/generate``, ``POST /v1/classify`` -- answer a batch of rows with the version being
  served; every response names that version and every row its route (block, cluster, distance),
  or ``null`` when the row is outside every cluster and the base model answered.
- ``GET /v1/versions``, ``GET /v1/versions/{n}`` -- history: manifests, effective status, stats,
  and what each version changed against its parent (edits added / forgotten / retracted /
  rolled back / restored).
- ``POST /v1/rollback``, ``POST /v1/retract`` -- admin, ``Authorization: Bearer <token>``
  compared in constant time. They never write the store themselves: see ``daemon.control_ops``
  (the single writer stays single).
- ``/healthz`` (process alive), ``/readyz`` (503 until a verified snapshot -- or, before any version is
  published, the unedited model as version 0 -- is loaded; says which), ``/metrics``.

Bad input is always a 4xx with a message naming the limit: 413 for a body over
``serve.max_body_bytes``, 422 for malformed JSON, wrong types, too many rows, over-long rows or
too many new tokens, a lone UTF-16 surrogate in a string, 401/403 for admin auth (checked before
the body is read). A validation error echoes the offending input with NaN / Infinity written as
strings and lone surrogates escaped, so the answer itself is always valid JSON. A request is
answered with the version it read when it started (see ``daemon.serving_state``).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

from fastapi import APIRouter, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from daemon import metrics
from daemon.api_serving import ServeLimits, admin_router, health_router, inference_router, versions_router
from daemon.control_ops import ControlOps
from daemon.serving_state import CurrentFollower, ServingState, VersionHistory
from daemon.settings import Settings

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class Service(Protocol):
    """A background helper that lives as long as the app (started and stopped by its lifespan)."""

    def start(self) -> Any:
        """Start in the background."""
        ...

    def stop(self) -> None:
        """Stop and wait for the background work."""
        ...


def _json_safe(value: Any) -> Any:
    """``value`` (already JSON-like) with non-finite floats as strings and lone surrogates escaped."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value).replace("inf", "Infinity").replace("nan", "NaN")
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_json_safe(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


async def _invalid_request(_request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 for a body that fails validation, safe to encode whatever the body held."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else [{"msg": str(exc)}]
    return JSONResponse({"detail": _json_safe(jsonable_encoder(errors))}, status_code=422)


class BodyLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` with 413 before anything parses them.

    Both a declared Content-Length and the bytes actually streamed are checked, so a chunked upload
    cannot slip past the declared size.
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(
            {"detail": f"request body over the {self.max_bytes}-byte limit (serve.max_body_bytes): send fewer or shorter rows"},
            status_code=413,
        )
        await response(scope, receive, send)


def create_app(
    state: ServingState,
    *,
    history: VersionHistory,
    control: ControlOps | None = None,
    admin_token: str | None = None,
    limits: ServeLimits = ServeLimits(),
    services: Sequence[Service] = (),
    routers: Sequence[APIRouter] = (),
) -> FastAPI:
    """The FastAPI app serving ``state``.

    ``control`` performs rollback/retract (``None``: admin routes answer 503); ``admin_token``
    guards them (``None``: they answer 403). ``services`` (the CURRENT follower, an announcement
    listener) are started with the app and stopped, in reverse order, when it shuts down.
    ``routers`` add route groups of their own modules (daemon/api_edits.py, daemon/api_openai.py).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202 - FastAPI's lifespan protocol
        started: list[Service] = []
        try:
            for service in services:
                service.start()
                started.append(service)
            yield
        finally:
            for service in reversed(started):
                service.stop()

    app = FastAPI(
        title="MELO serving API",
        version="1",
        description="Serve a MELO-edited model from versioned snapshots; inspect, roll back and retract versions.",
        lifespan=lifespan,
    )
    app.add_exception_handler(RequestValidationError, _invalid_request)

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        # The route template, not the raw path, keeps the label set bounded (/v1/versions/{n}).
        route = request.scope.get("route")
        label = getattr(route, "path", "unmatched")
        metrics.HTTP_REQUESTS.labels(route=label, status=str(response.status_code)).inc()
        metrics.HTTP_REQUEST_SECONDS.labels(route=label).observe(time.perf_counter() - started)
        return response

    app.include_router(inference_router(state, limits))
    app.include_router(versions_router(state, history))
    app.include_router(admin_router(control, admin_token))
    app.include_router(health_router(state))
    for router in routers:
        app.include_router(router)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    return app


class AnnouncementListener:
    """Wakes a :class:`CurrentFollower` whenever the snapshots topic announces a version of its model.

    It reads from the end of the topic without a consumer group (every replica sees every
    announcement) and never commits: CURRENT stays the source of truth, an announcement only
    makes the follower look now instead of at its next poll.
    """

    def __init__(self, client_kwargs: dict[str, Any], topic: str, model: str, follower: CurrentFollower) -> None:
        """Listen on ``topic`` with kafka-python ``client_kwargs`` (``KafkaSettings.client_kwargs()``)."""
        self.client_kwargs = client_kwargs
        self.topic = topic
        self.model = model.encode("utf-8")
        self.follower = follower
        self._stop = threading.Event()
        self._consumer: Any = None
        self._thread = threading.Thread(target=self._run, name=f"announcements-{model}", daemon=True)

    def start(self) -> AnnouncementListener:
        """Connect and start listening in a background thread; returns self."""
        from kafka import KafkaConsumer

        self._consumer = KafkaConsumer(
            self.topic, group_id=None, enable_auto_commit=False, auto_offset_reset="latest", **self.client_kwargs
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and close the consumer."""
        self._stop.set()
        self._thread.join(10.0)
        self._consumer.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            batches = self._consumer.poll(timeout_ms=500)
            if any(record.key == self.model for records in batches.values() for record in records):
                self.follower.nudge()


def build_app(settings: Settings) -> FastAPI:
    """Everything `melo serve` runs: backbone (loaded once), snapshot store, follower, control path."""
    from melo_runtime.backbones import load_backbone
    from melo_runtime.presets import preset_for
    from melo_runtime.pretrained import backbone_fingerprint

    from daemon.control_ops import ChannelControl, control_sender
    from daemon.snapshot_store_fs import FsSnapshotStore

    assert settings.backbone is not None and settings.snapshot_root is not None  # filled in by Settings
    labels = (settings.labels or None) if settings.task == "classify" else None
    model, tokenizer = load_backbone(
        settings.backbone,
        task=settings.task,
        labels=labels,
        dtype=settings.dtype,
        device=settings.device,
        trust_remote_code=settings.trust_remote_code,
    )
    store = FsSnapshotStore(settings.snapshot_root)
    state = ServingState(
        store,
        settings.model,
        model,
        tokenizer,
        weights_sha256=backbone_fingerprint(model),
        base_config=preset_for(model, settings.task, settings.melo),
    )
    metrics.SERVING_READY.labels(model=settings.model).set(0)
    follower = CurrentFollower(state, settings.serve.poll_s)
    history = VersionHistory(state)
    services: list[Service] = [follower]
    if settings.serve.follow == "announcements":
        if settings.kafka is None:
            raise ValueError("serve.follow = announcements needs [kafka] settings; use follow = current without Kafka")
        services.append(
            AnnouncementListener(settings.kafka.client_kwargs(), settings.kafka.topics.snapshots, settings.model, follower)
        )
    token = settings.serve.admin_token.get_secret_value() if settings.serve.admin_token is not None else None
    routers, extra_services = api_routers(settings, state)
    services.extend(extra_services)
    return create_app(
        state,
        history=history,
        control=ChannelControl(control_sender(settings), history, wait_s=settings.serve.control_wait_s),
        admin_token=token,
        limits=ServeLimits.from_settings(settings),
        services=services,
        routers=routers,
    )


def api_routers(settings: Settings, state: ServingState) -> tuple[list[APIRouter], list[Service]]:
    """The edit routes (daemon/api_edits.py) and the OpenAI-compatible routes (daemon/api_openai.py)
    for ``settings``, with the background services they need (a results-topic consumer)."""
    from daemon.api_auth import RoleTokens
    from daemon.api_edits import EditsApiConfig, edits_router
    from daemon.api_openai import openai_router
    from daemon.edit_intake import KafkaEditSink, SpoolEditSink
    from daemon.receipts import FileReceipts, KafkaReceipts
    from daemon.settings import TopicsSettings

    serve = settings.serve
    tokens = RoleTokens(
        producer=serve.producer_token.get_secret_value() if serve.producer_token is not None else None,
        admin=serve.admin_token.get_secret_value() if serve.admin_token is not None else None,
    )
    services: list[Service] = []
    sink: Any
    receipts: Any
    if settings.kafka is not None:
        topics = settings.kafka.topics
        sink = KafkaEditSink(settings.kafka.producer_kwargs(), topics.edits)
        receipts = KafkaReceipts(settings.kafka.client_kwargs(), topics.results, settings.model)
        services.append(receipts)
    else:
        topics = TopicsSettings()
        sink = SpoolEditSink(Path(settings.spool_dir or "."), topics.edits)
        receipts = FileReceipts(Path(settings.data_dir) / "outbox" / f"{topics.results}.jsonl", settings.model)
    config = EditsApiConfig(model=settings.model, task=settings.task, limits=settings.limits.to_limits(),
                            max_events=serve.max_rows, max_wait_s=serve.max_status_wait_s)
    limits = ServeLimits.from_settings(settings)
    openai = openai_router(state, max_rows=limits.max_rows, max_chars=limits.max_chars, max_new_tokens=limits.max_new_tokens)
    def serving() -> int | None:
        loaded = state.loaded()
        return loaded.version if loaded is not None else None

    return [edits_router(config, sink, receipts, tokens, serving), openai], services


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `melo serve` to the `melo` CLI (called by daemon.cli)."""
    parser = subparsers.add_parser(
        "serve",
        help="serve the current snapshot over HTTP and follow new versions",
        description="HTTP serving + admin API over the snapshot store; hot-swaps to every new CURRENT version.",
    )
    parser.add_argument("--config", type=Path, default=None, help="TOML settings file (MELO_* variables override it)")
    parser.add_argument("--host", default=None, help="interface to bind (default: serve.host)")
    parser.add_argument("--port", type=int, default=None, help="port to bind (default: serve.port)")
    parser.set_defaults(func=_serve_command)


def _serve_command(args: argparse.Namespace) -> int:
    import uvicorn

    settings = Settings.load(args.config)
    host = args.host or settings.serve.host
    port = args.port if args.port is not None else settings.serve.port
    try:
        app = build_app(settings)
    except (ValueError, OSError) as error:  # a backbone that cannot load: say why, no traceback
        print(f"melo serve: error: cannot serve backbone {settings.backbone!r}: {error}", file=sys.stderr)
        return 2
    print(f"melo serve: model {settings.model} from {settings.snapshot_root}, http://{host}:{port} (OpenAPI at /docs)")
    uvicorn.run(app, host=host, port=port, log_level="info")
    return 0
