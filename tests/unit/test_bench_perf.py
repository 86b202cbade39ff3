"""perf_train and perf_routing run end to end on a tiny model and report what they promise."""

import json

from bench import perf_routing, perf_train, perf_train_step
from melo_runtime.presets import preset_for
from melo_runtime.tiny import tiny_model


def test_perf_train_times_naive_before_and_ours_per_batch_size(tmp_path):
    perf_train.main(["--backbone", "tiny-llama", "--sizes", "1,2", "--iterations", "5", "--threads", "1",
                     "--out", str(tmp_path)])
    report = json.loads((tmp_path / "perf_train.json").read_text())
    assert [r["batch"] for r in report["rows"]] == [1, 2]
    for row in report["rows"]:
        assert row["naive"]["iterations"] == 5  # the naive loop never stops early
        assert row["before"]["iterations"] <= 5
        assert 0 <= row["ours"]["learned"] <= 1 and row["ours"]["blocks"] >= 1
        assert row["ours"]["speedup_vs_naive"] > 0 and row["ours"]["speedup_vs_before"] > 0
        assert row["columns"]["blocks"] >= 1 and row["ours"]["speedup_vs_columns"] > 0
    assert "| batch |" in (tmp_path / "perf_train.md").read_text()


def test_perf_train_trains_on_new_one_word_facts_on_request(tmp_path):
    perf_train.main(["--backbone", "tiny-gpt2", "--sizes", "2", "--facts", "words", "--threads", "1",
                     "--out", str(tmp_path)])
    report = json.loads((tmp_path / "perf_train.json").read_text())
    assert report["facts"] == "words"
    assert report["rows"][0]["ours"]["learned"] == 1.0  # the tiny model learns these, unlike zsRE's answers


def test_perf_train_step_times_both_projections_per_round(tmp_path):
    perf_train_step.main(["--backbone", "tiny-llama", "--batch", "2", "--steps", "2", "--rounds", "2",
                          "--threads", "1", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "perf_train_step.json").read_text())
    assert set(report["seconds_per_step"]) == {"columns", "scored"}
    assert all(len(values) == 2 for values in report["seconds_per_step"].values())
    rows, columns = report["shape"]
    assert rows == 2 and 0 < report["scored_tokens"] < rows * columns
    assert "seconds per step" in (tmp_path / "perf_train_step.md").read_text()


def test_perf_train_extrapolates_a_partly_timed_naive_loop_and_says_so(tmp_path):
    perf_train.main(["--backbone", "tiny-llama", "--sizes", "2", "--iterations", "6", "--naive-iterations", "2",
                     "--threads", "1", "--out", str(tmp_path)])
    naive = json.loads((tmp_path / "perf_train.json").read_text())["rows"][0]["naive"]
    assert naive["extrapolated"] and naive["measured_iterations"] == 2 and naive["iterations"] == 6
    assert naive["seconds"] == naive["measured_seconds"] * 3
    assert "extrapolated: 2 naive steps timed, scaled to 6" in (tmp_path / "perf_train.md").read_text()


def test_perf_routing_routes_every_timed_row_once_edits_are_indexed(tmp_path):
    # Tiny random models put every prompt's key close together: at the preset radius the newest of two
    # crowded prompt keys supersedes the other, so a smaller radius keeps each prompt its own cluster.
    perf_routing.main(["--backbone", "tiny-llama", "--edits", "0,40", "--batch", "4", "--repeats", "2",
                       "--threads", "1", "--r-init-scale", "0.5", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "perf_routing.json").read_text())["rows"]
    assert rows[0]["rows_routed"] == 0 and rows[0]["clusters"] == 0
    assert rows[1]["rows_routed"] == 4 and rows[1]["clusters"] == 40
    per_block = preset_for(tiny_model("llama")[0]).edits_per_block  # 1 with the scope preset
    assert rows[1]["blocks"] == -(-40 // per_block)
    assert all(r["ratio"] > 0 for r in rows)
