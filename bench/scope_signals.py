"""Scope signals: does anything beside the scope key's distance tell a reworded question from another
question about the same subject? Routing only, no training, development data.

Pairs (edit prompt, query, subject), positives asking the edited question, negatives something else:

* ``zsre``: each dev edit's held-out rephrase (1,000) / the next edit's rephrase with this edit's
  subject written in (``bench.scope_study.same_subject_probes``, 998);
* ``counterfact``: the first 300 edits' rephrases labelled ``same`` / ``other``
  (bench/data/counterfact_rephrase_labels.jsonl);
* ``handwritten``: the 40 hand-written facts' two rewordings and chat question / their
  same-subject question (bench/data/handwritten_facts.jsonl), subjects inferred as the editor does.

Signals:

* ``distance:<encoder>``: the masked-question distance the scope key measures (melo_runtime/scope.py)
  with MiniLM (shipped) or any sentence-transformers directory given in ``--encoders``;
* ``alignment``: a token-level check, BERTScore-style F1 between MiniLM's contextual embeddings of
  the two masked questions' content tokens, as a gate beside the shipped distance;
* ``typed mining`` (``--pool N``): each CounterFact edit is also keyed by the pooled questions of N
  earlier edits (counterfact-train.json) within distance tau whose targets are of the same kind
  (cosine of the target embeddings >= sigma), so a relation's other wordings reach it.

For each, the AUC (positives vs negatives) and the share of each inside the radius that lets in 5 /
9 / 14 % of zsRE's negatives (the shipped radius, 1.1, lets in 9 %).

    python -m bench.scope_signals [--encoders minilm,/path/to/all-mpnet-base-v2] [--pool 1000]
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from bench.handwritten import FACTS
from bench.rephrase_labels import LABELS, read_jsonl
from bench.scope_study import same_subject_probes
from melo_eval.datasets import DEFAULT_DATA_DIR, qa_prompt
from melo_runtime.pretrained import minilm_dir
from melo_runtime.scope import SUBJECT_PLACEHOLDER, SentenceEncoder, infer_subject, subject_clause

Pair = tuple[str, str, str]  # (edit prompt, query, subject)
STOP_WORDS = frozenset(
    "a an the of in on at to for by with from is are was were be been what which who whom whose when where why how "
    "does do did it its that this as and or his her their there".split()
)
LEAKS = (0.05, 0.09, 0.14)


def auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = np.asarray(positives, dtype=float)[:, None], np.asarray(negatives, dtype=float)[None]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def alignment_f1(a: np.ndarray, b: np.ndarray) -> float:
    """BERTScore-style F1 of two sets of unit token embeddings [k, d] and [m, d]."""
    similarity = a @ b.T
    recall, precision = similarity.max(1).mean(), similarity.max(0).mean()
    total = recall + precision
    return float(2 * recall * precision / total) if total > 0 else 0.0


def unit_distance(cosine: np.ndarray) -> np.ndarray:
    """L2 distance between unit vectors with cosine ``cosine`` (the vector DB's metric on scope keys)."""
    return np.sqrt(np.maximum(0.0, 2.0 - 2.0 * cosine))


def rephrase_labels() -> dict[str, str]:
    """The labelled CounterFact rephrases: rephrase text -> ``same`` / ``other`` / ``unclear``."""
    return {r["rephrase"]: r["label"] for r in read_jsonl(LABELS)}


def handwritten_pairs(path: Path = FACTS) -> tuple[list[Pair], list[Pair]]:
    positives, negatives = [], []
    for fact in read_jsonl(path):
        subject = infer_subject(fact["prompt"]) or ""
        positives += [(fact["prompt"], q, subject) for q in [*fact["rephrases"], fact["chat"]]]
        negatives.append((fact["prompt"], fact["same_subject"], subject))
    return positives, negatives


def dataset_pairs(data_dir: Path) -> dict[str, tuple[list[Pair], list[Pair]]]:
    zsre = json.loads((data_dir / "zsre" / "zsre_mend_train-1k.json").read_text())
    cases = [{"prompt": qa_prompt(r["src"]), "rephrase": qa_prompt(r["rephrase"]), "target": r["answers"][0],
              "subject": r["subject"]} for r in zsre]
    labels = rephrase_labels()
    cf = json.loads((data_dir / "counterfact" / "counterfact-edit.json").read_text())[:300]
    labelled = [((r["prompt"], r["rephrase_prompt"], r["subject"]), labels.get(r["rephrase_prompt"])) for r in cf]
    return {
        "zsre": ([(c["prompt"], c["rephrase"], c["subject"]) for c in cases],
                 [(cases[i]["prompt"], q, cases[i]["subject"]) for i, q in same_subject_probes(cases)]),
        "counterfact": ([p for p, label in labelled if label == "same"], [p for p, label in labelled if label == "other"]),
        "handwritten": handwritten_pairs(),
    }


def distances(encoder: SentenceEncoder, pairs: list[Pair]) -> np.ndarray:
    """The scope key's masked-question distance of each pair."""
    a = encoder.encode([subject_clause(p, s) for p, _, s in pairs])
    b = encoder.encode([subject_clause(q, s) for _, q, s in pairs])
    return unit_distance((a * b).sum(1))


def content_tokens(encoder: SentenceEncoder, text: str) -> np.ndarray:
    """Unit contextual embeddings of ``text``'s content tokens (no stop words, placeholder, punctuation)."""
    batch = encoder.tokenizer([text], truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder.model(**batch).last_hidden_state[0]
    skip = set(encoder.tokenizer.tokenize(SUBJECT_PLACEHOLDER)) | set(encoder.tokenizer.all_special_tokens)
    tokens = encoder.tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    keep = [i for i, t in enumerate(tokens) if t not in skip and t.lstrip("#") not in STOP_WORDS and re.search(r"\w", t)]
    keep = keep or [i for i, t in enumerate(tokens) if t not in encoder.tokenizer.all_special_tokens]
    return torch.nn.functional.normalize(hidden[keep], dim=-1).numpy()


def alignments(encoder: SentenceEncoder, pairs: list[Pair]) -> np.ndarray:
    return np.array([alignment_f1(content_tokens(encoder, subject_clause(p, s)), content_tokens(encoder, subject_clause(q, s)))
                     for p, q, s in pairs])


def routed(pos: np.ndarray, neg: np.ndarray, keep_pos: np.ndarray, keep_neg: np.ndarray, radius: float) -> str:
    return f"{((pos <= radius) & keep_pos).mean():.3f} / {((neg <= radius) & keep_neg).mean():.3f}"


def typed_mining(encoder: SentenceEncoder, data_dir: Path, pool: int, radius: float) -> list[str]:
    """Rows of the typed-mining table: CounterFact ``same`` / ``other`` routed per (tau, sigma)."""
    edits = json.loads((data_dir / "counterfact" / "counterfact-edit.json").read_text())[:300]
    earlier = json.loads((data_dir / "counterfact" / "counterfact-train.json").read_text())[:pool]
    labels = rephrase_labels()
    label = np.array([labels.get(r["rephrase_prompt"], "") for r in edits])
    question = encoder.encode([subject_clause(r["prompt"], r["subject"]) for r in edits])
    query = encoder.encode([subject_clause(r["rephrase_prompt"], r["subject"]) for r in edits])
    pooled = encoder.encode([subject_clause(r["prompt"], r["subject"]) for r in earlier])
    kind = encoder.encode([r["target_new"] for r in edits]) @ encoder.encode([r["target_new"] for r in earlier]).T
    own = unit_distance((question * query).sum(1))
    to_pool = unit_distance(question @ pooled.T)
    query_to_pool = unit_distance(query @ pooled.T)
    rows = []
    for tau in (0.8, 1.0, 1.2):
        for sigma in (-1.0, 0.5, 0.7):
            keyed = (to_pool <= tau) & (kind >= sigma)
            inside = np.minimum(own, np.where(keyed, query_to_pool, np.inf).min(1)) <= radius
            rows.append(f"| {tau} | {sigma} | {keyed.sum(1).mean():.1f} | {inside[label == 'same'].mean():.3f} | "
                        f"{inside[label == 'other'].mean():.3f} |")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scope_signals", description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoders", default="minilm", help="comma-separated: minilm or sentence-transformers directories")
    parser.add_argument("--pool", type=int, default=1000, help="earlier CounterFact edits for typed mining (0: skip)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    args = parser.parse_args(argv)
    sets = dataset_pairs(args.data_dir)
    minilm = SentenceEncoder(minilm_dir(), name="minilm-l6")
    print("| signal | zsRE leak | radius | " + " | ".join(f"{n} AUC | {n} pos / neg inside" for n in sets) + " |")
    print("|---" * (3 + 2 * len(sets)) + "|")
    shipped: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in args.encoders.split(","):
        encoder = minilm if name == "minilm" else SentenceEncoder(name)
        dist = {n: (distances(encoder, p), distances(encoder, q)) for n, (p, q) in sets.items()}
        shipped = shipped or dist
        for leak in LEAKS:
            radius = float(np.quantile(dist["zsre"][1], leak))
            cells = [f"{auc(-d[0], -d[1]):.3f} | {routed(*d, True, True, radius)}" for d in dist.values()]
            print(f"| distance:{encoder.name} | {leak} | {radius:.3f} | " + " | ".join(cells) + " |", flush=True)
    align = {n: (alignments(minilm, p), alignments(minilm, q)) for n, (p, q) in sets.items()}
    for gate in (0.3, 0.4, 0.5):
        cells = [f"{auc(*align[n]):.3f} | {routed(*shipped[n], align[n][0] >= gate, align[n][1] >= gate, 1.1)}" for n in sets]
        print(f"| alignment >= {gate} within 1.1 | - | 1.1 | " + " | ".join(cells) + " |", flush=True)
    if args.pool:
        print(f"\nTyped mining, radius 1.1, {args.pool} earlier edits pooled\n\n| tau | sigma | keys per edit | same | other |\n|---|---|---|---|---|")
        print("\n".join(typed_mining(minilm, args.data_dir, args.pool, 1.1)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
