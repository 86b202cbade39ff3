"""Regenerate examples/stream/melo.edits/zsre-300.jsonl: the first 300 zsRE facts as melo edit events.

Source: ../shared/data/zsre/zsre_mend_train-1k.json (ROME's zsre_mend_train subset; provenance in
that folder's PROVENANCE.md; research use). Mapping, as GRACE/MELO use zsRE: prompt = ``src``,
target = ``answers[0]`` (the true answer), rephrases = [``rephrase``], locality = the NQ question
``loc`` with its answer ``loc_ans``. Run from the repository root:

    python examples/make_sample_stream.py [--data PATH] [--count 300] [--model zsre-demo]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "zsre" / "zsre_mend_train-1k.json"


def convert(record: dict, index: int, model: str) -> dict:
    """One zsRE record → one edit event (schemas/edit.v1.json)."""
    loc = record["loc"].removeprefix("nq question: ")
    return {
        "edit_id": f"zsre-train-{index:04d}",
        "model": model,
        "task": "generate",
        "prompt": record["src"],
        "target": record["answers"][0],
        "rephrases": [record["rephrase"]],
        "locality": [{"prompt": loc, "expected": record["loc_ans"]}],
        "source": f"zsre_mend_train-1k.json#{index}",
        "created_at": "2024-01-01T00:00:00Z",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--model", default="zsre-demo")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "stream" / "melo.edits" / "zsre-300.jsonl")
    args = parser.parse_args()
    records = json.loads(args.data.read_text(encoding="utf-8"))[: args.count]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as handle:
        for index, record in enumerate(records):
            handle.write(json.dumps(convert(record, index, args.model), ensure_ascii=False) + "\n")
    print(f"wrote {len(records)} edit events to {args.out}")


if __name__ == "__main__":
    main()
