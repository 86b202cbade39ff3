"""The editing methods the quality harness compares, behind one small surface.

Every method takes edit batches and answers ``score`` / ``generate`` / ``classify`` /
``perplexity`` / ``stats``. ``melo`` is our editor (melo_runtime.MeloEditor); ``melo-paper`` is the
same algorithm run as published: 50 iterations every batch (no early stop) with the full forward
pass recomputed on every iteration (no prefix cache); ``lora`` and ``grace`` are
the baselines in melo_eval/baselines/.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

from torch import nn

from melo_eval.datasets import EditCase

METHODS = ("melo", "melo-paper", "lora", "grace")


class EditMethod(Protocol):
    """What the harness needs from an editor."""

    name: str

    def apply_batch(self, cases: Sequence[EditCase]) -> dict[str, float]: ...
    def score(self, prompts: Sequence[str], targets: Sequence[str]) -> list[float]: ...
    def generate(self, prompts: Sequence[str], max_new_tokens: int = 16) -> list[str]: ...
    def classify(self, texts: Sequence[str]) -> list[str]: ...
    def stats(self) -> dict[str, int]: ...


class MeloMethod:
    """melo_runtime.MeloEditor seen through the harness surface."""

    def __init__(self, name: str, model: nn.Module, tokenizer, config, cache_prefix: bool = True):
        from melo_runtime import MeloEditor  # imported late: the runtime is optional for dataset work

        self.name = name
        self.config = config
        self.cache_prefix = cache_prefix
        self.editor = MeloEditor(model, tokenizer, config)

    def apply_batch(self, cases: Sequence[EditCase]) -> dict[str, float]:
        """One micro-batch = one new block."""
        from melo_runtime import Edit

        result = self.editor.apply_batch(
            [Edit(c.edit_id, c.prompt, c.target, subject=c.subject) for c in cases], cache_prefix=self.cache_prefix
        )
        return {
            "iterations": result.iterations_run,
            "final_loss": result.final_loss,
            "learned": sum(result.learned.values()) / max(1, len(result.learned)),
            "not_learned": len(result.not_learned),
        }

    def score(self, prompts: Sequence[str], targets: Sequence[str]) -> list[float]:
        """Teacher-forced token accuracy, routed per row."""
        return self.editor.score(list(prompts), list(targets))

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 16) -> list[str]:
        """Greedy generation, routed once from the prompt."""
        return self.editor.generate(list(prompts), max_new_tokens=max_new_tokens)

    def chat(self, questions: Sequence[str], max_new_tokens: int = 16) -> list[str]:
        """Each question asked as the user message of the model's chat template (greedy), routed
        on the question."""
        return self.editor.generate([[{"role": "user", "content": q}] for q in questions], max_new_tokens=max_new_tokens)

    def classify(self, texts: Sequence[str]) -> list[str]:
        """Predicted labels, routed per row."""
        return self.editor.classify(list(texts))

    def routed(self, texts: Sequence[str]) -> list[bool]:
        """Per text: whether it is routed to an edit's block (else the base model answers it)."""
        return [block is not None for block in self.blocks_of(texts)]

    def blocks_of(self, texts: Sequence[str]) -> list[int | None]:
        """Per text: the block it is routed to (None: the base model answers it)."""
        return [None if route is None else route.block for route in self.editor.route(list(texts))]

    def perplexity(self, prompts: Sequence[str], targets: Sequence[str]) -> list[float]:
        """Target perplexity, routed per row."""
        return self.editor.perplexity(list(prompts), list(targets))

    def stats(self) -> dict[str, int]:
        """Clusters, conflicts and forgotten edits (the paper's Figure 3 quantities)."""
        stats = self.editor.stats()
        return {
            "clusters": int(stats.get("clusters", 0)),
            "conflicts": int(stats.get("conflicts_total", 0)),
            "forgotten": int(stats.get("forgotten_total", 0)),
            "blocks": int(stats.get("blocks", 0)),
        }


def paper_config(config):
    """MELO's official training schedule: Adam 1e-2, StepLR(20, 0.5), 50 iterations, no early stop."""
    return replace(config, early_stop=False, iterations=50, lr=1e-2, lr_step=20, lr_gamma=0.5)
