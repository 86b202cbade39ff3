"""bench.scope_study.same_subject_probes: the next edit's question asked about this edit's subject."""

from bench.scope_study import same_subject_probes


def case(prompt: str, rephrase: str, subject: str | None, target: str) -> dict:
    return {"prompt": prompt, "rephrase": rephrase, "subject": subject, "target": target}


def test_probe_writes_this_subject_into_the_next_rephrase():
    cases = [
        case("Q: Which series is Luna 1 part of? A:", "Q: Luna 1 belongs to which series? A:", "Luna 1", "Luna"),
        case("Q: When was Sputnik 2 launched? A:", "Q: What year did Sputnik 2 launch? A:", "Sputnik 2", "1957"),
    ]
    assert same_subject_probes(cases) == [
        (0, "Q: What year did Luna 1 launch? A:"),
        (1, "Q: Luna 1 belongs to which series? A:".replace("Luna 1", "Sputnik 2")),
    ]


def test_cases_without_a_subject_give_and_take_no_probe():
    cases = [
        case("Q: Which series is Luna 1 part of? A:", "Q: Luna 1 belongs to which series? A:", "Luna 1", "Luna"),
        case("Q: When was it launched? A:", "Q: What year did it launch? A:", None, "1957"),
        case("Q: Who founded Acme? A:", "Q: Acme was founded by whom? A:", "Acme", "Wile"),
    ]
    assert same_subject_probes(cases) == [(2, "Q: Luna 1 belongs to which series? A:".replace("Luna 1", "Acme"))]
