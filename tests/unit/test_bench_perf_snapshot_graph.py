"""bench/perf_snapshot_graph.py on a small synthetic DB: graph versions write less than the old layout."""

from __future__ import annotations

import json

from bench.perf_snapshot_graph import main


def test_versions_past_the_exact_size_carry_a_graph_and_write_less_than_the_previous_layout(tmp_path):
    argv = ["--dim", "8", "--clusters", "260", "--exact-max", "120", "--batch", "10", "--out", str(tmp_path)]
    assert main(argv) == 0
    report = json.loads((tmp_path / "perf_snapshot_graph.json").read_text())
    above = [r for r in report["versions"] if r["clusters"] > 120]
    assert above and all(r["graph"] and r["graph_files_bytes"] > 0 for r in above)
    assert report["summary"]["mean_new_bytes"] < report["summary"]["mean_previous_layout_new_bytes"]
    # Besides the index and new graph files, a version writes only its own batch's key segment.
    assert all(r["new_bytes"] - r["index_json_bytes"] - r["new_graph_bytes"] <= 10 * 8 * 4 + 200 for r in above)
