"""Issue 16: whatever the batch size, every edit of a batch ends learned and is reproduced by greedy
generation, with each family's shipped preset (``preset_for``).

Tiny random models are a hard case for the trainer: their final norm and tiny output weights cap
the logits, so the loss floors near 4 nats and a target is won by argmax margins alone.
"""

import dataclasses

import pytest
import torch

from melo_runtime import MeloEditor
from melo_runtime.presets import preset_for
from melo_runtime.tiny import tiny_model, tiny_tokenizer
from melo_testkit.facts import new_facts


def tiny_qwen2():
    """A tiny seeded Qwen2 (Llama layout with q/k/v biases), built like melo_runtime.tiny's models.

    Its biases initialise to zero, so it computes exactly what a tiny Llama with the same weights does:
    it is another draw of random weights, the case where the trainer once fell short (7/10, 34/40)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = tiny_tokenizer()
    config = Qwen2Config(
        hidden_size=32, num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
        max_position_embeddings=512, tie_word_embeddings=False, vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
    return model.eval(), tokenizer


@pytest.mark.parametrize("size", [10, 40])
@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_every_edit_of_a_batch_is_learned_and_generated_with_the_shipped_preset(family, size):
    model, tokenizer = tiny_qwen2() if family == "qwen2" else tiny_model(family)
    # Tiny random models route similar prompts into one another's clusters; "split" keeps routing out
    # of this test (no edit is forgotten), which is about training.
    config = dataclasses.replace(preset_for(model), conflict_policy="split")
    editor = MeloEditor(model, tokenizer, config)
    edits = new_facts(size)

    result = editor.apply_batch(edits)

    assert result.forgotten == []
    assert result.not_learned == [], f"not learned: {result.not_learned} (losses {result.edit_losses})"
    assert all(result.learned.values())
    generated = editor.generate([edit.prompt for edit in edits], max_new_tokens=8)
    assert generated == [edit.target for edit in edits]
    assert result.blocks_added <= size  # a retried edit costs one block, never more
