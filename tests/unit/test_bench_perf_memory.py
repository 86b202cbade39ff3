"""bench/perf_memory.py on tiny-gpt2: parameters follow the block formula, unchanged blobs are re-used."""

from __future__ import annotations

import json
import math

from bench.perf_memory import block_params, main, paper_layout_params, params_for_edits


def test_block_formula_counts_both_factors_of_every_layer():
    # A is p x d_in and B is d_out x p for each layer.
    assert block_params({"a": (10, 20), "b": (20, 10)}, rank=3) == 3 * 30 + 3 * 30
    assert params_for_edits(1000, 10, 100) == 10_000
    assert params_for_edits(1001, 10, 100) == 10_100  # a partial batch still takes a whole block


def test_paper_layout_formula_is_t5_small_wi_wo_with_two_ranks_and_100_edits_per_block():
    assert paper_layout_params(1000) == 10 * 2 * ((512 + 2048) + (2048 + 512))


def test_run_measures_block_params_and_reuses_unchanged_blobs(tmp_path):
    assert main(["--backbone", "tiny-gpt2", "--edits", "10", "--batch", "4", "--iterations", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "perf_memory.json").read_text())
    rows = report["versions"]
    assert [r["edits"] for r in rows] == [4, 8, 10]
    assert [r["blocks"] for r in rows] == [1, 2, 3]
    assert report["measured_block_params_total"] == 3 * report["params_per_block"]
    block = report["block_file_bytes"]
    for r in rows[1:]:
        # Only the new block, its key segment, the index and the scope's subject list are written;
        # older blocks and key segments and the config are re-used.
        assert r["new_blob_bytes"] == block + r["keys_file_bytes"] + r["index_file_bytes"] + r["scope_file_bytes"]
        assert r["graph_files_bytes"] == 0  # far below the exact-scan size: no HNSW graph
        assert r["version_bytes"] == (
            r["blocks"] * block + r["keys_files_total_bytes"] + r["index_file_bytes"] + r["config_file_bytes"]
            + r["scope_file_bytes"]
        )
    growth = {g["edits"]: g for g in report["growth"]}
    assert growth[10]["measured"] and not growth[10_000]["measured"]
    assert growth[10]["store_bytes_no_retention"] == sum(r["new_blob_bytes"] for r in rows)
    assert growth[10_000]["extra_params"] == math.ceil(10_000 / 4) * report["params_per_block"]
    assert "derived" in (tmp_path / "perf_memory.md").read_text()
