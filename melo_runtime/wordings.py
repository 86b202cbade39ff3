"""Wordings: the stream's own ways of asking a question, reused to train each new edit.

A block trained on one wording of a question answers other wordings less reliably (on zsRE dev,
about 7 in 100 reworded questions that reach their edit's block get another answer). A stream of
edits asks the same kinds of questions many times, each time in its producer's words: "Which
constellation is Gliese 638 part of?", "The star HD 1 is part of what constellation?". The pool keeps
every applied edit's text with its subject cut out (a *template*) and the scope key's embedding of
that text's masked question. A new edit is also trained (rows that do not decide "learned") on up to
``train_stream_wordings`` distinct templates whose question lies within ``stream_wordings_radius``
of its own, with its own subject written in. The radius is inside the routing radius, so the block
learns only wordings the router would send to it anyway: locality still rests on routing alone.

Measured on SmolLM2 over 1,000 zsRE dev edits (bench/RESULTS.md, "Wordings mined from the stream"):
held-out rephrases that reach their block answered 0.929 -> 0.953, all held-out rephrases 0.893 ->
0.916, at 2.8x the training time.

The pool is part of a scope editor's snapshot (``scope.json``, ``wordings``: each template and the
masked question it was keyed by); embeddings are recomputed on the first edit after a load, so a
serving replica never pays for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from melo_runtime.augment import TrainingRow
from melo_runtime.config import MeloConfig
from melo_runtime.scope import SentenceEncoder, mask_subject, subject_clause

HOLE = "\x00"  # where a template's subject was
MAX_WORDINGS = 50_000  # templates kept (the oldest go first); distinct texts only


@dataclass(frozen=True)
class Wording:
    """One pooled wording: ``template`` (an edit's text, its subject replaced by HOLE) and ``clause``
    (the masked question the scope key embedded)."""

    template: str
    clause: str


class WordingPool:
    """The templates of applied edits and their question embeddings (writer-side state)."""

    def __init__(self, encoder: SentenceEncoder, wordings: Sequence[Wording] = ()) -> None:
        self.encoder = encoder
        self._wordings: dict[str, Wording] = {}
        self._embeddings: dict[str, np.ndarray] = {}
        self._stacked: tuple[list[str], np.ndarray] | None = None  # (templates, embeddings), until the next add
        for wording in wordings:
            self._wordings[wording.template] = wording

    def __len__(self) -> int:
        return len(self._wordings)

    def wordings_for(
        self, text: str, subject: str, subject_text: str, embedding: np.ndarray, radius: float, most: int
    ) -> list[str]:
        """Up to ``most`` pooled wordings, nearest first, whose question is within ``radius`` of
        ``embedding`` (the scope key's question part for ``text``), with ``subject_text`` written in.
        Empty for an edit without a subject, or whose text does not name it."""
        own = template_of(text, subject)  # None without a subject, or when the text does not name it
        if own is None or not self._wordings or most <= 0:
            return []
        templates, matrix = self._stack()
        distance = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * (matrix @ embedding)))
        picked = []
        for index in np.argsort(distance, kind="stable"):
            if distance[index] > radius or len(picked) == most:
                break
            if templates[index] != own:
                picked.append(templates[index].replace(HOLE, subject_text))
        return picked

    def training_rows(self, rows: Sequence[Any], keys: np.ndarray, config: MeloConfig) -> list[TrainingRow]:
        """The extra rows for a batch's ``rows`` (EditRow: text, subject, subject_text, edit_id,
        target) keyed by ``keys`` (their scope keys, question part first), by ``config``'s
        ``train_stream_wordings`` and ``stream_wordings_radius``."""
        dim = self.encoder.dim
        extra = []
        for row, key in zip(rows, keys, strict=True):
            for text in self.wordings_for(
                row.text, row.subject, row.subject_text, key[:dim], config.stream_wordings_radius, config.train_stream_wordings
            ):
                extra.append(TrainingRow(row.edit_id, text, row.target, indexed=False))
        return extra

    def add(self, texts: Sequence[str], subjects: Sequence[str], embeddings: np.ndarray) -> None:
        """Pool the texts of newly applied edits (``embeddings``: their scope keys' question parts)."""
        for text, subject, embedding in zip(texts, subjects, embeddings, strict=True):
            template = template_of(text, subject)
            if template is None or template in self._wordings:
                continue
            self._wordings[template] = Wording(template, subject_clause(text, subject))
            self._embeddings[template] = np.asarray(embedding, dtype=np.float32)
        while len(self._wordings) > MAX_WORDINGS:
            oldest = next(iter(self._wordings))
            del self._wordings[oldest]
            self._embeddings.pop(oldest, None)
        self._stacked = None

    def _stack(self) -> tuple[list[str], np.ndarray]:
        if self._stacked is None:
            templates = list(self._wordings)
            missing = [t for t in templates if t not in self._embeddings]
            if missing:  # restored from a snapshot: embed once, on the first edit that needs them
                for template, row in zip(missing, self.encoder.encode([self._wordings[t].clause for t in missing])):
                    self._embeddings[template] = row
            self._stacked = (templates, np.stack([self._embeddings[t] for t in templates]))
        return self._stacked

    def to_list(self) -> list[list[str]]:
        """``[[template, clause], ...]`` oldest first, as ``scope.json`` stores them."""
        return [[w.template, w.clause] for w in self._wordings.values()]

    @classmethod
    def from_list(cls, encoder: SentenceEncoder, data: Any) -> WordingPool:
        """The pool stored by :meth:`to_list` (ValueError on a malformed entry)."""
        wordings = []
        for entry in data or []:
            if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry)):
                raise ValueError(f"scope.json wordings entry {entry!r} is not [template, clause]")
            wordings.append(Wording(entry[0], entry[1]))
        return cls(encoder, wordings)


def template_of(text: str, subject: str) -> str | None:
    """``text`` with the subject's words replaced by HOLE; None when it does not name the subject."""
    if not subject:
        return None
    template = mask_subject(text, subject, HOLE)
    return template if HOLE in template else None
