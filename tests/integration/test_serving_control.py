"""Issue 5 tests 2, 3 and 5: rollback, automatic rollback by the monitor, and retraction, end to end.

A real writer (``Worker`` from ``build_worker``: spool source, local record store, filesystem
snapshots, file outbox, tiny-gpt2) runs its loop in a thread. The serving side is a separate
``ServingState`` on its own copy of the backbone, exactly like a replica: admin requests travel
over the control channel (the spool's control directory) to the writer.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from fastapi.testclient import TestClient

from daemon import metrics
from daemon.control_ops import ChannelControl, control_sender
from daemon.monitor import monitor_for_worker
from daemon.server import create_app
from daemon.serving_state import CurrentFollower, ServingState, VersionHistory
from daemon.settings import MonitorSettings, Settings
from daemon.wiring import build_worker
from melo_runtime import MeloEditor
from melo_runtime.backbones import load_backbone
from schemas.events import EditEvent, LocalityProbe
from melo_testkit.services import wait_until

MODEL = "tiny-gpt2"
TOKEN = "admin-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
OVERRIDES = {"rank_per_block": 8, "iterations": 100, "lr": 0.02, "lr_step": 50}
LOCALITY = ["Paris is a city in", "The weather today is", "Numbers like 7 and 9"]
PROBES = ["The sky is", "My car is", "Grass is", *LOCALITY]


def edit_event(edit_id: str, prompt: str, target: str, *, locality: tuple[str, ...] = ()) -> dict:
    doc = {"edit_id": edit_id, "model": MODEL, "task": "generate", "prompt": prompt, "target": target}
    if locality:
        doc["locality"] = [{"prompt": p} for p in locality]
    return doc


class Writer:
    """The daemon's worker loop in a thread, fed through its spool directory."""

    def __init__(self, data_dir: Path) -> None:
        self.settings = Settings(
            model=MODEL, data_dir=data_dir, melo=OVERRIDES, batch={"max_size": 3, "max_wait_s": 0.2},
        )
        self.edits_dir = Path(self.settings.spool_dir) / "melo.edits"
        self.edits_dir.mkdir(parents=True)
        self.worker = build_worker(self.settings)
        self.thread = threading.Thread(target=self.worker.run, daemon=True)
        self._files = 0

    def send(self, events: list[dict]) -> None:
        self._files += 1
        path = self.edits_dir / f"{self._files:04d}.jsonl"
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(e) + "\n" for e in events))
        tmp.rename(path)

    def receipts(self) -> list[dict]:
        path = Path(self.settings.data_dir) / "outbox" / "melo.edit-results.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[Writer]:
    writer = Writer(tmp_path / "melo")
    writer.thread.start()
    try:
        yield writer
    finally:
        writer.worker.stop()
        writer.thread.join(30)


@pytest.fixture
def replica(writer: Writer) -> Iterator[tuple[ServingState, TestClient]]:
    model, tokenizer = load_backbone(MODEL)
    state = ServingState(writer.worker.snapshots, MODEL, model, tokenizer)
    history = VersionHistory(state)
    app = create_app(
        state,
        history=history,
        control=ChannelControl(control_sender(writer.settings), history, wait_s=60),
        admin_token=TOKEN,
        services=[CurrentFollower(state, poll_s=0.05)],
    )
    with TestClient(app) as client:
        yield state, client


def answers(client: TestClient, prompts: list[str]) -> list[dict]:
    response = client.post("/v1/generate", json={"prompts": prompts, "max_new_tokens": 6})
    assert response.status_code == 200, response.text
    return response.json()


def serve_version(state: ServingState, version: int) -> None:
    wait_until(lambda: state.ready and state.current().version == version, 60, f"the replica to serve version {version}")


def test_rollback_to_n_serves_version_n_bit_for_bit_and_marks_undone_edits(writer: Writer, replica):
    state, client = replica
    store = writer.worker.snapshots
    writer.send([edit_event("sky", "The sky is", " green"), edit_event("car", "My car is", " fast")])
    serve_version(state, 1)
    at_v1 = answers(client, PROBES)
    writer.send([edit_event("sky2", "The sky is", " plaid"), edit_event("grass", "Grass is", " blue")])
    serve_version(state, 2)
    assert answers(client, PROBES)["results"] != at_v1["results"]

    response = client.post("/v1/rollback", json={"to_version": 1, "reason": "bad facts"}, headers=AUTH)
    assert response.status_code == 200, response.text
    new_version = response.json()["version"]
    assert response.json()["status"] == "published" and new_version == 3
    serve_version(state, new_version)

    after = answers(client, PROBES)
    assert after["version"] == 3
    assert after["results"] == at_v1["results"]  # outputs and routes (block, cluster, float distance) equal
    assert store.manifest(MODEL, 3).files == store.manifest(MODEL, 1).files  # same bytes, content addressed
    detail = client.get("/v1/versions/3").json()
    assert detail["manifest"]["restores_version"] == 1
    assert detail["changes"]["rolled_back"] == ["grass", "sky2"]
    undone = {r["edit_id"] for r in writer.receipts() if r["status"] == "rolled_back"}
    assert undone == {"grass", "sky2"}
    assert metrics.REGISTRY.get_sample_value("melo_rollbacks_total", {"model": MODEL, "reason": "manual"}) >= 1


def test_retracted_edit_gets_the_base_output_and_other_edits_are_unaffected(writer: Writer, replica):
    state, client = replica
    writer.send([edit_event("sky", "The sky is", " green"), edit_event("car", "My car is", " fast"),
                 edit_event("grass", "Grass is", " blue")])
    serve_version(state, 1)
    before = answers(client, PROBES)["results"]

    response = client.post("/v1/retract", json={"edit_id": "car", "reason": "wrong"}, headers=AUTH)
    assert response.status_code == 200, response.text
    serve_version(state, response.json()["version"])

    after = answers(client, PROBES)["results"]
    base = MeloEditor(state.model, state.tokenizer, state.current().editor.config)
    assert after[1]["route"] is None
    assert after[1]["output"] == base.generate(["My car is"], max_new_tokens=6)[0]
    assert after[0] == before[0] and after[2] == before[2]  # the other edits, route and output
    assert after[3:] == before[3:]
    assert client.post("/v1/retract", json={"edit_id": "car", "reason": "again"}, headers=AUTH).status_code == 404
    assert any(r["edit_id"] == "car" and r["status"] == "retracted" for r in writer.receipts())


def test_monitor_rolls_back_a_harmful_batch_within_one_cycle(writer: Writer):
    store = writer.worker.snapshots
    settings = MonitorSettings(interval_s=2.0, locality_min=0.9, edits_min=0.9, auto_rollback=True)
    # The writer's own monitor: probes on its backbone, rollbacks published by the writer itself.
    monitor = monitor_for_worker(writer.worker, writer.settings.model_copy(update={"monitor": settings}))

    good = [edit_event("sky", "The sky is", " green", locality=tuple(LOCALITY)),
            edit_event("car", "My car is", " fast")]
    writer.send(good)
    wait_until(lambda: store.current(MODEL) == 1, 60, "version 1")
    # The writer's after-publish hook: record the batch's probes and check the version.
    events = [EditEvent(**{**e, "locality": tuple(LocalityProbe(**p) for p in e.get("locality", []))}) for e in good]
    assert monitor.after_publish(store.manifest(MODEL, 1), events).report.passed
    assert store.manifest(MODEL, 1).status == "good"

    rollbacks_before = metrics.REGISTRY.get_sample_value("melo_rollbacks_total", {"model": MODEL, "reason": "monitor"}) or 0
    scheduler = BackgroundScheduler(daemon=True)
    monitor.schedule(scheduler)
    scheduler.start()
    try:
        # Harmful: edits whose clusters capture the locality probes (they re-edit those very inputs).
        writer.send([edit_event(f"harm{i}", prompt, " WRONG") for i, prompt in enumerate(LOCALITY)])
        wait_until(lambda: store.latest(MODEL) == 2, 60, "the harmful version 2")
        published = time.monotonic()
        wait_until(lambda: store.current(MODEL) == 3, 60, "the automatic rollback")
        # One cycle: the next scheduled check (≤ interval_s away) plus its own run time.
        assert time.monotonic() - published <= 2 * settings.interval_s + 5
    finally:
        scheduler.shutdown(wait=True)

    rollback = store.manifest(MODEL, 3)
    assert rollback.kind == "rollback" and rollback.restores_version == 1
    assert "harm0" in rollback.reason and "locality" in rollback.reason
    assert store.manifest(MODEL, 2).status == "bad"
    after = metrics.REGISTRY.get_sample_value("melo_rollbacks_total", {"model": MODEL, "reason": "monitor"})
    assert after == rollbacks_before + 1
