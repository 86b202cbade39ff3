"""Unit tests run on tiny models with one CPU thread, offline."""

import dataclasses
import os

import pytest
import torch
from melo_runtime.presets import preset_for

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The test machine's cores are shared; one thread also keeps float results reproducible.
torch.set_num_threads(1)

# Tiny random models have near-uniform logits, so an official step (lr 1e-2) barely moves them;
# tests that need edits learned take larger steps on one or two edits per block.
LEARNABLE = {"lr": 0.05, "iterations": 80, "rank_per_block": 4}


@pytest.fixture
def make_editor():
    """Build an editor over a fresh tiny model: ``make_editor(family, learnable=False, key_source=None, **overrides)``.

    ``key_source=None`` takes the family's preset (scope keys for generation, hidden for classifiers).
    """
    from melo_runtime import MeloEditor
    from melo_runtime.tiny import tiny_model

    def build(family: str, *, learnable: bool = False, key_source: str | None = None, **overrides):
        model, tokenizer = tiny_model(family)
        changes = {**(LEARNABLE if learnable else {}), **overrides}
        config = dataclasses.replace(preset_for(model, key_source=key_source), **changes)
        return MeloEditor(model, tokenizer, config)

    return build
