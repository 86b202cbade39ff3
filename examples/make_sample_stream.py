"""Regenerate the sample edit streams: the first zsRE facts as melo edit events.

Writes three files from ../shared/data/zsre/zsre_mend_train-1k.json (ROME's zsre_mend_train subset;
provenance in that folder's PROVENANCE.md; research use):

- ``examples/stream/melo.edits/zsre-<count>.jsonl`` -- the first ``--count`` facts (default 60): the
  spool the ``make run`` demo reads, small enough for a pretrained backbone on CPU;
- ``examples/data/zsre-<full>.jsonl`` -- the first ``--full`` facts (default 300), outside the spool:
  a longer stream to send with ``melo produce`` or to copy into a spool by hand;
- ``examples/data/zsre-<count>.heldout.jsonl`` -- per demo edit, inputs the editor never sees:
  ``paraphrase`` (zsRE's ``rephrase``) and ``neighbour`` (the same question about another entity,
  the subject of a fact outside the stream), which ``examples/generality_demo.py`` asks.

Mapping, as GRACE/MELO use zsRE: prompt = ``src``, target = ``answers[0]`` (the true answer),
subject = ``subject``, locality = the NQ question ``loc`` with its answer ``loc_ans``. The
``rephrase`` is held out (not sent as the event's ``rephrases``) so the demo can show that an edit
holds under wording it was never trained on. Both
files number events from the same first fact, so the demo's events are the first lines of the long
file (same edit ids). Run from the repository root:

    python examples/make_sample_stream.py [--data PATH] [--count 60] [--full 300] [--model zsre-demo]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent
DEFAULT_DATA = EXAMPLES.parents[1] / "shared" / "data" / "zsre" / "zsre_mend_train-1k.json"


def convert(record: dict, index: int, model: str) -> dict:
    """One zsRE record → one edit event (schemas/edit.v1.json)."""
    loc = record["loc"].removeprefix("nq question: ")
    return {
        "edit_id": f"zsre-train-{index:04d}",
        "model": model,
        "task": "generate",
        "prompt": record["src"],
        "target": record["answers"][0],
        "subject": record["subject"],
        "locality": [{"prompt": loc, "expected": record["loc_ans"]}],
        "source": f"zsre_mend_train-1k.json#{index}",
        "created_at": "2024-01-01T00:00:00Z",
    }


def write_events(records: list[dict], out: Path, model: str) -> None:
    """Write ``records`` as edit events, one JSON line each, numbered from the first fact."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as handle:
        for index, record in enumerate(records):
            handle.write(json.dumps(convert(record, index, model), ensure_ascii=False) + "\n")
    print(f"wrote {len(records)} edit events to {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--count", type=int, default=60, help="facts in the demo spool (default 60)")
    parser.add_argument("--full", type=int, default=300, help="facts in the long file for melo produce (default 300)")
    parser.add_argument("--model", default="zsre-demo")
    args = parser.parse_args()
    if not 0 < args.count <= args.full:
        parser.error(f"--count {args.count} must be between 1 and --full ({args.full})")
    records = json.loads(args.data.read_text(encoding="utf-8"))
    if len(records) < args.full:
        parser.error(f"{args.data} holds {len(records)} facts, fewer than --full {args.full}")
    spool = EXAMPLES / "stream" / "melo.edits"
    # The demo reads every *.jsonl in its spool: a stream of another size left there would be read too.
    for stale in spool.glob("zsre-*.jsonl"):
        stale.unlink()
    write_events(records[: args.count], spool / f"zsre-{args.count}.jsonl", args.model)
    write_events(records[: args.full], EXAMPLES / "data" / f"zsre-{args.full}.jsonl", args.model)
    write_held_out(records, args.count, EXAMPLES / "data" / f"zsre-{args.count}.heldout.jsonl")


def write_held_out(records: list[dict], count: int, out: Path) -> None:
    """Per demo edit: its held-out paraphrase, and its question asked about an entity no edit names."""
    outsiders = [r["subject"] for r in records[count:] if r["subject"]]
    with out.open("w", encoding="utf-8") as handle:
        for index, record in enumerate(records[:count]):
            other = outsiders[index % len(outsiders)]
            neighbour = record["src"].replace(record["subject"], other) if record["subject"] in record["src"] else None
            line = {"edit_id": f"zsre-train-{index:04d}", "paraphrase": record["rephrase"], "neighbour": neighbour}
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")
    print(f"wrote {count} held-out paraphrases and neighbours to {out}")


if __name__ == "__main__":
    main()
