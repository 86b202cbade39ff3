"""daemon.metrics declares exactly the contract's metrics, with their types and labels, and serves them."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

from daemon import metrics

CONTRACTS = Path(__file__).resolve().parents[2] / "docs" / "contracts.md"
_ROW = re.compile(r"^\|\s*(melo_[a-z0-9_]+)\s*\|\s*(counter|gauge|histogram)\s*\|\s*([^|]*)\|", re.M)


def test_registry_holds_exactly_the_contract_metrics_with_their_labels() -> None:
    expected = {}
    for name, kind, labels in _ROW.findall(CONTRACTS.read_text()):
        plain = re.sub(r"\(.*?\)", "", labels)
        expected[name.removesuffix("_total") if kind == "counter" else name] = (
            kind,
            tuple(label.strip() for label in plain.split(",") if label.strip()),
        )
    declared = {
        collector._name: (collector._type, tuple(collector._labelnames))
        for collector in metrics.REGISTRY._collector_to_names
    }
    assert declared == expected


def test_metrics_endpoint_serves_the_registry() -> None:
    server = metrics.start_metrics_server("127.0.0.1", 0)
    try:
        metrics.REJECTED.labels(reason="schema").inc()
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5).read().decode()
    finally:
        server.close()
    assert 'melo_rejected_total{reason="schema"}' in body
    assert "melo_edit_latency_seconds_bucket" in body or "# TYPE melo_edit_latency_seconds histogram" in body
