"""Shared ground for the ops tests: repository paths, the metric catalogue, the promtool fixture.

docs/contracts.md fixes the metric names; daemon/metrics.py declares them on its REGISTRY. Alerts and
the dashboard are checked against `exported_metrics()` (the REGISTRY); the tests here prove the
REGISTRY and the contract agree.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CONTRACTS = REPO_ROOT / "docs" / "contracts.md"

_ROW = re.compile(r"^\|\s*(melo_[a-z0-9_]+)\s*\|\s*(counter|gauge|histogram|summary)\s*\|\s*([^|]*)\|", re.M)


def contract_metrics() -> dict[str, str]:
    """Metric name -> type ("counter", "gauge", "histogram") from the table in docs/contracts.md."""
    metrics = {name: kind for name, kind, _labels in _ROW.findall(CONTRACTS.read_text())}
    if not metrics:
        raise AssertionError(f"no metric table rows found in {CONTRACTS}")
    return metrics


def contract_labels() -> dict[str, set[str]]:
    """Metric name -> label names, from the same table (text in parentheses is commentary)."""
    labels: dict[str, set[str]] = {}
    for name, _kind, text in _ROW.findall(CONTRACTS.read_text()):
        plain = re.sub(r"\(.*?\)", "", text)
        labels[name] = {label.strip() for label in plain.split(",") if label.strip()}
    return labels


def exported_metrics() -> dict[str, str]:
    """Metric name -> type of every metric on daemon.metrics.REGISTRY (what the processes export)."""
    from daemon.metrics import REGISTRY

    exported = {}
    for family in REGISTRY.collect():
        # prometheus_client names a counter's family without the `_total` its samples carry.
        name = f"{family.name}_total" if family.type == "counter" else family.name
        exported[name] = family.type
    return exported


def series_names(name: str, kind: str) -> set[str]:
    """The series a metric of this type exposes (what a PromQL expression may select)."""
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return {name}


@pytest.fixture(scope="module")
def promtool() -> str:
    """Path of promtool: on PATH, or next to the interpreter (a venv's bin/).

    Fails rather than skips when it is missing, so CI cannot pass without really checking the rules.
    """
    found = shutil.which("promtool") or shutil.which("promtool", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail(
            "promtool not found on PATH: run `bash ops/scripts/install_promtool.sh` "
            "(installs Debian's 'prometheus' package, which ships promtool)"
        )
    return found


def test_contract_table_lists_every_metric_once_with_units_in_counter_names() -> None:
    rows = _ROW.findall(CONTRACTS.read_text())
    names = [name for name, _kind, _labels in rows]
    assert len(names) == len(set(names)), f"duplicate rows in {CONTRACTS}"
    for name, kind, _labels in rows:
        if kind == "counter":
            assert name.endswith("_total"), f"counter {name} must end in _total"


def test_registry_exports_exactly_the_contract_metrics_with_their_types() -> None:
    assert exported_metrics() == contract_metrics()


def test_contract_labels_are_parsed_without_commentary() -> None:
    labels = contract_labels()
    assert labels["melo_rollbacks_total"] == {"model", "reason"}
    assert labels["melo_lease_held"] == {"model"}
