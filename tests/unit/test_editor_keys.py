"""MeloEditor.keys: the keys the vector database indexes and ``route`` searches, without editing."""

import pytest
import safetensors.numpy
import torch

from melo_runtime import Edit

PROMPT = "The capital of France is"


def test_keys_are_the_keys_the_editor_indexes_and_routes_by(make_editor):
    editor = make_editor("llama")
    editor.apply_batch([Edit("a", PROMPT, " Lyon")])
    (key,) = editor.keys([PROMPT])
    indexed = safetensors.numpy.load(editor.export_files()["keys/000000.safetensors"])["keys"]
    assert key.dtype == torch.float32 and key.device.type == "cpu"
    assert torch.equal(key, torch.from_numpy(indexed[0]))
    keys = editor.keys([PROMPT, "Unrelated text here"])
    assert keys.shape == (2, indexed.shape[1])
    assert [route.block if route else None for route in editor.route([PROMPT])] == [0]


def test_keys_of_no_prompts_is_empty_and_bad_input_is_refused(make_editor):
    editor = make_editor("gpt2")
    dim = editor.keys(["x"]).shape[1]
    assert editor.keys([]).shape == (0, dim)
    with pytest.raises(ValueError, match="prompts must be a list of strings"):
        editor.keys(PROMPT)
    with pytest.raises(ValueError, match=r"prompts\[1\] must be a string"):
        editor.keys([PROMPT, 3])
