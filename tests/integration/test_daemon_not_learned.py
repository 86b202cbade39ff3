"""Issue 16: an edit the trainer cannot learn within its budget is never receipted "applied".

The embedded daemon (spool + local records) runs in this process so the Prometheus registry it
counts in can be read afterwards. The budget (one iteration, no extension, no retry block) is far
too small for tiny-gpt2 to reproduce any target.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon import metrics
from melo_testkit.daemon_harness import MODEL, Deployment, applied_edit_ids, zsre_events

NO_BUDGET = ["iterations = 1", "max_iterations = 1", "retry_rounds = 0", "index_not_learned = false"]


def _deployment(tmp_path: Path) -> Deployment:
    deployment = Deployment(tmp_path)
    deployment.write_config()
    text = deployment.config_path.read_text(encoding="utf-8")
    start = text.index("[melo]\n") + len("[melo]\n")
    end = text.index("[metrics]")
    deployment.config_path.write_text(text[:start] + "\n".join(NO_BUDGET) + "\n" + text[end:], encoding="utf-8")
    return deployment


def test_an_edit_not_learned_gets_a_not_learned_receipt_a_dlq_record_and_is_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from daemon.cli import main

    deployment = _deployment(tmp_path)
    events = zsre_events(3)
    ids = sorted(e["edit_id"] for e in events)
    deployment.feed(events)
    counted_before = metrics.REGISTRY.get_sample_value("melo_edits_not_learned_total", {"model": MODEL}) or 0.0

    assert main(["run", "--config", str(deployment.config_path), "--until-idle"]) == 0

    receipts = deployment.read_topic("results")
    assert sorted(r["edit_id"] for r in receipts if r["status"] == "not_learned") == ids
    assert not [r for r in receipts if r["status"] == "applied"], "a not-learned edit must never be receipted applied"
    for receipt in receipts:
        assert receipt["reason"] == "not_learned"
        assert "final loss" in receipt["detail"] and "max_iterations 1" in receipt["detail"], receipt["detail"]
    dlq = deployment.read_topic("dlq")
    assert sorted(record["reason"] for record in dlq) == ["not_learned"] * 3
    counted = metrics.REGISTRY.get_sample_value("melo_edits_not_learned_total", {"model": MODEL})
    assert counted == counted_before + 3
    assert not applied_edit_ids(deployment.store()), "no version may list an edit that was not learned"
    assert deployment.committed_edits_offset() == deployment.edits_end(), "dead-lettered edits are committed"
    summary = capsys.readouterr().out
    assert "edits not learned  3" in summary, summary[-2000:]
