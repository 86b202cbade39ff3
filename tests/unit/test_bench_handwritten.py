"""bench.handwritten: the data file and the probes built from it (no model)."""

from bench.generality_study import contains
from bench.handwritten import first_line, other_layout, probes, read_facts


def test_every_fact_has_its_held_out_questions_and_no_subject():
    facts = read_facts()
    assert len(facts) == 40
    for fact in facts:
        assert set(fact) == {"prompt", "target", "rephrases", "chat", "neighbour", "same_subject"}
        assert len(fact["rephrases"]) == 2 and fact["prompt"] not in fact["rephrases"]
        assert all(isinstance(v, str) and v.strip() for v in [fact["prompt"], fact["target"], fact["chat"]])


def test_probes_ask_each_fact_in_every_held_out_form():
    facts = [{"prompt": "The capital of Zorblax is", "target": "Mira", "rephrases": ["Zorblax's capital is",
              "Q: What is the capital of Zorblax? A:"], "chat": "Which city is Zorblax's capital?",
              "neighbour": "The capital of Quux is", "same_subject": "The currency of Zorblax is"}]
    asked = probes(facts)
    assert asked["rephrase"] == [(0, "Zorblax's capital is"), (0, "Q: What is the capital of Zorblax? A:")]
    assert asked["layout"] == [(0, "Q: What is the capital of Zorblax?\nA:")]
    assert asked["chat"] == [(0, [{"role": "user", "content": "Which city is Zorblax's capital?"}])]
    assert other_layout("The capital of Zorblax is") is None


def test_a_reply_is_scored_on_its_first_line_case_insensitively():
    assert first_line("\n  Mira, of course\nnext") == "Mira, of course"
    assert contains("the city of mira", "Mira") and not contains("", "Mira")
