"""Peak memory of ``MeloEditor.score`` over a long list: in passes of ``ROWS_PER_PASS`` rows (the
shipped behaviour), then the whole list in one pass (as before 413b5bf), side by side in one process.

``melo eval`` scores and generates every applied edit's rephrase at a checkpoint; at 1,000 CounterFact
edits the one-pass evaluation was killed for memory. Peak RSS only grows, so the passes run first.

    python -m bench.eval_memory --rows 500
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from melo_eval import datasets
from melo_runtime import MeloEditor
from melo_runtime import editor as editor_module
from melo_runtime.backbones import load_backbone
from melo_runtime.presets import preset_for


def peak_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=500, help="CounterFact development rephrases to score")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_backbone("smollm2-135m")
    editor = MeloEditor(model, tokenizer, preset_for(model))
    pairs = [(r, c.target) for c in datasets.counterfact_stream(n_edits=args.rows).cases for r in c.rephrases]
    prompts, targets = [p for p, _ in pairs[: args.rows]], [t for _, t in pairs[: args.rows]]
    loaded = peak_mib()
    shipped = editor_module.ROWS_PER_PASS
    try:
        for label, rows in ((f"passes of {shipped}", shipped), ("one pass", len(prompts))):
            editor_module.ROWS_PER_PASS = rows
            started = time.perf_counter()
            editor.score(prompts, targets)
            seconds = time.perf_counter() - started
            print(f"{label}: {len(prompts)} rows, peak RSS {peak_mib():.0f} MiB "
                  f"(model loaded: {loaded:.0f}), {seconds:.1f} s")
    finally:
        editor_module.ROWS_PER_PASS = shipped
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
