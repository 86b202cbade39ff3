"""bench/perf_serving.py on tiny-gpt2: the real server process under a bounded load generator."""

from __future__ import annotations

import argparse

import pytest

from bench.perf_common import zsre_edits
from bench.perf_serving import BASE_MODEL, EDITED_MODEL, parse_args, publish_snapshots, render, run_load, serve, summarize


@pytest.fixture
def snapshots(tmp_path) -> tuple[argparse.Namespace, list]:
    args = parse_args(["--backbone", "tiny-gpt2", "--edits", "4", "--iterations", "1", "--requests", "6",
                       "--concurrency", "2", "--max-new-tokens", "2", "--server-threads", "1"])
    edits = zsre_edits(args.edits)
    info = publish_snapshots(tmp_path, args, edits)
    assert info["edits"] == 4 and info["blocks"] == 1
    return args, edits


def test_load_generator_sends_exactly_the_requested_count_and_sees_edited_prompts_routed(tmp_path, snapshots):
    args, edits = snapshots
    prompts = [e.prompt for e in edits]
    with serve(tmp_path, EDITED_MODEL, args.backbone, args.server_threads, tmp_path) as server:
        result = run_load(server.url, prompts, requests=6, concurrency=2, max_new_tokens=2, time_cap_s=60)
    assert server.process.poll() is not None  # stopped on leaving the block
    assert result.errors == [] and len(result.latencies_s) == 6 and not result.stopped_by_time_cap
    row = summarize("edited-hit", EDITED_MODEL, result, args)
    assert row["routed_fraction"] == 1.0 and row["requests_per_s"] > 0 and row["mean_output_chars"] >= 0
    assert "| edited-hit | 6 / 0 |" in render({
        "backbone": "tiny-gpt2", "max_new_tokens": 2, "concurrency": 2, "requests": 6, "warmup": 0, "time_cap_s": 60,
        "server_threads": 1, "edited_snapshot": {"edits": 4, "blocks": 1, "clusters": 4, "edits_learned": 0},
        "scenarios": [row],
    })


def test_time_cap_stops_the_load_early_and_base_snapshot_routes_nothing(tmp_path, snapshots):
    args, edits = snapshots
    with serve(tmp_path, BASE_MODEL, args.backbone, args.server_threads, tmp_path) as server:
        result = run_load(server.url, [e.prompt for e in edits], requests=10**6, concurrency=1, max_new_tokens=2,
                          time_cap_s=1.0)
    assert result.stopped_by_time_cap and 0 < len(result.latencies_s) < 10**6
    assert result.routed == 0
