"""Turning prompts and targets into model inputs, the same way for training, routing and serving.

A prompt is tokenized once, with the tokenizer's own special tokens, and its key is read at its last
real token. Decoder-only models are left padded with explicit position ids, so a prompt gives the
same hidden states (and the same key) in ``generate``, in routing and in training, however much
padding its batch needs. Targets are tokenized without special tokens and followed by EOS, so
generation stops right after an edited answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from melo_runtime.chat import Rendered
from melo_runtime.families import is_causal_lm, is_encoder_decoder, model_device, position_ids

IGNORE = -100


@dataclass
class Batch:
    """Model keyword arguments plus the mask the key hook reads (the prompt's, or the full sequence's)."""

    inputs: dict[str, torch.Tensor]
    key_mask: torch.Tensor


@dataclass
class TeacherForced:
    """A training/scoring batch: inputs and the expected prediction at each logit position.

    ``targets`` is aligned with the logits: [batch, seq] token ids (IGNORE where nothing is scored)
    for language models, [batch] label ids for classifiers.
    """

    batch: Batch
    targets: torch.Tensor


class TextEncoder:
    """Tokenizes prompts and targets for one model/tokenizer pair."""

    def __init__(self, model: nn.Module, tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.causal = is_causal_lm(model)
        self.encoder_decoder = is_encoder_decoder(model)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0
        self.eos_id = tokenizer.eos_token_id
        # Learned absolute position tables (BERT, GPT-2) cannot encode longer inputs; rotary and
        # relative ones (Llama, T5) have no hard limit.
        limit = getattr(model.config, "max_position_embeddings", None)
        self.max_positions = int(limit) if isinstance(limit, int) and _absolute_positions(model) else None

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of a prompt, with the special tokens the tokenizer adds by itself (none more
        for a :class:`Rendered` chat, which carries its own)."""
        return list(self.tokenizer(prompt, add_special_tokens=not isinstance(prompt, Rendered)).input_ids)

    def target_ids(self, target: str) -> list[int]:
        """Token ids of a generation target: the text without special tokens, then EOS."""
        ids = list(self.tokenizer(target, add_special_tokens=False).input_ids)
        return ids + ([int(self.eos_id)] if self.eos_id is not None else [])

    def prompts(self, prompts: Sequence[str]) -> Batch:
        """A batch of prompts alone (routing, generation, classification)."""
        return self._batch([self.prompt_ids(prompt) for prompt in prompts])

    def teacher_forced(self, prompts: Sequence[str], targets: Sequence[str | int]) -> TeacherForced:
        """Prompts with their targets: text for language models, label ids for classifiers."""
        if not self.causal and not self.encoder_decoder:
            batch = self.prompts(prompts)
            labels = torch.tensor([int(t) for t in targets], device=batch.key_mask.device)
            return TeacherForced(batch=batch, targets=labels)
        prompt_ids = [self.prompt_ids(prompt) for prompt in prompts]
        target_ids = [self.target_ids(str(target)) for target in targets]
        if self.encoder_decoder:
            return self._seq2seq(prompt_ids, target_ids)
        sequences = [p + t for p, t in zip(prompt_ids, target_ids, strict=True)]
        batch = self._batch(sequences)
        width = batch.key_mask.shape[1]
        expected = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
        for row, (p, t) in enumerate(zip(prompt_ids, target_ids, strict=True)):
            # Left padded: the sequence ends at column width-1; logit at column j predicts token j+1.
            start = width - len(t) - 1
            expected[row, start : start + len(t)] = torch.tensor(t)
        return TeacherForced(batch=batch, targets=expected.to(batch.key_mask.device))

    def _seq2seq(self, prompt_ids: list[list[int]], target_ids: list[list[int]]) -> TeacherForced:
        batch = self._batch(prompt_ids)
        width = max(len(t) for t in target_ids)
        start = int(self.model.config.decoder_start_token_id)
        expected = torch.full((len(target_ids), width), IGNORE, dtype=torch.long)
        decoder_input = torch.full((len(target_ids), width), self.pad_id, dtype=torch.long)
        for row, t in enumerate(target_ids):
            expected[row, : len(t)] = torch.tensor(t)
            decoder_input[row, : len(t)] = torch.tensor([start] + t[:-1])
        device = batch.key_mask.device
        batch.inputs["decoder_input_ids"] = decoder_input.to(device)
        batch.inputs["decoder_attention_mask"] = (expected != IGNORE).long().to(device)
        return TeacherForced(batch=batch, targets=expected.to(device))

    def _batch(self, sequences: list[list[int]]) -> Batch:
        empty = [i for i, ids in enumerate(sequences) if not ids]
        if empty:
            # A zero-length row would reach the model as a [batch, 0, ...] tensor and fail deep inside it.
            raise ValueError(
                f"input {empty[0]} tokenizes to no tokens with this tokenizer; give text its vocabulary covers"
            )
        width = max(len(s) for s in sequences)
        if self.max_positions is not None and width > self.max_positions:
            longest = max(range(len(sequences)), key=lambda i: len(sequences[i]))
            raise ValueError(
                f"input {longest} is {width} tokens long; this model reads at most {self.max_positions} "
                "(max_position_embeddings): shorten the text"
            )
        input_ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, ids in enumerate(sequences):
            if self.causal:
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                mask[row, width - len(ids) :] = 1
            else:
                input_ids[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = 1
        device = model_device(self.model)
        input_ids, mask = input_ids.to(device), mask.to(device)
        inputs = {"input_ids": input_ids, "attention_mask": mask}
        if self.causal:
            inputs["position_ids"] = position_ids(mask)
        return Batch(inputs=inputs, key_mask=mask)


def loss_and_hits(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy over scored positions, per-row "all correct", and per-row token accuracy.

    Classifier logits are [batch, labels] with targets [batch]; language-model logits are
    [batch, seq, vocab] with targets [batch, seq] (IGNORE where not scored).
    """
    logits = logits.float()
    if targets.dim() == 1:
        correct = logits.argmax(-1) == targets
        return F.cross_entropy(logits, targets), correct, correct.float()
    scored = targets != IGNORE
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)
    right = (logits.argmax(-1) == targets) & scored
    counts = scored.sum(-1).clamp(min=1)
    return loss, right.sum(-1) == scored.sum(-1), right.sum(-1).float() / counts


def _absolute_positions(model: nn.Module) -> bool:
    """Whether the model looks positions up in a learned table (BERT ``position_embeddings``, GPT-2 ``wpe``)."""
    return any(
        isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in ("position_embeddings", "wpe")
        for name, module in model.named_modules()
    )
