"""Edits on every family are learned and reproduced by generate / classify; rephrases route too."""

import pytest

from melo_runtime import Edit

FACTS = [("The capital of France is", " Lyon"), ("Who wrote Hamlet?", " Marlowe")]


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_generation_edits_are_learned_and_generated(make_editor, family):
    # The prompt rows alone: chat-form rows are covered in test_scope.py.
    editor = make_editor(family, learnable=True, train_chat_form=False)
    for i, (prompt, target) in enumerate(FACTS):
        result = editor.apply_batch([Edit(f"e{i}", prompt, target)])
        assert result.learned == {f"e{i}": True} and result.block_id == i
    prompts = [prompt for prompt, _ in FACTS]
    assert editor.generate(prompts, max_new_tokens=12) == [target for _, target in FACTS]
    assert editor.score(prompts, [target for _, target in FACTS]) == [1.0, 1.0]
    assert editor.stats() == {
        "blocks": 2, "clusters": 2, "keys": 2, "edits": 2,
        "conflicts_total": 0, "forgotten_total": 0, "retracted_total": 0,
    }


def test_bert_classification_edit_flips_the_label_of_the_edited_text_only(make_editor):
    editor = make_editor("bert")
    text, other = "I loved this film", "The weather is mild today"
    before = editor.classify([text, other])
    new_label = "positive" if before[0] == "negative" else "negative"
    result = editor.apply_batch([Edit("e0", text, f"  {new_label} ")])  # labels compare normalized
    assert result.learned == {"e0": True}
    assert editor.classify([text, other]) == [new_label, before[1]]
    assert editor.score([text], [new_label]) == [1.0]


def test_rephrases_are_trained_and_indexed_with_their_edit(make_editor):
    editor = make_editor("llama", learnable=True)
    rephrase = "What is the capital of France?"
    result = editor.apply_batch([Edit("e0", FACTS[0][0], FACTS[0][1], rephrases=(rephrase,))])
    assert result.learned == {"e0": True}
    routes = editor.route([FACTS[0][0], rephrase])
    assert [r.block for r in routes] == [0, 0]
    assert editor.generate([rephrase], max_new_tokens=8) == [FACTS[0][1]]
    assert editor.stats()["keys"] == 2 and editor.stats()["edits"] == 1


def test_editor_works_with_the_preset_and_no_other_argument(make_editor):
    for family in ("bert", "gpt2", "llama", "t5"):
        editor = make_editor(family)
        target = "positive" if family == "bert" else " Lyon"
        result = editor.apply_batch([Edit("e0", FACTS[0][0], target)])
        assert result.block_id == 0 and result.iterations_run >= 1
        assert editor.route([FACTS[0][0]])[0].block == 0
