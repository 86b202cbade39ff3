"""Serving a user's checkpoint: the unedited model before any version, the right route per task,
and refusal of a snapshot made for other weights."""

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from daemon.server import create_app
from daemon.serving_state import ServingState, VersionHistory, WrongBaseModel
from daemon.snapshot_store_fs import FsSnapshotStore
from melo_runtime import Edit, MeloEditor
from melo_runtime.backbones import load_backbone
from melo_runtime.presets import preset_for
from melo_runtime.pretrained import backbone_fingerprint
from tests.checkpoints import save_checkpoint

MODEL = "own-model"
LEARN = {"lr": 0.05, "iterations": 150, "rank_per_block": 4}
PROMPT = "The capital of Xland is"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = save_checkpoint("llama", tmp_path_factory.mktemp("ckpt") / "llama")
    return load_backbone(path, dtype="bfloat16", device="cpu")


@pytest.fixture
def served(llama, tmp_path) -> Iterator[tuple[TestClient, FsSnapshotStore, ServingState]]:
    model, tokenizer = llama
    store = FsSnapshotStore(tmp_path / "snapshots")
    state = ServingState(
        store, MODEL, model, tokenizer,
        weights_sha256=backbone_fingerprint(model), base_config=preset_for(model, "generate", LEARN),
    )
    with TestClient(create_app(state, history=VersionHistory(state)), raise_server_exceptions=False) as client:
        yield client, store, state


def _publish(store, model, tokenizer, *, weights_sha256: str) -> int:
    editor = MeloEditor(model, tokenizer, preset_for(model, "generate", LEARN))
    assert editor.apply_batch([Edit(edit_id="e1", prompt=PROMPT, target="Bo")]).learned == {"e1": True}
    meta = {"base_model": {"id": "ckpt", "weights_sha256": weights_sha256}, "edit_ids": ["e1"]}
    return store.publish(MODEL, editor.export_files(), parent=None, meta=meta).version


def test_no_published_version_serves_the_unedited_model_as_version_0(served, llama):
    client, store, state = served
    assert client.get("/readyz").status_code == 503
    state.refresh()
    ready = client.get("/readyz").json()
    assert ready == {"ready": True, "model": MODEL, "version": 0, "serving": "unedited base model (no version published)"}
    body = client.post("/v1/generate", json={"prompts": [PROMPT], "max_new_tokens": 3}).json()
    assert body["version"] == 0 and body["results"][0]["route"] is None

    version = _publish(store, *llama, weights_sha256=state.weights_sha256)
    state.refresh()
    edited = client.post("/v1/generate", json={"prompts": [PROMPT], "max_new_tokens": 3}).json()
    assert edited["version"] == version == 1
    assert edited["results"][0]["output"] == "Bo" and edited["results"][0]["route"]["block"] == 0
    assert client.get("/readyz").json()["serving"] == "snapshot version 1"


def test_snapshot_for_other_weights_is_refused_naming_both_fingerprints(served, llama):
    _, store, state = served
    other = "0" * 64
    version = _publish(store, *llama, weights_sha256=other)
    with pytest.raises(WrongBaseModel) as refused:
        state.swap_to(version)
    assert other in str(refused.value) and state.weights_sha256 in str(refused.value)


def test_generate_on_a_classifier_is_a_4xx_naming_the_classify_route(tmp_path):
    model, tokenizer = load_backbone(save_checkpoint("roberta", tmp_path / "roberta"), device="cpu")
    state = ServingState(FsSnapshotStore(tmp_path / "snapshots"), MODEL, model, tokenizer,
                         base_config=preset_for(model, "classify"))
    state.refresh()
    with TestClient(create_app(state, history=VersionHistory(state)), raise_server_exceptions=False) as client:
        refused = client.post("/v1/generate", json={"prompts": ["good film"]})
        answered = client.post("/v1/classify", json={"texts": ["good film"]})
    assert refused.status_code == 422 and "/v1/classify" in refused.json()["detail"]
    assert answered.status_code == 200 and answered.json()["results"][0]["label"] in ("negative", "positive")
