"""The label-shift example: shipped data -> valid classify edit events -> a fine-tuned classifier learns them."""

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from melo_runtime import Edit, MeloEditor
from melo_runtime.backbones import load_backbone
from melo_runtime.presets import derive_preset
from schemas import Limits, parse_edit
from tests.checkpoints import save_checkpoint

ROOT = Path(__file__).resolve().parents[2]
# The shared data folder sits beside the checkout (../shared/data), or beside a worktree's parent.
DATA = next((p for p in (ROOT.parent / "shared" / "data", ROOT.parents[1] / "shared" / "data")
             if (p / "label-shift").is_dir()), ROOT.parent / "shared" / "data")


def _example():
    spec = importlib.util.spec_from_file_location("label_shift_example", ROOT / "examples" / "label_shift.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dataset", ["huffpost", "scotus"])
def test_converter_turns_the_edit_pool_into_valid_classify_events_in_date_order(dataset):
    events = _example().edit_events(dataset, DATA, 30, "ls-model", 1000)
    parsed = [parse_edit(json.dumps(e).encode(), Limits()) for e in events]
    assert len(parsed) == 30 and all(e.task == "classify" for e in parsed)
    labels = json.loads((DATA / "label-shift" / _example().DATASETS[dataset] / "labels.json").read_text())["labels"]
    assert {e["target"] for e in events} <= set(labels)
    assert [e["created_at"] for e in events] == sorted(e["created_at"] for e in events)
    assert len({e["edit_id"] for e in events}) == 30


def test_shipped_spool_matches_the_converter():
    shipped = (ROOT / "examples" / "stream-classify" / "melo.edits" / "huffpost-200.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in shipped] == _example().edit_events("huffpost", DATA, 200, "huffpost-demo", 1000)


def test_a_fine_tuned_classifier_directory_learns_converted_label_edits(tmp_path):
    labels = json.loads((DATA / "label-shift" / "huffpost-2018-2022" / "labels.json").read_text())["labels"]
    checkpoint = save_checkpoint("bert", tmp_path / "clf")
    model, tokenizer = load_backbone(checkpoint, labels=labels, dtype="bfloat16")
    config = dataclasses.replace(derive_preset(model).config, lr=0.05, iterations=150, rank_per_block=4)
    editor = MeloEditor(model, tokenizer, config)
    events = _example().edit_events("huffpost", DATA, 3, "m", 200)
    result = editor.apply_batch([Edit(edit_id=e["edit_id"], prompt=e["prompt"], target=e["target"]) for e in events])
    assert all(result.learned.values())
    assert editor.classify([e["prompt"] for e in events]) == [e["target"] for e in events]
