"""``VectorDB``: the insertion rules, retract and search over clusters of edit keys.

The rules are specified in docs/vectordb.md. The computations they are made of are in
``algebra`` (pure numpy), the nearest-centre search and its HNSW graph in ``centres``, and the
state written to files in ``state``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from melo_runtime.vectordb import state as persisted
from melo_runtime.vectordb.algebra import (
    CONFLICT_POLICIES,
    SAME_INPUT_TOLERANCE,
    Group,
    Pool,
    check_keys,
    distances,
    plan_split,
    regroup,
)
from melo_runtime.vectordb.centres import EXACT_SEARCH_MAX_CLUSTERS, CentreIndex
from melo_runtime.vectordb.store import ClusterStore


@dataclass(frozen=True)
class Hit:
    """A query routed into a cluster: the block and edit of its nearest member key."""

    cluster_id: int
    block: int
    edit_id: str
    distance: float  # L2 distance from the query to the cluster centre


@dataclass
class InsertReport:
    """What one ``insert`` call did: one action per key, counts, and the members it removed."""

    actions: list[str]  # per key: add | expand | join | conflict | supersede
    added: int  # keys that started a cluster by the add rule
    expanded: int  # keys that expanded a cluster
    conflicts: int  # conflict + supersede actions
    forgotten: list[tuple[str, int]]  # (edit_id, block) of every member removed


class VectorDB:
    """MELO clusters of edit keys with an HNSW index over their centres (rules: docs/vectordb.md).

    Args:
        dim: key dimension.
        r_init: radius of a new cluster (L2 distance on keys), > 0.
        hnsw_m: HNSW graph degree (hnswlib ``M``).
        ef_construction: HNSW build-time beam width.
        ef_search: HNSW query-time beam width (raised to at least the candidate count).
        seed: HNSW level-assignment seed.
        exact_search_max_clusters: up to this many clusters, search scans all centres exactly.
        conflict_policy: ``"forget"`` (the paper's rule) or ``"split"``: what a conflict does with
            the members outside the halved radius (docs/vectordb.md).

    Thread safety: ``search`` reads only and may run from many threads at once; ``insert``,
    ``retract`` and ``from_state`` mutate, and must not overlap any other call (the caller
    serializes, e.g. by swapping in a new database). Determinism: the same inserts in the same
    order give the same state, HNSW graph included.
    """

    def __init__(
        self,
        dim: int,
        r_init: float,
        *,
        hnsw_m: int = 16,
        ef_construction: int = 200,
        ef_search: int = 64,
        seed: int = 0,
        exact_search_max_clusters: int = EXACT_SEARCH_MAX_CLUSTERS,
        conflict_policy: str = "forget",
    ) -> None:
        if conflict_policy not in CONFLICT_POLICIES:
            raise ValueError(f"conflict_policy must be one of {CONFLICT_POLICIES}, got {conflict_policy!r}")
        if dim <= 0:
            raise ValueError(f"dim must be a positive key dimension, got {dim}")
        if not (np.isfinite(r_init) and r_init > 0):
            raise ValueError(f"r_init must be a finite distance > 0, got {r_init}")
        self.dim = int(dim)
        self.r_init = float(r_init)
        self.hnsw_m = int(hnsw_m)
        self.ef_construction = int(ef_construction)
        self.ef_search = int(ef_search)
        self.seed = int(seed)
        self.conflict_policy = conflict_policy
        index = CentreIndex(
            self.dim, hnsw_m=self.hnsw_m, ef_construction=self.ef_construction, ef_search=self.ef_search,
            seed=self.seed, exact_search_max_clusters=int(exact_search_max_clusters),
        )
        self._store = ClusterStore(self.dim, index)

    @property
    def exact_search_max_clusters(self) -> int:
        """Up to this many clusters search scans every centre; above it, the HNSW graph is used."""
        return self._store.index.exact_search_max_clusters

    @exact_search_max_clusters.setter
    def exact_search_max_clusters(self, value: int) -> None:
        self._store.index.exact_search_max_clusters = int(value)

    @property
    def centres(self) -> CentreIndex:
        """The index search reads: every centre, and the HNSW graph above ``exact_search_max_clusters``."""
        return self._store.index

    # ----------------------------------------------------------------------------------- insert

    def insert(
        self,
        keys: np.ndarray,
        labels: Sequence[str],
        blocks: Sequence[int],
        edit_ids: Sequence[str],
    ) -> InsertReport:
        """Insert keys one at a time, in order, by the rules of docs/vectordb.md.

        Every argument is validated before anything changes. Each key is appended to its block's
        segment; pass all keys of a block in one call to keep segments write-once.
        """
        keys = check_keys(keys, "keys", self.dim)
        n = keys.shape[0]
        for name, seq in (("labels", labels), ("blocks", blocks), ("edit_ids", edit_ids)):
            if len(seq) != n:
                raise ValueError(f"{name} has {len(seq)} entries for {n} keys; pass one per key")
        for block in blocks:
            if not isinstance(block, (int, np.integer)) or isinstance(block, bool) or block < 0:
                raise ValueError(f"blocks must be non-negative integers, got {block!r}")
        for edit_id in edit_ids:
            if not isinstance(edit_id, str) or not edit_id:
                raise ValueError(f"edit_ids must be non-empty strings, got {edit_id!r}")
        for label in labels:
            if not isinstance(label, str):
                raise ValueError(f"labels must be strings (normalized targets), got {label!r}")
        self._store.count_mutation()
        rows = self._store.append_to_segments(keys, [int(b) for b in blocks])
        report = InsertReport(actions=[], added=0, expanded=0, conflicts=0, forgotten=[])
        for key, label, block, row, edit_id in zip(keys, labels, blocks, rows, edit_ids):
            action = self._insert_one(key, label, int(block), row, edit_id, report.forgotten)
            report.actions.append(action)
            report.added += action == "add"
            report.expanded += action == "expand"
            report.conflicts += action in ("conflict", "supersede")
            self._store.maintain()
        self._store.conflicts_total += report.conflicts
        self._store.forgotten_total += len(report.forgotten)
        return report

    def _insert_one(
        self,
        key: np.ndarray,
        label: str,
        block: int,
        row: int,
        edit_id: str,
        forgotten: list[tuple[str, int]],
    ) -> str:
        nearest = self.nearest(key[None, :])[0]
        if nearest is None:
            self._store.create(key[None, :], label, [block], [row], [edit_id], self.r_init, self.r_init)
            return "add"
        cid, d = nearest
        c = self._store.clusters[cid]
        if d > c.radius + self.r_init:
            self._store.create(key[None, :], label, [block], [row], [edit_id], self.r_init, self.r_init)
            return "add"
        if c.label == label:
            action = "join" if d <= c.radius else "expand"
            self._store.append_member(cid, key, block, row, edit_id)
            self._store.refit(cid)
            return action
        if d > c.radius:
            self._conflict(cid, key, label, block, row, edit_id, d, forgotten)
            return "conflict"
        self._supersede(cid, key, label, block, row, edit_id, forgotten)
        return "supersede"

    def _conflict(
        self,
        cid: int,
        key: np.ndarray,
        label: str,
        block: int,
        row: int,
        edit_id: str,
        d: float,
        forgotten: list[tuple[str, int]],
    ) -> None:
        c = self._store.clusters[cid]
        half = d / 2.0
        c.radius = min(c.radius, half)
        c.floor = min(c.floor, c.radius)
        outside = distances(self._store.index.centres[cid], c.keys) > c.radius
        if outside.any() and c.centre_members is None:
            # The centre stays the mean of the members it had; remember them (see docstring).
            c.centre_members = list(zip(c.blocks, c.rows))
        if self.conflict_policy == "split" and outside.any():
            self._split(cid, outside, key)
        else:
            self._store.remove_members(cid, outside, forgotten)
        self._store.create(key[None, :], label, [block], [row], [edit_id], half, half)

    def _split(self, cid: int, moved: np.ndarray, key: np.ndarray) -> None:
        """Re-cluster the ``moved`` members of cluster ``cid`` as clusters halved against ``key`` and
        routing-checked, instead of forgetting them (docs/vectordb.md: ``split``)."""
        c = self._store.clusters[cid]
        pool = Pool()  # the members the split places: C's moved ones first, then evicted ones
        for i in np.flatnonzero(moved).tolist():
            pool.add(c.keys[i], c.blocks[i], c.rows[i], c.edit_ids[i], c.label, c.floor)
        n_moved = len(pool.blocks)
        self._store.remove_members(cid, moved, [])
        singles: set[int] = set()  # pool members that must be single-member clusters
        while True:
            plan = plan_split(pool, n_moved, singles, key)
            broken, taken = self._check_split(pool, plan, key)
            if not broken and not taken:
                break
            for j in broken:
                singles.update(plan[j].members)
            for (owner, block, row), j in taken.items():
                if len(plan[j].members) > 1:
                    singles.update(plan[j].members)
                else:
                    # Taken by a single-member cluster: only a centre on its own key is sure to keep it.
                    singles.add(self._evict(owner, block, row, pool))
        for g in plan:
            self._store.create(
                pool.keys[g.members],
                pool.labels[g.members[0]],
                [pool.blocks[i] for i in g.members],
                [pool.rows[i] for i in g.members],
                [pool.edit_ids[i] for i in g.members],
                g.radius,
                g.floor,
            )

    def _check_split(
        self, pool: Pool, plan: list[Group], key: np.ndarray
    ) -> tuple[set[int], dict[tuple[int, int, int], int]]:
        """Step 3 of ``split``: the planned groups that a member of theirs would not route to, and the
        live members ``(cluster id, block, row)`` that a planned cluster would take (-> its index)."""
        clusters = self._store.clusters
        planned = np.stack([g.centre for g in plan])
        live = [(cid, m) for cid in self._store.clusters_near(planned) for m in range(len(clusters[cid].blocks))]
        owner = {i: j for j, g in enumerate(plan) for i in g.members if len(g.members) > 1}
        queries = np.concatenate(
            [pool.keys[sorted(owner)].reshape(-1, self.dim)] + [clusters[i].keys[m][None, :] for i, m in live]
        )
        if not len(queries):
            return set(), {}
        # As in Search: the nearest centre wins and an exact tie goes to the newest cluster; planned
        # clusters are newer than every live one, and K's cluster is created after them.
        diff = queries.astype(np.float64)[:, None, :] - planned.astype(np.float64)[None, :, :]
        planned_d = np.sqrt(np.einsum("nkd,nkd->nk", diff, diff))
        nearest = planned_d.shape[1] - 1 - np.argmin(planned_d[:, ::-1], axis=1)
        best = planned_d[np.arange(len(queries)), nearest]
        key_d = distances(key, queries)
        existing = self.nearest(queries)
        wins = (best < key_d) & np.array([e is None or b <= e[1] for b, e in zip(best, existing)])
        broken = set()
        for n, i in enumerate(sorted(owner)):
            if not (wins[n] and nearest[n] == owner[i]):
                broken.add(owner[i])
        taken = {}
        for n, (i, m) in enumerate(live, start=len(owner)):
            if wins[n]:
                c = self._store.clusters[i]
                taken[(i, c.blocks[m], c.rows[m])] = int(nearest[n])
        return broken, taken

    def _evict(self, cid: int, block: int, row: int, pool: Pool) -> int:
        """Move member ``(block, row)`` out of cluster ``cid`` into ``pool``; returns its pool index.

        The cluster's centre stays (as after a conflict), so its other members route as before.
        """
        c = self._store.clusters[cid]
        mask = np.array([(b, r) == (block, row) for b, r in zip(c.blocks, c.rows)])
        m = int(np.flatnonzero(mask)[0])
        pool.add(c.keys[m], block, row, c.edit_ids[m], c.label, c.floor)
        if c.centre_members is None:
            c.centre_members = list(zip(c.blocks, c.rows))
        self._store.remove_members(cid, mask, [])
        return len(pool.blocks) - 1

    def _supersede(
        self,
        cid: int,
        key: np.ndarray,
        label: str,
        block: int,
        row: int,
        edit_id: str,
        forgotten: list[tuple[str, int]],
    ) -> None:
        c = self._store.clusters[cid]
        if self.conflict_policy == "split":
            same_input = distances(key, c.keys) <= SAME_INPUT_TOLERANCE * self.r_init
            if self._store.remove_members(cid, same_input, forgotten):
                self._split(cid, np.ones(len(self._store.clusters[cid].blocks), dtype=bool), key)
        else:
            superseded = distances(key, c.keys) <= self.r_init
            forgotten.extend(
                (c.edit_ids[i], c.blocks[i]) for i in np.flatnonzero(superseded).tolist()
            )
            survivors = np.flatnonzero(~superseded).tolist()
            groups = regroup(c.keys, survivors, c.floor)
            self._store.drop(cid)
            for g in groups:
                self._store.create(
                    c.keys[g.members],
                    c.label,
                    [c.blocks[i] for i in g.members],
                    [c.rows[i] for i in g.members],
                    [c.edit_ids[i] for i in g.members],
                    g.radius,
                    c.floor,
                )
        self._store.create(key[None, :], label, [block], [row], [edit_id], self.r_init, self.r_init)

    # ---------------------------------------------------------------------------------- retract

    def retract(self, edit_id: str) -> int:
        """Remove every member of ``edit_id``; refit the clusters that keep members, drop empty ones.

        Returns the number of members removed (0 for an unknown or already retracted edit). The
        keys stay in their segments (immutable), unreferenced.
        """
        self._store.count_mutation()
        clusters = sorted(self._store.edit_clusters.get(edit_id, {}))
        removed = 0
        for cid in clusters:
            mask = np.array([e == edit_id for e in self._store.clusters[cid].edit_ids])
            removed += int(mask.sum())
            if self._store.remove_members(cid, mask, []):
                self._store.refit(cid)
        self._store.maintain()
        if removed:
            self._store.retracted_total += 1
        return removed

    # ----------------------------------------------------------------------------------- search

    def search(self, queries: np.ndarray) -> list[Hit | None]:
        """Route each query row: the hit in its nearest cluster if inside the radius, else None."""
        queries = check_keys(queries, "queries", self.dim)
        hits: list[Hit | None] = []
        for cid_d, q in zip(self.nearest(queries), queries):
            if cid_d is None:
                hits.append(None)
                continue
            cid, d = cid_d
            c = self._store.clusters[cid]
            if d > c.radius:
                hits.append(None)
                continue
            member_d = distances(q, c.keys)
            # Newest member wins a tie: search the reversed order, map the index back.
            m = len(member_d) - 1 - int(np.argmin(member_d[::-1]))
            hits.append(Hit(cluster_id=cid, block=c.blocks[m], edit_id=c.edit_ids[m], distance=d))
        return hits

    def nearest(self, queries: np.ndarray) -> list[tuple[int, float] | None]:
        """Nearest live cluster and its exact distance per query row (None: no clusters)."""
        return self._store.nearest(queries)

    # ------------------------------------------------------------------------------ bookkeeping

    def edit_ids(self) -> set[str]:
        """Edits with at least one member left (not forgotten, not retracted)."""
        return set(self._store.edit_clusters)

    def stats(self) -> dict[str, int]:
        """Sizes and lifetime counters."""
        return self._store.stats()

    def clusters(self) -> list[dict[str, Any]]:
        """Every cluster in id order: its record (as in ``to_state``) plus ``centre`` and member ``keys``.

        For inspection and tests; the arrays are copies.
        """
        store = self._store
        return [
            {**persisted.record(store, cid), "centre": store.index.centres[cid].copy(), "keys": c.keys.copy()}
            for cid, c in sorted(store.clusters.items())
        ]

    # ------------------------------------------------------------------------------ persistence

    def to_state(self, *, include_index: bool = True) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Serialize to a JSON-able dict and named numpy arrays (safetensors-friendly, no pickle).

        Array names are ``<file stem>/<tensor>``, grouped so that each stem is one immutable unit:

        - ``keys/<block:06d>/keys`` float32 [rows, dim]: the block's key segment;
        - ``graph/base/index`` uint8: hnswlib's serialization of the graph at the last checkpoint;
        - ``graph/<seq:08d>/ops`` uint64 [n, 2] (kind, label or capacity) and
          ``graph/<seq:08d>/vectors`` float32 [additions, dim]: one mutating call's graph log part.

        The graph arrays exist only while the database has a graph (above
        ``exact_search_max_clusters`` clusters) and ``include_index`` is true; without them
        ``from_state`` rebuilds the graph, which can then differ on HNSW misses.
        """
        return persisted.to_state(self._params(), self._store, include_index=include_index)

    def _params(self) -> dict[str, Any]:
        """The constructor's arguments, as the state records them."""
        return {
            "dim": self.dim,
            "r_init": self.r_init,
            "hnsw_m": self.hnsw_m,
            "ef_construction": self.ef_construction,
            "ef_search": self.ef_search,
            "seed": self.seed,
            "exact_search_max_clusters": self.exact_search_max_clusters,
            "conflict_policy": self.conflict_policy,
        }

    def copy(self) -> VectorDB:
        """An independent database that routes, and evolves, exactly like this one.

        Made through the persisted state (less the checksums of its own segments), so it is exactly
        what a loader of this database's snapshot would build.
        """
        return self._from_state(*self.to_state(), verify=False)

    @classmethod
    def from_state(cls, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> VectorDB:
        """Rebuild a database written by ``to_state``; validates shapes, checksums and counts."""
        return cls._from_state(state, arrays, verify=True)

    @classmethod
    def _from_state(cls, state: dict[str, Any], arrays: dict[str, np.ndarray], *, verify: bool) -> VectorDB:
        db = cls(**persisted.params(state))
        persisted.load(db._store, state, arrays, verify=verify)
        return db
