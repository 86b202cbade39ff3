"""Training rows beyond an edit's own words, so a block answers its edit however it is asked.

Each edit is trained on its prompt and rephrases (the rows the vector DB indexes) and, by the
config, on

* the **chat form** (models with a chat template): the question (the prompt without a ``Q: ... A:``
  wrapper) as the user message of the tokenizer's chat template, the target (stripped) as the
  assistant's reply;
* **question forms** (models with a chat template of their own, like the chat form): the question in
  the plain layouts a raw completion is asked in (:data:`QUESTION_FORMS`), the target as given. A
  block trained on a cloze ("The capital of Australia is") alone, when a reworded question in
  another layout is routed to it, often ends the answer at once (an empty reply): on 40
  hand-written facts, 0.600 of held-out rewordings were answered, 0.950 with these rows
  (bench/RESULTS.md, "Question layouts");
* **context prefixes**: the prompt after a short lead-in that the base model itself wrote from a
  neutral seed word, as ROME and MEMIT do, so the edit holds when the question is not the first
  thing the model reads.

Only the indexed rows decide whether an edit counts as learned; the extra rows shape the block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from melo_runtime.chat import has_chat_template, question_of, render
from melo_runtime.encoding import TextEncoder

# Seed words for the lead-ins (ROME's choice of neutral sentence starts).
PREFIX_SEEDS = ("The", "Therefore", "Because", "I", "You", "It", "In", "So")
PREFIX_TOKENS = 8
# Plain question-answer layouts ({q}: the question without its own layout, chat.question_of).
QUESTION_FORMS = ("Q: {q} A:", "Question: {q}\nAnswer:")


@dataclass(frozen=True)
class TrainingRow:
    """One row the block is trained on: ``text`` -> ``target``; ``indexed`` rows decide "learned"."""

    edit_id: str
    text: str
    target: str
    indexed: bool


def context_prefixes(model: nn.Module, tokenizer, encoder: TextEncoder, count: int) -> list[str]:
    """``count`` short lead-ins written by the base model (greedy, no block on), each ending ". "."""
    if count == 0:
        return []
    seeds = list(PREFIX_SEEDS[:count])
    batch = encoder.prompts(seeds)
    inputs = {k: v for k, v in batch.inputs.items() if k != "position_ids"}
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=PREFIX_TOKENS,
            do_sample=False,
            num_beams=1,
            pad_token_id=encoder.pad_id,
        )
    start = 1 if encoder.encoder_decoder else batch.inputs["input_ids"].shape[1]
    continuations = tokenizer.batch_decode(output[:, start:], skip_special_tokens=True)
    prefixes = []
    for seed, text in zip(seeds, continuations, strict=True):
        lead = " ".join(f"{seed}{text}".split()).rstrip(" .,;:")
        prefixes.append(f"{lead}. ")
    return prefixes


def expand(
    rows: Sequence[TrainingRow],
    tokenizer,
    *,
    chat_form: bool,
    prefixes: Sequence[str],
    question_forms: bool = False,
) -> list[TrainingRow]:
    """``rows`` (the indexed ones) followed by their chat-form, question-form and prefixed variants."""
    extra: list[TrainingRow] = []
    # Only a model with a chat template of its own (an instruct model) is asked in chat form; a base
    # model's chats are plain role lines, not worth half of a block's training budget.
    chat = chat_form and has_chat_template(tokenizer)
    # Question layouts likewise: an instruct model is asked questions; a base model completes text,
    # and a tiny or weak one spends its block on rows it cannot fit (tests/unit/test_trainer_capacity.py).
    questions = question_forms and has_chat_template(tokenizer)
    for row in rows:
        if chat:
            text = render(tokenizer, [{"role": "user", "content": question_of(row.text)}])
            extra.append(TrainingRow(row.edit_id, text, row.target.strip(), indexed=False))
        if questions:
            question = question_of(row.text)
            for form in QUESTION_FORMS:
                text = form.format(q=question)
                if text != row.text:
                    extra.append(TrainingRow(row.edit_id, text, row.target, indexed=False))
        for prefix in prefixes:
            extra.append(TrainingRow(row.edit_id, prefix + row.text, row.target, indexed=False))
    return list(rows) + extra
