"""Snapshot bytes and copy/load time of the vector DB once routing uses the HNSW graph.

    python -m bench.perf_snapshot_graph --dim 1536 --clusters 8000 --exact-max 4096

bench/perf_memory.py measures whole editors, which at the sizes it can afford (1k edits) stay below
the vector DB's exact-scan size (4,096 clusters), where snapshots hold no graph. This benchmark
drives a :class:`VectorDB` alone past that size with synthetic keys, batch by batch as the editor
does: each batch starts from a copy made through the persisted state (``VectorDB.copy``, as
``melo_runtime.serialization.copy_db``), inserts ``--batch`` keys (``--join-fraction`` of them next
to an existing key, so that clusters grow and centres move, the rest far from everything), and is
exported. Measured per batch: the bytes a content-addressed store would newly write (files grouped
as ``export_files`` groups them, plus the JSON state), the bytes of the graph files, and the seconds
of the copy. For comparison, the bytes the previous layout (``melo.editor/1``: every member key,
every centre and hnswlib's whole serialized graph in one file per version) would have written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from bench.perf_common import environment, write_report
from melo_eval.tables import markdown_table
from melo_runtime.vectordb import VectorDB


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.perf_snapshot_graph", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=1536, help="key dimension (SmolLM2 preset: 1536)")
    parser.add_argument("--clusters", type=int, default=8000, help="stop once the DB holds this many clusters")
    parser.add_argument("--exact-max", type=int, default=4096, help="exact_search_max_clusters")
    parser.add_argument("--batch", type=int, default=10, help="keys per batch (= per version)")
    parser.add_argument("--join-fraction", type=float, default=0.2, help="share of keys placed next to an old key")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/out/perf"))
    args = parser.parse_args(argv)
    if args.clusters <= args.exact_max:
        parser.error(f"--clusters={args.clusters} must exceed --exact-max={args.exact_max} to exercise the graph")
    return args


def state_files(db: VectorDB) -> dict[str, bytes]:
    """The DB's part of an editor snapshot, grouped into files as serialization.export_files does."""
    state, arrays = db.to_state()
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for name, array in arrays.items():
        stem, tensor = name.rsplit("/", 1)
        grouped.setdefault(f"{stem}.safetensors", {})[tensor] = np.ascontiguousarray(array)
    files = {name: safetensors.numpy.save(tensors) for name, tensors in grouped.items()}
    files["index.json"] = json.dumps(state, sort_keys=True, separators=(",", ":")).encode()
    return files


def previous_layout_bytes(db: VectorDB) -> int:
    """Bytes of melo.editor/1's keys.safetensors for this DB: members + centres + graph, all float32."""
    stats = db.stats()
    index = db.centres
    graph = len(index.graph_bytes()) if index.graph is not None else 0
    return (stats["members"] + stats["clusters"]) * db.dim * 4 + graph


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Insert batches until ``--clusters`` clusters; one row per batch past the exact-scan size."""
    rng = np.random.default_rng(args.seed)
    db = VectorDB(args.dim, 1.0, exact_search_max_clusters=args.exact_max, seed=args.seed)
    held: set[str] = set()
    rows: list[dict[str, Any]] = []
    all_keys = np.zeros((0, args.dim), np.float32)
    block = 0
    while db.stats()["clusters"] < args.clusters:
        started = time.perf_counter()
        db = db.copy()  # what the editor does before every batch
        copy_s = time.perf_counter() - started
        joins = rng.random(args.batch) < args.join_fraction if len(all_keys) else np.zeros(args.batch, bool)
        far = rng.standard_normal((args.batch, args.dim)).astype(np.float32) * 10  # ~440 apart: new clusters
        near = all_keys[rng.integers(0, max(len(all_keys), 1), args.batch)] if len(all_keys) else far
        keys = np.where(joins[:, None], near + 0.001, far).astype(np.float32)
        db.insert(keys, ["y"] * args.batch, [block] * args.batch, [f"e{block}-{i}" for i in range(args.batch)])
        all_keys = np.concatenate([all_keys, keys])
        files = state_files(db)
        digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
        new = {name for name, digest in digests.items() if digest not in held}
        held |= set(digests.values())
        clusters = db.stats()["clusters"]
        if clusters > args.exact_max or block % 50 == 0:
            rows.append(
                {
                    "version": block + 1,
                    "clusters": clusters,
                    "graph": db.centres.graph is not None,
                    "new_bytes": sum(len(files[n]) for n in new),
                    "new_graph_bytes": sum(len(files[n]) for n in new if n.startswith("graph/")),
                    "index_json_bytes": len(files["index.json"]),
                    "graph_files_bytes": sum(len(d) for n, d in files.items() if n.startswith("graph/")),
                    "previous_layout_new_bytes": previous_layout_bytes(db) + len(files["index.json"]),
                    "copy_seconds": round(copy_s, 4),
                }
            )
        block += 1
    return {"args": {k: str(v) for k, v in vars(args).items()}, "versions": rows}


def summarize(rows: list[dict[str, Any]], exact_max: int) -> dict[str, Any]:
    """Means over the versions past the exact-scan size."""
    above = [r for r in rows if r["clusters"] > exact_max]
    return {
        "versions_above_exact_size": len(above),
        "mean_new_bytes": round(float(np.mean([r["new_bytes"] for r in above]))),
        "max_new_bytes": max(r["new_bytes"] for r in above),
        "mean_previous_layout_new_bytes": round(float(np.mean([r["previous_layout_new_bytes"] for r in above]))),
        "mean_copy_seconds": round(float(np.mean([r["copy_seconds"] for r in above])), 3),
        "max_copy_seconds": max(r["copy_seconds"] for r in above),
    }


def render(measured: dict[str, Any], summary: dict[str, Any]) -> str:
    rows = measured["versions"]
    picks = sorted({round(i * (len(rows) - 1) / 9) for i in range(10)}) if len(rows) > 10 else range(len(rows))
    table = markdown_table(
        ["version", "clusters", "new bytes", "of which graph", "index.json", "graph files held", "previous layout",
         "copy s"],
        [
            [r["version"], r["clusters"], f"{r['new_bytes']:,}", f"{r['new_graph_bytes']:,}",
             f"{r['index_json_bytes']:,}", f"{r['graph_files_bytes']:,}", f"{r['previous_layout_new_bytes']:,}",
             r["copy_seconds"]]
            for r in (rows[i] for i in picks)
        ],
    )
    return "\n".join([
        table,
        "",
        f"Past the exact-scan size ({summary['versions_above_exact_size']} versions): new bytes per version "
        f"{summary['mean_new_bytes']:,} on average (max {summary['max_new_bytes']:,}, a checkpoint), vs "
        f"{summary['mean_previous_layout_new_bytes']:,} with the previous layout; copy through the state "
        f"{summary['mean_copy_seconds']} s on average (max {summary['max_copy_seconds']} s).",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write ``perf_snapshot_graph.json`` / ``.md`` into ``--out``."""
    args = parse_args(argv)
    started = time.perf_counter()
    measured = measure(args)
    summary = summarize(measured["versions"], args.exact_max)
    report = {"environment": environment(1), "wall_seconds": round(time.perf_counter() - started, 1),
              **measured, "summary": summary}
    json_path, md_path = write_report(args.out, "perf_snapshot_graph", report, render(measured, summary))
    print(md_path.read_text(encoding="utf-8"))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
