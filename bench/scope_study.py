"""Scope study: does a scope key send each held-out paraphrase to its own edit, and nothing else?

Routing only (no training): every edit's key is inserted into the runtime's own ``VectorDB`` in
batches of 10 with labels = normalized targets, exactly as the editor does, then

* ``route_gen``: held-out rephrases routed to their own edit (the paraphrase was never inserted);
* ``route_gen_chat``: the same rephrase without the ``Q: ... A:`` wrapper (how a chat user asks);
* ``leak``: locality probes routed to any edit (NQ questions for zsRE; CounterFact's neighbourhood
  prompts, same relation and another subject);
* ``leak_same``: *same subject, other question*: the next edit's *held-out rephrase* with its
  subject replaced by this edit's subject ("When did Luna 1 launch?" for an edit about Luna 1's
  series), routed to this edit. The rephrase is no edit's wording, so this is a held-out question
  (zsRE only; an upper bound, since a few such questions ask the same thing);
* ``clusters`` / ``conflicts`` / ``forgotten``: the database's counters after the stream.

Key variants: ``sentence`` (MiniLM embedding of the whole prompt, no subject part), ``scope`` (the
shipped scope key: embedding of the clause naming the subject + subject code, melo_runtime/scope.py),
``scope-inferred`` (the same, but subjects inferred from the prompt instead of read from the data).
Development data only (zsre_mend_train-1k.json, counterfact-edit.json).

    python -m bench.scope_study --n-edits 1000 --radii 0.6,0.7,0.8,0.9,1.0
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from melo_eval.datasets import DEFAULT_DATA_DIR, nq_probes, qa_prompt
from melo_runtime.edits import normalize_label
from melo_runtime.scope import SUBJECT_DIM, ScopeKeys, SentenceEncoder, infer_subject, normalized_subject
from melo_runtime.pretrained import minilm_dir
from melo_runtime.vectordb import VectorDB

VARIANTS = ("sentence", "scope", "scope-inferred")


def load_cases(dataset: str, n: int, data_dir: Path) -> tuple[list[dict], list[str]]:
    """Edit records (prompt, chat question, rephrase, target, subject) and locality prompts."""
    if dataset == "zsre":
        raw = json.loads((data_dir / "zsre" / "zsre_mend_train-1k.json").read_text())[:n]
        cases = [
            {"prompt": qa_prompt(r["src"]), "rephrase": qa_prompt(r["rephrase"]), "chat": r["rephrase"],
             "target": r["answers"][0], "subject": r["subject"]}
            for r in raw
        ]
        return cases, [p.prompt for p in nq_probes(data_dir, n)]
    raw = json.loads((data_dir / "counterfact" / "counterfact-edit.json").read_text())[:n]
    cases = [
        {"prompt": r["prompt"], "rephrase": r["rephrase_prompt"], "chat": r["rephrase_prompt"],
         "target": r["target_new"], "subject": r["subject"], "swap": False}
        for r in raw
    ]
    return cases, [r["locality_prompt"] for r in raw]


def same_subject_probes(cases: list[dict]) -> list[tuple[int, str]]:
    """(edit index, the next edit's prompt asked about this edit's subject), where that differs.

    Cases without a subject (``None`` or empty) give and take no probe.
    """
    probes = []
    for i, case in enumerate(cases):
        other = cases[(i + 1) % len(cases)]
        if not case["subject"] or not other["subject"]:
            continue
        if not case.get("swap", True) or other["subject"] not in other["prompt"]:
            continue
        if other["target"] == case["target"] or case["subject"] in other["prompt"]:
            continue
        if other["subject"] not in other["rephrase"]:
            continue
        probes.append((i, other["rephrase"].replace(other["subject"], case["subject"])))
    return probes


def route(db: VectorDB, scope: ScopeKeys | None, encoder: SentenceEncoder, texts: Sequence[str]) -> list[str | None]:
    """The edit id each text is routed to (None: base model)."""
    if scope is None:
        keys = encoder.encode(list(texts))
        return [None if hit is None else hit.edit_id for hit in db.search(keys)]
    return [None if hit is None else hit.edit_id for hit in scope.search(db, list(texts))]


def run(variant: str, radius: float, cases: list[dict], locality: list[str], encoder: SentenceEncoder,
        batch: int = 10) -> dict:
    scoped = variant != "sentence"
    scope = ScopeKeys(encoder) if scoped else None
    dim = encoder.dim + (SUBJECT_DIM if scoped else 0)
    db = VectorDB(dim, radius, conflict_policy="split")
    for start in range(0, len(cases), batch):
        chunk = cases[start : start + batch]
        ids = [f"e{start + i}" for i in range(len(chunk))]
        if scope is None:
            keys = encoder.encode([c["prompt"] for c in chunk])
        else:
            given = [c["subject"] if variant == "scope" else infer_subject(c["prompt"]) for c in chunk]
            subjects = [normalized_subject(s) for s in given]
            keys = scope.edit_keys([c["prompt"] for c in chunk], subjects)
            scope = scope.with_subjects(subjects)
        db.insert(keys, [normalize_label(c["target"]) for c in chunk], [start // batch] * len(chunk), ids)
    own = [f"e{i}" for i in range(len(cases))]
    gen = route(db, scope, encoder, [c["rephrase"] for c in cases])
    chat = route(db, scope, encoder, [c["chat"] for c in cases])
    es = route(db, scope, encoder, [c["prompt"] for c in cases])
    leak = route(db, scope, encoder, locality)
    swapped = same_subject_probes(cases)
    leak_same = route(db, scope, encoder, [text for _, text in swapped])
    stats = db.stats()
    return {
        "variant": variant,
        "radius": radius,
        "route_es": float(np.mean([a == b for a, b in zip(es, own)])),
        "route_gen": float(np.mean([a == b for a, b in zip(gen, own)])),
        "route_gen_chat": float(np.mean([a == b for a, b in zip(chat, own)])),
        "leak": float(np.mean([r is not None for r in leak])),
        "leak_same": float(np.mean([r == f"e{i}" for (i, _), r in zip(swapped, leak_same)])) if swapped else float("nan"),
        "clusters": stats["clusters"],
        "conflicts": stats["conflicts_total"],
        "forgotten": stats["forgotten_total"],
    }


class CachedEncoder(SentenceEncoder):
    """The MiniLM encoder with a per-text cache: the sweep embeds the same texts many times."""

    def __init__(self) -> None:
        super().__init__(minilm_dir(), name="minilm-l6")
        self._cache: dict[str, np.ndarray] = {}

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            for text, row in zip(missing, super().encode(missing, batch_size)):
                self._cache[text] = row
        return np.stack([self._cache[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scope_study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="zsre,counterfact")
    parser.add_argument("--n-edits", type=int, default=1000)
    parser.add_argument("--radii", default="0.6,0.7,0.8,0.9,1.0")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    args = parser.parse_args(argv)
    encoder = CachedEncoder()
    print("| dataset | key | radius | route_es | route_gen | route_gen_chat | leak | leak_same | clusters | conflicts | forgotten |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for dataset in args.datasets.split(","):
        cases, locality = load_cases(dataset, args.n_edits, args.data_dir)
        for variant in args.variants.split(","):
            for radius in (float(r) for r in args.radii.split(",")):
                r = run(variant, radius, cases, locality, encoder)
                print(f"| {dataset} | {variant} | {radius} | {r['route_es']:.3f} | {r['route_gen']:.3f} | "
                      f"{r['route_gen_chat']:.3f} | {r['leak']:.3f} | {r['leak_same']:.3f} | {r['clusters']} | {r['conflicts']} | "
                      f"{r['forgotten']} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
