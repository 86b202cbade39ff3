"""Turn untrusted bytes into typed events, or say exactly why not.

Every check maps to one machine-readable `Reason`, which the daemon puts on the dead-letter record
and on the `melo_rejected_total{reason}` metric. `parse_edit` / `parse_control` never raise anything
but `InvalidEvent`, whatever the bytes (they are fuzzed in tests/unit/test_schemas.py).

Checks run cheapest first: byte size, UTF-8, JSON syntax, shape, the JSON Schema (hard ceilings
shared with producers), then the configured `Limits` (tighter, per deployment).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import ValidationError, best_match

from schemas.events import ControlEvent, EditEvent, LocalityProbe

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""A model namespace: also a Kafka key, a directory name and a Redis hash tag (same pattern as the schemas)."""

MAX_DEPTH = 32
"""Deepest JSON nesting accepted anywhere in an event (metadata included)."""

_DETAIL_CHARS = 300


class Reason(StrEnum):
    """Why an event was rejected. Stable strings: they are metric labels and DLQ fields."""

    OVERSIZE = "oversize"
    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    TOO_DEEP = "too_deep"
    NOT_OBJECT = "not_object"
    SCHEMA = "schema"
    UNKNOWN_TASK = "unknown_task"
    UNKNOWN_TYPE = "unknown_type"
    EMPTY_PROMPT = "empty_prompt"
    EMPTY_TARGET = "empty_target"
    FIELD_TOO_LONG = "field_too_long"
    TOO_MANY_ITEMS = "too_many_items"
    METADATA_TOO_LARGE = "metadata_too_large"
    # Over the editor's token budget (MeloConfig.max_length_tokens); checked by the daemon, which has the tokenizer.
    TOO_MANY_TOKENS = "too_many_tokens"


class InvalidEvent(ValueError):
    """An event that must go to the dead-letter topic.

    `reason_code` is a `Reason`; `pointer` is the JSON pointer (RFC 6901) of the offending field when
    there is one; `detail` is for people.
    """

    def __init__(self, reason_code: Reason, detail: str, pointer: str | None = None) -> None:
        self.reason_code = reason_code
        self.detail = detail[:_DETAIL_CHARS]
        self.pointer = pointer
        where = f" at {pointer}" if pointer is not None else ""
        super().__init__(f"{reason_code.value}{where}: {self.detail}")


@dataclass(frozen=True)
class Limits:
    """Per-deployment bounds, tighter than the schemas' hard ceilings (settings.limits)."""

    max_event_bytes: int = 64 * 1024
    max_prompt_chars: int = 2000
    max_target_chars: int = 500
    max_rephrases: int = 8
    max_locality: int = 16
    max_metadata_bytes: int = 4096

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"Limits.{name} must be a non-negative int, got {value!r}")


def load_schema(name: str) -> dict[str, Any]:
    """The JSON Schema `name` ("edit", "control" or "manifest") shipped in this package."""
    if name not in ("edit", "control", "manifest"):
        raise ValueError(f"unknown schema {name!r}: expected edit, control or manifest")
    text = resources.files("schemas").joinpath(f"{name}.v1.json").read_text(encoding="utf-8")
    return json.loads(text)


def parse_edit(raw: bytes, limits: Limits) -> EditEvent:
    """Validate one edit event's raw bytes; raise `InvalidEvent` with the first problem found."""
    doc = _decode(raw, limits)
    task = doc.get("task")
    if isinstance(task, str) and task not in ("generate", "classify"):
        raise InvalidEvent(Reason.UNKNOWN_TASK, f"task {task!r} is not generate or classify", "/task")
    for name, reason in (("prompt", Reason.EMPTY_PROMPT), ("target", Reason.EMPTY_TARGET)):
        value = doc.get(name)
        if isinstance(value, str) and not value.strip():
            raise InvalidEvent(reason, f"{name} is empty or only whitespace", f"/{name}")
    _check_schema(_validator("edit"), doc)

    _check_chars(doc["prompt"], limits.max_prompt_chars, "/prompt", "max_prompt_chars")
    _check_chars(doc["target"], limits.max_target_chars, "/target", "max_target_chars")
    rephrases = doc.get("rephrases", [])
    _check_items(rephrases, limits.max_rephrases, "/rephrases", "max_rephrases")
    for i, text in enumerate(rephrases):
        _check_chars(text, limits.max_prompt_chars, f"/rephrases/{i}", "max_prompt_chars")
    if "subject" in doc:
        _check_chars(doc["subject"], limits.max_target_chars, "/subject", "max_target_chars")
    locality = doc.get("locality", [])
    _check_items(locality, limits.max_locality, "/locality", "max_locality")
    for i, probe in enumerate(locality):
        _check_chars(probe["prompt"], limits.max_prompt_chars, f"/locality/{i}/prompt", "max_prompt_chars")
        if "expected" in probe:
            _check_chars(probe["expected"], limits.max_target_chars, f"/locality/{i}/expected", "max_target_chars")
    metadata = doc.get("metadata", {})
    size = len(json.dumps(metadata, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    if size > limits.max_metadata_bytes:
        raise InvalidEvent(
            Reason.METADATA_TOO_LARGE,
            f"metadata is {size} bytes as compact JSON; limit max_metadata_bytes={limits.max_metadata_bytes}",
            "/metadata",
        )

    return EditEvent(
        edit_id=doc["edit_id"],
        model=doc["model"],
        task=doc["task"],
        prompt=doc["prompt"],
        target=doc["target"],
        rephrases=tuple(rephrases),
        subject=doc.get("subject"),
        locality=tuple(LocalityProbe(p["prompt"], p.get("expected")) for p in locality),
        source=doc.get("source"),
        created_at=_parse_datetime(doc["created_at"]) if "created_at" in doc else None,
        metadata=metadata,
    )


def parse_control(raw: bytes, limits: Limits) -> ControlEvent:
    """Validate one control event's raw bytes; raise `InvalidEvent` with the first problem found."""
    doc = _decode(raw, limits)
    kind = doc.get("type")
    if kind not in ("rollback", "retract", "pause", "resume"):
        detail = "type is missing" if kind is None else f"type {kind!r} is not rollback, retract, pause or resume"
        raise InvalidEvent(Reason.UNKNOWN_TYPE, detail, "/type")
    # Validate against the branch the discriminator names: errors then speak about that shape
    # instead of "is not valid under any of the given schemas".
    _check_schema(_validator(f"control:{kind}"), doc)
    return ControlEvent(
        type=kind,
        model=doc["model"],
        request_id=doc["request_id"],
        reason=doc["reason"],
        to_version=doc.get("to_version"),
        edit_id=doc.get("edit_id"),
        created_at=_parse_datetime(doc["created_at"]) if "created_at" in doc else None,
    )


def manifest_problems(doc: Any) -> list[str]:
    """Every way `doc` violates schemas/manifest.v1.json, as "<pointer>: <message>" (empty = valid)."""
    validator = _validator("manifest")
    return [
        f"{_pointer(error.absolute_path) or '/'}: {error.message[:_DETAIL_CHARS]}"
        for error in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]


_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
_FORMATS = FormatChecker(formats=())


@_FORMATS.checks("date-time", raises=ValueError)
def _is_datetime(value: object) -> bool:
    # jsonschema only checks date-time when an optional package is installed; check it ourselves
    # so producers in every language get the same answer.
    if not isinstance(value, str):
        return True
    _parse_datetime(value)
    return True


def _parse_datetime(value: str) -> datetime:
    if not _RFC3339.match(value):
        raise ValueError(f"{value!r} is not an RFC 3339 date-time with offset (e.g. 2024-05-01T12:00:00Z)")
    head, _, tail = value.partition(".")
    if tail:  # Python parses at most microseconds; keep the offset, drop extra digits
        digits = re.match(r"\d+", tail).group()
        value = f"{head}.{digits[:6].ljust(6, '0')}{tail[len(digits) :]}"
    return datetime.fromisoformat(value.replace("z", "Z").replace("t", "T"))


@cache
def _validator(name: str) -> Draft202012Validator:
    if name.startswith("control:"):
        root = load_schema("control")
        branch = root["$defs"][name.removeprefix("control:")]
        schema = {"$schema": root["$schema"], "$defs": root["$defs"], **branch}
    else:
        schema = load_schema(name)
    return Draft202012Validator(schema, format_checker=_FORMATS)


def _decode(raw: bytes, limits: Limits) -> dict[str, Any]:
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise InvalidEvent(Reason.NOT_OBJECT, f"expected bytes, got {type(raw).__name__}")
    if len(raw) > limits.max_event_bytes:
        raise InvalidEvent(
            Reason.OVERSIZE, f"event is {len(raw)} bytes; limit max_event_bytes={limits.max_event_bytes}"
        )
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEvent(Reason.INVALID_UTF8, f"not UTF-8 at byte {exc.start}: {exc.reason}") from None
    try:
        doc = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys, parse_float=_finite)
    except RecursionError:
        raise InvalidEvent(Reason.TOO_DEEP, f"JSON nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError, and int() refusing thousands of digits
        raise InvalidEvent(Reason.INVALID_JSON, str(exc)) from None
    if not isinstance(doc, dict):
        raise InvalidEvent(Reason.NOT_OBJECT, f"top level is a JSON {type(doc).__name__}, expected an object")
    _check_tree(doc)
    return doc


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} overflows a double")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of duplicate keys; producers and the daemon could then disagree.
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise ValueError(f"duplicate key {key!r}")
        doc[key] = value
    return doc


def _check_tree(doc: dict[str, Any]) -> None:
    """Reject nesting deeper than MAX_DEPTH and strings that cannot be re-encoded as UTF-8."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InvalidEvent(Reason.TOO_DEEP, f"JSON nests deeper than {MAX_DEPTH} levels")
        if isinstance(node, dict):
            stack.extend((k, depth) for k in node)
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
        elif isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:  # a "\ud800" escape: valid JSON syntax, not a character
                raise InvalidEvent(Reason.INVALID_UTF8, "string contains an unpaired surrogate escape") from None


def _check_schema(validator: Draft202012Validator, doc: dict[str, Any]) -> None:
    error = best_match(validator.iter_errors(doc))
    if error is not None:
        raise InvalidEvent(Reason.SCHEMA, error.message, _error_pointer(error))


def _error_pointer(error: ValidationError) -> str:
    path = list(error.absolute_path)
    instance = error.instance
    # Point at the field itself, not at the object that lacks it or carries it.
    if error.validator == "required" and isinstance(instance, dict):
        missing = [k for k in error.validator_value if k not in instance]
        path += missing[:1]
    elif error.validator == "additionalProperties" and isinstance(instance, dict):
        known = error.schema.get("properties", {})
        extra = [k for k in instance if k not in known]
        path += extra[:1]
    return _pointer(path)


def _pointer(path: Any) -> str:
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in path)


def _check_chars(text: str, limit: int, pointer: str, setting: str) -> None:
    if len(text) > limit:
        raise InvalidEvent(Reason.FIELD_TOO_LONG, f"{len(text)} characters; limit {setting}={limit}", pointer)


def _check_items(items: list[Any], limit: int, pointer: str, setting: str) -> None:
    if len(items) > limit:
        raise InvalidEvent(Reason.TOO_MANY_ITEMS, f"{len(items)} items; limit {setting}={limit}", pointer)
