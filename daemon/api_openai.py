"""The OpenAI-compatible dialect of `melo serve`: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

What clients built for vLLM / TGI / the ``openai`` package expect, over the same served version
as ``/v1/generate``:

- ``/v1/models`` lists one model whose id is the served model name (``settings.model``); a
  request naming another model is a 404, as OpenAI answers.
- ``temperature`` (default 1.0, as OpenAI; 0 = greedy), ``top_p``, ``max_tokens`` (at most
  ``serve.max_new_tokens``), ``stop`` (up to 4 strings; the text is cut before the first one),
  ``seed`` (same seed, same text), ``n`` = 1 only. ``stream: true`` answers server-sent events
  (``data: {chunk}`` lines, then ``data: [DONE]``), one prompt per streamed request.
- Chat messages go to the editor as a conversation: it renders them with the tokenizer's chat
  template and routes on the last user message (the question), never on the template.
- Every response (and every streamed chunk) carries ``melo: {"version", "routes"}``: the snapshot
  version that answered and, per prompt, the route (block, cluster, distance) or ``null`` where
  the base model answered.

Bad bodies are 422 (or 404 for an unknown model), a version not yet loaded is 503.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from daemon.serving_state import LoadedVersion, NotReady, ServingState
from melo_runtime.chat import check_messages, render, user_question

MAX_STOPS = 4
MAX_SEED = 2**63 - 1


class _Sampling(BaseModel):
    """Fields shared by both endpoints (OpenAI's names and defaults)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str = Field(min_length=1, max_length=256, description="The served model's id (see /v1/models).")
    max_tokens: int | None = Field(None, ge=1, description="New tokens per choice; default and ceiling serve.max_new_tokens.")
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy; above 0 samples.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    n: int = Field(1, ge=1, le=1, description="Choices per prompt: only 1.")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings; the text ends before the first one.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Sampling seed: same seed, same text.")
    stream: bool = Field(False, description="Answer as server-sent events.")
    stream_options: dict[str, Any] | None = Field(None, description="Accepted for compatibility; usage is not streamed.")
    user: str | None = Field(None, max_length=256, description="Accepted for compatibility; unused.")


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: str | list[str] = Field(description="One prompt or a list (one choice each; a streamed request takes one).")


class ChatMessage(BaseModel):
    """One chat turn; ``content`` is text or a list of ``{"type": "text", "text": ...}`` parts."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]
    name: str | None = Field(None, max_length=64)

    def text(self) -> str:
        """The content as plain text (text parts joined); other part types are refused."""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise HTTPException(422, f"message content part {part.get('type')!r}: only text parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")


@dataclass(frozen=True)
class _Job:
    """One validated request: what to generate and how."""

    kind: Literal["text_completion", "chat.completion"]
    model: str
    rows: list[Any]  # per row: a prompt, or a conversation (list of {role, content})
    questions: list[str]  # per row: what routing reads (the prompt, or the last user message)
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stops: list[str]


class StopCutter:
    """Cuts streamed text before the first stop string, holding back what could still become one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add generated text; return what may be sent now."""
        if self.stopped:
            return ""
        self.text += piece
        cut = cut_at_stop(self.text, self.stops)
        if cut is not None:
            self.stopped = True
            return self._send_to(cut)
        return self._send_to(max(len(self.text) - self.hold, self.sent))

    def finish(self) -> str:
        """The held-back rest once generation ended."""
        return "" if self.stopped else self._send_to(len(self.text))

    def _send_to(self, end: int) -> str:
        out, self.sent = self.text[self.sent:end], max(end, self.sent)
        return out


def cut_at_stop(text: str, stops: list[str]) -> int | None:
    """Index of the earliest stop string in ``text``, or None."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def openai_router(state: ServingState, *, max_rows: int, max_chars: int, max_new_tokens: int) -> APIRouter:
    """The router of the OpenAI-compatible routes over ``state`` (limits as in daemon/server.py)."""
    router = APIRouter(tags=["openai"])
    served = state.model_name

    def job(
        body: _Sampling,
        kind: Literal["text_completion", "chat.completion"],
        prompts: list[str],
        rows: list[Any] | None = None,
    ) -> _Job:
        if body.model != served:
            raise HTTPException(404, f"model {body.model!r} is not served here; this server serves {served!r} (GET /v1/models)")
        if not prompts or len(prompts) > max_rows:
            raise HTTPException(422, f"{len(prompts)} prompts: send 1 to {max_rows} (serve.max_rows)")
        if body.stream and len(prompts) != 1:
            raise HTTPException(422, "a streamed request takes exactly one prompt")
        for index, prompt in enumerate(prompts):
            if not prompt.strip() or len(prompt) > max_chars:
                raise HTTPException(422, f"prompt {index} is empty or over {max_chars} characters: send 1 to {max_chars}")
            _check_utf8(prompt, f"prompt {index}")
        max_tokens = body.max_tokens or max_new_tokens
        if max_tokens > max_new_tokens:
            raise HTTPException(422, f"max_tokens={max_tokens}, at most {max_new_tokens} (serve.max_new_tokens)")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > MAX_STOPS or any(len(s) > max_chars for s in stops):
            raise HTTPException(422, f"stop: at most {MAX_STOPS} strings of at most {max_chars} characters")
        for stop in stops:
            _check_utf8(stop, "stop")
        return _Job(kind, served, rows or prompts, prompts, max_tokens, body.temperature, body.top_p, body.seed, stops)

    def loaded() -> LoadedVersion:
        try:
            return state.current()
        except NotReady as exc:
            raise HTTPException(503, str(exc)) from exc

    @router.get("/v1/models")
    def list_models() -> dict[str, Any]:
        """The one model this server serves (OpenAI's list shape)."""
        return {"object": "list", "data": [{"id": served, "object": "model", "created": 0, "owned_by": "melo"}]}

    @router.post("/v1/completions", response_model=None)
    def completions(body: CompletionRequest) -> dict[str, Any] | StreamingResponse:
        """Complete each prompt (OpenAI's text completions)."""
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        return _answer(job(body, "text_completion", prompts), loaded(), body.stream)

    @router.post("/v1/chat/completions", response_model=None)
    def chat_completions(body: ChatRequest) -> dict[str, Any] | StreamingResponse:
        """Answer the conversation (OpenAI's chat completions), through the model's chat template."""
        if len(body.messages) > max_rows or any(len(m.text()) > max_chars for m in body.messages):
            raise HTTPException(422, f"at most {max_rows} messages of at most {max_chars} characters each")
        version = loaded()
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        for index, message in enumerate(messages):
            _check_utf8(message["content"], f"messages[{index}].content")
        try:
            check_messages(messages, "messages")
            render(version.editor.tokenizer, messages)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from exc
        except Exception as exc:  # noqa: BLE001 - a template may refuse a conversation (e.g. role order)
            raise HTTPException(422, f"the model's chat template refused these messages: {exc}") from exc
        return _answer(job(body, "chat.completion", [user_question(messages)], [messages]), version, body.stream)

    return router


def _check_utf8(text: str, what: str) -> None:
    # JSON's \ud800 escapes decode to lone surrogates, which no tokenizer can encode.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise HTTPException(422, f"{what} holds an unpaired surrogate at character {exc.start}: send valid Unicode") from exc


def _routes(version: LoadedVersion, questions: list[str]) -> list[dict[str, Any] | None]:
    return [None if r is None else {"block": int(r.block), "cluster": int(r.cluster), "distance": float(r.distance)}
            for r in version.editor.route(questions)]


def _generate(version: LoadedVersion, job: _Job, streamer: Any = None) -> list[str]:
    return version.editor.generate(job.rows, max_new_tokens=job.max_tokens, temperature=job.temperature,
                                   top_p=job.top_p, seed=job.seed, streamer=streamer)


def _finish(version: LoadedVersion, text: str, job: _Job) -> tuple[str, str]:
    """The text cut at a stop string, and OpenAI's finish_reason."""
    cut = cut_at_stop(text, job.stops)
    if cut is not None:
        return text[:cut], "stop"
    produced = len(version.editor.tokenizer(text, add_special_tokens=False)["input_ids"])
    return text, "length" if produced >= job.max_tokens else "stop"


def _answer(job: _Job, version: LoadedVersion, stream: bool) -> dict[str, Any] | StreamingResponse:
    try:
        routes = _routes(version, job.questions)
        if stream:
            return StreamingResponse(_stream(job, version, routes), media_type="text/event-stream")
        outputs = _generate(version, job)
    except ValueError as exc:  # the editor's input validation (e.g. a prompt over its token limit)
        raise HTTPException(422, str(exc)) from exc
    tokenizer = version.editor.tokenizer
    choices, completion_tokens = [], 0
    for index, output in enumerate(outputs):
        text, reason = _finish(version, output, job)
        completion_tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"])
        content = {"message": {"role": "assistant", "content": text}} if job.kind == "chat.completion" else {"text": text, "logprobs": None}
        choices.append({"index": index, **content, "finish_reason": reason})
    rendered = [row if isinstance(row, str) else render(tokenizer, row) for row in job.rows]
    prompt_tokens = sum(len(tokenizer(p)["input_ids"]) for p in rendered)
    return {
        "id": f"{'chatcmpl' if job.kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}",
        "object": job.kind, "created": int(time.time()), "model": job.model, "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
        "melo": {"version": version.version, "routes": routes},
    }


def _stream(job: _Job, version: LoadedVersion, routes: list[Any]) -> Iterator[bytes]:
    """Server-sent events: generation runs in a thread feeding a streamer; pieces go out as they come."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(version.editor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            _generate(version, job, streamer)
        except BaseException as exc:  # noqa: BLE001 - reported to the client as the stream's last event
            failure.append(exc)
            streamer.end()

    threading.Thread(target=produce, name="melo-stream", daemon=True).start()
    chat = job.kind == "chat.completion"
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    object_name = "chat.completion.chunk" if chat else "text_completion"

    def event(piece: str | None, finish: str | None, first: bool = False) -> bytes:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": piece or ""} if first else ({"content": piece} if piece else {})
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
        chunk = {"id": ident, "object": object_name, "created": int(time.time()), "model": job.model,
                 "choices": [choice], "melo": {"version": version.version, "routes": routes}}
        return f"data: {json.dumps(chunk)}\n\n".encode()

    cutter = StopCutter(job.stops)
    yield event("", None, first=True)
    for piece in streamer:
        if out := cutter.feed(piece):
            yield event(out, None)
    if failure:
        yield f"data: {json.dumps({'error': {'message': str(failure[0]), 'type': 'generation_failed'}})}\n\n".encode()
    else:
        if rest := cutter.finish():
            yield event(rest, None)
        finish = "stop" if cutter.stopped else _finish(version, cutter.text, job)[1]
        yield event(None, finish)
    yield b"data: [DONE]\n\n"
