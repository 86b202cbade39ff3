"""Routing overhead: edited-model forward time / base-model forward time, by number of edits indexed.

The edited forward is the serving path (``MeloEditor.classify``/``generate`` use it): the routing
decision (scope key: the sentence encoder on each prompt, then the searches; paper key: the key
hook's search inside the forward) and one forward pass in which each row gathers its own block.
The base forward is the same model call with no editor state. ``--new-tokens N`` times a greedy
generation of N tokens instead of one forward (routing happens once per request). With N edits
indexed:

* the benchmark prompts' own keys are indexed, so every row of the timed batch *is* routed to a
  block (the expensive case: search + gather + the low-rank delta);
* the other N - batch keys are synthetic (the prompts' keys plus Gaussian noise far larger than
  R_init, so each becomes its own cluster), spread over N / edits_per_block random blocks.

Synthetic state goes in through the editor's VectorDB and block factors directly: training
10,000 real edits on a CPU would take hours and routing cost does not depend on what the blocks
learned. Target (issue 3): ratio <= 1.10 on CPU.

    python -m bench.perf_routing --edits 0,100,10000 --out var/bench/perf_routing
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from melo_eval import datasets
from melo_runtime.scope import infer_subject, normalized_subject
from melo_runtime.presets import preset_for


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.perf_routing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--edits", default="0,100,10000", help="comma-separated numbers of indexed edits")
    parser.add_argument("--batch", type=int, default=16, help="prompts per timed forward")
    parser.add_argument("--repeats", type=int, default=15, help="timed forwards per measurement (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=0, help="time greedy generation of this many tokens (0: one forward)")
    parser.add_argument(
        "--r-init-scale", type=float, default=1.0,
        help="multiply the preset's R_init (1.0 = preset); below 1 keeps crowded prompt keys (tiny models) in "
        "separate clusters instead of superseding each other",
    )
    parser.add_argument("--data-dir", type=Path, default=datasets.DEFAULT_DATA_DIR)
    parser.add_argument("--out", type=Path, default=Path("var/bench/perf_routing"))
    return parser.parse_args(argv)


def populate(editor, prompts: list[str], prompt_keys: np.ndarray, n_edits: int, seed: int = 0) -> None:
    """Index ``n_edits`` keys (the prompts' own first) over random blocks of ``edits_per_block``."""
    if n_edits == 0:
        return
    generator = np.random.default_rng(seed)
    config = editor.config
    n_blocks = max(1, -(-n_edits // config.edits_per_block))
    torch.manual_seed(seed)
    for factors in editor.factors.values():  # synthetic state, see module docstring
        for _ in range(n_blocks):
            factors.append(torch.randn(factors.rank, factors.d_in) * 0.01, torch.randn(factors.d_out, factors.rank) * 0.01)
    spread = 50.0 * config.r_init / np.sqrt(prompt_keys.shape[1])  # noise norm ~ 50 R_init: distinct clusters
    extra = n_edits - min(n_edits, len(prompt_keys))
    base = prompt_keys[generator.integers(0, len(prompt_keys), extra)]
    synthetic = base + generator.normal(0, spread, base.shape).astype(np.float32)
    keys = np.concatenate([prompt_keys[: min(n_edits, len(prompt_keys))], synthetic]).astype(np.float32)
    blocks = [i % n_blocks for i in range(len(keys))]
    editor.db.insert(keys, [f"label-{i}" for i in range(len(keys))], blocks, [f"e{i}" for i in range(len(keys))])
    if editor._scope is not None:  # noqa: SLF001 -- the subjects the prompts' keys were made with
        editor._scope = editor._scope.with_subjects(normalized_subject(infer_subject(p)) for p in prompts)  # noqa: SLF001


def time_forward(model, inputs: dict, state, repeats: int, new_tokens: int = 0) -> float:
    """Median seconds of ``repeats`` forwards or ``new_tokens``-token greedy generations (after one
    warm-up), inside ``state`` when given (``state()`` is called inside the timed region)."""
    from melo_runtime.routing import use_state

    timings = []
    for i in range(repeats + 1):
        started = time.perf_counter()
        with torch.no_grad():
            if state is None:
                _run(model, inputs, new_tokens)
            else:
                with use_state(state()):
                    _run(model, inputs, new_tokens)
        if i:
            timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def _run(model, inputs: dict, new_tokens: int) -> None:
    if not new_tokens:
        model(**inputs)
        return
    kwargs = {k: v for k, v in inputs.items() if k != "position_ids"}
    model.generate(**kwargs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   pad_token_id=model.config.eos_token_id)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure base vs edited forward for each number of indexed edits; write JSON + markdown."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from melo_runtime import MeloEditor
    from melo_runtime.backbones import load_backbone

    model, tokenizer = load_backbone(args.backbone)
    config = preset_for(model)
    config = dataclasses.replace(config, r_init=config.r_init * args.r_init_scale)
    prompts = [c.prompt for c in datasets.zsre_stream(args.data_dir, args.batch, n_locality=0).cases]
    rows = []
    for n_edits in [int(n) for n in args.edits.split(",")]:
        editor = MeloEditor(model, tokenizer, config)
        prompt_keys = editor.keys(prompts).numpy()
        populate(editor, prompts, prompt_keys, n_edits)
        scoped = editor.config.key_source == "scope"
        routed = sum(route is not None for route in editor.route(prompts))
        batch = editor.encoder.prompts(prompts)
        # Interleave base and edited measurements so load changes on the shared CPU hit both alike.
        base_times, edited_times = [], []
        for _ in range(3):
            base_times.append(time_forward(model, batch.inputs, None, args.repeats, args.new_tokens))
            edited_times.append(time_forward(
                model, batch.inputs,
                lambda: editor.serving_state(batch.key_mask, prompts if scoped else None),
                args.repeats, args.new_tokens,
            ))
        base, edited = min(base_times), min(edited_times)
        row = {"edits_indexed": n_edits, "clusters": editor.stats()["clusters"], "blocks": editor.blocks,
               "rows_routed": routed, "batch": len(prompts), "base_ms": base * 1e3, "edited_ms": edited * 1e3,
               "ratio": edited / base}
        print(json.dumps(row), flush=True)
        rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"backbone": args.backbone, "threads": args.threads, "repeats": args.repeats,
              "key_source": config.key_source, "new_tokens": args.new_tokens, "rows": rows}
    (args.out / "perf_routing.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    lines = ["| edits indexed | clusters | blocks | rows routed | base ms | edited ms | ratio |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['edits_indexed']} | {r['clusters']} | {r['blocks']} | {r['rows_routed']}/{r['batch']} | "
                     f"{r['base_ms']:.1f} | {r['edited_ms']:.1f} | {r['ratio']:.3f} |")
    table = "\n".join(lines) + "\n"
    (args.out / "perf_routing.md").write_text(table, encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
