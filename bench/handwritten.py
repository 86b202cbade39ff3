"""Hand-written facts: 40 counterfactual edits as a new user writes them, asked in words never shown.

bench/data/handwritten_facts.jsonl holds 40 facts written for this check (not from a benchmark): a
prompt in the layout a user would pick (a cloze such as "The capital of Australia is", or
"Q: ... A:"), a target, and no subject (the editor infers it). Held out from the editor:

* ``rephrases``: two rewordings each, one a cloze and one a "Q: ... A:" question;
* ``chat``: the question as a chat user message (the tokenizer's chat template);
* ``neighbour``: the same relation about another entity ("The capital of Canada is"): must not change;
* ``same_subject``: another question about the same entity ("The currency of Australia is"): must
  not change either.

Per variant (each on a fresh copy of the model's editor, side by side in one process) it reports
rewrite, rephrase and chat success (the target in the reply's first line, case-insensitive; and
``_em``: the reply starts with it), ``layout``: the "Q: ... A:" rephrases asked as "Q: ...\\nA:" (a
layout no row is trained on), and the share of neighbour and same-subject questions whose greedy
reply is unchanged. ``--show-misses`` prints each miss and each changed reply.

    python -m bench.handwritten --variants shipped,no-qforms --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from bench.generality_study import contains
from melo_eval.quality import exact_match
from melo_runtime import Edit, MeloEditor
from melo_runtime.chat import question_of
from melo_runtime.presets import preset_for
from melo_runtime.pretrained import load_smollm2

FACTS = Path(__file__).resolve().parent / "data" / "handwritten_facts.jsonl"
VARIANTS = {"shipped": {}, "no-qforms": {"train_question_forms": False}}
TOKENS = 12
BATCH = 10


def read_facts(path: Path = FACTS) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else ""


def other_layout(prompt: str) -> str | None:
    """A "Q: ... A:" prompt asked as "Q: ...\\nA:" (None for other prompts)."""
    return f"Q: {question_of(prompt)}\nA:" if prompt.startswith("Q: ") else None


def probes(facts: Sequence[dict]) -> dict[str, list[tuple[int, object]]]:
    """(fact index, input) per kind of question."""
    rephrases = [(k, r) for k, f in enumerate(facts) for r in f["rephrases"]]
    layouts = [(k, other_layout(r)) for k, r in rephrases]
    return {
        "rewrite": [(k, f["prompt"]) for k, f in enumerate(facts)],
        "rephrase": rephrases,
        "layout": [(k, text) for k, text in layouts if text],
        "chat": [(k, [{"role": "user", "content": f["chat"]}]) for k, f in enumerate(facts)],
        "neighbour": [(k, f["neighbour"]) for k, f in enumerate(facts)],
        "same_subject": [(k, f["same_subject"]) for k, f in enumerate(facts)],
    }


def replies(editor: MeloEditor, inputs: Sequence[object]) -> list[str]:
    return [first_line(text) for text in editor.generate(list(inputs), TOKENS)]


def run_variant(model, tokenizer, facts: list[dict], overrides: dict, base: dict[str, list[str]], show: bool) -> dict:
    editor = MeloEditor(model, tokenizer, preset_for(model, overrides=overrides))
    started = time.perf_counter()
    not_learned = 0
    for start in range(0, len(facts), BATCH):
        chunk = facts[start : start + BATCH]
        result = editor.apply_batch([Edit(f"h{start + i}", f["prompt"], f["target"]) for i, f in enumerate(chunk)])
        not_learned += len(result.not_learned)
    row: dict[str, object] = {"train_s": round(time.perf_counter() - started), "not_learned": not_learned}
    for kind, asked in probes(facts).items():
        got = replies(editor, [x for _, x in asked])
        if kind in base:
            unchanged = [g == b for g, b in zip(got, base[kind], strict=True)]
            row[kind] = sum(unchanged) / len(unchanged)
            misses = [(x, f"{b!r} -> {g!r}") for (_, x), g, b, same in zip(asked, got, base[kind], unchanged) if not same]
        else:
            targets = [facts[k]["target"] for k, _ in asked]
            row[kind] = sum(map(contains, got, targets)) / len(got)
            row[f"{kind}_em"] = sum(map(exact_match, got, targets)) / len(got)
            misses = [(x, f"{g!r}, want {t!r}") for (_, x), g, t in zip(asked, got, targets) if not contains(g, t)]
        if show:
            for asked_input, what in misses:
                print(f"  {kind} miss: {asked_input!r}: {what}")
    return row


COLUMNS = ("rewrite", "rephrase", "rephrase_em", "layout", "chat", "neighbour", "same_subject", "not_learned", "train_s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.handwritten", description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--show-misses", action="store_true")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2()
    facts = read_facts()
    base_editor = MeloEditor(model, tokenizer, preset_for(model))
    base = {kind: replies(base_editor, [x for _, x in asked]) for kind, asked in probes(facts).items()
            if kind in ("neighbour", "same_subject")}
    print("| variant | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for name in args.variants.split(","):
        torch.manual_seed(0)
        row = run_variant(model, tokenizer, facts, VARIANTS[name], base, args.show_misses)
        cells = [f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
