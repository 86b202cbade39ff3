"""Choose MELO's key layer and R_init from routing alone, on development data.

Training decides whether an edit is learned; *routing* decides whether a rephrase reaches the
edit's block (generality) and whether an unrelated input stays on the base model (locality). Both
depend only on the keys, so they can be measured for many key layers and radii without training:

The edit keys are inserted into the runtime's own ``VectorDB`` batch by batch, exactly as the
editor would (add / expand / conflict / forget with labels = normalized targets), then:

* ``route_es``: fraction of edit prompts routed to their own edit's block;
* ``route_gen``: fraction of held-out rephrases routed to their own edit's block;
* ``route_loc``: fraction of locality probes routed to no block (base model);
* ``clusters`` / ``conflicts`` / ``forgotten``: the index's size and counters after the stream.

Development data only: zsRE (zsre_mend_train-1k.json; locality = NQ questions) or CounterFact
(counterfact-edit.json; rephrase = ``rephrase_prompt``, locality = each case's neighbourhood prompt).
``--conflict-policies`` compares the VectorDB's conflict policies on the same keys.

    python -m bench.key_spread --layers 20,23,26 --n-edits 200
    python -m bench.key_spread --dataset counterfact --layers 23 --fractions 0.45 --conflict-policies forget,split
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from melo_eval import datasets
from melo_eval.tables import markdown_table
from melo_runtime.presets import preset_for


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.key_spread", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--layers", default="20,23,26", help="layer indices whose mlp.up_proj output is the key")
    parser.add_argument("--module", default="mlp.up_proj", help="module inside each layer used as key")
    parser.add_argument("--dataset", choices=("zsre", "counterfact"), default="zsre")
    parser.add_argument("--n-edits", type=int, default=200)
    parser.add_argument("--n-locality", type=int, default=300,
                        help="NQ locality probes (zsre); CounterFact has one neighbourhood probe per edit")
    parser.add_argument("--conflict-policies", type=_policies, default=["forget"],
                        help="comma-separated VectorDB conflict policies to compare: forget, split")
    parser.add_argument("--fractions", default="0.15,0.25,0.35,0.45,0.55,0.65,0.75",
                        help="R_init candidates as fractions of the calibration median (MeloConfig rule)")
    parser.add_argument("--batch-size", type=int, default=10, help="edits per block, as the stream would batch them")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=datasets.DEFAULT_DATA_DIR)
    parser.add_argument("--out", type=Path, default=Path("var/bench/key_spread"))
    return parser.parse_args(argv)


def _policies(text: str) -> list[str]:
    from melo_runtime.vectordb import CONFLICT_POLICIES

    policies = text.split(",")
    if any(p not in CONFLICT_POLICIES for p in policies):
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(CONFLICT_POLICIES)}")
    return policies


def load_stream(args: argparse.Namespace) -> datasets.Stream:
    """The development stream ``--dataset`` names (module docstring)."""
    if args.dataset == "counterfact":
        return datasets.counterfact_stream(args.data_dir, args.n_edits)
    return datasets.zsre_stream(args.data_dir, args.n_edits, args.n_locality)


def routing_outcomes(edit_keys: torch.Tensor, labels: list[str], rephrase_keys: torch.Tensor, owner: torch.Tensor,
                     locality_keys: torch.Tensor, radius: float, batch_size: int,
                     conflict_policy: str = "forget") -> dict[str, float]:
    """Insert the edits in batches (block = batch index) and route every probe set (module docstring)."""
    from melo_runtime import VectorDB

    db = VectorDB(edit_keys.shape[1], radius, conflict_policy=conflict_policy)
    blocks = [i // batch_size for i in range(len(edit_keys))]
    for start in range(0, len(edit_keys), batch_size):
        end = start + batch_size
        db.insert(edit_keys[start:end].numpy(), labels[start:end], blocks[start:end],
                  [f"e{i}" for i in range(start, min(end, len(edit_keys)))])

    def own_block(keys: torch.Tensor, owners: list[int]) -> float:
        hits = db.search(keys.numpy())
        return sum(h is not None and h.edit_id == f"e{o}" for h, o in zip(hits, owners)) / len(owners)

    stats = db.stats()
    return {
        "conflict_policy": conflict_policy,
        "radius": radius,
        "route_es": own_block(edit_keys, list(range(len(edit_keys)))),
        "route_gen": own_block(rephrase_keys, owner.tolist()),
        "route_loc": sum(h is None for h in db.search(locality_keys.numpy())) / len(locality_keys),
        "clusters": stats["clusters"],
        "conflicts": stats["conflicts_total"],
        "forgotten": stats["forgotten_total"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Print and write, per key layer, radius and conflict policy, the routing-level generality and locality."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from dataclasses import replace

    from melo_runtime import MeloEditor
    from melo_runtime.backbones import load_backbone
    from melo_runtime.presets import calibrate_r_init
    from melo_runtime.edits import normalize_label

    model, tokenizer = load_backbone(args.backbone)
    stream = load_stream(args)
    with_rephrase = [c for c in stream.cases if c.rephrases]
    preset = preset_for(model)
    stack = preset.key_module.split(".mlp.")[0].rsplit(".", 1)[0]  # e.g. model.layers
    results = []
    for layer in [int(x) for x in args.layers.split(",")]:
        key_module = f"{stack}.{layer}.{args.module}"
        median = calibrate_r_init(model, key_module, fraction=1.0)
        targets = [f"{stack}.{layer + 1}.mlp.down_proj"]  # any module above the key: keys do not depend on it
        editor = MeloEditor(model, tokenizer, replace(preset, key_module=key_module, target_modules=targets))
        edit_keys = editor.keys([c.prompt for c in stream.cases])
        rephrase_keys = editor.keys([c.rephrases[0] for c in with_rephrase])
        owner = torch.tensor([stream.cases.index(c) for c in with_rephrase])
        labels = [normalize_label(c.target) for c in stream.cases]
        locality_keys = editor.keys([p.prompt for p in stream.locality])
        for fraction in [float(f) for f in args.fractions.split(",")]:
            for policy in args.conflict_policies:
                row = {"dataset": stream.name, "key_module": key_module, "fraction": fraction,
                       "calibration_median": median,
                       **routing_outcomes(edit_keys, labels, rephrase_keys, owner, locality_keys,
                                          fraction * median, args.batch_size, policy)}
                # The shipped preset: its key module and its radius (MeloConfig rounds it to 6 decimals).
                row["preset"] = key_module == preset.key_module and abs(row["radius"] - preset.r_init) < 1e-5
                print(json.dumps(row), flush=True)
                results.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"key_spread_{stream.name}"
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    table = results_table(results)
    (args.out / f"{stem}.md").write_text(table, encoding="utf-8")
    print(table)
    return 0


def results_table(results: list[dict]) -> str:
    """One row per (dataset, key module, radius, conflict policy)."""
    header = ["dataset", "key module", "R_init (fraction x median)", "conflict policy", "route_es", "route_gen",
              "route_loc", "clusters", "conflicts", "forgotten"]
    rows = [[r["dataset"], r["key_module"], f"{r['radius']:.2f} ({r['fraction']} x {r['calibration_median']:.1f})",
             r["conflict_policy"], f"{r['route_es']:.3f}", f"{r['route_gen']:.3f}", f"{r['route_loc']:.3f}",
             r["clusters"], r["conflicts"], r["forgotten"]] for r in results]
    return markdown_table(header, rows) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
