"""Score a `melo eval` run's held-out rephrases by what they really ask (CounterFact development file).

About half of the "rephrase prompts" of ``counterfact-edit.json`` do not ask the edited question: for
"The mother tongue of Thomas Joannes Stieltjes is" -> English the rephrase is "Thomas Joannes
Stieltjes was born in", for a twin-city edit "People in Lyon's twin city speak the language of".
An editor that answers those with the edit's target is wrong, not general. bench/data/
counterfact_rephrase_labels.jsonl labels the first 300 edits' rephrases by reading them (one rater,
a helper engineer, spot-checked): ``same`` (the same attribute of the same subject: the target is
the right continuation), ``other`` (another attribute, or the target would not be a right answer)
or ``unclear``.

This reads the ``details.jsonl`` that ``melo eval`` writes (melo_eval/quality.py ``rephrase_details``)
and reports, per label: exact match, the share routed to the edit's own block, exact match among
those, and the misses split into routing and block.

    python -m bench.rephrase_labels var/bench/gen-cf-300/details.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

LABELS = Path(__file__).resolve().parent / "data" / "counterfact_rephrase_labels.jsonl"
KINDS = ("same", "other", "unclear")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def label_of(labels: Iterable[dict]) -> dict[tuple[str, str], str]:
    """(prompt, rephrase) -> label of the labels file's records."""
    return {(r["prompt"], r["rephrase"]): r["label"] for r in labels}


def score(details: Iterable[dict], labels: Iterable[dict]) -> dict[str, dict[str, float | int]]:
    """Per label: n, em, routed (to the edit's own block), em_given_routed, miss_routing, miss_block.

    A detail record is matched to its label by (prompt, rephrase); records without a label are left out.
    """
    labelled = label_of(labels)
    counts: dict[str, Counter] = {}
    for record in details:
        label = labelled.get((record["prompt"], record["rephrase"]))
        if label is None:
            continue
        tally = counts.setdefault(label, Counter())
        routed = record["rephrase_block"] is not None and record["rephrase_block"] == record["edit_block"]
        tally.update(n=1, em=int(record["em"]), routed=int(routed), em_routed=int(routed and record["em"]),
                     miss_routing=int(record["miss"] == "routing"), miss_block=int(record["miss"] == "block"))
    out = {}
    for label in [k for k in KINDS if k in counts] + sorted(set(counts) - set(KINDS)):
        tally = counts[label]
        n = tally["n"]
        out[label] = {
            "n": n,
            "em": tally["em"] / n,
            "routed": tally["routed"] / n,
            "em_given_routed": tally["em_routed"] / tally["routed"] if tally["routed"] else float("nan"),
            "miss_routing": tally["miss_routing"],
            "miss_block": tally["miss_block"],
        }
    return out


def table(scores: dict[str, dict[str, float | int]]) -> str:
    lines = ["| rephrase asks | n | exact match | routed to its edit | exact match given routed | misses: routing / block |",
             "|---|---|---|---|---|---|"]
    for label, s in scores.items():
        lines.append(f"| {label} | {s['n']} | {s['em']:.3f} | {s['routed']:.3f} | {s['em_given_routed']:.3f} | "
                     f"{s['miss_routing']} / {s['miss_block']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rephrase_labels", description=__doc__.split("\n\n")[0])
    parser.add_argument("details", type=Path, help="details.jsonl of a `melo eval --dataset counterfact` run")
    parser.add_argument("--labels", type=Path, default=LABELS)
    args = parser.parse_args(argv)
    missing = [str(path) for path in (args.details, args.labels) if not path.is_file()]
    if missing:
        print(f"python -m bench.rephrase_labels: no such file {', '.join(missing)} (a `melo eval` run writes details.jsonl in its --out)")
        return 2
    print(table(score(read_jsonl(args.details), read_jsonl(args.labels))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
