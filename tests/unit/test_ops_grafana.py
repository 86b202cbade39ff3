"""The Grafana dashboard: a panel for every exported metric, and only metrics that exist.

Each panel's PromQL is also checked for syntax with promtool (Grafana's $variables substituted),
because a typo in a dashboard query otherwise shows up only as an empty panel.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.unit.test_ops_common import REPO_ROOT, exported_metrics, promtool, series_names  # noqa: F401

GRAFANA = REPO_ROOT / "ops" / "grafana"
DASHBOARD = json.loads((GRAFANA / "dashboards" / "melo.json").read_text())
PANELS = [p for p in DASHBOARD["panels"] if p["type"] != "row"]
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "6h", "$__interval": "1m", '"$model"': '".*"'}


def _metrics_in(expr: str) -> set[str]:
    return set(re.findall(r"\b(melo_[a-z0-9_]+)\b", expr))


def _series_to_metric() -> dict[str, str]:
    """Series name (e.g. melo_train_seconds_bucket) -> the metric that exposes it."""
    return {series: name for name, kind in exported_metrics().items() for series in series_names(name, kind)}


def test_every_panel_selects_only_exported_metrics() -> None:
    known = _series_to_metric()
    for panel in PANELS:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            used = _metrics_in(target["expr"])
            assert used, f"panel {panel['title']!r} query selects no melo metric: {target['expr']}"
            unknown = used - known.keys()
            assert not unknown, f"panel {panel['title']!r} selects metrics the daemon does not export: {unknown}"


def test_every_exported_metric_has_a_panel() -> None:
    known = _series_to_metric()
    shown = {known[s] for p in PANELS for t in p["targets"] for s in _metrics_in(t["expr"]) if s in known}
    missing = sorted(set(exported_metrics()) - shown)
    assert not missing, f"metrics without a dashboard panel: {missing}"


def test_panels_have_unique_ids_fit_the_grid_and_use_the_datasource_variable() -> None:
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    variables = {v["name"] for v in DASHBOARD["templating"]["list"]}
    assert {"datasource", "model"} <= variables
    for panel in PANELS:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, f"panel {panel['title']!r} overflows the grid"
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["description"], f"panel {panel['title']!r} has no description"
        assert {t["refId"] for t in panel["targets"]} == {chr(65 + i) for i in range(len(panel["targets"]))}


def test_every_panel_query_is_valid_promql(promtool: str, tmp_path: Path) -> None:  # noqa: F811
    rules = []
    for panel in PANELS:
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"unsubstituted Grafana variable in {target['expr']}"
            rules.append({"record": f"dashboard:panel{panel['id']}:{target['refId'].lower()}", "expr": expr})
    rule_file = tmp_path / "dashboard_queries.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(rule_file)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_provisioning_points_grafana_at_the_dashboards_and_prometheus() -> None:
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "melo.yaml").read_text())["providers"]
    assert providers[0]["options"]["path"] == "/var/lib/grafana/dashboards"
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert datasources["datasources"][0]["type"] == "prometheus"
    compose = yaml.safe_load((REPO_ROOT / "ops" / "compose.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert "./grafana/dashboards:/var/lib/grafana/dashboards:ro" in mounts
    for mount in mounts:
        source = mount.split(":")[0]
        if source.startswith("."):
            assert (REPO_ROOT / "ops" / source).exists(), f"grafana mounts {source}, missing under ops/"
