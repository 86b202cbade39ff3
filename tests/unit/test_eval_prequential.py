"""Prequential accuracy: each pool item is scored by the model as it stands before its edit."""

from collections.abc import Sequence

import pytest

from melo_eval import prequential, quality
from melo_eval.datasets import EditCase, LabelShiftData, Probe, label_shift_stream


class TopicRule:
    """A deterministic stand-in editor: the base answers "old"; an edit teaches its text's first word.

    After an edit of "w ..." to label L, every text starting with "w" is classified L, so an edit
    carries over to later items of the same topic and can break later items the base got right.
    """

    name = "topic-rule"

    def __init__(self) -> None:
        self.rules: dict[str, str] = {}
        self.calls: list[list[str]] = []

    def apply_batch(self, cases: Sequence[EditCase]) -> dict[str, float]:
        self.rules.update({case.prompt.split()[0]: case.target for case in cases})
        return {"final_loss": 0.0}

    def classify(self, texts: Sequence[str]) -> list[str]:
        self.calls.append(list(texts))
        return [self.rules.get(text.split()[0], "old") for text in texts]

    def routed(self, texts: Sequence[str]) -> list[bool]:
        return [text.split()[0] in self.rules for text in texts]

    def score(self, prompts: Sequence[str], targets: Sequence[str]) -> list[float]:
        return [float(p == t) for p, t in zip(self.classify(prompts), targets)]

    def stats(self) -> dict[str, int]:
        return {}


# (text, label) in date order. The base (always "old") gets the "old" items right: 5 edits.
POOL = [
    ("a 1", "new"),   # edit 0, batch 0: scored by the base -> wrong
    ("b 1", "old"),   # kept, scored before batch 0 -> right
    ("a 2", "new"),   # edit 1, batch 0: scored before batch 0 -> wrong (edit 0 not applied yet)
    ("a 3", "new"),   # edit 2, batch 1: scored after batch 0 (rule a) -> right
    ("b 2", "old"),   # kept, before batch 1 (the next edit is edit 3) -> right
    ("c 1", "new"),   # edit 3, batch 1 -> scored before batch 1: wrong
    ("a 4", "old"),   # kept, before batch 2: rule a -> "new" -> wrong (an earlier edit broke it)
    ("c 2", "new"),   # edit 4, batch 2: scored after batch 1 (rule c) -> right
    ("d 1", "old"),   # after the last edit: not in the span
]


def _stream(n_edits: int = 5):
    data = LabelShiftData("scotus", ["old", "new"], [], [Probe("z", "old")],
                          [(f"r{i}", Probe(text, label)) for i, (text, label) in enumerate(POOL)])
    return label_shift_stream(data, lambda texts: ["old"] * len(texts), n_edits=n_edits, n_locality=1, scan_batch=4)


def test_schedule_scores_each_item_before_the_batch_that_edits_it_or_follows_it():
    stream = _stream()
    batches = [stream.cases[0:2], stream.cases[2:4], stream.cases[4:5]]
    scored = prequential.schedule(stream.pool, batches)
    assert [[item.probe.prompt for item in items] for items in scored] == [
        ["a 1", "b 1", "a 2"], ["a 3", "b 2", "c 1"], ["a 4", "c 2"]]
    assert "d 1" not in [item.probe.prompt for item in stream.pool]


def test_replay_reports_prequential_accuracy_against_the_unedited_classifier():
    stream = _stream()
    method = TopicRule()
    rows = quality.replay(method, stream, quality.Evaluator(stream, None, generation=False), batch_size=2, every=4)
    assert [r["n_edits"] for r in rows] == [0, 4, 5]
    assert rows[0].get("preq_acc") is None
    # After 2 batches: a1 x, b1 v, a2 x | a3 v, b2 v, c1 x -> 3/6; base: b1, b2 -> 2/6.
    assert (rows[1]["preq_n"], rows[1]["preq_acc"], rows[1]["preq_base"]) == (6, 3 / 6, 2 / 6)
    assert (rows[1]["preq_acc_edited"], rows[1]["preq_acc_kept"]) == (1 / 4, 2 / 2)
    assert rows[1]["preq_routed"] == 1 / 6  # only a3 met a rule (a) when it was scored
    # The last batch adds a4 x (rule a broke it) and c2 v: 4/8; base b1, b2, a4 -> 3/8; kept 2/3, edited 2/5.
    last = rows[2]
    assert (last["preq_n"], last["preq_acc"], last["preq_base"]) == (8, 4 / 8, 3 / 8)
    assert (last["preq_acc_edited"], last["preq_acc_kept"]) == (2 / 5, 2 / 3)
    assert last["preq_routed"] == 3 / 8  # a3, a4, c2
    assert last["es"] == 1.0 and last["loc"] == 1.0


def test_schedule_rejects_a_pool_from_another_stream():
    stream = _stream()
    other = _stream(n_edits=4)
    with pytest.raises(ValueError, match="pool"):
        prequential.schedule(other.pool, [stream.cases])


class ForgetfulRule(TopicRule):
    """Learns nothing and says so: every edit of a batch is reported not learned."""

    def apply_batch(self, cases: Sequence[EditCase]) -> dict[str, float]:
        return {"final_loss": 1.0, "not_learned": len(cases)}


def test_replay_counts_not_learned_edits_and_preq_stays_at_the_base():
    stream = _stream()
    rows = quality.replay(ForgetfulRule(), stream, quality.Evaluator(stream, None, generation=False), batch_size=2, every=4)
    assert [r["not_learned"] for r in rows[1:]] == [4, 5]
    assert rows[-1]["preq_acc"] == rows[-1]["preq_base"] == 3 / 8 and rows[-1]["es"] == 0.0


def test_a_real_editor_is_scored_before_each_batch_it_learns():
    from melo_eval.methods import MeloMethod
    from melo_runtime.presets import preset_for
    from melo_runtime.tiny import tiny_model

    model, tokenizer = tiny_model("bert", labels=["negative", "positive"])
    method = MeloMethod("melo", model, tokenizer, preset_for(model, "classify"))
    texts = ["The plot is thin", "A fine film", "Dull and long", "Loved every minute", "Mild weather", "Zero stars"]
    base = method.classify(texts)
    flip = {"negative": "positive", "positive": "negative"}
    edited = [True, False, True, True, False, True]
    pool = [(f"r{i}", Probe(t, flip[b] if e else b)) for i, (t, b, e) in enumerate(zip(texts, base, edited))]
    data = LabelShiftData("scotus", ["negative", "positive"], [], [Probe("Something else", "negative")], pool)
    stream = label_shift_stream(data, method.classify, n_edits=4, n_locality=1)
    rows = quality.replay(method, stream, quality.Evaluator(stream, tokenizer, generation=False), batch_size=2, every=2)
    first, last = rows[1], rows[2]
    # The first batch's items (r0, r1, r2) are scored by the unedited editor: only r1 is right.
    assert (first["preq_n"], first["preq_acc"], first["preq_base"], first["preq_routed"]) == (3, 1 / 3, 1 / 3, 0.0)
    assert last["preq_n"] == 6 and last["preq_base"] == 2 / 6
    assert last["es"] == 1.0 and last["not_learned"] == 0
