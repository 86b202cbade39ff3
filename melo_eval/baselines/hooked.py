"""Shared measurement side of the baselines: a frozen HF model edited through forward hooks.

A baseline subclass decides *how* the model is changed (one LoRA, a GRACE codebook, ...) by
registering hooks and implementing ``apply_batch``; this class gives it the same ``score`` /
``generate`` / ``classify`` / ``perplexity`` surface the MELO editor has, so the harness treats
every method alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from melo_eval import lm


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (whose weight is stored (d_in, d_out))."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    raise TypeError(f"{type(module).__name__} is neither nn.Linear nor Conv1D; pick a linear layer by name")


class HookedMethod:
    """A frozen model plus measurement helpers; subclasses add hooks and ``apply_batch``."""

    name = "base"

    def __init__(self, model: nn.Module, tokenizer, task: str, max_length: int = 256, eval_batch: int = 32):
        if task not in ("generate", "classify"):
            raise ValueError(f"task={task!r}; choose 'generate' or 'classify'")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.task = task
        self.max_length = max_length
        self.eval_batch = eval_batch
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    def routing(self, key_positions: Tensor, prefill: bool) -> AbstractContextManager:
        """Context entered around each forward; baselines that route per row override it."""
        return nullcontext()

    # -- forward passes -------------------------------------------------------------------------

    def pair_logits(self, batch: lm.PairBatch) -> Tensor:
        """Logits of a teacher-forced prompt+target batch (causal LM)."""
        with self.routing(batch.key_positions, True):
            return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    def class_logits(self, texts: Sequence[str]) -> Tensor:
        """Classifier logits; the key is each row's last non-padding token."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        key_positions = enc["attention_mask"].sum(-1) - 1
        with self.routing(key_positions, True):
            return self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits

    def label_ids(self, labels: Sequence[str]) -> Tensor:
        """Class ids of label names, with an error naming an unknown label."""
        label2id = {name: int(i) for i, name in self.model.config.id2label.items()}
        unknown = [label for label in labels if label not in label2id]
        if unknown:
            raise ValueError(f"labels {unknown[:3]} are not in the classifier's labels {sorted(label2id)}")
        return torch.tensor([label2id[label] for label in labels])

    def edit_loss(self, prompts: Sequence[str], targets: Sequence[str]) -> Tensor:
        """Training loss of a batch of edits (target tokens only / cross-entropy on the label)."""
        if self.task == "classify":
            return nn.functional.cross_entropy(self.class_logits(prompts), self.label_ids(targets))
        batch = lm.encode_pairs(self.tokenizer, prompts, targets, self.max_length)
        return lm.batch_loss(self.pair_logits(batch), batch.labels)

    # -- the editor surface the harness uses ---------------------------------------------------

    @torch.no_grad()
    def score(self, prompts: Sequence[str], targets: Sequence[str]) -> list[float]:
        """Teacher-forced token accuracy per (prompt, target); 1/0 label accuracy for a classifier."""
        out: list[float] = []
        for part in lm.chunks(len(prompts), self.eval_batch):
            if self.task == "classify":
                predicted = self.classify(prompts[part])
                out.extend(float(p == t) for p, t in zip(predicted, targets[part]))
                continue
            batch = lm.encode_pairs(self.tokenizer, prompts[part], targets[part], self.max_length)
            out.extend(lm.token_accuracy(self.pair_logits(batch), batch.labels).tolist())
        return out

    @torch.no_grad()
    def perplexity(self, prompts: Sequence[str], targets: Sequence[str]) -> list[float]:
        """Perplexity of each target given its prompt."""
        out: list[float] = []
        for part in lm.chunks(len(prompts), self.eval_batch):
            batch = lm.encode_pairs(self.tokenizer, prompts[part], targets[part], self.max_length)
            out.extend(torch.exp(lm.target_nll(self.pair_logits(batch), batch.labels)).tolist())
        return out

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], max_new_tokens: int = 16) -> list[str]:
        """Greedy continuation of each prompt (new text only)."""
        out: list[str] = []
        for part in lm.chunks(len(prompts), self.eval_batch):
            out.extend(lm.greedy_generate(self.model, self.tokenizer, prompts[part], max_new_tokens, self.routing))
        return out

    @torch.no_grad()
    def classify(self, texts: Sequence[str]) -> list[str]:
        """Predicted label name per text."""
        id2label = self.model.config.id2label
        out: list[str] = []
        for part in lm.chunks(len(texts), self.eval_batch):
            out.extend(id2label[int(i)] for i in self.class_logits(texts[part]).argmax(-1))
        return out

    def stats(self) -> dict[str, int]:
        """Counters comparable to MELO's (clusters, conflicts, forgotten); zero where meaningless."""
        return {"clusters": 0, "conflicts": 0, "forgotten": 0}
