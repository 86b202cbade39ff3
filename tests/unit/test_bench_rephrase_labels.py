"""bench.rephrase_labels: per-label scores of a details.jsonl, counted exactly."""

import json

from bench import rephrase_labels


def _record(prompt, rephrase, em, edit_block, rephrase_block):
    miss = None if em else ("block" if rephrase_block is not None and rephrase_block == edit_block else "routing")
    return {"prompt": prompt, "rephrase": rephrase, "em": em, "edit_block": edit_block,
            "rephrase_block": rephrase_block, "miss": miss}


def test_scores_split_by_label_and_by_where_the_miss_happened(tmp_path):
    labels = [{"prompt": "p1", "rephrase": "r1", "label": "same"}, {"prompt": "p2", "rephrase": "r2", "label": "same"},
              {"prompt": "p3", "rephrase": "r3", "label": "same"}, {"prompt": "p4", "rephrase": "r4", "label": "other"}]
    details = [_record("p1", "r1", True, 0, 0), _record("p2", "r2", False, 0, 0), _record("p3", "r3", False, 1, None),
               _record("p4", "r4", True, 2, 2), _record("p9", "r9", True, 3, 3)]
    scores = rephrase_labels.score(details, labels)
    assert scores["same"] == {"n": 3, "em": 1 / 3, "routed": 2 / 3, "em_given_routed": 0.5,
                              "miss_routing": 1, "miss_block": 1}
    assert scores["other"]["n"] == 1 and scores["other"]["em"] == 1.0
    path = tmp_path / "details.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in details))
    labels_path = tmp_path / "labels.jsonl"
    labels_path.write_text("\n".join(json.dumps(label) for label in labels))
    assert rephrase_labels.main([str(path), "--labels", str(labels_path)]) == 0


def test_shipped_labels_cover_300_counterfact_edits():
    rows = rephrase_labels.read_jsonl(rephrase_labels.LABELS)
    assert len(rows) == 300 and len({r["case_id"] for r in rows}) == 300  # the file's first 300 records
    assert {r["label"] for r in rows} <= set(rephrase_labels.KINDS)


def test_a_missing_details_file_is_a_clear_message_and_exit_2(tmp_path, capsys):
    assert rephrase_labels.main([str(tmp_path / "nope.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().out
