"""The values that cross the editor's boundary: an edit in, a batch result and a route out."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class Edit:
    """One edit: for ``prompt`` (and each of ``rephrases``) the right output is now ``target``.

    ``target`` is the new continuation text for generation, a label name for classification.
    ``subject`` is the entity the edit is about, when the producer knows it: a scope-keyed editor
    lets only inputs that name it reach the edit (melo_runtime/scope.py); without it the subject is
    inferred from the prompt.
    """

    edit_id: str
    prompt: str
    target: str
    rephrases: tuple[str, ...] = ()
    subject: str | None = None


@dataclass
class BatchResult:
    """What ``apply_batch`` did with one micro-batch of edits."""

    block_id: int
    edit_ids: list[str]
    clusters_added: int
    clusters_expanded: int
    conflicts: int
    forgotten: list[str]  # edit ids whose every key was forgotten in this batch
    learned: dict[str, bool]  # per edit id: its prompt and rephrases reproduce the target
    seconds: float
    iterations_run: int
    final_loss: float
    # Edits trained but not learned within the training budget: none of their keys is indexed, so no
    # input is routed for them (the base model answers). Not learned edits are also ``learned=False``.
    not_learned: list[str] = field(default_factory=list)
    edit_losses: dict[str, float] = field(default_factory=dict)  # per trained edit: its worst row's final loss
    blocks_added: int = 1  # blocks ``block_id`` .. ``block_id + blocks_added - 1`` hold this batch's edits


@dataclass(frozen=True)
class Route:
    """Where an input is routed: the block switched on for it, its cluster and the distance to its centre."""

    block: int
    cluster: int
    distance: float


def normalize_label(text: str) -> str:
    """The form in which targets are compared: Unicode NFC, stripped, whitespace runs collapsed.

    Two edits carry the same label exactly when their normalized targets are equal (never by sums of
    token ids, which collide).
    """
    return _SPACES.sub(" ", unicodedata.normalize("NFC", text)).strip()
