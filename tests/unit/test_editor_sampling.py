"""MeloEditor.generate's sampling keywords (issue 14): greedy stays the default, a seed reproduces a sample."""

from __future__ import annotations

import pytest

from melo_runtime import MeloEditor
from melo_runtime.backbones import load_backbone
from melo_runtime.presets import preset_for

PROMPTS = ["The sky is", "Numbers like 7 and"]


@pytest.fixture(scope="module")
def editor() -> MeloEditor:
    model, tokenizer = load_backbone("tiny-gpt2")
    return MeloEditor(model, tokenizer, preset_for(model, "generate"))


def test_temperature_zero_is_the_greedy_default(editor):
    greedy = editor.generate(PROMPTS, max_new_tokens=8)
    assert editor.generate(PROMPTS, max_new_tokens=8, temperature=0.0, top_p=0.5, seed=3) == greedy


def test_a_seed_reproduces_a_sample_and_different_seeds_differ(editor):
    first = editor.generate(PROMPTS, max_new_tokens=12, temperature=1.5, seed=11)
    assert editor.generate(PROMPTS, max_new_tokens=12, temperature=1.5, seed=11) == first
    others = {tuple(editor.generate(PROMPTS, max_new_tokens=12, temperature=1.5, seed=s)) for s in range(5)}
    assert len(others) > 1


@pytest.mark.parametrize(("temperature", "top_p"), [(-0.1, 1.0), (1.0, 0.0), (1.0, 1.5)])
def test_out_of_range_sampling_parameters_are_refused(editor, temperature, top_p):
    with pytest.raises(ValueError, match="temperature"):
        editor.generate(PROMPTS, temperature=temperature, top_p=top_p)
