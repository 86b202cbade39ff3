"""Save -> load gives a bit-identical editor; retract falls back to the base model."""

import json

import pytest
import safetensors.numpy
import torch

from melo_runtime import Edit, MeloConfig, MeloEditor
from melo_runtime.tiny import tiny_model

FACTS = [("The capital of France is", " Lyon"), ("Who wrote Hamlet?", " Marlowe")]
PROMPTS = [FACTS[0][0], FACTS[1][0], "Unrelated text here"]


def _edited(make_editor, family="gpt2", **overrides):
    editor = make_editor(family, learnable=True, **overrides)
    editor.apply_batch([Edit("a", *FACTS[0])])
    editor.apply_batch([Edit("b", *FACTS[1])])
    return editor


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_a_saved_and_loaded_editor_gives_bit_identical_outputs(make_editor, tmp_path, family):
    editor = _edited(make_editor, family)
    editor.save(tmp_path)
    model, tokenizer = tiny_model(family)
    loaded = MeloEditor.load(tmp_path, model, tokenizer)
    targets = [" Lyon", " Marlowe", " x"]
    assert torch.equal(loaded.teacher_forced_logits(PROMPTS, targets), editor.teacher_forced_logits(PROMPTS, targets))
    assert loaded.generate(PROMPTS, max_new_tokens=8) == editor.generate(PROMPTS, max_new_tokens=8)
    assert loaded.route(PROMPTS) == editor.route(PROMPTS)
    assert loaded.stats() == editor.stats() and loaded.edit_ids() == editor.edit_ids()
    assert loaded.config == editor.config
    assert loaded.export_files() == editor.export_files()


def test_files_are_safetensors_and_json_with_one_file_per_block(make_editor):
    files = _edited(make_editor).export_files()
    assert sorted(files) == [
        "blocks/000000.safetensors", "blocks/000001.safetensors", "config.json", "index.json",
        "keys/000000.safetensors", "keys/000001.safetensors", "scope.json",
    ]
    for name, data in files.items():
        if name.endswith(".json"):
            json.loads(data)
        else:
            assert safetensors.numpy.load(data)  # parses as safetensors: no pickle anywhere


def test_unchanged_blocks_are_byte_identical_in_later_exports(make_editor):
    editor = _edited(make_editor)
    before = editor.export_files()
    editor.apply_batch([Edit("c", "Mount Everest is in", " Nepal")])
    after = editor.export_files()
    assert after["blocks/000000.safetensors"] == before["blocks/000000.safetensors"]
    assert after["blocks/000001.safetensors"] == before["blocks/000001.safetensors"]
    assert "blocks/000002.safetensors" in after and after["index.json"] != before["index.json"]


def test_a_new_version_adds_only_its_batch_keys_and_leaves_earlier_files_byte_identical(make_editor):
    editor = _edited(make_editor)
    before = editor.export_files()
    editor.apply_batch([Edit("c", "Mount Everest is in", " Nepal", rephrases=("Everest lies in",))])
    editor.retract("a")  # drops references to keys, never rows: segments stay as written
    after = editor.export_files()
    changed = {name for name in after if before.get(name) != after[name]}
    # scope.json lists the subjects known so far: it changes with a batch that names a new one.
    assert changed == {"index.json", "scope.json", "blocks/000002.safetensors", "keys/000002.safetensors"}
    new_keys = safetensors.numpy.load(after["keys/000002.safetensors"])["keys"]
    # The prompt and its rephrase, in order.
    assert new_keys.shape == (2, json.loads(after["index.json"])["db"]["dim"])


def test_loaded_editor_routes_and_continues_identically_when_routing_uses_the_hnsw_graph(make_editor):
    files = _edited(make_editor).export_files()
    # Force the graph path (normally only above 4096 clusters) through the persisted state.
    index = json.loads(files["index.json"])
    index["db"]["exact_search_max_clusters"] = 0
    files["index.json"] = json.dumps(index).encode()
    model, tokenizer = tiny_model("gpt2")
    live = MeloEditor.from_files(files, model, tokenizer)
    live.apply_batch([Edit("c", "Mount Everest is in", " Nepal"), Edit("d", "The sky is", " green")])
    exported = live.export_files()
    assert "graph/base.safetensors" in exported and any(n.startswith("graph/0") for n in exported)
    loaded = MeloEditor.from_files(exported, model, tokenizer)
    prompts = [*PROMPTS, "Mount Everest is in", "The sky is"]
    assert loaded.route(prompts) == live.route(prompts)
    assert loaded.generate(prompts, max_new_tokens=4) == live.generate(prompts, max_new_tokens=4)
    # Both go on identically: the replayed graph is the live graph, level generator included.
    for editor in (live, loaded):
        editor.apply_batch([Edit("e", "Water boils at", " 50 degrees")])
    assert loaded.export_files() == live.export_files()


def test_a_snapshot_of_the_previous_format_is_refused_with_what_to_do(make_editor):
    files = _edited(make_editor).export_files()
    index = json.loads(files["index.json"])
    index["format"] = "melo.editor/1"
    files["index.json"] = json.dumps(index).encode()
    model, tokenizer = tiny_model("gpt2")
    with pytest.raises(ValueError, match="melo.editor/1.*re-apply the edits"):
        MeloEditor.from_files(files, model, tokenizer)


def test_a_key_segment_from_another_snapshot_is_refused(make_editor):
    files = _edited(make_editor).export_files()
    files["keys/000000.safetensors"] = files["keys/000001.safetensors"]
    model, tokenizer = tiny_model("gpt2")
    with pytest.raises(ValueError, match="keys/000000"):
        MeloEditor.from_files(files, model, tokenizer)


def test_a_loaded_editor_keeps_editing_from_the_next_block(make_editor, tmp_path):
    editor = _edited(make_editor)
    model, tokenizer = tiny_model("gpt2")
    loaded = MeloEditor.from_files(editor.export_files(), model, tokenizer)
    result = loaded.apply_batch([Edit("c", "Mount Everest is in", " Nepal")])
    assert result.block_id == 2 and loaded.generate([FACTS[0][0]], max_new_tokens=8) == [" Lyon"]


def test_retract_makes_the_edit_fall_back_to_the_base_output(make_editor):
    editor = _edited(make_editor)
    model, tokenizer = tiny_model("gpt2")
    base = MeloEditor(model, tokenizer, editor.config)  # same model weights, no edits
    assert editor.retract("a") is True
    assert editor.retract("a") is False and editor.retract("never-applied") is False
    assert editor.route([FACTS[0][0]]) == [None]
    assert torch.equal(
        editor.teacher_forced_logits([FACTS[0][0]], [" Lyon"]), base.teacher_forced_logits([FACTS[0][0]], [" Lyon"])
    )
    assert editor.generate([FACTS[1][0]], max_new_tokens=8) == [" Marlowe"]  # the other edit stays
    assert editor.edit_ids() == {"b"} and editor.stats()["retracted_total"] == 1


def test_loading_files_for_another_model_is_refused(make_editor):
    files = _edited(make_editor).export_files()
    model, tokenizer = tiny_model("llama")
    with pytest.raises(ValueError, match="target_modules|not a module"):
        MeloEditor.from_files(files, model, tokenizer)


def test_missing_block_file_is_named(make_editor):
    files = _edited(make_editor).export_files()
    del files["blocks/000001.safetensors"]
    model, tokenizer = tiny_model("gpt2")
    with pytest.raises(ValueError, match="blocks/000001.safetensors"):
        MeloEditor.from_files(files, model, tokenizer)


def _without_conflict_policy(files: dict[str, bytes]) -> dict[str, bytes]:
    """The files as a runtime from before the conflict policy existed wrote them."""
    config, index = json.loads(files["config.json"]), json.loads(files["index.json"])
    del config["conflict_policy"], index["db"]["conflict_policy"]
    return {**files, "config.json": json.dumps(config).encode(), "index.json": json.dumps(index).encode()}


def test_the_conflict_policy_round_trips_through_the_config_and_snapshots(make_editor):
    editor = make_editor("gpt2", conflict_policy="split")
    assert MeloConfig.from_dict(json.loads(json.dumps(editor.config.to_dict()))) == editor.config
    editor.apply_batch([Edit("a", *FACTS[0])])
    files = editor.export_files()
    assert json.loads(files["config.json"])["conflict_policy"] == "split"
    assert json.loads(files["index.json"])["db"]["conflict_policy"] == "split"
    model, tokenizer = tiny_model("gpt2")
    loaded = MeloEditor.from_files(files, model, tokenizer)
    assert loaded.config.conflict_policy == "split" and loaded.export_files() == files
    with pytest.raises(ValueError, match="conflict_policy"):
        MeloConfig.from_dict({**editor.config.to_dict(), "conflict_policy": "keep"})


def test_a_snapshot_from_before_the_conflict_policy_loads_as_forget(make_editor):
    files = _edited(make_editor, conflict_policy="forget").export_files()
    model, tokenizer = tiny_model("gpt2")
    loaded = MeloEditor.from_files(_without_conflict_policy(files), model, tokenizer)
    assert loaded.config.conflict_policy == "forget"
    assert loaded.export_files() == files  # what this runtime writes for the same editor


def test_a_config_and_vector_db_with_different_conflict_policies_are_refused(make_editor):
    files = _edited(make_editor, conflict_policy="forget").export_files()
    config = json.loads(files["config.json"])
    files["config.json"] = json.dumps({**config, "conflict_policy": "split"}).encode()
    model, tokenizer = tiny_model("gpt2")
    with pytest.raises(ValueError, match="conflict_policy 'forget' but config.json says 'split'"):
        MeloEditor.from_files(files, model, tokenizer)
