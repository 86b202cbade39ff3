"""A ``VectorDB`` to and from its persisted state: a JSON-able dict and named numpy arrays.

The layout (docs/vectordb.md, "Persistence"): member keys in append-only per-block segments,
clusters as records of member references, centres recomputed from their keys, the HNSW graph as a
base plus a log. ``melo_runtime/serialization.py`` writes these into an editor's files.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from melo_runtime.vectordb.algebra import Cluster, mean, sha256

if TYPE_CHECKING:
    from melo_runtime.vectordb.db import VectorDB

STATE_FORMAT = "melo.vectordb/2"


def segment_name(block: int) -> str:
    """Array name of block ``block``'s key segment in ``to_state``, e.g. ``keys/000003/keys``."""
    return f"keys/{block:06d}/keys"


def to_state(db: VectorDB, *, include_index: bool = True) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``db`` as a JSON-able dict and named arrays (``VectorDB.to_state`` documents the names)."""
    state: dict[str, Any] = {
        "format": STATE_FORMAT,
        "dim": db.dim,
        "r_init": db.r_init,
        "hnsw_m": db.hnsw_m,
        "ef_construction": db.ef_construction,
        "ef_search": db.ef_search,
        "seed": db.seed,
        "exact_search_max_clusters": db.exact_search_max_clusters,
        "conflict_policy": db.conflict_policy,
        "next_cluster_id": db._next_id,
        "conflicts_total": db._conflicts_total,
        "forgotten_total": db._forgotten_total,
        "retracted_total": db._retracted_total,
        "mutations": db._mutations,
        "segments": [
            {"block": block, "rows": len(keys), "sha256": _segment_digest(db, block)}
            for block, keys in sorted(db._segments.items())
        ],
        **db._index.state(),
        "clusters": [record(db, cid) for cid in sorted(db._clusters)],
    }
    arrays = {segment_name(block): keys for block, keys in sorted(db._segments.items())}
    if include_index:
        arrays.update(db._index.arrays())
    return state, arrays


def record(db: VectorDB, cid: int) -> dict[str, Any]:
    """Cluster ``cid``'s record in the state: label, radius, floor and member references."""
    c = db._clusters[cid]
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
    if db._index.graph is not None:
        out["graph_label"] = db._index.graph_labels[cid]
    return out


def _segment_digest(db: VectorDB, block: int) -> str:
    if block not in db._segment_sha:
        db._segment_sha[block] = sha256(db._segments[block])
    return db._segment_sha[block]


def from_state(cls: type[VectorDB], state: dict[str, Any], arrays: dict[str, np.ndarray], *, verify: bool) -> VectorDB:
    """Rebuild a database written by :func:`to_state`; ``verify`` checks segment checksums too."""
    if state.get("format") != STATE_FORMAT:
        raise ValueError(
            f"unknown vector DB state format {state.get('format')!r}; this runtime reads {STATE_FORMAT!r} "
            "(an older format must be re-created by re-applying its edits)"
        )
    db = cls(
        state["dim"],
        state["r_init"],
        hnsw_m=state["hnsw_m"],
        ef_construction=state["ef_construction"],
        ef_search=state["ef_search"],
        seed=state["seed"],
        exact_search_max_clusters=state["exact_search_max_clusters"],
        # States written before the policy existed were all made by the paper's rule.
        conflict_policy=state.get("conflict_policy", "forget"),
    )
    db._segments = _segments_from(db.dim, state["segments"], arrays, verify=verify)
    db._segment_sha = {int(r["block"]): r["sha256"] for r in state["segments"]}
    db._next_id = int(state["next_cluster_id"])
    db._index.reserve(db._next_id)
    for cluster in state["clusters"]:
        _restore_cluster(db, cluster)
    db._conflicts_total = int(state["conflicts_total"])
    db._forgotten_total = int(state["forgotten_total"])
    db._retracted_total = int(state["retracted_total"])
    db._mutations = int(state["mutations"])
    db._index.seq = db._mutations
    graph_arrays = {name: a for name, a in arrays.items() if name.startswith("graph/")}
    if state["graph"] and graph_arrays:
        db._index.load_graph(state, graph_arrays)
    elif graph_arrays:
        raise ValueError(
            f"arrays do not match the state: graph arrays {sorted(graph_arrays)[:3]} for a state without a graph"
        )
    else:
        db._index.maintain(sorted(db._clusters))  # a saved graph left out: build it as the live database would
    return db


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


def _member_keys(db: VectorDB, refs: list[tuple[int, int]], cid: int) -> np.ndarray:
    for block, row in refs:
        if block not in db._segments or not 0 <= row < len(db._segments[block]):
            raise ValueError(f"cluster {cid} refers to key (block {block}, row {row}), which no segment holds")
    return np.stack([db._segments[block][row] for block, row in refs])


def _restore_cluster(db: VectorDB, entry: dict[str, Any]) -> None:
    cid = int(entry["id"])
    blocks, rows = [int(b) for b in entry["blocks"]], [int(r) for r in entry["rows"]]
    m = len(blocks)
    ragged = not len(rows) == len(entry["edit_ids"]) == m
    if not 0 <= cid < db._next_id or cid in db._clusters or m == 0 or ragged:
        raise ValueError(f"invalid cluster record {cid}: bad id, duplicate, empty or ragged members")
    keys = _member_keys(db, list(zip(blocks, rows)), cid)
    centre_members = entry.get("centre_members")
    if centre_members is not None:
        centre_members = [(int(b), int(r)) for b, r in centre_members]
    db._clusters[cid] = Cluster(
        radius=float(entry["radius"]),
        floor=float(entry["floor"]),
        label=entry["label"],
        keys=keys,
        blocks=blocks,
        rows=rows,
        edit_ids=list(entry["edit_ids"]),
        centre_members=centre_members,
    )
    for e in entry["edit_ids"]:
        counts = db._edit_clusters.setdefault(e, {})
        counts[cid] = counts.get(cid, 0) + 1
    db._index.restore(cid, mean(keys if centre_members is None else _member_keys(db, centre_members, cid)))
