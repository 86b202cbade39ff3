"""The control channel and the monitor, end to end on the embedded default (spool + local records).

Two kinds of writer: the real ``melo run`` (a subprocess from the harness's fork server) where the
CLI's wiring is what is tested, and a ``Worker`` from ``build_worker`` driven turn by turn in this
process (``Worker.step`` until idle), so a test can say "the writer has read everything there is"
without waiting on a clock, and can read the process's Prometheus registry.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import metrics
from daemon.cli import main as melo
from daemon.control_ops import control_sender
from daemon.settings import Settings
from daemon.wiring import build_worker
from daemon.worker import Worker
from schemas.events import ControlEvent
from melo_testkit.daemon_harness import MODEL, Deployment, zsre_events

# Enough rank and steps for tiny-gpt2 to learn each edit (as in test_serving_control).
LEARN = ["iterations = 100", "rank_per_block = 8", "lr = 0.02", "lr_step = 50"]
LOCALITY = ["Paris is a city in", "The weather today is", "Numbers like 7 and 9"]


def edit(edit_id: str, prompt: str, target: str, *, locality: tuple[str, ...] = ()) -> dict:
    doc = {"edit_id": edit_id, "model": MODEL, "task": "generate", "prompt": prompt, "target": target}
    if locality:
        doc["locality"] = [{"prompt": p} for p in locality]
    return doc


GOOD = [edit("sky", "The sky is", " green", locality=tuple(LOCALITY)), edit("car", "My car is", " fast"),
        edit("grass", "Grass is", " blue")]
# Harmful: re-edits of the locality probes themselves, so their clusters capture the probes.
HARMFUL = [edit(f"harm{i}", prompt, " WRONG") for i, prompt in enumerate(LOCALITY)]


def write_config(deployment: Deployment, *, melo: list[str], tables: list[str]) -> None:
    """The harness's embedded config with ``melo`` as its ``[melo]`` table and ``tables`` appended."""
    deployment.write_config()
    text = deployment.config_path.read_text(encoding="utf-8").replace("iterations = 5\n", "\n".join(melo) + "\n")
    deployment.config_path.write_text(text + "\n".join(tables) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- melo run + the monitor


@pytest.mark.parametrize("auto_rollback", [True, False], ids=["auto-rollback", "score-only"])
def test_melo_run_monitor_rolls_back_a_harmful_batch_only_with_auto_rollback(tmp_path: Path, auto_rollback: bool) -> None:
    deployment = Deployment(tmp_path, batch_max_size=3)
    write_config(deployment, melo=LEARN, tables=["[monitor]", f"auto_rollback = {str(auto_rollback).lower()}"])
    deployment.feed(GOOD + HARMFUL)

    assert deployment.run(timeout_s=180) == 0, deployment.log_text()[-3000:]

    store = deployment.store()
    assert store.manifest(MODEL, 1).status == "good"
    assert tuple(store.manifest(MODEL, 2).edit_ids) == ("harm0", "harm1", "harm2")
    assert store.manifest(MODEL, 2).status == "bad"
    if not auto_rollback:
        assert store.current(MODEL) == 2, "score-only: the breach is marked, nothing is rolled back"
        assert "breaches ['locality" in deployment.log_text() and "automatic rollback is off" in deployment.log_text()
        return
    assert store.current(MODEL) == 3
    rollback = store.manifest(MODEL, 3)
    assert (rollback.kind, rollback.restores_version) == ("rollback", 1)
    assert rollback.reason.startswith("monitor:") and "locality" in rollback.reason and "harm0" in rollback.reason
    assert rollback.files == store.manifest(MODEL, 1).files
    undone = {r["edit_id"] for r in deployment.read_topic("results") if r["status"] == "rolled_back"}
    assert undone == {"harm0", "harm1", "harm2"}


# --------------------------------------------------------------------------- control events, in process


class SteppedWriter:
    """A started ``Worker`` of the embedded default that the test turns by hand."""

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self.settings = Settings.load(deployment.config_path)
        self.worker: Worker = build_worker(self.settings)
        assert self.worker.start()

    def until_idle(self, timeout_s: float = 120) -> None:
        """Turn the loop until the source is drained and everything read is published."""
        deadline = time.monotonic() + timeout_s
        while not self.worker.step():
            assert time.monotonic() < deadline, f"the writer did not go idle within {timeout_s}s"

    def control(self, kind: str, reason: str, **fields) -> None:
        """Send a control event on the channel replicas and the CLI use."""
        send = control_sender(self.settings, sender="test")
        try:
            send(ControlEvent(type=kind, model=MODEL, request_id=f"t-{time.monotonic_ns()}", reason=reason, **fields))
        finally:
            send.close()

    def applied(self, ids: set[str]) -> set[str]:
        return set(self.worker.records.applied(MODEL, ids))


@pytest.fixture
def stepped(tmp_path: Path) -> Iterator[SteppedWriter]:
    deployment = Deployment(tmp_path, batch_max_size=5)
    deployment.write_config()
    writer = SteppedWriter(deployment)
    try:
        yield writer
    finally:
        writer.worker.close()


def test_pause_stops_applying_edits_and_resume_applies_them(stepped: SteppedWriter) -> None:
    store = stepped.worker.snapshots
    first, held = zsre_events(5), zsre_events(5, start=5)
    stepped.deployment.feed(first, file="a.jsonl")
    stepped.until_idle()
    assert store.current(MODEL) == 1

    stepped.control("pause", "maintenance window")
    stepped.until_idle()
    assert stepped.worker.paused
    stepped.deployment.feed(held, file="b.jsonl")
    stepped.until_idle()  # idle although b.jsonl is unread: a paused source reads control only
    held_ids = {e["edit_id"] for e in held}
    assert store.current(MODEL) == 1 and stepped.applied(held_ids) == set()
    offsets = json.loads((Path(stepped.settings.data_dir) / "spool-offsets" / f"{MODEL}.json").read_text())
    assert "melo.edits/b.jsonl" not in offsets["offsets"], "nothing of the held file is committed"

    stepped.control("resume", "window over")
    stepped.until_idle()
    assert not stepped.worker.paused
    assert store.current(MODEL) == 2
    assert set(store.manifest(MODEL, 2).edit_ids) == held_ids == stepped.applied(held_ids)


def rollbacks(reason: str) -> float:
    return metrics.REGISTRY.get_sample_value("melo_rollbacks_total", {"model": MODEL, "reason": reason}) or 0.0


def test_a_control_rollback_from_a_monitor_counts_as_monitor_and_any_other_as_manual(stepped: SteppedWriter) -> None:
    stepped.deployment.feed(zsre_events(10))
    stepped.until_idle()
    assert stepped.worker.snapshots.current(MODEL) == 2
    monitor_before, manual_before = rollbacks("monitor"), rollbacks("manual")

    stepped.control("rollback", "monitor: version 2 breached locality 0.500 < 0.9", to_version=1)
    stepped.until_idle()
    assert (rollbacks("monitor"), rollbacks("manual")) == (monitor_before + 1, manual_before)

    stepped.control("rollback", "operator: the monitor was right", to_version=2)
    stepped.until_idle()
    assert (rollbacks("monitor"), rollbacks("manual")) == (monitor_before + 1, manual_before + 1)
    assert stepped.worker.snapshots.current(MODEL) == 4


def test_cli_rollback_goes_through_the_running_writer_and_publishes_directly_without_one(
    stepped: SteppedWriter, capsys: pytest.CaptureFixture[str]
) -> None:
    store = stepped.worker.snapshots
    stepped.deployment.feed(zsre_events(10))
    stepped.until_idle()
    config = str(stepped.deployment.config_path)

    assert melo(["rollback", "--to", "1", "--reason", "bad batch", "--no-wait", "--config", config]) == 0
    assert "holds the lease; control event written to" in capsys.readouterr().out
    assert store.current(MODEL) == 2, "the CLI never publishes while a writer holds the lease"
    stepped.until_idle()
    via_writer = store.manifest(MODEL, 3)
    assert (via_writer.kind, via_writer.restores_version) == ("rollback", 1)
    assert via_writer.request_id.startswith("cli-") and via_writer.reason == "bad batch"

    stepped.worker.close()  # the writer stops and releases its lease
    assert melo(["rollback", "--to", "2", "--reason", "undo the undo", "--config", config]) == 0
    assert "published version 4" in capsys.readouterr().out
    assert (store.manifest(MODEL, 4).kind, store.manifest(MODEL, 4).restores_version) == ("rollback", 2)
