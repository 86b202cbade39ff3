"""Prometheus alert rules: promtool validates them and runs a unit test of every rule.

promtool comes from Debian's `prometheus` package; `ops/scripts/install_promtool.sh` installs it (the
Makefile's install step calls it). The tests fail, rather than skip, when it is missing, so CI cannot
pass without really checking the rules.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from tests.unit.test_ops_common import REPO_ROOT, exported_metrics, promtool, series_names  # noqa: F401

PROM_DIR = REPO_ROOT / "ops" / "prometheus"
ALERTS = PROM_DIR / "alerts.yml"
RULE_TESTS = sorted((PROM_DIR / "tests").glob("*.yml"))


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def _rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _heading_anchors(markdown: str) -> set[str]:
    """GitHub-style anchors of the markdown headings (lower case, punctuation dropped, spaces to -)."""
    anchors = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^a-z0-9 -]", "", text).replace(" ", "-"))
    return anchors


def test_promtool_accepts_alert_rules(promtool: str) -> None:
    result = _run([promtool, "check", "rules", str(ALERTS)], cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout


def test_promtool_unit_tests_of_every_rule_pass(promtool: str) -> None:
    assert RULE_TESTS, f"no promtool rule tests under {PROM_DIR / 'tests'}"
    result = _run([promtool, "test", "rules", *map(str, RULE_TESTS)], cwd=PROM_DIR / "tests")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and "FAILED" not in result.stdout


def test_promtool_accepts_the_compose_scrape_config(promtool: str) -> None:
    result = _run([promtool, "check", "config", str(PROM_DIR / "prometheus.yml")], cwd=PROM_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_rule_has_a_promtool_test_in_which_it_fires() -> None:
    fired: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                if check.get("exp_alerts"):
                    fired.add(check["alertname"])
    missing = sorted({rule["alert"] for rule in _rules()} - fired)
    assert not missing, f"alert rules without a promtool test that makes them fire: {missing}"


def test_rules_select_only_contract_metrics_and_link_an_existing_runbook_section() -> None:
    known = {"up"}
    for name, kind in exported_metrics().items():
        known |= series_names(name, kind)
    anchors = _heading_anchors((REPO_ROOT / "docs" / "runbook.md").read_text())
    for rule in _rules():
        used = set(re.findall(r"\b(melo_[a-z0-9_]+|up)\b", rule["expr"]))
        assert used, f"{rule['alert']} selects no metric"
        assert used <= known, f"{rule['alert']} uses metrics the daemon does not export: {sorted(used - known)}"
        anchor = rule["annotations"]["runbook"].partition("#")[2]
        assert anchor in anchors, f"{rule['alert']} links docs/runbook.md#{anchor}, which has no such heading"
        assert rule["labels"]["severity"] in {"warning", "critical"}
