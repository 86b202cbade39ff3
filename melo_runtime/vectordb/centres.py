"""The centre index: nearest cluster centres by exact numpy scan or through an HNSW graph.

Row ``i`` of the centre matrix holds cluster ``i``'s centre while cluster ``i`` exists (ids are never
reused; a removed cluster's row is zero with norm +inf). The HNSW graph exists only above
``exact_search_max_clusters`` live clusters; it is persisted as a *base* (hnswlib's serialization at
the last checkpoint) plus a *log* of the operations since, one part per mutating call, so a loader
replays exactly the live graph (docs/vectordb.md, "Index maintenance" and "Persistence").
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import hnswlib
import numpy as np

from melo_runtime.vectordb.algebra import sq_norm

# Candidates re-checked exactly per query; HNSW's first few results contain the true nearest centre
# far more often than its first one alone.
CANDIDATES = 8
# Below this many clusters an exact numpy scan beats an HNSW query (measured: bench/RESULTS.md).
EXACT_SEARCH_MAX_CLUSTERS = 4096
# Cells of the (queries x clusters) score matrix computed at once by the exact scan: bounds memory.
_SCAN_CHUNK_CELLS = 1 << 22
# Query rows re-checked at once (each row gathers CANDIDATES centres in float64): bounds memory.
_RECHECK_CHUNK_ROWS = 1024
# An HNSW element's label is (version << 32) | cluster id: a moved centre is a new element.
_ID_BITS = 32
_ID_MASK = (1 << _ID_BITS) - 1
# Rebuild the graph once it holds more deleted elements than this and than live ones.
_COMPACT_MIN_DELETED = 1024
# Checkpoint the graph once its log holds more additions than this and than clusters // fraction:
# bounds the replay work of every load (and of every copy) against the base bytes written.
_CHECKPOINT_MIN_ADDS = 1024
_CHECKPOINT_FRACTION = 8
# Graph log operations: (kind, value) rows; an addition's vector is the next row of the part's vectors.
_OP_ADD, _OP_DELETE, _OP_RESIZE = 0, 1, 2


@dataclass
class LogPart:
    """The graph operations of one mutating call since the last checkpoint."""

    seq: int  # the call's number (``mutations`` when it ran): names the part's file
    ops: list[tuple[int, int]] = field(default_factory=list)  # (kind, label or capacity)
    vectors: list[np.ndarray] = field(default_factory=list)  # [dim] float32 per addition, in order


class CentreIndex:
    """Cluster centres by id, searched by exact scan or HNSW graph; the graph's base and log.

    ``seq`` is the number of the mutating call in progress (the database's ``mutations``): graph
    operations are logged under it.
    """

    def __init__(
        self, dim: int, *, hnsw_m: int, ef_construction: int, ef_search: int, seed: int, exact_search_max_clusters: int
    ) -> None:
        self.dim = dim
        self.hnsw_m = hnsw_m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.seed = seed
        self.exact_search_max_clusters = exact_search_max_clusters
        self.seq = 0
        self.centres = np.zeros((0, dim), dtype=np.float32)
        self.sq_norms = np.zeros(0, dtype=np.float32)  # ||centre||^2, +inf for removed clusters
        self.graph: hnswlib.Index | None = None  # None while search scans exactly
        self.graph_labels: dict[int, int] = {}  # cluster id -> label of its live HNSW element
        self.graph_deleted = 0  # elements marked deleted since the graph was last built
        self.graph_base: np.ndarray | None = None  # uint8: hnswlib's serialization at the checkpoint
        self.graph_base_capacity = 0
        self.graph_log: list[LogPart] = []
        self.graph_log_adds = 0

    # ---------------------------------------------------------------------------------- centres

    def reserve(self, n: int) -> None:
        """Make room for cluster ids below ``n`` (rows grow in chunks)."""
        if n > len(self.centres):
            grow = max(1024, len(self.centres), n - len(self.centres))
            self.centres = np.concatenate([self.centres, np.zeros((grow, self.dim), np.float32)])
            self.sq_norms = np.concatenate([self.sq_norms, np.full(grow, np.inf, np.float32)])

    def restore(self, cid: int, centre: np.ndarray) -> None:
        """Set a loaded cluster's centre; the graph comes from its own base and log."""
        self.centres[cid] = centre
        self.sq_norms[cid] = sq_norm(centre)

    def set(self, cid: int, centre: np.ndarray) -> None:
        """Place cluster ``cid``'s centre (new or moved), in the graph too when there is one."""
        self.centres[cid] = centre
        self.sq_norms[cid] = sq_norm(centre)
        if self.graph is None:
            return
        # A moved centre becomes a new element rather than an in-place hnswlib update: updates
        # re-prune neighbours' links and measurably orphan unrelated elements (0.05% of queries
        # missed their nearest centre at 3k clusters); a plain insertion does not.
        old = self.graph_labels.get(cid)
        if old is not None:
            self._graph_delete(old)
        label = cid if old is None else old + (1 << _ID_BITS)
        self._graph_add(label, centre)
        self.graph_labels[cid] = label

    def remove(self, cid: int) -> None:
        """Forget cluster ``cid``'s centre (its row stays, unused)."""
        self.sq_norms[cid] = np.inf
        self.centres[cid] = 0.0
        if self.graph is not None:
            self._graph_delete(self.graph_labels.pop(cid))

    # ----------------------------------------------------------------------------------- search

    def nearest(self, queries: np.ndarray, n_live: int, n_rows: int) -> list[tuple[int, float] | None]:
        """Nearest live centre and its exact distance per query row (None: no clusters).

        ``n_live`` clusters exist among ids ``< n_rows``. Candidates come from the exact scan or the
        graph and are re-checked in float64; an exact tie goes to the newest cluster.
        """
        if n_live == 0:
            return [None] * len(queries)
        if len(queries) > _RECHECK_CHUNK_ROWS:
            return [
                hit
                for start in range(0, len(queries), _RECHECK_CHUNK_ROWS)
                for hit in self.nearest(queries[start : start + _RECHECK_CHUNK_ROWS], n_live, n_rows)
            ]
        k = min(n_live, CANDIDATES)
        if self.graph is None or n_live <= self.exact_search_max_clusters:
            candidates = self.scan_candidates(queries, k, n_rows)
        else:
            try:
                labels, _ = self.graph.knn_query(queries, k=k, num_threads=1)
                candidates = (labels & _ID_MASK).astype(np.int64)
            except RuntimeError:
                # hnswlib raises when its beam found fewer than k live elements (possible once many
                # clusters were removed); the exact scan always can.
                candidates = self.scan_candidates(queries, k, n_rows)
        diff = self.centres[candidates].astype(np.float64) - queries.astype(np.float64)[:, None, :]
        dist = np.sqrt(np.einsum("nkd,nkd->nk", diff, diff))
        # Sort by (distance, newest first): lexsort's last key is the primary one.
        order = np.lexsort((-candidates, dist), axis=1)[:, 0]
        rows = np.arange(len(queries))
        return [
            (int(cid), float(d))
            for cid, d in zip(candidates[rows, order], dist[rows, order])
        ]

    def scan_candidates(self, queries: np.ndarray, k: int, n_rows: int) -> np.ndarray:
        """The k smallest ||c||^2 - 2 q.c over all centres, by exact numpy scan: [n, k] cluster ids."""
        out = np.empty((len(queries), k), dtype=np.int64)
        step = max(1, _SCAN_CHUNK_CELLS // max(n_rows, 1))
        centres = self.centres[:n_rows]
        norms = self.sq_norms[:n_rows]
        for start in range(0, len(queries), step):
            q = queries[start : start + step]
            scores = norms[None, :] - 2.0 * (q @ centres.T)
            if k < n_rows:
                out[start : start + len(q)] = np.argpartition(scores, k - 1, axis=1)[:, :k]
            else:
                out[start : start + len(q)] = np.argsort(scores, axis=1)[:, :k]
        return out

    def near(self, points: np.ndarray, radii: np.ndarray) -> list[int]:
        """Ids of the live centres within twice their radius (``radii`` by id) of one of ``points``.

        Scanned like ``scan_candidates`` (one matrix product over every centre row); the slack
        covers float32 rounding, and a cluster let in by it is only checked exactly, in vain.
        """
        n_rows = len(radii)
        norms = self.sq_norms[:n_rows].astype(np.float64)
        alive = np.isfinite(norms)
        point_norms = np.einsum("ij,ij->i", points.astype(np.float64), points.astype(np.float64))
        sq = norms[None, :] + point_norms[:, None] - 2.0 * (points @ self.centres[:n_rows].T)
        slack = 1e-3 * (np.where(alive, norms, 0.0)[None, :] + point_norms[:, None]) + 1e-12
        near = alive & (sq <= (2.0 * radii) ** 2 + slack).any(axis=0)
        return np.flatnonzero(near).tolist()

    # ------------------------------------------------------------------------------------ graph

    def maintain(self, live_ids: list[int]) -> None:
        """Build, compact or checkpoint the graph where due (docs/vectordb.md, "Index maintenance")."""
        n_live = len(live_ids)
        if self.graph is None:
            if n_live > self.exact_search_max_clusters:
                self.graph = self._build(live_ids)
                self._checkpoint()
        elif self.graph_deleted > max(_COMPACT_MIN_DELETED, n_live):
            self.graph = self._build(live_ids)
            self._checkpoint()
        elif self.graph_log_adds > max(_CHECKPOINT_MIN_ADDS, n_live // _CHECKPOINT_FRACTION):
            self._checkpoint()

    def graph_bytes(self) -> np.ndarray:
        """hnswlib's serialization of the current graph, uint8 (there must be a graph)."""
        assert self.graph is not None
        # hnswlib serializes only to a file path; a private temp dir keeps concurrent savers apart.
        with tempfile.TemporaryDirectory(prefix="melo-hnsw-") as tmp:
            path = os.path.join(tmp, "index.bin")
            self.graph.save_index(path)
            with open(path, "rb") as f:
                return np.frombuffer(f.read(), dtype=np.uint8).copy()

    def _graph_add(self, label: int, vector: np.ndarray) -> None:
        assert self.graph is not None
        if self.graph.element_count >= self.graph.get_max_elements():
            capacity = max(1024, 2 * self.graph.get_max_elements())
            self.graph.resize_index(capacity)
            self._log(_OP_RESIZE, capacity)
        # One thread keeps the graph a deterministic function of the operation sequence.
        self.graph.add_items(vector[None, :], np.array([label], dtype=np.uint64), num_threads=1)
        self._log(_OP_ADD, label, vector)
        self.graph_log_adds += 1

    def _graph_delete(self, label: int) -> None:
        assert self.graph is not None
        self.graph.mark_deleted(label)
        self._log(_OP_DELETE, label)
        self.graph_deleted += 1

    def _log(self, kind: int, value: int, vector: np.ndarray | None = None) -> None:
        if not self.graph_log or self.graph_log[-1].seq != self.seq:
            self.graph_log.append(LogPart(seq=self.seq))
        part = self.graph_log[-1]
        part.ops.append((kind, int(value)))
        if vector is not None:
            part.vectors.append(np.array(vector, dtype=np.float32, copy=True))

    def _checkpoint(self) -> None:
        """Make the current graph the base: serialize it, and continue from the reloaded copy.

        Continuing from the reload, not the original, matters: a reload restarts hnswlib's level
        generator, so only then does a loader that replays later operations on the same base
        build the same graph.
        """
        assert self.graph is not None
        self.graph_base = self.graph_bytes()
        self.graph_base_capacity = self.graph.get_max_elements()
        self.graph = self._load(self.graph_base, self.graph_base_capacity)
        self.graph_log = []
        self.graph_log_adds = 0

    def _build(self, ids: list[int]) -> hnswlib.Index:
        """A fresh graph of the live centres, inserted in cluster-id order (labels = cluster ids)."""
        index = self._new(capacity=max(1024, 2 * len(ids)))
        if ids:
            index.add_items(self.centres[ids], np.array(ids, dtype=np.uint64), num_threads=1)
        self.graph_labels = {cid: cid for cid in ids}
        self.graph_deleted = 0
        return index

    def _new(self, capacity: int) -> hnswlib.Index:
        index = hnswlib.Index(space="l2", dim=self.dim)
        index.init_index(
            max_elements=capacity, ef_construction=self.ef_construction, M=self.hnsw_m, random_seed=self.seed
        )
        index.set_ef(max(self.ef_search, CANDIDATES))
        index.set_num_threads(1)
        return index

    def _load(self, blob: np.ndarray, capacity: int) -> hnswlib.Index:
        index = hnswlib.Index(space="l2", dim=self.dim)
        with tempfile.TemporaryDirectory(prefix="melo-hnsw-") as tmp:
            path = os.path.join(tmp, "index.bin")
            with open(path, "wb") as f:
                f.write(blob.tobytes())
            index.load_index(path, max_elements=capacity)
        index.set_ef(max(self.ef_search, CANDIDATES))
        index.set_num_threads(1)
        return index

    # ------------------------------------------------------------------------------ persistence

    def state(self) -> dict[str, Any]:
        """The graph's fields of the database state (``to_state``)."""
        return {
            "graph": self.graph is not None,
            "graph_elements": 0 if self.graph is None else self.graph.element_count,
            "graph_capacity": 0 if self.graph is None else self.graph.get_max_elements(),
            "graph_deleted": self.graph_deleted,
            "graph_base_capacity": self.graph_base_capacity,
            "graph_log": [part.seq for part in self.graph_log],
        }

    def arrays(self) -> dict[str, np.ndarray]:
        """The base and log parts as named arrays (none before the first checkpoint)."""
        arrays: dict[str, np.ndarray] = {}
        if self.graph_base is not None:
            arrays["graph/base/index"] = self.graph_base
            for part in self.graph_log:
                arrays[f"graph/{part.seq:08d}/ops"] = np.array(part.ops, dtype=np.uint64).reshape(-1, 2)
                arrays[f"graph/{part.seq:08d}/vectors"] = (
                    np.stack(part.vectors) if part.vectors else np.zeros((0, self.dim), np.float32)
                )
        return arrays

    def load_graph(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Load the base graph and replay the log parts, as the saved database built them."""
        expected = {"graph/base/index"} | {
            f"graph/{seq:08d}/{t}" for seq in state["graph_log"] for t in ("ops", "vectors")
        }
        if set(arrays) != expected:
            raise ValueError(
                f"arrays do not match the state: graph arrays differ by {sorted(set(arrays) ^ expected)[:4]}"
            )
        self.graph_base = np.asarray(arrays["graph/base/index"], dtype=np.uint8)
        self.graph_base_capacity = int(state["graph_base_capacity"])
        index = self._load(self.graph_base, self.graph_base_capacity)
        for seq in state["graph_log"]:
            self.graph_log.append(self._replay(index, int(seq), arrays))
        if index.element_count != state["graph_elements"] or index.get_max_elements() != state["graph_capacity"]:
            raise ValueError(
                f"the replayed graph holds {index.element_count} elements (capacity {index.get_max_elements()}) "
                f"but the state says {state['graph_elements']} ({state['graph_capacity']}); the arrays come "
                "from a different snapshot"
            )
        if any("graph_label" not in r for r in state["clusters"]):
            raise ValueError("a cluster record lacks its graph_label although the state has a graph")
        self.graph_labels = {int(r["id"]): int(r["graph_label"]) for r in state["clusters"]}
        if not set(self.graph_labels.values()) <= set(index.get_ids_list()):
            raise ValueError("the replayed graph is missing live clusters; the arrays come from a different snapshot")
        self.graph_deleted = int(state["graph_deleted"])
        self.graph = index

    def _replay(self, index: hnswlib.Index, seq: int, arrays: dict[str, np.ndarray]) -> LogPart:
        """Apply one log part's operations to ``index``; returns the part."""
        ops = np.asarray(arrays[f"graph/{seq:08d}/ops"], dtype=np.uint64).reshape(-1, 2)
        vectors = np.asarray(arrays[f"graph/{seq:08d}/vectors"], dtype=np.float32)
        part = LogPart(seq=seq, ops=[(int(k), int(v)) for k, v in ops], vectors=list(vectors))
        if sum(k == _OP_ADD for k, _ in part.ops) != len(part.vectors):
            raise ValueError(f"graph log part {seq} has {len(part.vectors)} vectors for its additions")
        added = iter(part.vectors)
        for kind, value in part.ops:
            if kind == _OP_ADD:
                index.add_items(next(added)[None, :], np.array([value], dtype=np.uint64), num_threads=1)
                self.graph_log_adds += 1
            elif kind == _OP_DELETE:
                index.mark_deleted(value)
            elif kind == _OP_RESIZE:
                index.resize_index(value)
            else:
                raise ValueError(f"graph log part {seq} has an unknown operation kind {kind}")
        return part
