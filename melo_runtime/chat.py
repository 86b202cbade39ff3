"""Chat messages as model input, and the question a chat or a prompt asks.

An edit is made on a prompt ("Q: Who wrote X? A:", "The mother tongue of X is"); users ask the
edited model through its chat template. Routing reads the question alone (the last user message),
never the template around it, and blocks are also trained on the edit asked in chat form, so an
edit fires however it is asked (docs/generality.md).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

ROLES = ("system", "user", "assistant")
# A generate input row: a prompt, or a chat conversation ending with the user's question.
Prompt = str | Sequence[dict[str, str]]
# A question wrapped for a base LM ("Q: ... A:", "Question: ... Answer:") asks the same as its core.
_QA_WRAPPER = re.compile(r"^\s*(?:q|question)\s*:\s*(?P<core>.*?)\s*(?:a|answer)\s*:\s*$", re.IGNORECASE | re.DOTALL)


class Rendered(str):
    """Text that already carries the model's special tokens (a rendered chat template).

    The text encoder tokenizes it without adding special tokens of its own.
    """


def question_of(prompt: str) -> str:
    """The question a prompt asks, without a ``Q: ... A:`` wrapper (the prompt itself otherwise)."""
    match = _QA_WRAPPER.match(prompt)
    return match.group("core").strip() if match else prompt.strip()


def check_messages(messages: object, where: str) -> list[dict[str, str]]:
    """``messages`` as a list of {role, content}; ValueError naming what is wrong.

    The conversation must end with a user message (that is the question routing reads).
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError(f"{where} must be a non-empty list of chat messages, got {type(messages).__name__}")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"{where}[{i}] must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"{where}[{i}].role={role!r} must be one of {ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"{where}[{i}].content must be a string, got {type(content).__name__}")
        checked.append({"role": str(role), "content": content})
    if checked[-1]["role"] != "user":
        raise ValueError(f"{where} must end with a user message (the question to answer)")
    return checked


class Question(str):
    """The text routing reads (the last user message), with ``context``: the conversation's earlier
    user messages, where a follow-up's subject was named ("Who is Danielle Darrieux?" ... "What is
    her mother tongue?")."""

    context: str = ""

    def __new__(cls, text: str, context: str = "") -> Question:
        question = super().__new__(cls, text)
        question.context = context
        return question


def user_question(messages: Sequence[Mapping[str, str]]) -> Question:
    """The text routing reads: the content of the last user message, the earlier ones as context."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    return Question(users[-1], "\n".join(users[:-1]))


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer has a chat template of its own (instruct models do)."""
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> str:
    """The conversation through the tokenizer's chat template, ready for the assistant's turn.

    A tokenizer without a template (base models, the tiny test tokenizers) gets ``role: content``
    lines and an open ``assistant:`` line, rendered as plain text (its own special tokens added).
    """
    if not has_chat_template(tokenizer):
        lines = [f"{message['role']}: {message['content']}" for message in messages]
        return "\n".join([*lines, "assistant:"])
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    return Rendered(text)


def chat_inputs(tokenizer: Any, rows: Sequence[Prompt]) -> tuple[list[str], list[str]]:
    """Model texts (chats rendered) and the question routing reads, per generate row."""
    if isinstance(rows, str) or not isinstance(rows, Sequence):
        raise ValueError(f"prompts must be a list of prompts or chat conversations, got {type(rows).__name__}")
    texts, questions = [], []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            texts.append(row)
            questions.append(row)
            continue
        messages = check_messages(row, f"prompts[{i}]")
        texts.append(render(tokenizer, messages))
        questions.append(user_question(messages))
    return texts, questions
