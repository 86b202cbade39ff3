"""After `make run`: ask the edited model in words it was never trained on, and about other entities.

For the first few demo edits still reachable in CURRENT, prints the route and the answer of CURRENT
and of the base model for

- the edit's **held-out paraphrase** (zsRE's rephrase, never sent to the daemon): should reach the
  edit and answer with its target;
- the paraphrase **asked as a chat** message (the model's chat template): the same;
- a **neighbour**: the edit's question asked about an entity no edit names: must route to no block
  and keep the base model's answer.

Inputs come from ``examples/data/zsre-60.heldout.jsonl`` (written by make_sample_stream.py).

    python examples/generality_demo.py --config examples/embedded.toml [--examples 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELD_OUT = Path(__file__).resolve().parent / "data" / "zsre-60.heldout.jsonl"
TOKENS = 10


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--examples", type=int, default=2)
    args = parser.parse_args(argv)

    from daemon.settings import Settings
    from daemon.snapshot_store_fs import FsSnapshotStore
    from melo_runtime import MeloConfig, MeloEditor
    from melo_runtime.backbones import load_backbone

    settings = Settings.load(Path(args.config))
    store = FsSnapshotStore(settings.snapshot_root)
    version = store.current(settings.model)
    if version is None:
        print(f"generality demo: {settings.model!r} has no published version yet; run `make run` first")
        return 1
    model, tokenizer = load_backbone(settings.backbone or settings.model)
    editor = MeloEditor.from_files(store.load_files(settings.model, version), model, tokenizer)
    base = MeloEditor(model, tokenizer, MeloConfig.from_dict(editor.config.to_dict()))
    reachable = editor.edit_ids()
    rows = [json.loads(line) for line in HELD_OUT.read_text(encoding="utf-8").splitlines()]
    rows = [r for r in rows if r["edit_id"] in reachable and r["neighbour"]][: args.examples]
    events = {e["edit_id"]: e for e in _events(settings)}

    def show(label: str, asked: object, question: str, want: str | None) -> None:
        route = editor.route([question])[0]
        edited = editor.generate([asked], TOKENS)[0].strip().splitlines() or [""]
        before = base.generate([asked], TOKENS)[0].strip().splitlines() or [""]
        where = "no block: the base model answers" if route is None else f"block {route.block}, distance {route.distance:.2f}"
        if want is None:
            verdict = "unchanged ✓" if edited[0] == before[0] else "CHANGED ✗"
        else:
            verdict = "✓" if want.casefold() in edited[0].casefold() else "✗"
        print(f"    {label:<11} {question}")
        print(f"      → base {before[0]!r}  → edited {edited[0]!r} {verdict}  (routed to {where})")

    print(f"generality demo: version {version} (CURRENT), inputs the editor never saw (examples/data/{HELD_OUT.name}):")
    for row in rows:
        event = events.get(row["edit_id"], {})
        print(f"  edit {row['edit_id']}: {event.get('prompt')!r} → {event.get('target')!r} (subject {event.get('subject')!r})")
        target = event.get("target", "")
        show("paraphrase", row["paraphrase"], row["paraphrase"], target)
        show("as a chat", [{"role": "user", "content": row["paraphrase"]}], row["paraphrase"], target)
        show("neighbour", row["neighbour"], row["neighbour"], None)
    return 0


def _events(settings) -> list[dict]:
    spool = Path(settings.spool_dir) / "melo.edits"
    return [json.loads(line) for path in sorted(spool.glob("*.jsonl")) for line in path.read_text().splitlines() if line]


if __name__ == "__main__":
    sys.exit(main())
