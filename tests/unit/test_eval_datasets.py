"""Stream constructions read the real shared data the way each PROVENANCE.md describes."""

import pytest

from melo_eval import datasets
from melo_eval.datasets import split_sentences

pytestmark = pytest.mark.skipif(
    not datasets.DEFAULT_DATA_DIR.is_dir(), reason="shared/data is not beside the checkout"
)


def test_zsre_stream_maps_question_answer_rephrase_and_nq_locality():
    stream = datasets.zsre_stream(n_edits=3, n_locality=2)
    first = stream.cases[0]
    assert first.prompt == "Q: What is the product made by UniFirst? A:"
    assert first.target == " uniform"
    assert first.rephrases == ("Q: What will be the product of UniFirst? A:",)
    assert stream.locality[0].prompt == "Q: john goodman's character in the big lebowski? A:"
    assert stream.locality[0].target == " Walter Sobchak"
    assert len(stream.cases) == 3 and len(stream.locality) == 2 and not stream.reserved


def test_reserved_zsre_reads_the_disjoint_eval_file_and_is_flagged():
    dev = datasets.zsre_stream(n_edits=50)
    final = datasets.zsre_stream(n_edits=50, reserved=True)
    assert final.reserved
    assert not {c.prompt for c in dev.cases} & {c.prompt for c in final.cases}


def test_asking_for_more_edits_than_the_file_holds_names_the_limit():
    with pytest.raises(ValueError, match="only 1000"):
        datasets.zsre_stream(n_edits=1001)


def test_counterfact_edits_towards_target_new_with_neighbourhood_locality():
    stream = datasets.counterfact_stream(n_edits=1)
    assert stream.cases[0].prompt == "The mother tongue of Danielle Darrieux is"
    assert stream.cases[0].target == " English"
    assert stream.locality[0].target == " French"


def test_hallucination_construction_matches_grace_counts():
    stream = datasets.hallucination_stream(n_edits=None)
    assert len(stream.cases) == 1392  # PROVENANCE.md: 761 major + 631 minor inaccurate
    assert len(stream.retention) == 516
    first = stream.cases[0]
    assert first.prompt == "This is a Wikipedia passage about john russell reynolds."
    assert first.target.startswith(" Sir John Russell Reynolds, 1st Baronet")


def test_sentence_splitter_keeps_initials_and_titles_inside_a_sentence():
    text = "He met Dr. Marshall Hall in St. Louis. J. R. Smith left in 1850. Then he died."
    assert split_sentences(text) == [
        "He met Dr. Marshall Hall in St. Louis.",
        "J. R. Smith left in 1850.",
        "Then he died.",
    ]


def test_label_shift_stream_keeps_only_misclassified_items_in_date_order():
    data = datasets.read_label_shift("scotus")
    stream = datasets.label_shift_stream(data, lambda texts: ["Criminal Procedure"] * len(texts), n_edits=20)
    pool_order = {record_id: i for i, (record_id, _) in enumerate(data.edit_pool)}
    order = [pool_order[c.edit_id] for c in stream.cases]
    assert order == sorted(order)
    assert all(c.target != "Criminal Procedure" for c in stream.cases)
    assert stream.task == "classify" and stream.labels[0] == "Criminal Procedure"


def test_label_shift_stream_carries_every_scanned_pool_item_up_to_the_last_edit():
    data = datasets.read_label_shift("scotus")
    stream = datasets.label_shift_stream(data, lambda texts: ["Criminal Procedure"] * len(texts), n_edits=20)
    assert [item.record_id for item in stream.pool] == [record_id for record_id, _ in data.edit_pool[: len(stream.pool)]]
    assert stream.pool[-1].record_id == stream.cases[-1].edit_id
    assert [item.record_id for item in stream.pool if item.edited] == [c.edit_id for c in stream.cases]
    kept = [item for item in stream.pool if not item.edited]
    assert kept and all(item.probe.target == "Criminal Procedure" for item in kept)


def test_label_shift_rejects_an_unknown_dataset_name():
    with pytest.raises(ValueError, match="scotus"):
        datasets.read_label_shift("imdb")


def test_label_shift_texts_are_cut_to_a_token_budget_as_prefixes():
    from melo_runtime.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    data = datasets.read_label_shift("scotus")
    cut = datasets.truncate_label_shift(data, tokenizer, max_tokens=100)
    pairs = [(a.prompt, b.prompt) for a, b in zip(data.dev, cut.dev, strict=True)]
    assert all(len(tokenizer(new).input_ids) <= 100 for _, new in pairs)
    assert all(old.startswith(new) for old, new in pairs)
    assert any(len(new) < len(old) for old, new in pairs)  # SCOTUS facts are long: some were cut
    short = [(old, new) for old, new in pairs if len(tokenizer(old).input_ids) <= 100]
    assert all(old == new for old, new in short)
    assert [p.target for p in cut.dev] == [p.target for p in data.dev]
    assert [rid for rid, _ in cut.edit_pool] == [rid for rid, _ in data.edit_pool]


def test_hallucination_locality_is_wikipedia_text_of_passages_the_stream_never_edits():
    stream = datasets.hallucination_stream(n_edits=100)
    edited = {c.prompt.split(".")[0] for c in stream.cases}
    assert len(stream.locality) > 100
    assert all(p.prompt.startswith("This is a Wikipedia passage about ") for p in stream.locality)
    assert not edited & {p.prompt.split(".")[0] for p in stream.locality}
