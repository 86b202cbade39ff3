"""The serving API's own routes, as FastAPI routers that :func:`daemon.server.create_app` puts
together: inference (``/v1/generate``, ``/v1/classify``), history (``/v1/versions``), admin
(``/v1/rollback``, ``/v1/retract``) and health (``/healthz``, ``/readyz``, ``/metrics``).
The routes are described in daemon/server.py's docstring.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from daemon import metrics
from daemon.control_ops import ControlError, ControlOps, ControlResult
from daemon.errors import SnapshotNotFound
from daemon.serving_state import LoadedVersion, NotReady, ServingState, VersionHistory
from daemon.settings import Settings


@dataclass(frozen=True)
class ServeLimits:
    """Bounds on one inference request (beyond ``serve.max_body_bytes``, enforced before parsing)."""

    max_body_bytes: int = 1024 * 1024
    max_rows: int = 64
    max_chars: int = 2000
    max_new_tokens: int = 64

    @classmethod
    def from_settings(cls, settings: Settings) -> ServeLimits:
        """Body bytes, rows and new tokens from ``serve``; row length from ``limits.max_prompt_chars``
        (what an edit may hold)."""
        return cls(
            max_body_bytes=settings.serve.max_body_bytes,
            max_rows=settings.serve.max_rows,
            max_chars=settings.limits.max_prompt_chars,
            max_new_tokens=settings.serve.max_new_tokens,
        )


def _no_lone_surrogate(text: str) -> str:
    """Refuse a string holding a lone UTF-16 surrogate (a JSON "\\ud800" escape: valid syntax, not a
    character); tokenizers and UTF-8 encoders cannot take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"contains a lone UTF-16 surrogate at character {exc.start}: send text as UTF-8, or surrogate pairs"
        ) from None
    return text


# Every free-text field of a request body: a lone surrogate is a 422 naming the field.
Text = Annotated[str, AfterValidator(_no_lone_surrogate)]


# Every free-text field of a request body: a lone surrogate is a 422 naming the field.
Text = Annotated[str, AfterValidator(_no_lone_surrogate)]


class GenerateRequest(BaseModel):
    """Greedy continuations of each prompt."""

    model_config = ConfigDict(extra="forbid")
    prompts: list[Text] = Field(min_length=1, description="Rows to continue; at most max_rows, each at most max_chars.")
    max_new_tokens: int = Field(16, ge=1, description="Tokens to generate per row; at most max_new_tokens.")


class ClassifyRequest(BaseModel):
    """Labels for each text."""

    model_config = ConfigDict(extra="forbid")
    texts: list[Text] = Field(min_length=1, description="Rows to label; at most max_rows, each at most max_chars.")


class RouteOut(BaseModel):
    """Which edit block answered a row: the cluster its key fell in and how far from the centre."""

    block: int
    cluster: int
    distance: float


class GenerateRow(BaseModel):
    output: str
    route: RouteOut | None = Field(description="null: outside every cluster, the base model answered.")


class ClassifyRow(BaseModel):
    label: str
    route: RouteOut | None = Field(description="null: outside every cluster, the base model answered.")


class GenerateResponse(BaseModel):
    model: str
    version: int = Field(description="The snapshot version that produced every row of this response.")
    results: list[GenerateRow]


class ClassifyResponse(BaseModel):
    model: str
    version: int = Field(description="The snapshot version that produced every row of this response.")
    results: list[ClassifyRow]


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to_version: int = Field(ge=1, le=9007199254740991, description="The version whose content the new version reproduces.")
    reason: Text = Field(min_length=1, max_length=1000)
    request_id: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]{1,128}$")


class RetractRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    edit_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]{1,128}$")
    reason: Text = Field(min_length=1, max_length=1000)
    request_id: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]{1,128}$")


class ControlResponse(BaseModel):
    request_id: str
    status: str = Field(description="published: the new version exists; accepted: queued for the writer, not yet published.")
    version: int | None = Field(description="The version this request produced, once published.")
    via: str = Field(description="control: sent to the running writer; direct: applied under the writer lease.")


def _route_out(route: Any) -> RouteOut | None:
    if route is None:
        return None
    return RouteOut(block=int(route.block), cluster=int(route.cluster), distance=float(route.distance))


def _check_rows(rows: Sequence[str], limits: ServeLimits, field: str) -> None:
    if len(rows) > limits.max_rows:
        raise HTTPException(422, f"{field}: {len(rows)} rows, at most {limits.max_rows} per request (serve.max_rows): split the batch")
    for index, row in enumerate(rows):
        if not row.strip():
            raise HTTPException(422, f"{field}[{index}] is empty or whitespace: send text")
        if len(row) > limits.max_chars:
            raise HTTPException(422, f"{field}[{index}] has {len(row)} characters, at most {limits.max_chars}: shorten it")


def inference_router(state: ServingState, limits: ServeLimits) -> APIRouter:
    """``POST /v1/generate`` and ``POST /v1/classify`` over the version ``state`` serves."""
    router = APIRouter()
    model_label = state.model_name

    def serving() -> LoadedVersion:
        try:
            return state.current()
        except NotReady as exc:
            raise HTTPException(503, str(exc)) from exc

    @router.post("/v1/generate", response_model=GenerateResponse)
    def generate(body: GenerateRequest) -> GenerateResponse:
        """Continue each prompt greedily with the served version."""
        _check_rows(body.prompts, limits, "prompts")
        if body.max_new_tokens > limits.max_new_tokens:
            raise HTTPException(422, f"max_new_tokens={body.max_new_tokens}, at most {limits.max_new_tokens} (serve.max_new_tokens): ask for fewer")
        loaded = serving()  # read once: this request is answered entirely by this version
        if loaded.editor.config.task == "classify":
            raise HTTPException(422, f"model {model_label!r} is a classifier: POST /v1/classify with {{\"texts\": [...]}}")
        try:
            routes = loaded.editor.route(body.prompts)
            outputs = loaded.editor.generate(body.prompts, max_new_tokens=body.max_new_tokens)
        except ValueError as exc:  # the editor's input validation (e.g. too many tokens)
            raise HTTPException(422, str(exc)) from exc
        rows = [GenerateRow(output=o, route=_route_out(r)) for o, r in zip(outputs, routes, strict=True)]
        return GenerateResponse(model=model_label, version=loaded.version, results=rows)

    @router.post("/v1/classify", response_model=ClassifyResponse)
    def classify(body: ClassifyRequest) -> ClassifyResponse:
        """Label each text with the served version."""
        _check_rows(body.texts, limits, "texts")
        loaded = serving()
        try:
            routes = loaded.editor.route(body.texts)
            labels = loaded.editor.classify(body.texts)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from exc
        rows = [ClassifyRow(label=label, route=_route_out(r)) for label, r in zip(labels, routes, strict=True)]
        return ClassifyResponse(model=model_label, version=loaded.version, results=rows)

    return router


def versions_router(state: ServingState, history: VersionHistory) -> APIRouter:
    """``GET /v1/versions`` and ``GET /v1/versions/{n}``: the model's history."""
    router = APIRouter()
    model_label = state.model_name

    @router.get("/v1/versions")
    def list_versions() -> dict[str, Any]:
        """Every stored version, newest first, with its effective status."""
        served = loaded.version if (loaded := state.loaded()) is not None else None
        return {"model": model_label, "serving": served, "current": history.current(), "versions": history.summaries()}

    @router.get("/v1/versions/{n}")
    def show_version(n: int) -> dict[str, Any]:
        """One version's manifest, effective status, stats and changes against its parent."""
        try:
            return history.detail(n)
        except SnapshotNotFound as exc:
            raise HTTPException(404, str(exc)) from exc

    return router


def admin_router(control: ControlOps | None, admin_token: str | None) -> APIRouter:
    """``POST /v1/rollback`` and ``POST /v1/retract``, guarded by ``admin_token`` (``None``: 403);
    ``control`` performs them (``None``: 503)."""
    router = APIRouter()

    def require_admin(request: Request) -> None:
        if admin_token is None:
            raise HTTPException(403, "admin routes are disabled: set serve.admin_token (MELO_SERVE__ADMIN_TOKEN)")
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise HTTPException(401, "admin route: send 'Authorization: Bearer <token>'", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode("utf-8"), admin_token.encode("utf-8")):
            raise HTTPException(403, "admin route: wrong bearer token")

    def control_ops() -> ControlOps:
        if control is None:
            raise HTTPException(503, "this server has no control path configured: run rollback/retract with the CLI")
        return control

    @router.post("/v1/rollback", response_model=ControlResponse, dependencies=[Depends(require_admin)])
    def rollback(body: RollbackRequest, ops: ControlOps = Depends(control_ops)) -> JSONResponse:
        """Publish a new version whose content is ``to_version`` (history stays append-only)."""
        try:
            result = ops.rollback(body.to_version, body.reason, request_id=body.request_id, trigger="manual")
        except ControlError as exc:
            raise HTTPException(exc.status, str(exc)) from exc
        return _control_response(result)

    @router.post("/v1/retract", response_model=ControlResponse, dependencies=[Depends(require_admin)])
    def retract(body: RetractRequest, ops: ControlOps = Depends(control_ops)) -> JSONResponse:
        """Publish a new version in which ``edit_id``'s inputs get the base model's output."""
        try:
            result = ops.retract(body.edit_id, body.reason, request_id=body.request_id)
        except ControlError as exc:
            raise HTTPException(exc.status, str(exc)) from exc
        return _control_response(result)

    return router


def health_router(state: ServingState) -> APIRouter:
    """``/healthz``, ``/readyz`` and ``/metrics``."""
    router = APIRouter()
    model_label = state.model_name

    @router.get("/healthz")
    def healthz() -> dict[str, str]:
        """The process is up (says nothing about the model)."""
        return {"status": "ok"}

    @router.get("/readyz")
    def readyz() -> JSONResponse:
        """200 once a verified snapshot (or, before any is published, the unedited model) is loaded, 503 before."""
        if not state.ready:
            return JSONResponse({"ready": False, "model": model_label, "version": None}, status_code=503)
        loaded = state.current()
        serving = "unedited base model (no version published)" if loaded.unedited else f"snapshot version {loaded.version}"
        return JSONResponse({"ready": True, "model": model_label, "version": loaded.version, "serving": serving})

    @router.get("/metrics")
    def prometheus_metrics() -> PlainTextResponse:
        """Prometheus text exposition of the process's registry."""
        return PlainTextResponse(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return router


def _control_response(result: ControlResult) -> JSONResponse:
    body = ControlResponse(request_id=result.request_id, status=result.status, version=result.version, via=result.via)
    return JSONResponse(body.model_dump(), status_code=200 if result.status == "published" else 202)
