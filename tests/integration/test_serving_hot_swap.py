"""Issue 5 test 1: hot swap under load, on a real uvicorn socket over a real snapshot store.

≥ 200 concurrent requests while CURRENT moves through ≥ 5 versions: no request fails, and every
response's output equals what the version it names gives for that prompt.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn

from daemon import metrics
from daemon.server import create_app
from daemon.serving_state import CurrentFollower, ServingState, VersionHistory
from daemon.snapshot_store_fs import FsSnapshotStore
from melo_runtime import Edit, MeloConfig, MeloEditor
from melo_runtime.backbones import load_backbone
from melo_testkit.services import free_port, wait_until
from melo_runtime.presets import preset_for

MODEL = "tiny-gpt2"
OVERRIDES = {"rank_per_block": 8, "iterations": 100, "lr": 0.02, "lr_step": 50}
# Six versions; each re-edits the same prompts with new targets, so every version answers differently.
TARGETS = [" red", " green", " blue", " pink", " gray", " gold"]
PROMPTS = ["The sky is", "My car is", "Grass is", "An unrelated prompt"]
REQUESTS = 240


def swaps() -> float:
    return metrics.REGISTRY.get_sample_value("melo_swaps_total", {"model": MODEL}) or 0.0


def publish_versions(store: FsSnapshotStore, model, tokenizer) -> list[int]:
    config = MeloConfig.from_dict(preset_for(model, "generate").to_dict() | OVERRIDES)
    editor = MeloEditor(model, tokenizer, config)
    parent = None
    versions = []
    for index, target in enumerate(TARGETS):
        batch = [Edit(f"e{index}-{n}", prompt, target) for n, prompt in enumerate(PROMPTS[:3])]
        editor.apply_batch(batch)
        meta = {"melo_config": config.to_dict(), "edit_ids": [e.edit_id for e in batch]}
        parent = store.publish(MODEL, editor.export_files(), parent=parent, meta=meta, make_current=False).version
        versions.append(parent)
    return versions


class ThreadedServer:
    """uvicorn on a free loopback port in a thread of this process."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        wait_until(lambda: self.server.started, 20, "uvicorn to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(20)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def served(tmp_path) -> Iterator[tuple[ServingState, FsSnapshotStore, list[int], ThreadedServer]]:
    model, tokenizer = load_backbone(MODEL)
    store = FsSnapshotStore(tmp_path / "snapshots")
    versions = publish_versions(store, model, tokenizer)
    store.set_current(MODEL, versions[0])
    state = ServingState(store, MODEL, model, tokenizer)
    follower = CurrentFollower(state, poll_s=0.02)
    app = create_app(state, history=VersionHistory(state), services=[follower])
    with ThreadedServer(app) as server:
        wait_until(lambda: state.ready, 20, "the first version to load")
        yield state, store, versions, server


def test_hot_swap_under_load_has_no_errors_and_each_response_matches_its_version(served):
    state, store, versions, server = served
    expected = {
        v: {p: state.load(v).editor.generate([p], max_new_tokens=4)[0] for p in PROMPTS} for v in versions
    }
    assert len({tuple(answers.values()) for answers in expected.values()}) == len(versions), "versions must differ"
    swaps_before = swaps()

    done = threading.Event()
    swapped_to: list[int] = []

    def swap_through_versions() -> None:
        # Cycle CURRENT while requests run; wait for each swap so every version really serves.
        for version in versions[1:] + versions[:2]:
            store.set_current(MODEL, version)
            wait_until(lambda v=version: state.current().version == v, 20, f"swap to {version}")
            swapped_to.append(version)
            if done.is_set():
                return

    def ask(index: int) -> tuple[str, dict]:
        prompt = PROMPTS[index % len(PROMPTS)]
        response = client.post("/v1/generate", json={"prompts": [prompt], "max_new_tokens": 4})
        assert response.status_code == 200, response.text
        return prompt, response.json()

    with httpx.Client(base_url=server.url, timeout=60, limits=httpx.Limits(max_connections=64)) as client:
        swapper = threading.Thread(target=swap_through_versions)
        swapper.start()
        with ThreadPoolExecutor(max_workers=32) as pool:
            answers = list(pool.map(ask, range(REQUESTS)))
        done.set()
        swapper.join(60)

    assert len(swapped_to) >= 5, swapped_to
    assert swaps() - swaps_before >= 5
    seen = set()
    for prompt, body in answers:
        seen.add(body["version"])
        assert body["results"][0]["output"] == expected[body["version"]][prompt], (prompt, body)
    assert len(seen) >= 2, f"requests all hit one version {seen}: the load did not overlap the swaps"
