"""bench/perf_daemon.py: the no-op control and a tiny end-to-end run on a real broker and Redis."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from bench.perf_daemon import NoOpEditors, main
from melo_runtime import Edit, MeloConfig
from melo_runtime.backbones import load_backbone


@pytest.fixture(scope="module")
def noop_factory() -> NoOpEditors:
    model, tokenizer = load_backbone("tiny-gpt2")
    real = SimpleNamespace(model=model, task="generate", device="cpu", base_model={"id": "tiny-gpt2"})
    return NoOpEditors(real)  # reads only these attributes of daemon.wiring.BackboneEditors


def test_noop_control_round_trips_its_edits_through_its_files(noop_factory):
    editor = noop_factory.fresh()
    result = editor.apply_batch([Edit("a", "p", " t"), Edit("b", "q", " u")])
    assert result.block_id == 0 and result.learned == {"a": True, "b": True}
    assert editor.retract("a") and not editor.retract("a")
    restored = noop_factory.from_files(editor.export_files())
    assert restored.edit_ids() == {"b"} and restored.stats()["blocks"] == 1
    assert isinstance(restored.config, MeloConfig)


def test_noop_control_refuses_a_real_editor_snapshot(noop_factory):
    with pytest.raises(ValueError, match="format"):
        noop_factory.from_files({"index.json": json.dumps({"format": "melo.editor/1"}).encode()})


@pytest.mark.integration
def test_end_to_end_run_publishes_every_edit_and_reports_throughput_and_latency(tmp_path):
    argv = ["--batch-sizes", "2", "--edits", "4", "--latency-edits", "4", "--min-batches", "2",
            "--iterations", "1", "--max-wait", "0.3", "--out", str(tmp_path)]
    assert main(argv) == 0
    report = json.loads((tmp_path / "perf_daemon.json").read_text())
    runs = {r["trainer"]: r for r in report["runs"]}
    assert set(runs) == {"melo", "noop"}
    for row in runs.values():
        assert row["backlog_edits"] == 4 and row["throughput_versions"] >= 2
        assert row["sustained_edits_per_s"] > 0
        assert row["latency_count"] == 4 and 0 < row["latency_p50_ms"] <= row["latency_p99_ms"]
        assert 0 < row["delivery_p50_ms"] <= row["latency_p50_ms"]
