"""Edit / control / manifest validation: every rejection class has its reason code, nothing crashes."""

from __future__ import annotations

import json
import random
from datetime import timezone

import pytest

from schemas import InvalidEvent, Limits, Reason, load_schema, manifest_problems, parse_control, parse_edit

LIMITS = Limits(
    max_event_bytes=8192,
    max_prompt_chars=200,
    max_target_chars=50,
    max_rephrases=2,
    max_locality=2,
    max_metadata_bytes=64,
)


def edit(**overrides: object) -> bytes:
    doc = {
        "edit_id": "wiki:42.1",
        "model": "tiny-gpt2",
        "task": "generate",
        "prompt": "The capital of France is",
        "target": " Lyon",
        "rephrases": ["France's capital city is"],
        "locality": [{"prompt": "The capital of Spain is", "expected": " Madrid"}, {"prompt": "2+2="}],
        "source": "wikidata-sync",
        "created_at": "2024-05-01T12:00:00.5+02:00",
        "metadata": {"ticket": 7},
    }
    doc.update(overrides)
    return json.dumps({k: v for k, v in doc.items() if v is not ...}).encode()


def reason_of(raw: bytes, parse=parse_edit) -> tuple[Reason, str | None]:
    with pytest.raises(InvalidEvent) as info:
        parse(raw, LIMITS)
    return info.value.reason_code, info.value.pointer


def test_valid_edit_parses_into_typed_event_that_round_trips() -> None:
    event = parse_edit(edit(), LIMITS)
    assert event.edit_id == "wiki:42.1" and event.task == "generate" and event.target == " Lyon"
    assert event.rephrases == ("France's capital city is",)
    assert event.locality[0].expected == " Madrid" and event.locality[1].expected is None
    assert event.created_at.astimezone(timezone.utc).hour == 10
    assert parse_edit(json.dumps(event.to_json()).encode(), LIMITS) == event


def test_minimal_edit_needs_only_id_model_task_prompt_target() -> None:
    raw = edit(rephrases=..., locality=..., source=..., created_at=..., metadata=...)
    event = parse_edit(raw, LIMITS)
    assert event.rephrases == () and event.created_at is None and event.metadata == {}


@pytest.mark.parametrize(
    ("raw", "reason", "pointer"),
    [
        (b"x" * (LIMITS.max_event_bytes + 1), Reason.OVERSIZE, None),
        (b'{"prompt": "\xff"}', Reason.INVALID_UTF8, None),
        (b'{"prompt": "\\ud800"}', Reason.INVALID_UTF8, None),
        (b"{not json", Reason.INVALID_JSON, None),
        (b'{"a": NaN}', Reason.INVALID_JSON, None),
        (b'{"a": 1e999}', Reason.INVALID_JSON, None),
        (b'{"a": 1, "a": 2}', Reason.INVALID_JSON, None),
        (b'{"a": ' + b"[" * 100 + b"]" * 100 + b"}", Reason.TOO_DEEP, None),
        (b'["a list"]', Reason.NOT_OBJECT, None),
        (edit(task="translate"), Reason.UNKNOWN_TASK, "/task"),
        (edit(prompt="  \n"), Reason.EMPTY_PROMPT, "/prompt"),
        (edit(target=""), Reason.EMPTY_TARGET, "/target"),
        (edit(target=...), Reason.SCHEMA, "/target"),
        (edit(prompt=5), Reason.SCHEMA, "/prompt"),
        (edit(edit_id="has space"), Reason.SCHEMA, "/edit_id"),
        (edit(model="../etc"), Reason.SCHEMA, "/model"),
        (edit(created_at="yesterday"), Reason.SCHEMA, "/created_at"),
        (edit(created_at="2024-02-30T00:00:00Z"), Reason.SCHEMA, "/created_at"),
        (edit(surprise=1), Reason.SCHEMA, "/surprise"),
        (edit(locality=[{"prompt": "p", "extra": 1}]), Reason.SCHEMA, "/locality/0/extra"),
        (edit(prompt="p" * 201), Reason.FIELD_TOO_LONG, "/prompt"),
        (edit(target="t" * 51), Reason.FIELD_TOO_LONG, "/target"),
        (edit(rephrases=["ok", "r" * 201]), Reason.FIELD_TOO_LONG, "/rephrases/1"),
        (edit(rephrases=["a", "b", "c"]), Reason.TOO_MANY_ITEMS, "/rephrases"),
        (edit(locality=[{"prompt": "p"}] * 3), Reason.TOO_MANY_ITEMS, "/locality"),
        (edit(metadata={"blob": "m" * 64}), Reason.METADATA_TOO_LARGE, "/metadata"),
    ],
)
def test_each_invalid_edit_class_gets_its_reason_code(raw: bytes, reason: Reason, pointer: str | None) -> None:
    assert reason_of(raw) == (reason, pointer)


def test_huge_integer_literal_is_invalid_json_not_a_crash() -> None:
    assert (
        reason_of(b'{"a": ' + b"9" * 5000 + b"}", parse=lambda r, _: parse_edit(r, Limits()))[0] == Reason.INVALID_JSON
    )


def control(**fields: object) -> bytes:
    doc = {"model": "tiny-gpt2", "request_id": "ops-1", "reason": "bad answers"} | fields
    return json.dumps({k: v for k, v in doc.items() if v is not ...}).encode()


def test_each_control_type_parses_with_its_own_fields() -> None:
    assert parse_control(control(type="rollback", to_version=3), LIMITS).to_version == 3
    assert parse_control(control(type="retract", edit_id="e-1"), LIMITS).edit_id == "e-1"
    paused = parse_control(control(type="pause"), LIMITS)
    assert (paused.type, paused.to_version, paused.edit_id) == ("pause", None, None)
    resumed = parse_control(control(type="resume", created_at="2024-01-01T00:00:00Z"), LIMITS)
    assert parse_control(json.dumps(resumed.to_json()).encode(), LIMITS) == resumed


@pytest.mark.parametrize(
    ("raw", "reason", "pointer"),
    [
        (control(type="reboot"), Reason.UNKNOWN_TYPE, "/type"),
        (control(), Reason.UNKNOWN_TYPE, "/type"),
        (control(type="rollback"), Reason.SCHEMA, "/to_version"),
        (control(type="rollback", to_version=0), Reason.SCHEMA, "/to_version"),
        (control(type="retract", to_version=2, edit_id="e"), Reason.SCHEMA, "/to_version"),
        (control(type="pause", reason=...), Reason.SCHEMA, "/reason"),
        (control(type="pause", request_id=""), Reason.SCHEMA, "/request_id"),
    ],
)
def test_each_invalid_control_class_gets_its_reason_code(raw: bytes, reason: Reason, pointer: str) -> None:
    assert reason_of(raw, parse=parse_control) == (reason, pointer)


def test_random_and_mutated_bytes_never_raise_anything_but_invalid_event() -> None:
    rng = random.Random(1234)
    seeds = [edit(), control(type="rollback", to_version=2), b'{"a": [1, {"b": null}]}']
    accepted = 0
    for i in range(3000):
        if i % 3 == 0:
            raw = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
        else:
            raw = bytearray(rng.choice(seeds))
            for _ in range(rng.randrange(1, 6)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            raw = bytes(raw)
        for parse in (parse_edit, parse_control):
            try:
                parse(raw, LIMITS)
                accepted += 1
            except InvalidEvent as exc:
                assert isinstance(exc.reason_code, Reason)
    assert accepted < 3000 * 2  # sanity: the fuzz really produced rejects


def test_schemas_are_closed_and_every_string_and_list_is_bounded() -> None:
    def walk(node: object, where: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                closed = node.get("additionalProperties") is False or node.get("unevaluatedProperties") is False
                assert closed, f"{where} is open"
            if node.get("type") == "string" and "enum" not in node and "const" not in node:
                assert "maxLength" in node or "pattern" in node, f"{where} string unbounded"
            if node.get("type") == "array":
                assert "maxItems" in node, f"{where} list unbounded"
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}/{i}")

    for name in ("edit", "control", "manifest"):
        schema = load_schema(name)
        assert schema["$schema"].endswith("2020-12/schema") and schema["$id"].endswith(f"{name}.v1.json")
        walk(schema, name)


def test_manifest_problems_name_the_offending_field() -> None:
    problems = manifest_problems({"format": "melo.manifest.v1", "version": 0})
    assert any(p.startswith("/version:") for p in problems)
    assert any("required property" in p for p in problems)


def test_model_name_pattern_is_the_same_in_python_and_every_schema() -> None:
    from schemas import MODEL_NAME

    assert load_schema("edit")["$defs"]["namespace"]["pattern"] == MODEL_NAME.pattern
    assert load_schema("control")["$defs"]["namespace"]["pattern"] == MODEL_NAME.pattern
    assert load_schema("manifest")["properties"]["model"]["pattern"] == MODEL_NAME.pattern
