"""What the editor accepts: an edit's fields within ``MeloConfig``'s limits, its target a label of
a classifier, its texts within the token budget; and the text lists its serving and scoring calls take.

Validation runs before anything is trained, so a refused batch leaves the editor as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from melo_runtime.config import MeloConfig
from melo_runtime.edits import Edit, normalize_label
from melo_runtime.encoding import TeacherForced, TextEncoder
from melo_runtime.scope import infer_subject, normalized_subject


@dataclass(frozen=True)
class EditRow:
    """One training row: an edit's prompt or one of its rephrases."""

    edit_id: str
    text: str
    target: str  # generation target text, or label name
    label: str  # normalized target: what clusters compare
    subject: str  # normalized subject ("" = none): part of a scope key
    subject_text: str = ""  # the subject as the producer wrote it (or as inferred from the prompt)


class TokenLimitError(ValueError):
    """An edit whose prompt, rephrase or target exceeds ``MeloConfig.max_length_tokens``."""


class EditValidator:
    """Checks batches of edits for one editor and turns them into training rows."""

    def __init__(self, config: MeloConfig, encoder: TextEncoder, label_ids: dict[str, int], *, scoped: bool) -> None:
        """``label_ids``: normalized label name -> class id (empty for a generate editor);
        ``scoped``: the editor keys edits by subject (key_source "scope")."""
        self.config = config
        self._encoder = encoder
        self._label_ids = label_ids
        self._scoped = scoped

    def validate(self, edits: Sequence[Edit], applied: set[str]) -> list[EditRow]:
        """The rows to train and index for ``edits``; ValueError (or TokenLimitError) naming the
        first field that is wrong. ``applied``: edit ids the editor holds already."""
        if isinstance(edits, (str, bytes)) or not isinstance(edits, Sequence):
            raise ValueError(f"edits must be a sequence of Edit, got {type(edits).__name__}")
        if not edits:
            raise ValueError("edits is an empty batch; pass at least one Edit")
        seen: set[str] = set()
        config = self.config
        for i, edit in enumerate(edits):
            where = f"edits[{i}]"
            if not isinstance(edit, Edit):
                raise ValueError(f"{where} must be an Edit, got {type(edit).__name__}")
            if not isinstance(edit.edit_id, str) or not edit.edit_id.strip():
                raise ValueError(f"{where}.edit_id must be a non-empty string, got {edit.edit_id!r}")
            if edit.edit_id in seen:
                raise ValueError(f"{where}.edit_id={edit.edit_id!r} appears twice in this batch; edit ids are unique")
            if edit.edit_id in applied:
                raise ValueError(f"{where}.edit_id={edit.edit_id!r} is already applied; retract it first to replace it")
            seen.add(edit.edit_id)
            self._check_text(edit.prompt, f"{where}.prompt", config.max_prompt_chars)
            self._check_text(edit.target, f"{where}.target", config.max_target_chars)
            if not isinstance(edit.rephrases, (tuple, list)):
                raise ValueError(f"{where}.rephrases must be a tuple of strings, got {type(edit.rephrases).__name__}")
            if len(edit.rephrases) > config.max_rephrases:
                raise ValueError(
                    f"{where}.rephrases has {len(edit.rephrases)} entries; at most max_rephrases={config.max_rephrases}"
                )
            for j, rephrase in enumerate(edit.rephrases):
                self._check_text(rephrase, f"{where}.rephrases[{j}]", config.max_prompt_chars)
            if edit.subject is not None:
                self._check_text(edit.subject, f"{where}.subject", config.max_target_chars)
            label = normalize_label(edit.target)
            if self._label_ids and label not in self._label_ids:
                raise ValueError(f"{where}.target={edit.target!r} is not a label of this classifier; known: {sorted(self._label_ids)}")
            self._check_token_length(edit, where)
        # The newest edit giving a text wins it: earlier rows with the same text are dropped.
        last_owner = {text: i for i, edit in enumerate(edits) for text in (edit.prompt, *edit.rephrases)}
        rows = []
        for i, edit in enumerate(edits):
            written = (edit.subject or infer_subject(edit.prompt) or "") if self._scoped else ""
            subject = normalized_subject(written)
            for text in dict.fromkeys((edit.prompt, *edit.rephrases)):
                if last_owner[text] == i:
                    rows.append(EditRow(edit.edit_id, text, edit.target, normalize_label(edit.target), subject, written))
        return rows

    @staticmethod
    def _check_text(text: object, field: str, limit: int) -> None:
        if not isinstance(text, str):
            raise ValueError(f"{field} must be a string, got {type(text).__name__}")
        if not text.strip():
            raise ValueError(f"{field} is empty or whitespace; give the text to edit")
        if len(text) > limit:
            raise ValueError(f"{field} has {len(text)} characters; the limit is {limit} (MeloConfig)")

    def _check_token_length(self, edit: Edit, where: str) -> None:
        limit = self.config.max_length_tokens
        target = 0 if self._label_ids else len(self._encoder.target_ids(edit.target))
        if target > limit:
            raise TokenLimitError(f"{where}.target is {target} tokens long; max_length_tokens={limit}")
        texts = {f"{where}.prompt": edit.prompt}
        texts.update({f"{where}.rephrases[{j}]": text for j, text in enumerate(edit.rephrases)})
        for field, text in texts.items():
            tokens = len(self._encoder.prompt_ids(text))
            # Decoder-only models see prompt and target in one sequence.
            total = tokens + (target if self._encoder.causal else 0)
            if total > limit:
                raise TokenLimitError(
                    f"{field} is {tokens} tokens long ({total} with the target); max_length_tokens={limit}"
                )


def text_list(texts: Sequence[str], field: str) -> list[str]:
    """``texts`` as a list; ValueError unless it is a sequence of strings (not one string)."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise ValueError(f"{field} must be a list of strings, got {type(texts).__name__}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"{field}[{i}] must be a string, got {type(text).__name__}")
    return list(texts)


def teacher_forced_pairs(
    encoder: TextEncoder, label_ids: dict[str, int], prompts: Sequence[str], targets: Sequence[str]
) -> tuple[list[str], TeacherForced]:
    """Checked prompts and the teacher-forced batch of (prompt, target) pairs the scoring calls
    read; ``label_ids`` (a classifier's) turns label names into class ids. ValueError naming the problem."""
    prompts = text_list(prompts, "prompts")
    targets = text_list(targets, "targets")
    if len(prompts) != len(targets):
        raise ValueError(f"prompts has {len(prompts)} entries but targets has {len(targets)}; pass one target per prompt")
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt")
    if label_ids:
        unknown = [t for t in targets if normalize_label(t) not in label_ids]
        if unknown:
            raise ValueError(f"targets {unknown[:3]!r} are not labels of this classifier; known: {sorted(label_ids)}")
        labels: list[str | int] = [label_ids[normalize_label(t)] for t in targets]
        return prompts, encoder.teacher_forced(prompts, labels)
    return prompts, encoder.teacher_forced(prompts, list(targets))
