"""`melo eval`: replay a real dataset as a sequential edit stream and measure edit quality.

The metrics are described in melo_eval/quality.py. ``--daemon`` replays the stream through the whole
daemon pipeline instead (melo_eval/quality_daemon.py), which imports the daemon and starts local
services; everything else edits in-process.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from melo_eval import datasets
from melo_eval.methods import METHODS
from melo_eval.quality import (
    STREAMS,
    Evaluator,
    build_method,
    build_stream,
    melo_config,
    quality_table,
    replay,
    write_report,
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The arguments of ``melo eval`` (``--help`` lists them)."""
    parser = argparse.ArgumentParser(prog="melo eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=STREAMS, default="zsre")
    parser.add_argument("--reserved", action="store_true",
                        help="use the reserved split (zsRE eval / CounterFact val): final numbers only")
    parser.add_argument("--backbone", default=None, help="shipped name, checkpoint directory, .gguf file or "
                        "hf:<org>/<name> (default: smollm2-135m, or minilm-l6 for scotus/huffpost)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="base weights' dtype (block factors train in float32 whatever it is)")
    parser.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--trust-remote-code", action="store_true", help="let a checkpoint run its own code")
    parser.add_argument("--method", choices=METHODS, default="melo")
    parser.add_argument("--n-edits", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=10, help="edits per micro-batch (one MELO block)")
    parser.add_argument("--every", type=int, default=50, help="evaluate after every k edits")
    parser.add_argument("--n-locality", type=int, default=100, help="locality probes evaluated")
    parser.add_argument("--out", type=Path, default=Path("var/bench/quality"))
    parser.add_argument("--data-dir", type=Path, default=datasets.DEFAULT_DATA_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--no-generation", action="store_true", help="skip free-generation metrics (faster)")
    parser.add_argument("--daemon", action="store_true",
                        help="replay through the whole daemon pipeline (Kafka-protocol broker + Redis + snapshots, "
                             "started on loopback) and score the published versions as a replica loads them; "
                             "generation streams and --method melo only (melo_eval/quality_daemon.py)")
    melo = parser.add_argument_group("MELO config overrides (default: melo_runtime.presets.preset_for)")
    melo.add_argument("--key-source", choices=("hidden", "scope"),
                      help="edit keys: the paper's hidden state or the scope key (default: the preset; melo-paper: hidden)")
    melo.add_argument("--r-init", type=float)
    melo.add_argument("--iters", type=int)
    melo.add_argument("--lr", type=float)
    melo.add_argument("--rank", type=int, help="rank per block (MELO) / LoRA rank (lora)")
    melo.add_argument("--edits-per-block", type=int,
                      help="most edits one block holds (default: the preset's; a micro-batch trains "
                           "ceil(batch / edits-per-block) blocks)")
    melo.add_argument("--key-module")
    melo.add_argument("--target-modules", help="comma-separated module names")
    melo.add_argument("--no-early-stop", action="store_true")
    melo.add_argument("--index-not-learned", action="store_true",
                      help="index an edit's keys even when its block did not learn it (tiny smoke runs)")
    melo.add_argument("--conflict-policy", choices=("forget", "split"),
                      help="what a cluster conflict does with the members it pushes out (default: forget)")
    melo.add_argument("--max-length-tokens", type=int,
                      help="longest prompt+target the editor accepts (all methods; hallucination prompts need 512)")
    grace = parser.add_argument_group("GRACE")
    grace.add_argument("--grace-layer", help="default: the MELO key layer's MLP down projection")
    grace.add_argument("--grace-eps", type=float, default=None, help="deferral radius for new keys")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one quality evaluation; returns the process exit code."""
    args = parse_args(argv)
    if args.n_edits < 1 or args.batch_size < 1 or args.every < 1:
        raise SystemExit(f"--n-edits, --batch-size and --every must be >= 1 (got {args.n_edits}, "
                         f"{args.batch_size}, {args.every})")
    if args.daemon:
        from melo_eval.quality_daemon import run as run_daemon  # imports the daemon: only when asked

        return run_daemon(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from melo_runtime.backbones import load_backbone

    classify = args.dataset in ("scotus", "huffpost")
    backbone = args.backbone or ("minilm-l6" if classify else "smollm2-135m")
    extra: dict = {"backbone": backbone}
    if classify:
        from melo_eval.classifier import trained_classifier

        if (args.dtype, args.device) != ("auto", "cpu"):
            raise SystemExit("label-shift streams fit the classifier head on the CPU in float32 (melo_eval.classifier); "
                             "drop --dtype/--device for scotus/huffpost")
        model, tokenizer, head_report = trained_classifier(backbone, args.dataset, args.data_dir, args.seed)
        extra["classifier_head"] = head_report
    else:
        model, tokenizer = load_backbone(backbone, dtype=args.dtype, device=args.device,
                                         trust_remote_code=args.trust_remote_code)
    extra |= {"dtype": str(model.dtype).removeprefix("torch."), "device": str(model.device)}
    task = "classify" if classify else "generate"
    method = build_method(args.method, model, tokenizer, task, args)
    stream = build_stream(args, method, tokenizer, melo_config(model, task, args).max_length_tokens)
    if hasattr(method, "config"):
        extra["melo_config"] = method.config.to_dict()
    if args.method == "grace":
        if args.grace_eps is None:
            # Development prompts only: NQ questions for generation, the dev split for label shift.
            dev = stream.locality if classify else datasets.nq_probes(args.data_dir, 32)
            method.calibrate_eps([p.prompt for p in dev[:32]])
        extra["grace"] = {"layer": method.layer, "eps": method.eps, "iterations": method.iterations, "lr": method.lr}
    evaluator = Evaluator(stream, tokenizer, generation=not args.no_generation)
    rows = replay(method, stream, evaluator, args.batch_size, args.every)
    write_report(args.out, args, stream, rows, extra, details=evaluator.details)
    print(quality_table(rows))
    print(f"wrote {args.out}/metrics.json, table.md, quality.png" + (", details.jsonl" if evaluator.details else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
