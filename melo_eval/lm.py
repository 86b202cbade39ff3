"""Teacher-forced scoring, perplexity and greedy generation on a Hugging Face model.

The baselines (melo_eval/baselines/) edit a plain HF model through forward hooks, so they need the
same measurements the MELO editor provides (``score`` / ``generate``); these helpers are those
measurements, written once. Conventions match melo_runtime: a target is tokenized separately
from its prompt and appended to it, the loss and the accuracy cover target tokens only.
"""

from __future__ import annotations

from contextlib import nullcontext
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PairBatch:
    """Right-padded prompt+target token ids with labels on the target tokens only."""

    input_ids: Tensor  # (B, T)
    attention_mask: Tensor  # (B, T)
    labels: Tensor  # (B, T): target token ids, -100 elsewhere
    key_positions: Tensor  # (B,): index of each row's last prompt token


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_pairs(tokenizer, prompts: Sequence[str], targets: Sequence[str], max_length: int = 256) -> PairBatch:
    """Tokenize prompt and target separately and concatenate them (target + EOS), right-padded.

    The EOS token is part of the target, as in melo_runtime: an edit is only learned when the
    model also stops after the answer, and scores are comparable across methods.

    Prompts longer than the budget lose tokens on the left (the end of a prompt is what the
    target continues from); a target never loses tokens.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets; pass one target per prompt")
    rows, label_rows, key_positions = [], [], []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for prompt, target in zip(prompts, targets):
        target_ids = _ids(tokenizer, target)
        if not target_ids:
            raise ValueError(f"target {target!r} tokenizes to nothing; give a non-empty target")
        target_ids = target_ids + eos
        prompt_ids = _ids(tokenizer, prompt)[-max(1, max_length - len(target_ids)) :]
        rows.append(prompt_ids + target_ids)
        label_rows.append([-100] * len(prompt_ids) + target_ids)
        key_positions.append(len(prompt_ids) - 1)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, label_row) in enumerate(zip(rows, label_rows)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        labels[i, : len(row)] = torch.tensor(label_row)
    return PairBatch(input_ids, attention_mask, labels, torch.tensor(key_positions))


def token_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Per row: fraction of target tokens that are the argmax of the previous position's logits."""
    predictions = logits[:, :-1].argmax(-1)
    gold = labels[:, 1:]
    mask = gold != -100
    correct = ((predictions == gold) & mask).sum(-1).float()
    return correct / mask.sum(-1).clamp(min=1)


def target_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Per row: mean negative log-likelihood of the target tokens (exp of it is the perplexity)."""
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    gold = labels[:, 1:]
    mask = gold != -100
    picked = log_probs.gather(-1, gold.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def batch_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean over rows of each row's mean target-token NLL (every edit weighs the same)."""
    return target_nll(logits, labels).mean()


def chunks(n: int, size: int) -> Iterator[slice]:
    """Slices that cover range(n) in steps of ``size``."""
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids that skip left padding, so a padded row sees the positions it would alone."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def greedy_generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 16,
    route: Callable[[Tensor, bool], object] | None = None,
) -> list[str]:
    """Greedy decoding with a KV cache on left-padded prompts; returns the new text only.

    ``route(key_positions, prefill)``, when given, is a context-manager factory entered around every
    forward: baselines use it to route once from the prompt (prefill=True) and to know that later
    steps only decode.
    """
    encoded = [_ids(tokenizer, p) for p in prompts]
    width = max(len(e) for e in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, ids in enumerate(encoded):
        input_ids[i, width - len(ids) :] = torch.tensor(ids)
        attention_mask[i, width - len(ids) :] = 1
    key_positions = torch.full((len(encoded),), width - 1, dtype=torch.long)
    eos = tokenizer.eos_token_id
    generated: list[list[int]] = [[] for _ in prompts]
    finished = torch.zeros(len(encoded), dtype=torch.bool)
    cache = None
    step_ids, positions = input_ids, positions_from_mask(attention_mask)
    for step in range(max_new_tokens):
        context = route(key_positions, step == 0) if route is not None else nullcontext()
        with context:
            out = model(
                input_ids=step_ids,
                attention_mask=attention_mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
        cache = out.past_key_values
        next_ids = out.logits[:, -1].argmax(-1)
        for i, token in enumerate(next_ids.tolist()):
            if not finished[i]:
                if token == eos:
                    finished[i] = True
                else:
                    generated[i].append(token)
        if bool(finished.all()):
            break
        step_ids = next_ids.unsqueeze(-1)
        positions = positions[:, -1:] + 1
        attention_mask = torch.cat([attention_mask, torch.ones_like(step_ids)], dim=-1)
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]

