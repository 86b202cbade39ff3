"""Classification end to end on the shipped label-shift data: a fine-tuned classifier and its edit stream.

Two steps, both run from the repository root:

    python examples/label_shift.py checkpoint --dataset huffpost --out var/huffpost-minilm
    python examples/label_shift.py events --dataset huffpost --count 200 --out examples/stream-classify/melo.edits

``checkpoint`` fits a classifier head on the dataset's *upstream* period (the pretrained MiniLM
encoder stays frozen: bench/classifier.py) and saves it with ``save_pretrained``: a fine-tuned
classifier directory with its own ``id2label``, exactly what a team would bring. ``events`` turns the
first ``--count`` records of the later *edit pool* (date order) into ``classify`` edit events
(schemas/edit.v1.json): prompt = the text (cut to ``--max-chars``), target = its label. Point
``backbone`` at the checkpoint and ``spool_dir`` at the events (examples/classify.toml) and
``melo run`` corrects the labels that drifted.

Data: ../shared/data/label-shift/ (provenance in each folder's PROVENANCE.md).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent
DEFAULT_DATA = EXAMPLES.parents[1] / "shared" / "data"
DATASETS = {"huffpost": "huffpost-2018-2022", "scotus": "scotus-oyez"}
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._:-]")


def convert(record: dict, dataset: str, model: str, max_chars: int) -> dict:
    """One label-shift record -> one classify edit event."""
    edit_id = _ID_UNSAFE.sub("-", f"{dataset}:{record['id']}")[:128]
    date = str(record["date"])
    created = f"{date}T00:00:00Z" if len(date) == 10 else f"{date[:4]}-01-01T00:00:00Z"  # SCOTUS gives a year only
    return {
        "edit_id": edit_id,
        "model": model,
        "task": "classify",
        "prompt": record["text"][:max_chars].strip(),
        "target": record["label"],
        "source": f"label-shift/{DATASETS[dataset]}/edit_pool.jsonl#{record['id']}",
        "created_at": created,
    }


def edit_events(dataset: str, data_dir: Path, count: int, model: str, max_chars: int) -> list[dict]:
    """The first ``count`` edit-pool records of ``dataset`` in date order, as edit events."""
    path = data_dir / "label-shift" / DATASETS[dataset] / "edit_pool.jsonl"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records.sort(key=lambda r: (str(r["date"]), r["id"]))
    return [convert(r, dataset, model, max_chars) for r in records[:count]]


def save_fine_tuned(dataset: str, data_dir: Path, out: Path) -> dict:
    """Fit MiniLM's head on the upstream period and save the classifier; returns the fit report."""
    sys.path.insert(0, str(EXAMPLES.parent))
    from bench.classifier import trained_classifier

    model, tokenizer, report = trained_classifier("minilm-l6", dataset, data_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("events", "checkpoint"))
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="huffpost")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    parser.add_argument("--out", type=Path, required=True, help="events: a spool folder; checkpoint: a directory")
    parser.add_argument("--count", type=int, default=200, help="events: how many edits")
    parser.add_argument("--model", default="huffpost-demo", help="events: the model namespace")
    parser.add_argument("--max-chars", type=int, default=1000, help="events: cut each text to this many characters")
    args = parser.parse_args(argv)
    if args.step == "checkpoint":
        report = save_fine_tuned(args.dataset, args.data, args.out)
        print(f"wrote {args.out}: MiniLM + head fitted on {report['upstream_items']} upstream items "
              f"(training accuracy {report['upstream_train_accuracy']:.3f})")
        return 0
    events = edit_events(args.dataset, args.data, args.count, args.model, args.max_chars)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.dataset}-{len(events)}.jsonl"
    path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in events), encoding="utf-8")
    print(f"wrote {len(events)} classify edit events to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
