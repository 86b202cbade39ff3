"""Memory cost of edits: extra parameters per 1,000 edits and snapshot bytes per edit.

    python -m bench.perf_memory --backbone smollm2-135m --edits 300 --iterations 2

Replays real zsRE edits through a :class:`MeloEditor` with the backbone's shipped preset
(``preset_for``), one micro-batch of ``edits_per_block`` edits per block as the daemon
does, and publishes every batch as a version through the real :class:`FsSnapshotStore`. Measured
per version: the size of each snapshot file, the bytes of blobs the store had to write (blobs it
already held are re-used, so unchanged block files cost nothing), and the parameters in the
block files. Training runs only ``--iterations`` steps: whether an edit is learned does not change
a single byte here (block shapes are fixed; keys and clusters come from the frozen model).

Extra parameters follow exactly from the layout, which the run checks against the block files:

    params(E) = ceil(E / k) * p * sum over LoRA layers of (d_in + d_out)

(k = edits per block, p = ranks per block). The MELO paper reports 0.12M extra parameters for its
zsRE run on T5-small; :func:`paper_layout_params` applies the same formula to the official T5-small
layout for comparison. Beyond the measured run, 1k and 10k figures are derived: block and key-segment
bytes are constant per block (both written once) and index.json, the one file every version rewrites,
is fitted as a + b * edits on the measured versions.
The report says which numbers are measured and which derived.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from tqdm import tqdm

from melo_eval import datasets
from bench.perf_common import environment, write_report, zsre_edits
from melo_eval.tables import markdown_table
from daemon.snapshot_store_fs import FsSnapshotStore
from melo_runtime import MeloEditor
from melo_runtime.backbones import load_backbone
from melo_runtime.pretrained import backbone_fingerprint
from melo_runtime.presets import preset_for

MODEL_NAME = "perf-memory"
GROWTH_POINTS = (1_000, 10_000)
# MELO (arXiv 2312.11795), efficiency comparison on zsRE with T5-small: extra parameters of its blocks.
PAPER_EXTRA_PARAMS = 0.12e6
PAPER_EDITS = 1_000
# Official T5-small layout (DESIGN.md §2): LoRA on the feed-forward wi (512 -> 2048) and wo
# (2048 -> 512) of the top encoder block, 2 ranks per block, 100 edits per block.
T5_SMALL_LAYERS = {"wi": (512, 2048), "wo": (2048, 512)}
T5_SMALL_RANK, T5_SMALL_EDITS_PER_BLOCK = 2, 100


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.perf_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="smollm2-135m", help="a melo_runtime.backbones name (generate task)")
    parser.add_argument("--edits", type=int, default=300, help="zsRE edits actually applied and published")
    parser.add_argument("--batch", type=int, default=None, help="edits per block (default: the preset's)")
    parser.add_argument("--iterations", type=int, default=2, help="training steps per block (bytes do not depend on it)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--data-dir", type=Path, default=datasets.DEFAULT_DATA_DIR)
    parser.add_argument("--out", type=Path, default=Path("bench/out/perf"))
    args = parser.parse_args(argv)
    if args.edits < 1:
        parser.error(f"--edits={args.edits} must be >= 1")
    if args.batch is not None and args.batch < 1:
        parser.error(f"--batch={args.batch} must be >= 1")
    if args.iterations < 1:
        parser.error(f"--iterations={args.iterations} must be >= 1")
    return args


def block_params(layers: dict[str, Sequence[int]], rank: int) -> int:
    """Parameters of one block: ``rank * (d_in + d_out)`` per LoRA layer (A is p x d_in, B is d_out x p)."""
    return sum(rank * (int(d_in) + int(d_out)) for d_in, d_out in layers.values())


def params_for_edits(edits: int, edits_per_block: int, per_block: int) -> int:
    """Extra parameters after ``edits`` edits learned ``edits_per_block`` to a block."""
    return math.ceil(edits / edits_per_block) * per_block


def paper_layout_params(edits: int = PAPER_EDITS) -> int:
    """The formula on MELO's official T5-small layout (the paper's own efficiency setting)."""
    per_block = block_params(T5_SMALL_LAYERS, T5_SMALL_RANK)
    return params_for_edits(edits, T5_SMALL_EDITS_PER_BLOCK, per_block)


def tensor_params(data: bytes) -> int:
    """Number of elements in a safetensors file."""
    return sum(t.numel() for t in safetensors.torch.load(data).values())


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``(a, b)`` of ``y = a + b x``; with one point, the line through it and the origin."""
    if len(xs) == 1:
        return 0.0, ys[0] / xs[0]
    slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(intercept), float(slope)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Apply and publish the edits; return the per-version measurements and the layout."""
    model, tokenizer = load_backbone(args.backbone)
    preset = preset_for(model, "generate")
    batch = args.batch or preset.edits_per_block
    # Storage per block is measured: exactly one block per batch, indexed whether learned or not.
    config = dataclasses.replace(preset, iterations=args.iterations, edits_per_block=batch,
                                 max_iterations=args.iterations, retry_rounds=0, index_not_learned=True)
    editor = MeloEditor(model, tokenizer, config)
    edits = zsre_edits(args.edits, args.data_dir)
    base = {"id": args.backbone, "weights_sha256": backbone_fingerprint(model)}
    rows: list[dict[str, Any]] = []
    block_bytes: list[int] = []
    with tempfile.TemporaryDirectory(prefix="melo-perf-memory-") as root:
        store = FsSnapshotStore(root)
        blob_dir = Path(root) / MODEL_NAME / "blobs" / "sha256"
        parent = None
        batches = [edits[i : i + batch] for i in range(0, len(edits), batch)]
        for chunk in tqdm(batches, desc=f"apply+publish on {args.backbone}", unit="block"):
            editor.apply_batch(chunk)
            files = editor.export_files()
            held = {p.name for p in blob_dir.iterdir()} if blob_dir.is_dir() else set()
            started = time.perf_counter()
            manifest = store.publish(
                MODEL_NAME,
                files,
                parent=parent,
                meta={"base_model": base, "melo_config": config.to_dict(), "edit_ids": [e.edit_id for e in chunk]},
            )
            publish_s = time.perf_counter() - started
            parent = manifest.version
            written = {ref.sha256: ref.bytes for ref in manifest.files.values() if ref.sha256 not in held}
            stats = editor.stats()
            newest_block = f"blocks/{stats['blocks'] - 1:06d}.safetensors"
            newest_keys = f"keys/{stats['blocks'] - 1:06d}.safetensors"
            block_bytes.append(len(files[newest_block]))
            rows.append(
                {
                    "version": manifest.version,
                    "edits": sum(len(c) for c in batches[: manifest.version]),
                    "blocks": stats["blocks"],
                    "keys": stats["keys"],
                    "clusters": stats["clusters"],
                    "block_file_bytes": len(files[newest_block]),
                    "keys_file_bytes": len(files[newest_keys]),  # this batch's key segment
                    "keys_files_total_bytes": sum(len(d) for n, d in files.items() if n.startswith("keys/")),
                    "graph_files_bytes": sum(len(d) for n, d in files.items() if n.startswith("graph/")),
                    "index_file_bytes": len(files["index.json"]),
                    "config_file_bytes": len(files["config.json"]),
                    # scope-keyed editors: the encoder identity and the known subjects (grows with them)
                    "scope_file_bytes": len(files.get("scope.json", b"")),
                    "version_bytes": manifest.total_bytes,
                    "new_blob_bytes": sum(written.values()),
                    "manifest_bytes": (Path(root) / MODEL_NAME / "versions" / f"{manifest.version}.json").stat().st_size,
                    "publish_seconds": round(publish_s, 4),
                }
            )
            # Retention keeps the disk bounded; the latest version still references every block
            # blob, so the re-use of unchanged blobs measured above is unaffected.
            store.retain(MODEL_NAME, keep_last=1, keep_statuses=frozenset())
        final = editor.export_files()
    index = json.loads(final["index.json"])
    per_block = block_params(index["layers"], config.rank_per_block)
    measured_params = sum(tensor_params(data) for name, data in final.items() if name.startswith("blocks/"))
    if measured_params != per_block * editor.stats()["blocks"]:
        raise RuntimeError(
            f"block files hold {measured_params} parameters but the formula gives {per_block} x {editor.stats()['blocks']}; "
            "the block layout is not what this benchmark assumes"
        )
    key_arrays = {
        f"{name}:{tensor}": t
        for name, data in final.items()
        if name.startswith(("keys/", "graph/"))
        for tensor, t in safetensors.torch.load(data).items()
    }
    return {
        "backbone": args.backbone,
        "config": config.to_dict(),
        "preset_iterations": preset.iterations,
        "layers": index["layers"],
        "key_dim": int(index["db"]["dim"]),
        "edits_per_block": batch,
        "params_per_block": per_block,
        "measured_block_params_total": measured_params,
        "key_arrays_total": {
            "files": len({name.split(":")[0] for name in key_arrays}),
            "rows": sum(int(t.shape[0]) for name, t in key_arrays.items() if name.startswith("keys/")),
        },
        "block_file_bytes": max(block_bytes),
        "versions": rows,
    }


def derive(measured: dict[str, Any]) -> dict[str, Any]:
    """Parameters and bytes at 1k and 10k edits from the measured per-block and per-edit sizes."""
    rows = measured["versions"]
    k, per_block, block_bytes = measured["edits_per_block"], measured["params_per_block"], measured["block_file_bytes"]
    xs = [row["edits"] for row in rows]
    # Each version writes its block, its batch's key segment (constant per batch) and index.json anew;
    # graph files appear only above the vector DB's exact-scan size (4,096 clusters): not modelled.
    segment_bytes = float(np.mean([row["keys_file_bytes"] for row in rows]))
    index_fit = linear_fit(xs, [row["index_file_bytes"] for row in rows])
    config_bytes = rows[-1]["config_file_bytes"]

    def rewritten(edits: int) -> float:  # the files every version writes anew, besides its block
        return segment_bytes + index_fit[0] + index_fit[1] * edits

    last = rows[-1]
    growth = []
    for edits in sorted({*GROWTH_POINTS, last["edits"]}):
        measured = edits == last["edits"]
        blocks = math.ceil(edits / k)
        if measured:
            version_bytes, per_version_new = last["version_bytes"], last["new_blob_bytes"]
            cumulative = sum(row["new_blob_bytes"] for row in rows)  # every blob any version wrote
        elif edits < last["edits"]:
            continue  # inside the measured run: its own rows say it
        else:
            version_bytes = blocks * (block_bytes + segment_bytes) + index_fit[0] + index_fit[1] * edits + config_bytes
            per_version_new = block_bytes + rewritten(edits)
            # Without retention the store keeps every version: new bytes summed over versions 1..blocks.
            cumulative = sum(block_bytes + rewritten(min(v * k, edits)) for v in range(1, blocks + 1)) + config_bytes
        growth.append(
            {
                "edits": edits,
                "measured": measured,
                "extra_params": params_for_edits(edits, k, per_block),
                "extra_params_per_1k_edits": round(params_for_edits(edits, k, per_block) * 1000 / edits),
                "version_bytes": round(version_bytes),
                "version_bytes_per_edit": round(version_bytes / edits),
                "new_bytes_per_version": round(per_version_new),
                "new_bytes_per_edit": round(per_version_new / k),
                "store_bytes_no_retention": round(cumulative),
            }
        )
    return {
        "keys_segment_mean_bytes": round(segment_bytes),
        "index_file_fit_bytes": {"a": round(index_fit[0]), "b_per_edit": round(index_fit[1], 1)},
        "growth": growth,
        "paper": {
            "reported_extra_params": PAPER_EXTRA_PARAMS,
            "edits": PAPER_EDITS,
            "formula_on_official_t5_small_layout": paper_layout_params(),
            "ours_at_paper_edits_per_block": params_for_edits(1000, T5_SMALL_EDITS_PER_BLOCK, per_block),
        },
    }


def render(measured: dict[str, Any], derived: dict[str, Any]) -> str:
    """Markdown for bench/RESULTS.md."""
    rows, layers = measured["versions"], measured["layers"]
    last = rows[-1]
    layout = ", ".join(f"`{name}` {d_in}->{d_out}" for name, (d_in, d_out) in layers.items())
    paper = derived["paper"]
    parts = [
        f"Backbone `{measured['backbone']}`, shipped preset: p = {measured['config']['rank_per_block']} ranks/block, "
        f"k = {measured['edits_per_block']} edits/block, key dim {measured['key_dim']}, LoRA layers: {layout}.",
        f"Per block: p x sum(d_in + d_out) = **{measured['params_per_block']:,} parameters** "
        f"(checked against the {last['blocks']} block files: {measured['measured_block_params_total']:,} = "
        f"{last['blocks']} x {measured['params_per_block']:,}); one block file = {measured['block_file_bytes']:,} bytes.",
        "",
        "Measured run (every micro-batch published as a version through FsSnapshotStore; "
        f"{measured['config']['iterations']} training iterations per block instead of the preset's "
        f"{measured['preset_iterations']}, which changes no byte):",
        "",
        markdown_table(
            ["version", "edits", "keys", "clusters", "new keys/ segment", "all keys/ files", "graph/ files", "index.json",
             "version size", "new blob bytes"],
            [
                [r["version"], r["edits"], r["keys"], r["clusters"], f"{r['keys_file_bytes']:,}",
                 f"{r['keys_files_total_bytes']:,}", f"{r['graph_files_bytes']:,}", f"{r['index_file_bytes']:,}",
                 f"{r['version_bytes']:,}", f"{r['new_blob_bytes']:,}"]
                for r in _sample(rows)
            ],
        ),
        "",
        f"Per batch: one key segment of {derived['keys_segment_mean_bytes']:,} bytes on average (written once); fit on "
        "the measured versions: index.json ≈ "
        f"{derived['index_file_fit_bytes']['a']:,} + {derived['index_file_fit_bytes']['b_per_edit']:,} bytes/edit.",
        "",
        markdown_table(
            ["edits", "measured or derived", "extra params", "per 1k edits", "version size", "bytes/edit (version)",
             "new bytes per version", "new bytes/edit", "store, no retention"],
            [
                [f"{g['edits']:,}", "measured" if g["measured"] else "derived", f"{g['extra_params']:,}",
                 f"{g['extra_params_per_1k_edits']:,}", _mb(g["version_bytes"]), f"{g['version_bytes_per_edit']:,}",
                 _mb(g["new_bytes_per_version"]), f"{g['new_bytes_per_edit']:,}", _mb(g["store_bytes_no_retention"])]
                for g in derived["growth"]
            ],
        ),
        "",
        f"Paper comparison: MELO reports {paper['reported_extra_params'] / 1e6:.2f}M extra parameters for "
        f"{paper['edits']:,} zsRE edits on T5-small. The same formula on the official T5-small layout (wi/wo "
        f"512<->2048 of one block, p = 2, 100 edits/block) gives {paper['formula_on_official_t5_small_layout']:,}; "
        f"our {measured['backbone']} layout at the paper's 100 edits/block would give {paper['ours_at_paper_edits_per_block']:,}.",
    ]
    return "\n".join(parts)


def _sample(rows: list[dict[str, Any]], shown: int = 8) -> list[dict[str, Any]]:
    """At most ``shown`` rows, evenly spread, always the first and the last."""
    if len(rows) <= shown:
        return rows
    picks = sorted({round(i * (len(rows) - 1) / (shown - 1)) for i in range(shown)})
    return [rows[i] for i in picks]


def _mb(value: float) -> str:
    return f"{value / 1e6:,.2f} MB"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write ``perf_memory.json`` / ``perf_memory.md`` into ``--out``."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment(args.threads)
    started = time.perf_counter()
    measured = measure(args)
    derived = derive(measured)
    report = {"environment": env, "wall_seconds": round(time.perf_counter() - started, 1), **measured, **derived}
    json_path, md_path = write_report(args.out, "perf_memory", report, render(measured, derived))
    print(md_path.read_text(encoding="utf-8"))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
