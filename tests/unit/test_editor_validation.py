"""Bad input is refused with a ValueError naming the field, before anything changes."""

import pytest

from melo_runtime import Edit, MeloConfig
from melo_runtime.presets import preset_for

GOOD = Edit("ok", "The capital of France is", " Lyon")


def _unchanged(editor, before_files):
    assert editor.export_files() == before_files
    assert editor.blocks == 1


@pytest.fixture
def editor(make_editor):
    editor = make_editor("gpt2", max_prompt_chars=60, max_target_chars=20, max_rephrases=2, max_length_tokens=40)
    editor.apply_batch([GOOD])
    return editor


@pytest.mark.parametrize(
    ("edits", "field"),
    [
        ([], "empty batch"),
        ([Edit("x", "   ", " a")], r"edits\[0\].prompt is empty"),
        ([Edit("x", "Hello", "")], r"edits\[0\].target is empty"),
        ([Edit("", "Hello", " a")], r"edits\[0\].edit_id"),
        ([Edit("x", "H" * 61, " a")], r"edits\[0\].prompt has 61 characters"),
        ([Edit("x", "Hello", "a" * 21)], r"edits\[0\].target has 21 characters"),
        ([Edit("x", "Hello", " a", rephrases=("a", "b", "c"))], r"edits\[0\].rephrases has 3"),
        ([Edit("x", "Hello", " a", rephrases=("",))], r"edits\[0\].rephrases\[0\] is empty"),
        ([Edit("x", "H" * 30, "a" * 15)], r"edits\[0\].prompt is 30 tokens long \(46 with the target\)"),
        ([Edit("x", "Hi", " a"), Edit("x", "Yo", " b")], r"edits\[1\].edit_id='x' appears twice"),
        ([Edit("ok", "Hi", " a")], r"edits\[0\].edit_id='ok' is already applied"),
        ([Edit("y", "Hi", " a"), "not an edit"], r"edits\[1\] must be an Edit"),
    ],
)
def test_bad_batches_are_refused_naming_the_field_and_change_nothing(editor, edits, field):
    before = editor.export_files()
    with pytest.raises(ValueError, match=field):
        editor.apply_batch(edits)
    _unchanged(editor, before)


def test_unknown_label_for_a_classifier_is_refused(make_editor):
    editor = make_editor("bert")
    with pytest.raises(ValueError, match=r"edits\[0\].target='neutral' is not a label.*negative.*positive"):
        editor.apply_batch([Edit("x", "Fine film", "neutral")])
    assert editor.blocks == 0 and editor.stats()["keys"] == 0
    with pytest.raises(ValueError, match="not labels of this classifier"):
        editor.score(["Fine film"], ["neutral"])


def test_a_failure_during_training_leaves_no_block_and_no_keys(editor, monkeypatch):
    before = editor.export_files()

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr("melo_runtime.editor.train_block", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        editor.apply_batch([Edit("new", "Who wrote Hamlet?", " Marlowe")])
    _unchanged(editor, before)
    assert editor.edit_ids() == {"ok"}


def test_serving_calls_reject_non_string_inputs(editor):
    with pytest.raises(ValueError, match="prompts must be a list"):
        editor.generate("a single string")
    with pytest.raises(ValueError, match=r"prompts\[1\] must be a string"):
        editor.route(["fine", 3])
    with pytest.raises(ValueError, match="targets has 1"):
        editor.score(["a", "b"], ["x"])


def test_config_fields_are_validated_by_name():
    with pytest.raises(ValueError, match="rank_per_block=0"):
        MeloConfig(task="generate", key_module="k", target_modules=["t"], rank_per_block=0, r_init=1.0, edits_per_block=1)
    with pytest.raises(ValueError, match="task='summarize'"):
        MeloConfig(task="summarize", key_module="k", target_modules=["t"], rank_per_block=1, r_init=1.0, edits_per_block=1)
    with pytest.raises(ValueError, match="no field"):
        MeloConfig.from_dict({"task": "generate", "bogus": 1})


def test_config_round_trips_through_a_dict(make_editor):
    config = make_editor("t5").config
    assert MeloConfig.from_dict(config.to_dict()) == config


def test_a_key_module_above_a_lora_layer_is_refused(make_editor):
    from melo_runtime import MeloEditor
    from melo_runtime.tiny import tiny_model

    model, tokenizer = tiny_model("gpt2")
    config = preset_for(model)
    config.key_module = "transformer.h.5.mlp.c_proj"
    with pytest.raises(ValueError, match="runs before key_module"):
        MeloEditor(model, tokenizer, config)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_serving_an_input_longer_than_the_position_table_is_a_clear_error(make_editor, family):
    editor = make_editor(family, max_prompt_chars=2000)
    text = "word " * 120  # 600 characters = 600+ tokens for the tiny char tokenizer; the table holds 512
    call = editor.classify if family == "bert" else editor.generate
    with pytest.raises(ValueError, match=r"reads at most 512 \(max_position_embeddings\)"):
        call(["short", text])
