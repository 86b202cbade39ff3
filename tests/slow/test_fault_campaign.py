"""The fault campaign script, run small: a few kill -9 over a real broker + Redis stream lose nothing."""

from __future__ import annotations

import json
from pathlib import Path

from tests.slow.fault_campaign import main


def test_a_small_fault_campaign_loses_nothing_and_applies_nothing_twice(tmp_path: Path) -> None:
    assert main(["--kills", "4", "--edits", "40", "--seed", "3", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "fault_campaign.json").read_text())
    assert report["kills"] >= 4 and report["lost"] == [] and report["twice"] == [] and report["unverified"] == []
