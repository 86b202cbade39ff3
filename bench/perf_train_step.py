"""Seconds per training step of one batch: the vocabulary projection of every kept column vs the
scored positions only (plus the top layer's MLP on those positions), the frozen prefix cached.

A step is a forward over the LoRA layers and the output layer, a backward and an Adam update. Each
variant trains ``--steps`` + 1 steps without early stop and ``1`` step, both on fresh blocks, and
the difference divided by ``--steps`` is a step's cost without the first pass, which also computes
the frozen prefix. Variants alternate for ``--rounds`` rounds in one process, so load swings hit
both. ``--torch-profile`` adds the operators that take the most time in the scored variant.

    python -m bench.perf_train_step --backbone smollm2-135m --batch 10 --steps 4 --threads 1
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from bench.perf_common import environment, write_report, zsre_edits
from melo_eval import datasets
from melo_runtime.encoding import IGNORE
from melo_runtime.presets import preset_for

VARIANTS = {"columns": False, "scored": True}  # name -> train_block(scored_only=...)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.perf_train_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=10, help="zsRE train facts in the batch")
    parser.add_argument("--steps", type=int, default=4, help="steps timed per variant and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--torch-profile", action="store_true", help="print the top operators of the scored variant")
    parser.add_argument("--data-dir", type=Path, default=datasets.DEFAULT_DATA_DIR)
    parser.add_argument("--out", type=Path, default=Path("var/bench/perf_train_step"))
    args = parser.parse_args(argv)
    if args.batch < 1 or args.steps < 1 or args.rounds < 1:
        parser.error("--batch, --steps and --rounds must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Time the variants and write perf_train_step.json / .md."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from melo_runtime.attach import attach
    from melo_runtime.backbones import load_backbone
    from melo_runtime.block_lora import BlockFactors
    from melo_runtime.encoding import TextEncoder
    from melo_runtime.families import model_device
    from melo_runtime.trainer import train_block

    model, tokenizer = load_backbone(args.backbone)
    config = replace(preset_for(model), early_stop=False)
    attachment = attach(model, config)
    edits = zsre_edits(args.batch, args.data_dir)
    data = TextEncoder(model, tokenizer).teacher_forced([e.prompt for e in edits], [e.target for e in edits])
    device = model_device(model)

    def train(scored_only: bool, steps: int) -> float:
        factors = {
            name: BlockFactors(layer.d_in, layer.d_out, config.rank_per_block, device)
            for name, layer in attachment.layers.items()
        }
        started = time.perf_counter()
        train_block(model, data, factors, 0, replace(config, iterations=steps), key_module=attachment.key_module,
                    prefix_layers=attachment.prefix_layers, scored_only=scored_only)
        return time.perf_counter() - started

    per_step: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, scored_only in VARIANTS.items():
            per_step[name].append((train(scored_only, args.steps + 1) - train(scored_only, 1)) / args.steps)
            print(f"{name:8s} {per_step[name][-1]:.3f} s/step", flush=True)
    if args.torch_profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            train(True, args.steps + 1)
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=12))
    rows, columns = data.targets.shape
    scored_tokens = int((data.targets != IGNORE).sum())
    best = {name: min(values) for name, values in per_step.items()}
    report = {"environment": environment(args.threads), "backbone": args.backbone, "batch": args.batch,
              "shape": [rows, columns], "scored_tokens": scored_tokens, "steps": args.steps,
              "seconds_per_step": per_step, "best": best}
    markdown = (
        f"{args.backbone}, {rows} rows x {columns} columns, {scored_tokens} scored tokens; seconds per step "
        f"(each round), best: columns {best['columns']:.3f}, scored {best['scored']:.3f} "
        f"({best['columns'] / best['scored']:.2f}x)\n\n"
        "| variant | s/step per round |\n|---|---|\n"
        + "".join(f"| {name} | {' / '.join(f'{v:.3f}' for v in values)} |\n" for name, values in per_step.items())
    )
    write_report(args.out, "perf_train_step", report, markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
