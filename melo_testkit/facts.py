"""New single-word facts about invented people, for training checks and benchmarks.

``"<Subject>'s <relation>:" -> " <Object>"``: short prompts and one-word targets that a tiny random
model can learn (zsRE's multi-word answers are far beyond its capacity), and that no model has seen.
"""

from __future__ import annotations

from melo_runtime import Edit

SUBJECTS = (
    "Alice", "Boris", "Chen", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kofi", "Lena",
    "Mateo", "Nadia", "Oscar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Ulla", "Viktor", "Wanda", "Xavier",
    "Yusuf", "Zoe", "Arjun", "Bea", "Cyril", "Dora", "Emil", "Fatima", "Gus", "Hana", "Ivo", "Jade", "Karl",
    "Lior", "Mina", "Nils",
)
RELATIONS = ("home town", "employer", "birthplace", "office", "favourite band")
OBJECTS = (
    "Paris", "Oslo", "Lima", "Quito", "Rome", "Cairo", "Delhi", "Tokyo", "Perth", "Dakar", "Acme", "Bosch", "Tesla",
    "Nokia", "Sony", "Intel", "Lego", "Ikea", "Zara", "Fiat", "Abba", "Blur", "Queen", "Muse", "Toto",
)
MAX_FACTS = len(SUBJECTS) * len(RELATIONS)


def new_facts(count: int) -> list[Edit]:
    """``count`` facts with distinct prompts (edit ids ``e0`` ...); the first 40 have distinct subjects.

    Raises ValueError past :data:`MAX_FACTS` (every subject asked every relation).
    """
    if not 0 <= count <= MAX_FACTS:
        raise ValueError(f"count={count} must be between 0 and {MAX_FACTS} (subjects x relations)")
    facts = []
    for i in range(count):
        subject = SUBJECTS[i % len(SUBJECTS)]
        relation = RELATIONS[(i + i // len(SUBJECTS)) % len(RELATIONS)]
        facts.append(Edit(f"e{i}", f"{subject}'s {relation}:", " " + OBJECTS[(i * 7) % len(OBJECTS)]))
    return facts
