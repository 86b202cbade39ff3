"""bench/perf_common.py: percentiles, latency summaries and report files."""

from __future__ import annotations

import json

import pytest

from bench.perf_common import environment, latency_summary, percentile, write_report, zsre_edits
from melo_eval.tables import markdown_table


def test_percentile_is_nearest_rank_so_p99_is_an_observed_sample():
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([3.0, 1.0, 2.0], 0) == 1.0


def test_percentile_refuses_empty_samples_and_out_of_range_q():
    with pytest.raises(ValueError, match="no samples"):
        percentile([], 50)
    with pytest.raises(ValueError, match="q=101"):
        percentile([1.0], 101)


def test_latency_summary_reports_milliseconds():
    summary = latency_summary([0.010, 0.020, 0.030, 0.040])
    assert summary == {"count": 4, "mean_ms": 25.0, "p50_ms": 20.0, "p90_ms": 40.0, "p99_ms": 40.0, "max_ms": 40.0}


def test_zsre_edits_reads_real_edits_in_file_order_with_an_offset():
    first = zsre_edits(3)
    shifted = zsre_edits(2, offset=1)
    assert [e.edit_id for e in shifted] == [e.edit_id for e in first[1:]]
    assert all(e.prompt.startswith("Q: ") and e.prompt.endswith(" A:") and e.target.startswith(" ") for e in first)
    assert all(e.rephrases == () for e in first)


def test_write_report_records_command_machine_and_date(tmp_path):
    env = environment(threads=1)
    json_path, md_path = write_report(tmp_path, "demo", {"environment": env, "x": 1}, markdown_table(["a"], [[1]]))
    assert json.loads(json_path.read_text())["x"] == 1
    text = md_path.read_text()
    assert "| a |" in text and env["date_utc"] in text and env["cpu"] in text and "Command: `" in text
    assert env["accelerator"]
