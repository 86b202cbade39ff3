"""The serving API on a real snapshot store of tiny-gpt2 versions, through the ASGI app in process.

Every test reads versions published once per module by a real MeloEditor; nothing is mocked.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from daemon.server import ServeLimits, build_app, create_app
from daemon.serving_state import ServingState, VersionHistory
from daemon.settings import Settings
from daemon.snapshot_store_fs import FsSnapshotStore
from melo_runtime import Edit, MeloConfig, MeloEditor
from melo_runtime.backbones import load_backbone
from melo_runtime.presets import preset_for

MODEL = "tiny-gpt2"
TOKEN = "s3cret-admin-token"
# Enough rank and steps for the tiny model to learn every edit exactly (measured: ~30 iterations).
OVERRIDES = {"rank_per_block": 8, "iterations": 100, "lr": 0.02, "lr_step": 50}
BATCHES = [
    [Edit("capital", "The capital of France is", " Lyon"), Edit("boil", "Water boils at", " 42 degrees")],
    [Edit("grass", "Grass is", " blue")],
]
UNRELATED = "Hello there, friend"


def publish_versions(store: FsSnapshotStore, model, tokenizer, batches: list[list[Edit]]) -> list[int]:
    """Train each batch as one block and publish a version after each, as the writer does."""
    config = MeloConfig.from_dict(preset_for(model, "generate").to_dict() | OVERRIDES)
    editor = MeloEditor(model, tokenizer, config)
    versions: list[int] = []
    parent = None
    for batch in batches:
        result = editor.apply_batch(batch)
        assert all(result.learned.values()), result
        meta = {"melo_config": config.to_dict(), "edit_ids": [e.edit_id for e in batch],
                "edit_counts": {"total": len(editor.edit_ids()), "new": len(batch)}}
        parent = store.publish(MODEL, editor.export_files(), parent=parent, meta=meta).version
        versions.append(parent)
    return versions


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("tiny-gpt2")


@pytest.fixture(scope="module")
def store(backbone, tmp_path_factory: pytest.TempPathFactory) -> FsSnapshotStore:
    store = FsSnapshotStore(tmp_path_factory.mktemp("snapshots"))
    assert publish_versions(store, *backbone, BATCHES) == [1, 2]
    return store


@pytest.fixture
def state(store, backbone) -> ServingState:
    return ServingState(store, MODEL, *backbone)


@pytest.fixture
def client(state: ServingState) -> Iterator[TestClient]:
    state.refresh()
    app = create_app(state, history=VersionHistory(state), admin_token=TOKEN, limits=ServeLimits(max_body_bytes=4096))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def test_readyz_is_503_until_a_verified_snapshot_is_loaded(state: ServingState):
    app = create_app(state, history=VersionHistory(state))
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 503
        assert client.post("/v1/generate", json={"prompts": ["x"]}).status_code == 503
        assert client.get("/healthz").status_code == 200
        state.refresh()
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"ready": True, "model": MODEL, "version": 2, "serving": "snapshot version 2"}


def test_generate_names_the_version_and_each_rows_route(client: TestClient, state: ServingState):
    response = client.post("/v1/generate", json={"prompts": ["The capital of France is", UNRELATED], "max_new_tokens": 5})
    assert response.status_code == 200
    body = response.json()
    assert body["version"] == 2 and body["model"] == MODEL
    edited, unrelated = body["results"]
    assert edited["output"].startswith(" Lyon")
    assert edited["route"]["distance"] == pytest.approx(0.0, abs=1e-4) and edited["route"]["block"] == 0
    assert unrelated["route"] is None
    base = MeloEditor(state.model, state.tokenizer, state.current().editor.config)
    assert unrelated["output"] == base.generate([UNRELATED], max_new_tokens=5)[0]


def test_versions_list_and_detail_show_what_each_version_changed(client: TestClient):
    listing = client.get("/v1/versions").json()
    assert [v["version"] for v in listing["versions"]] == [2, 1]
    assert listing["current"] == 2 and listing["serving"] == 2
    detail = client.get("/v1/versions/2").json()
    assert detail["changes"]["added"] == ["grass"]
    assert detail["changes"]["forgotten"] == [] and detail["changes"]["restored"] == []
    assert detail["manifest"]["parent"] == 1 and detail["current"] is True
    assert client.get("/v1/versions/99").status_code == 404


def test_admin_routes_refuse_a_missing_or_wrong_token(client: TestClient):
    body = {"to_version": 1, "reason": "test"}
    missing = client.post("/v1/rollback", json=body)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert client.post("/v1/rollback", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert client.post("/v1/retract", json={"edit_id": "grass", "reason": "x"},
                       headers={"Authorization": "Basic " + TOKEN}).status_code == 401
    # The right token passes auth; this app has no control path, which is its own clear answer.
    assert client.post("/v1/rollback", json=body, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 503


def test_admin_routes_are_closed_when_no_token_is_configured(state: ServingState):
    state.refresh()
    with TestClient(create_app(state, history=VersionHistory(state))) as client:
        response = client.post("/v1/rollback", json={"to_version": 1, "reason": "x"}, headers={"Authorization": "Bearer "})
        assert response.status_code == 403


BAD_BODIES = [
    ("/v1/generate", b"{not json"),
    ("/v1/generate", b"[]"),
    ("/v1/generate", b"null"),
    ("/v1/generate", json.dumps({"prompts": []}).encode()),
    ("/v1/generate", json.dumps({"prompts": "one string"}).encode()),
    ("/v1/generate", json.dumps({"prompts": [1, 2]}).encode()),
    ("/v1/generate", json.dumps({"prompts": ["  "]}).encode()),
    ("/v1/generate", json.dumps({"prompts": ["x"] * 65}).encode()),
    ("/v1/generate", json.dumps({"prompts": ["x" * 2001]}).encode()[:4000]),
    ("/v1/generate", json.dumps({"prompts": ["x"], "max_new_tokens": 65}).encode()),
    ("/v1/generate", json.dumps({"prompts": ["x"], "max_new_tokens": 0}).encode()),
    ("/v1/generate", json.dumps({"prompts": ["x"], "max_new_tokens": 10**30}).encode()),
    ("/v1/generate", json.dumps({"prompts": ["x"], "extra": 1}).encode()),
    ("/v1/generate", b"\xff\xfe\x00garbage"),
    ("/v1/generate", b"[" * 3000 + b"]" * 3000),
    ("/v1/classify", json.dumps({"texts": ["x"]}).encode()),  # a generator cannot classify
    ("/v1/generate", b"x" * 5000),  # over max_body_bytes
]


@pytest.mark.parametrize(("path", "raw"), BAD_BODIES, ids=range(len(BAD_BODIES)))
def test_malformed_or_oversized_bodies_get_a_4xx_never_a_500(client: TestClient, path: str, raw: bytes):
    response = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    assert response.json()["detail"]


def test_a_body_over_the_limit_is_refused_with_413_even_without_content_length(client: TestClient):
    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield b" " * 1000

    response = client.post("/v1/generate", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert "max_body_bytes" in response.json()["detail"]


def test_row_and_token_limits_come_from_serve_settings(state: ServingState):
    state.refresh()
    limits = ServeLimits.from_settings(Settings(serve={"max_rows": 2, "max_new_tokens": 4}))
    with TestClient(create_app(state, history=VersionHistory(state), limits=limits)) as client:
        assert client.post("/v1/generate", json={"prompts": ["a", "b"], "max_new_tokens": 4}).status_code == 200
        rows = client.post("/v1/generate", json={"prompts": ["a", "b", "c"]})
        assert rows.status_code == 422 and "serve.max_rows" in rows.json()["detail"]
        tokens = client.post("/v1/generate", json={"prompts": ["a"], "max_new_tokens": 5})
        assert tokens.status_code == 422 and "serve.max_new_tokens" in tokens.json()["detail"]


def test_served_admin_requests_wait_serve_control_wait_s_for_the_writer(store: FsSnapshotStore, tmp_path: Path):
    # No writer runs: with control_wait_s = 0 the request is accepted (202) at once, not after 30 s.
    settings = Settings(model=MODEL, data_dir=tmp_path, snapshot_root=store.root,
                        serve={"admin_token": TOKEN, "control_wait_s": 0})
    with TestClient(build_app(settings)) as client:
        response = client.post("/v1/rollback", json={"to_version": 1, "reason": "test"},
                               headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 202 and response.json()["status"] == "accepted"
    sent = [json.loads(line) for path in (tmp_path / "spool" / "melo.control").glob("http-*.jsonl")
            for line in path.read_text().splitlines()]
    assert [(e["type"], e["to_version"], e["request_id"]) for e in sent] == [("rollback", 1, response.json()["request_id"])]


def test_openapi_and_metrics_are_served(client: TestClient):
    spec = client.get("/openapi.json").json()
    assert {"/v1/generate", "/v1/classify", "/v1/versions/{n}", "/v1/rollback", "/v1/retract"} <= set(spec["paths"])
    client.post("/v1/generate", json={"prompts": ["Grass is"], "max_new_tokens": 3})
    text = client.get("/metrics").text
    assert 'melo_http_requests_total{route="/v1/generate",status="200"}' in text


def test_a_corrupt_new_version_is_refused_and_the_old_one_keeps_serving(state: ServingState, store: FsSnapshotStore,
                                                                        tmp_path: Path):
    state.swap_to(1)
    manifest = store.manifest(MODEL, 2)
    blob = next(ref for name, ref in manifest.files.items() if name.startswith("blocks/"))
    path = store.root / MODEL / "blobs" / "sha256" / blob.sha256
    original = path.read_bytes()
    path.chmod(0o644)
    path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    try:
        with pytest.raises(Exception, match="sha256"):
            state.refresh()
        assert state.current().version == 1
    finally:
        path.write_bytes(original)
        path.chmod(0o444)
