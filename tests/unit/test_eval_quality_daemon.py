"""`melo eval --daemon` (melo_eval/quality_daemon.py): refusals, checkpoint choice, and an end-to-end
replay through a real broker, Redis and snapshot store that must score exactly like the in-process one."""

from __future__ import annotations

import json

import pytest

from melo_eval import cli
from melo_eval.quality_daemon import checkpoints

IDS = [f"e{i}" for i in range(7)]
TIMING = {"train_seconds", "eval_seconds"}


def _versions(*batches: list[str]) -> list[tuple[int, tuple[str, ...], float]]:
    return [(number, tuple(ids), float(number)) for number, ids in enumerate(batches, start=1)]


@pytest.mark.parametrize(("dataset", "method", "message"), [
    ("scotus", "melo", "generation streams only"),
    ("huffpost", "melo", "classifier head"),
    ("zsre", "grace", "not a daemon trainer"),
    ("zsre", "lora", "--method melo"),
])
def test_daemon_mode_refuses_what_the_daemon_cannot_train(dataset, method, message, tmp_path):
    argv = ["--daemon", "--dataset", dataset, "--method", method, "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match=message):
        cli.main(argv)
    assert not (tmp_path / "metrics.json").exists()


def test_checkpoints_pick_versions_as_the_replay_picks_batches():
    chosen = checkpoints(IDS, _versions(IDS[0:3], IDS[3:6], IDS[6:7]), set(), every=4)
    assert [(c.n_edits, c.version, c.start) for c in chosen] == [(6, 2, 3), (7, 3, 6)]


def test_checkpoints_count_rejected_edits_in_the_prefix_they_were_sent_in():
    versions = _versions(["e0", "e2"], ["e3", "e4", "e5", "e6"])
    chosen = checkpoints(IDS, versions, {"e1"}, every=3)
    assert [(c.n_edits, c.version) for c in chosen] == [(3, 1), (7, 2)]


@pytest.mark.parametrize(("versions", "message"), [
    (_versions(["e0", "e2"], ["e1"]), "skips edit 'e1'"),
    (_versions(IDS[0:3]), "cover 3 of the 7"),
    (_versions(IDS, ["zz"]), "not next in the stream"),
])
def test_checkpoints_refuse_versions_that_are_not_the_stream_in_order(versions, message):
    with pytest.raises(RuntimeError, match=message):
        checkpoints(IDS, versions, set(), every=3)


@pytest.mark.integration
def test_daemon_replay_scores_each_published_version_exactly_like_the_in_process_replay(tmp_path):
    # The paper's key and every key indexed: tiny random models learn little, and the comparison
    # needs clusters that collide and a version per batch.
    common = ["--backbone", "tiny-llama", "--n-edits", "6", "--batch-size", "3", "--every", "3",
              "--n-locality", "5", "--threads", "1", "--key-source", "hidden", "--index-not-learned"]
    assert cli.main([*common, "--out", str(tmp_path / "inproc")]) == 0
    assert cli.main([*common, "--daemon", "--out", str(tmp_path / "daemon")]) == 0
    inproc = json.loads((tmp_path / "inproc" / "metrics.json").read_text())
    daemon = json.loads((tmp_path / "daemon" / "metrics.json").read_text())

    assert [r["n_edits"] for r in daemon["rows"]] == [0, 3, 6]
    assert [r["version"] for r in daemon["rows"]] == [None, 1, 2]
    published = [r["published_seconds"] for r in daemon["rows"][1:]]
    assert 0 < published[0] < published[1]
    assert daemon["rows"][-1]["es_tf"] > 0  # trained
    for ours, theirs in zip(daemon["rows"], inproc["rows"], strict=True):
        assert {k: v for k, v in ours.items() if k not in TIMING | {"version", "published_seconds"}} == {
            k: v for k, v in theirs.items() if k not in TIMING}
    assert daemon["melo_config"] == inproc["melo_config"]

    pipeline = daemon["pipeline"]
    assert pipeline["batches_formed"] == [3, 3] and pipeline["applied_edits"] == 6
    assert pipeline["receipts"]["applied"] == 6 and pipeline["receipts"].get("rejected", 0) == 0
    assert pipeline["receipts"].get("forgotten", 0) == daemon["rows"][-1]["forgotten"]
    assert "| n_edits | version | published_seconds |" in (tmp_path / "daemon" / "table.md").read_text()
