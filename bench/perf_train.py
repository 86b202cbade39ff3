"""Block training speed: our trainer vs the naive loop the official MELO code runs.

For each batch size the same batch of real zsRE edits trains one block three ways, one after the
other on the same model:

* ``naive``   -- the official loop: 50 iterations, each a full forward + backward pass;
* ``cache``   -- 50 iterations, the frozen layers below the first LoRA layer computed once;
* ``ours``    -- the runtime's trainer as the editor runs it: prefix cache + early stop once every
  target of the batch is reproduced.

Reports seconds, iterations, edits/s and the speed-up of each over ``naive``. The naive loop has
no early stop, so its cost is exactly ``iterations`` equal steps: ``--naive-iterations K`` times
only its first K steps and scales the seconds by ``iterations / K`` (reported as extrapolated), for
batch sizes where the full loop would take hours on a CPU.

    python -m bench.perf_train --sizes 1,10,100 --out var/bench/perf_train
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from melo_eval import datasets
from melo_runtime.presets import preset_for


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.perf_train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--sizes", default="1,10,100", help="comma-separated batch sizes")
    parser.add_argument("--iterations", type=int, default=50, help="iteration cap of every variant (official: 50)")
    parser.add_argument("--naive-iterations", type=int, default=None,
                        help="time only this many naive steps and scale to --iterations (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=datasets.DEFAULT_DATA_DIR)
    parser.add_argument("--out", type=Path, default=Path("var/bench/perf_train"))
    return parser.parse_args(argv)


def time_variant(model, data, config, attachment, cache_prefix: bool) -> dict:
    """Train block 0 once with ``config``; seconds, iterations and whether every row was learned."""
    from melo_runtime.block_lora import BlockFactors
    from melo_runtime.families import model_device
    from melo_runtime.trainer import train_block

    device = model_device(model)
    factors = {
        name: BlockFactors(layer.d_in, layer.d_out, config.rank_per_block, device)
        for name, layer in attachment.layers.items()
    }
    started = time.perf_counter()
    result = train_block(
        model, data, factors, 0, config,
        key_module=attachment.key_module, prefix_layers=attachment.prefix_layers, cache_prefix=cache_prefix,
    )
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "iterations": result.iterations,
        "learned": sum(result.learned) / len(result.learned),
        "final_loss": result.final_loss,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison and write perf_train.json / perf_train.md."""
    args = parse_args(argv)
    naive_steps = args.naive_iterations or args.iterations
    if not 1 <= naive_steps <= args.iterations:
        raise SystemExit(f"--naive-iterations must be between 1 and --iterations={args.iterations}")
    torch.set_num_threads(args.threads)
    from melo_runtime.attach import attach
    from melo_runtime.backbones import load_backbone
    from melo_runtime.encoding import TextEncoder

    sizes = [int(s) for s in args.sizes.split(",")]
    model, tokenizer = load_backbone(args.backbone)
    config = preset_for(model)
    attachment = attach(model, config)
    encoder = TextEncoder(model, tokenizer)
    stream = datasets.zsre_stream(args.data_dir, max(sizes), n_locality=0)
    variants = {
        "naive": (replace(config, early_stop=False, iterations=naive_steps), False),
        "cache": (replace(config, early_stop=False, iterations=args.iterations), True),
        "ours": (replace(config, iterations=args.iterations), True),
    }
    rows = []
    for size in sizes:
        cases = stream.cases[:size]
        data = encoder.teacher_forced([c.prompt for c in cases], [c.target for c in cases])
        row: dict = {"batch": size}
        for name, (variant_config, cache_prefix) in variants.items():
            timing = time_variant(model, data, variant_config, attachment, cache_prefix)
            if name == "naive" and naive_steps < args.iterations:
                timing.update(measured_seconds=timing["seconds"], measured_iterations=naive_steps,
                              seconds=timing["seconds"] * args.iterations / naive_steps,
                              iterations=args.iterations, learned=None, extrapolated=True)
            row[name] = {**timing, "edits_per_second": size / timing["seconds"]}
            learned = "n/a (extrapolated)" if timing["learned"] is None else f"{timing['learned']:.2f}"
            print(f"batch {size:4d} {name:6s} {timing['seconds']:8.2f}s  {timing['iterations']:3d} it  "
                  f"learned {learned}", flush=True)
        for name in ("cache", "ours"):
            row[name]["speedup_vs_naive"] = row["naive"]["seconds"] / row[name]["seconds"]
        rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"backbone": args.backbone, "config": config.to_dict(), "threads": args.threads,
              "naive_iterations_timed": naive_steps, "rows": rows}
    (args.out / "perf_train.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    lines = ["| batch | naive s (it) | cache s (it) | ours s (it) | naive edits/s | ours edits/s | cache x | ours x |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['naive']['seconds']:.1f}{'*' if r['naive'].get('extrapolated') else ''} "
            f"({r['naive']['iterations']}) | "
            f"{r['cache']['seconds']:.1f} ({r['cache']['iterations']}) | {r['ours']['seconds']:.1f} "
            f"({r['ours']['iterations']}) | {r['naive']['edits_per_second']:.3f} | "
            f"{r['ours']['edits_per_second']:.3f} | {r['cache']['speedup_vs_naive']:.2f} | "
            f"{r['ours']['speedup_vs_naive']:.2f} |"
        )
    if naive_steps < args.iterations:
        lines.append(f"\n\\* extrapolated: {naive_steps} naive steps timed, scaled to {args.iterations}.")
    table = "\n".join(lines) + "\n"
    (args.out / "perf_train.md").write_text(table, encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
