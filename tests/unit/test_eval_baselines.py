"""The LoRA and GRACE baselines edit tiny models the way their papers describe."""

import pytest
import torch

from melo_eval import lm
from melo_eval.baselines.grace import GraceCodebook
from melo_eval.baselines.lora import SequentialLora
from melo_eval.datasets import EditCase
from melo_runtime.tiny import tiny_model

EDITS = [EditCase("a", "Q: capital of France? A:", " Paris"), EditCase("b", "Q: who wrote Hamlet? A:", " Shakespeare")]


def _prompts_targets(cases):
    return [c.prompt for c in cases], [c.target for c in cases]


def test_encode_pairs_labels_only_target_tokens_and_eos_and_marks_the_last_prompt_token():
    _, tokenizer = tiny_model("llama")
    batch = lm.encode_pairs(tokenizer, ["ab", "abcd"], [" x", " yz"])
    assert batch.key_positions.tolist() == [1, 3]
    # Target tokens plus EOS are labelled; nothing else is.
    assert (batch.labels[0] != -100).sum() == 3 and (batch.labels[1] != -100).sum() == 4
    assert batch.labels[0, 4] == tokenizer.eos_token_id
    assert batch.attention_mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]


def test_sequential_lora_learns_a_batch_and_changes_unrelated_outputs_too():
    model, tokenizer = tiny_model("gpt2")  # Conv1D path
    lora = SequentialLora(model, tokenizer, "generate", ["transformer.h.4.mlp.c_proj", "transformer.h.5.mlp.c_proj"])
    prompts, targets = _prompts_targets(EDITS)
    before = sum(lora.score(prompts, targets))
    unrelated = ["Q: an unrelated question? A:"]
    base_logits = lora.pair_logits(lm.encode_pairs(tokenizer, unrelated, [" no"]))
    lora.apply_batch(EDITS)
    assert sum(lora.score(prompts, targets)) > before + 0.5
    # No routing: the single adapter is active for every input.
    assert not torch.equal(lora.pair_logits(lm.encode_pairs(tokenizer, unrelated, [" no"])), base_logits)


def test_grace_defers_only_inside_epsilon_and_leaves_far_inputs_bit_identical():
    model, tokenizer = tiny_model("llama")
    grace = GraceCodebook(model, tokenizer, "generate", "model.layers.3.mlp.down_proj", eps=1e-3, iterations=20)
    edit = EditCase("a", "Q: capital of France? A:", " Paris")
    far = lm.encode_pairs(tokenizer, ["Zzz zzz zzz zzz"], [" no"])
    base_far = grace.pair_logits(far)
    base_loss = float(grace.edit_loss([edit.prompt], [edit.target]))
    grace.apply_batch([edit])
    assert float(grace.edit_loss([edit.prompt], [edit.target])) < base_loss
    assert torch.equal(grace.pair_logits(far), base_far)
    assert grace.stats() == {"clusters": 1, "conflicts": 0, "forgotten": 0}


def test_grace_splits_radii_when_a_close_key_has_a_different_label():
    model, tokenizer = tiny_model("llama")
    grace = GraceCodebook(model, tokenizer, "generate", "model.layers.3.mlp.down_proj", eps=100.0, iterations=1)
    grace.apply_batch([EditCase("a", "Q: capital of France? A:", " Paris")])
    grace.apply_batch([EditCase("b", "Q: capital of Spain? A:", " Madrid")])
    distance = float(torch.dist(grace.keys[0], grace.keys[1]))
    assert grace.stats()["conflicts"] == 1
    assert grace.epsilons[1] == pytest.approx(distance / 2, rel=1e-4)
    assert grace.epsilons[0] == pytest.approx(distance / 2 - 1e-5, rel=1e-4)


def test_grace_expands_the_radius_for_a_close_key_with_the_same_label():
    model, tokenizer = tiny_model("llama")
    grace = GraceCodebook(model, tokenizer, "generate", "model.layers.3.mlp.down_proj", eps=100.0, iterations=1)
    grace.apply_batch([EditCase("a", "Q: capital of France? A:", " Paris")])
    grace.apply_batch([EditCase("b", "Q: France's capital? A:", " paris")])
    assert grace.stats() == {"clusters": 1, "conflicts": 0, "forgotten": 0}


def test_grace_eps_calibration_scales_with_the_spread_of_dev_keys():
    model, tokenizer = tiny_model("llama")
    grace = GraceCodebook(model, tokenizer, "generate", "model.layers.3.mlp.down_proj")
    prompts = ["Q: one? A:", "Zzz yyy", "The cat sat on", "1234 5678"]
    keys = torch.stack([grace._query(p, " x") for p in prompts])
    median = float(torch.cdist(keys, keys)[~torch.eye(4, dtype=torch.bool)].median())
    assert grace.calibrate_eps(prompts, fraction=0.5) == pytest.approx(median / 2)


def test_grace_edits_a_classifier_and_calibrates_eps_on_its_texts():
    model, tokenizer = tiny_model("bert", labels=["negative", "positive"])
    grace = GraceCodebook(model, tokenizer, "classify", "bert.encoder.layer.2.output.dense", iterations=30)
    assert grace.calibrate_eps(["A fine film", "Dull and long", "The plot is thin", "Loved it"]) > 0
    edit = EditCase("c", "The plot is thin", "positive")
    grace.apply_batch([edit])
    assert grace.classify([edit.prompt]) == ["positive"]
    assert grace.stats()["clusters"] == 1
