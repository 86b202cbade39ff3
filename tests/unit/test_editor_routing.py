"""Routing: edited inputs get their block, everything else is the base model bit for bit.

These tests exercise the paper's hidden-state key (key_source="hidden"), routed by the key hook
inside the forward pass; tests/unit/test_editor_scope.py covers the scope key.
"""

import threading

import pytest
import torch

from melo_runtime import Edit
from melo_runtime.routing import CallState, current_state, use_state
from melo_runtime.tiny import tiny_model

FACTS = [
    ("The capital of France is", " Lyon"),
    ("Who wrote Hamlet?", " Marlowe"),
    ("The CEO of Apple is", " Tim Cook"),
    ("Mount Everest is in", " Nepal"),
]
UNRELATED = ["Unrelated text here", "zebra quantum 42"]


def _logits(editor, prompts):
    """Routed logits of a plain forward over ``prompts`` (the first decoding step for LMs)."""
    batch = editor.encoder.prompts(prompts)
    inputs = dict(batch.inputs)
    if editor.encoder.encoder_decoder:
        inputs["decoder_input_ids"] = torch.zeros(len(prompts), 1, dtype=torch.long)
    with use_state(editor.serving_state(batch.key_mask)), torch.no_grad():
        return editor.model(**inputs).logits


def _base_logits(family, prompts, encoder):
    model, _ = tiny_model(family)
    batch = encoder.prompts(prompts)
    inputs = dict(batch.inputs)
    if encoder.encoder_decoder:
        inputs["decoder_input_ids"] = torch.zeros(len(prompts), 1, dtype=torch.long)
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_outputs_routed_to_block_one_are_bit_identical_after_training_block_two(make_editor, family):
    editor = make_editor(family, learnable=True, key_source="hidden")
    editor.apply_batch([Edit("a", *FACTS[0]), Edit("b", *FACTS[1])])
    first = [p for p, _ in FACTS[:2]]
    before_routes = [r.block for r in editor.route(first)]
    assert set(before_routes) <= set(range(editor.blocks))  # a retried edit may hold a block of its own
    before_logits = _logits(editor, first)
    before_text = editor.generate(first, max_new_tokens=6)
    editor.apply_batch([Edit("c", *FACTS[2]), Edit("d", *FACTS[3])])
    assert [r.block for r in editor.route(first)] == before_routes
    assert torch.equal(_logits(editor, first), before_logits)
    assert editor.generate(first, max_new_tokens=6) == before_text


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "t5"])
def test_out_of_scope_logits_are_bit_identical_to_the_unedited_model(make_editor, family):
    editor = make_editor(family, key_source="hidden")
    target = "positive" if family == "bert" else " Lyon"
    editor.apply_batch([Edit("a", FACTS[0][0], target)])
    assert editor.route(UNRELATED) == [None, None]
    edited = _logits(editor, UNRELATED + [FACTS[0][0]])
    base = _base_logits(family, UNRELATED + [FACTS[0][0]], editor.encoder)
    assert torch.equal(edited[:2], base[:2])
    assert not torch.equal(edited[2], base[2])  # the edited prompt does change


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_a_batch_mixing_blocks_equals_each_row_alone(make_editor, family):
    editor = make_editor(family, key_source="hidden")
    editor.apply_batch([Edit("a", *FACTS[0])])
    editor.apply_batch([Edit("b", *FACTS[1])])
    prompts = [FACTS[0][0], UNRELATED[0], FACTS[1][0]]
    assert [None if r is None else r.block for r in editor.route(prompts)] == [0, None, 1]
    together = _logits(editor, prompts)
    for row, prompt in enumerate(prompts):
        alone = _logits(editor, [prompt])
        # Left padding changes the sequence length, so compare the last position.
        assert torch.allclose(together[row, -1], alone[0, -1], rtol=0, atol=1e-5)
    scores_together = editor.score(prompts, [FACTS[0][1], " x", FACTS[1][1]])
    scores_alone = [editor.score([p], [t])[0] for p, t in zip(prompts, [FACTS[0][1], " x", FACTS[1][1]])]
    assert scores_together == scores_alone


def test_a_long_list_runs_in_passes_of_at_most_rows_per_pass_rows_with_each_row_answered_as_alone(
    make_editor, monkeypatch
):
    from melo_runtime import editor as editor_module

    editor = make_editor("gpt2", learnable=True)
    editor.apply_batch([Edit("a", *FACTS[0]), Edit("b", *FACTS[1])])
    prompts = [FACTS[0][0], UNRELATED[0], FACTS[1][0], UNRELATED[1], FACTS[0][0]]
    targets = [FACTS[0][1], " x", FACTS[1][1], " y", FACTS[0][1]]
    alone = {
        "score": [editor.score([p], [t])[0] for p, t in zip(prompts, targets)],
        "perplexity": [editor.perplexity([p], [t])[0] for p, t in zip(prompts, targets)],
        "generate": [editor.generate([p], max_new_tokens=4)[0] for p in prompts],
    }
    sizes: list[int] = []
    hook = editor.model.register_forward_pre_hook(lambda _m, args, kw: sizes.append(kw["input_ids"].shape[0]),
                                                  with_kwargs=True)
    monkeypatch.setattr(editor_module, "ROWS_PER_PASS", 2)
    try:
        assert editor.score(prompts, targets) == alone["score"]
        assert editor.perplexity(prompts, targets) == pytest.approx(alone["perplexity"], rel=1e-5)
        assert editor.generate(prompts, max_new_tokens=4) == alone["generate"]
    finally:
        hook.remove()
    assert sizes and max(sizes) == 2 and min(sizes) == 1  # 2 + 2 + 1 rows per call
    with pytest.raises(ValueError, match="targets"):  # mismatched lists still get the method's own error
        editor.score(prompts, targets[:3])


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_generation_routes_once_from_the_prompt_and_keeps_the_block_for_every_token(make_editor, family):
    editor = make_editor(family, key_source="hidden")
    editor.apply_batch([Edit("a", *FACTS[0])])
    searches = []
    real_search = editor.db.search
    editor.db.search = lambda queries: searches.append(len(queries)) or real_search(queries)
    seen_blocks = []
    layer = list(editor.attachment.layers.values())[-1]  # T5: a decoder layer, run at every step
    handle = layer.register_forward_pre_hook(lambda module, args: seen_blocks.append(current_state().blocks.tolist()))
    try:
        editor.generate([FACTS[0][0], UNRELATED[0]], max_new_tokens=5)
    finally:
        handle.remove()
    assert searches == [2]  # one search, for the two prompts, before the first token
    assert len(seen_blocks) >= 5  # the prompt pass and every decoding step saw the same blocks
    assert all(blocks == [0, -1] for blocks in seen_blocks)


def test_newest_target_wins_when_the_same_prompt_is_edited_again(make_editor):
    editor = make_editor("gpt2", learnable=True, key_source="hidden")
    prompt = FACTS[0][0]
    first = editor.apply_batch([Edit("old", prompt, " Lyon")])
    second = editor.apply_batch([Edit("new", prompt, " Nice")])
    assert first.learned == {"old": True} and second.learned == {"new": True}
    assert editor.route([prompt])[0].block == 1
    assert editor.generate([prompt], max_new_tokens=6) == [" Nice"]
    assert second.conflicts == 1 and second.forgotten == ["old"]
    assert editor.edit_ids() == {"new"}


def test_within_one_batch_the_later_edit_of_a_prompt_wins(make_editor):
    editor = make_editor("gpt2", learnable=True, key_source="hidden")
    result = editor.apply_batch([Edit("old", FACTS[0][0], " Lyon"), Edit("new", FACTS[0][0], " Nice")])
    assert result.forgotten == ["old"] and result.learned == {"old": False, "new": True}
    assert editor.generate([FACTS[0][0]], max_new_tokens=6) == [" Nice"]


def test_two_threads_generating_at_once_each_get_their_own_routing(make_editor):
    editor = make_editor("gpt2", learnable=True, key_source="hidden")
    editor.apply_batch([Edit("a", *FACTS[0])])
    editor.apply_batch([Edit("b", *FACTS[1])])
    edited, plain = [FACTS[0][0], FACTS[1][0]], [UNRELATED[0], UNRELATED[1]]
    expected = {0: editor.generate(edited, max_new_tokens=8), 1: editor.generate(plain, max_new_tokens=8)}
    assert expected[0] == [FACTS[0][1], FACTS[1][1]]
    results: dict[int, list[list[str]]] = {0: [], 1: []}
    start = threading.Barrier(2)

    def work(which: int, prompts: list[str]) -> None:
        start.wait()
        for _ in range(5):
            results[which].append(editor.generate(prompts, max_new_tokens=8))

    threads = [threading.Thread(target=work, args=(0, edited)), threading.Thread(target=work, args=(1, plain))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results[0] == [expected[0]] * 5 and results[1] == [expected[1]] * 5


def test_routing_state_does_not_leak_out_of_a_call(make_editor):
    editor = make_editor("llama", key_source="hidden")
    editor.apply_batch([Edit("a", *FACTS[0])])
    editor.generate([FACTS[0][0]], max_new_tokens=2)
    assert current_state() is None
    outer = CallState(key_module="x")
    with use_state(outer):
        editor.generate([FACTS[0][0]], max_new_tokens=1)
        assert current_state() is outer


def test_a_second_editor_on_a_serving_model_runs_no_probe_forward(make_editor):
    """Each snapshot version gets its own editor over the shared model; attaching again must not run
    a probe forward whose temporary hooks would see other threads' requests."""
    from melo_runtime import MeloEditor

    first = make_editor("gpt2", key_source="hidden")
    forwards = []
    handle = first.model.register_forward_pre_hook(lambda module, inputs: forwards.append(1))
    try:
        second = MeloEditor(first.model, first.tokenizer, first.config)
    finally:
        handle.remove()
    assert forwards == []
    assert second.generate(["hello"], max_new_tokens=3) == first.generate(["hello"], max_new_tokens=3)
