"""Prequential accuracy of a label-shift stream: each next pool item is scored *before* it is edited.

The stream (melo_eval.datasets.label_shift_stream) carries every edit-pool item up to its last edit,
in date order, with the unedited classifier's prediction. Edits are applied in micro-batches; an
item is scored by the model as it stands just before the batch that holds the item's own edit or,
for an item the base classifier already gets right (never edited), the first batch after it. The
first batch's items are therefore scored by the unedited model, and an edited item is never scored
by a model that has learned it.

Reported per evaluation row, cumulative over the items scored so far:

* ``preq_n``: items scored;
* ``preq_acc``: accuracy of the edited model on them; ``preq_base``: of the unedited classifier;
* ``preq_acc_edited``: accuracy on the items about to be edited (the base gets all of them wrong:
  above 0 only where earlier edits carry over to later cases of the new period);
* ``preq_acc_kept``: accuracy on the items the base gets right (the base: 1.0; below 1 where
  earlier edits break later correct answers);
* ``preq_routed`` (methods that route, i.e. MELO): the fraction of them routed to an earlier edit's
  block at all, which tells "no earlier edit reached it" from "an edit reached it with another label".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from melo_eval.datasets import EditCase, PoolItem
from melo_eval.methods import EditMethod


def schedule(pool: Sequence[PoolItem], batches: Sequence[Sequence[EditCase]]) -> list[list[PoolItem]]:
    """The pool items scored before each batch (one list per batch, in pool order).

    ``batches`` must be the edited pool items in pool order, cut into consecutive batches: ValueError
    otherwise (the pool then belongs to another stream).
    """
    batch_of = {case.edit_id: k for k, batch in enumerate(batches) for case in batch}
    expected = [case.edit_id for batch in batches for case in batch]
    edited = [item.record_id for item in pool if item.edited]
    if edited != expected:
        raise ValueError(
            f"the stream's pool holds edits {edited[:5]}... but its batches edit {expected[:5]}...: "
            "prequential accuracy needs the pool the stream was built from"
        )
    scored: list[list[PoolItem]] = [[] for _ in batches]
    waiting: list[PoolItem] = []
    for item in pool:
        waiting.append(item)
        if item.edited:
            scored[batch_of[item.record_id]].extend(waiting)
            waiting = []
    return scored


@dataclass
class Tally:
    """Running counts of the items scored so far."""

    n: int = 0
    correct: int = 0
    base_correct: int = 0
    n_edited: int = 0
    correct_edited: int = 0
    routed: int | None = None  # None: the method does not say where it routes

    def add(self, items: Sequence[PoolItem], predictions: Sequence[str], routed: Sequence[bool] | None = None) -> None:
        """Count ``items`` with the current model's ``predictions`` for them (and whether each was
        routed to an edit, when the method says)."""
        if len(items) != len(predictions) or (routed is not None and len(routed) != len(items)):
            raise ValueError(f"{len(predictions)} predictions for {len(items)} pool items")
        if routed is not None:
            self.routed = (self.routed or 0) + sum(routed)
        for item, predicted in zip(items, predictions):
            right = predicted == item.probe.target
            self.n += 1
            self.correct += right
            self.base_correct += not item.edited
            if item.edited:
                self.n_edited += 1
                self.correct_edited += right

    def row(self) -> dict[str, float | int | None]:
        """The ``preq_*`` columns (None while nothing is scored)."""
        kept = self.n - self.n_edited
        return {
            "preq_n": self.n,
            "preq_acc": self.correct / self.n if self.n else None,
            "preq_base": self.base_correct / self.n if self.n else None,
            "preq_acc_edited": self.correct_edited / self.n_edited if self.n_edited else None,
            "preq_acc_kept": (self.correct - self.correct_edited) / kept if kept else None,
            "preq_routed": self.routed / self.n if self.n and self.routed is not None else None,
        }


def score_before(method: EditMethod, items: Sequence[PoolItem], tally: Tally) -> None:
    """Score ``items`` with ``method`` as it stands now into ``tally``."""
    if not items:
        return
    texts = [item.probe.prompt for item in items]
    routed = method.routed(texts) if hasattr(method, "routed") else None
    tally.add(items, method.classify(texts), routed)
