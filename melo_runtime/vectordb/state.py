"""A ``VectorDB`` to and from its persisted state: a JSON-able dict and named numpy arrays.

The layout (docs/vectordb.md, "Persistence"): member keys in append-only per-block segments,
clusters as records of member references, centres recomputed from their keys, the HNSW graph as a
base plus a log. ``melo_runtime/serialization.py`` writes these into an editor's files.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from melo_runtime.vectordb.algebra import Cluster, mean, sha256
from melo_runtime.vectordb.store import ClusterStore

STATE_FORMAT = "melo.vectordb/2"


def segment_name(block: int) -> str:
    """Array name of block ``block``'s key segment in ``to_state``, e.g. ``keys/000003/keys``."""
    return f"keys/{block:06d}/keys"


def to_state(
    params: dict[str, Any], store: ClusterStore, *, include_index: bool = True
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A database (its constructor ``params`` and its ``store``) as a JSON-able dict and named arrays.

    ``VectorDB.to_state`` documents the array names.
    """
    state: dict[str, Any] = {
        "format": STATE_FORMAT,
        **params,
        "next_cluster_id": store.next_id,
        "conflicts_total": store.conflicts_total,
        "forgotten_total": store.forgotten_total,
        "retracted_total": store.retracted_total,
        "mutations": store.mutations,
        "segments": [
            {"block": block, "rows": len(keys), "sha256": store.segment_digest(block)}
            for block, keys in sorted(store.segments.items())
        ],
        **store.index.state(),
        "clusters": [record(store, cid) for cid in sorted(store.clusters)],
    }
    arrays = {segment_name(block): keys for block, keys in sorted(store.segments.items())}
    if include_index:
        arrays.update(store.index.arrays())
    return state, arrays


def record(store: ClusterStore, cid: int) -> dict[str, Any]:
    """Cluster ``cid``'s record in the state: label, radius, floor and member references."""
    c = store.clusters[cid]
    out: dict[str, Any] = {
        "id": cid,
        "label": c.label,
        "radius": c.radius,
        "floor": c.floor,
        "blocks": list(c.blocks),
        "rows": list(c.rows),
        "edit_ids": list(c.edit_ids),
    }
    if c.centre_members is not None:
        out["centre_members"] = [[block, row] for block, row in c.centre_members]
    if store.index.graph is not None:
        out["graph_label"] = store.index.graph_labels[cid]
    return out


def params(state: dict[str, Any]) -> dict[str, Any]:
    """The ``VectorDB`` constructor arguments a state was written with; ValueError for another format."""
    if state.get("format") != STATE_FORMAT:
        raise ValueError(
            f"unknown vector DB state format {state.get('format')!r}; this runtime reads {STATE_FORMAT!r} "
            "(an older format must be re-created by re-applying its edits)"
        )
    return {
        "dim": state["dim"],
        "r_init": state["r_init"],
        "hnsw_m": state["hnsw_m"],
        "ef_construction": state["ef_construction"],
        "ef_search": state["ef_search"],
        "seed": state["seed"],
        "exact_search_max_clusters": state["exact_search_max_clusters"],
        # States written before the policy existed were all made by the paper's rule.
        "conflict_policy": state.get("conflict_policy", "forget"),
    }


def load(store: ClusterStore, state: dict[str, Any], arrays: dict[str, np.ndarray], *, verify: bool) -> None:
    """Fill an empty ``store`` from a state written by :func:`to_state`; ``verify`` checks checksums too."""
    store.segments = _segments_from(store.dim, state["segments"], arrays, verify=verify)
    store.segment_sha = {int(r["block"]): r["sha256"] for r in state["segments"]}
    store.next_id = int(state["next_cluster_id"])
    store.index.reserve(store.next_id)
    for entry in state["clusters"]:
        _restore_cluster(store, entry)
    store.conflicts_total = int(state["conflicts_total"])
    store.forgotten_total = int(state["forgotten_total"])
    store.retracted_total = int(state["retracted_total"])
    store.mutations = int(state["mutations"])
    store.index.seq = store.mutations
    graph_arrays = {name: a for name, a in arrays.items() if name.startswith("graph/")}
    if state["graph"] and graph_arrays:
        store.index.load_graph(state, graph_arrays)
    elif graph_arrays:
        raise ValueError(
            f"arrays do not match the state: graph arrays {sorted(graph_arrays)[:3]} for a state without a graph"
        )
    else:
        store.maintain()  # a saved graph left out: build it as the live database would


def _segments_from(
    dim: int, records: list[dict[str, Any]], arrays: dict[str, np.ndarray], *, verify: bool
) -> dict[int, np.ndarray]:
    segments = {}
    for entry in records:
        block, name = int(entry["block"]), segment_name(int(entry["block"]))
        keys = arrays.get(name)
        expected = (int(entry["rows"]), dim)
        if (
            keys is None
            or keys.shape != expected
            or (verify and sha256(np.asarray(keys, np.float32)) != entry["sha256"])
        ):
            got = "missing" if keys is None else f"shape {keys.shape}"
            raise ValueError(
                f"arrays do not match the state: segment {name!r} is {got}, expected shape {expected} "
                f"and sha256 {entry['sha256'][:12]}..; load the files of one snapshot together"
            )
        segments[block] = np.asarray(keys, dtype=np.float32)
    names = {segment_name(b) for b in segments}
    extra = sorted(n for n in arrays if n.startswith("keys/") and n not in names)
    if extra:
        raise ValueError(f"arrays do not match the state: segments {extra[:3]} are not in the state")
    return segments


def _member_keys(store: ClusterStore, refs: list[tuple[int, int]], cid: int) -> np.ndarray:
    for block, row in refs:
        if block not in store.segments or not 0 <= row < len(store.segments[block]):
            raise ValueError(f"cluster {cid} refers to key (block {block}, row {row}), which no segment holds")
    return np.stack([store.segments[block][row] for block, row in refs])


def _restore_cluster(store: ClusterStore, entry: dict[str, Any]) -> None:
    cid = int(entry["id"])
    blocks, rows = [int(b) for b in entry["blocks"]], [int(r) for r in entry["rows"]]
    m = len(blocks)
    ragged = not len(rows) == len(entry["edit_ids"]) == m
    if not 0 <= cid < store.next_id or cid in store.clusters or m == 0 or ragged:
        raise ValueError(f"invalid cluster record {cid}: bad id, duplicate, empty or ragged members")
    keys = _member_keys(store, list(zip(blocks, rows)), cid)
    centre_members = entry.get("centre_members")
    if centre_members is not None:
        centre_members = [(int(b), int(r)) for b, r in centre_members]
    store.clusters[cid] = Cluster(
        radius=float(entry["radius"]),
        floor=float(entry["floor"]),
        label=entry["label"],
        keys=keys,
        blocks=blocks,
        rows=rows,
        edit_ids=list(entry["edit_ids"]),
        centre_members=centre_members,
    )
    store.count_members(cid, list(entry["edit_ids"]))
    store.index.restore(cid, mean(keys if centre_members is None else _member_keys(store, centre_members, cid)))
