"""The MELO cluster vector database: edit keys grouped into labelled balls, searched through HNSW.

A cluster is a ball in key space: a centre, a radius and a label, holding members
``(key, block, edit_id)``. Keys are inserted one at a time, in order. For a new key ``K`` with label
``y`` and nearest cluster ``C`` at L2 distance ``d`` (``R_C`` its radius, ``R_init`` the initial
radius), exactly one rule applies (DESIGN.md §2):

- ``add``: ``d > R_C + R_init`` (or no cluster yet) -> new cluster ``{K}``, radius ``R_init``.
- ``expand``: ``R_C < d <= R_C + R_init``, same label -> ``K`` joins ``C`` and ``C`` is refitted.
- ``conflict``: ``R_C < d <= R_C + R_init``, other label -> ``R_C <- min(R_C, d/2)`` (a shrink:
  when an earlier conflict already left ``R_C < d/2`` it stays); new cluster at ``K`` with radius
  ``d/2``, created last; members of ``C`` now outside ``R_C`` (*moved* members) are forgotten under
  the ``forget`` conflict policy (the paper's rule, the default) or re-clustered under ``split``
  (below). ``C``'s centre stays where it is: it is the centre of the ball that was halved, and
  moving it to the mean of the survivors could push survivors outside the new radius. It becomes
  the mean again at the next refit.
- ``join``: ``d <= R_C``, same label -> ``K`` joins ``C`` and ``C`` is refitted.
- ``supersede``: ``d <= R_C``, other label -> the newest edit prevails (MELO's Property 4):

  1. Members of ``C`` that are "the same input" as ``K`` are *superseded*: forgotten and reported.
     Under ``forget`` these are the members within ``R_init`` of ``K``: ``R_init`` is the scope MELO
     gives one edit, so an old key that close counts as the same input and now belongs to the new
     label. Under ``split`` they are only the members at most ``SAME_INPUT_TOLERANCE * R_init`` from
     ``K``: the same prompt computed again (float noise apart); a different input whose key is
     merely close is kept.
  2. ``C`` is dissolved and its remaining members are re-clustered. Under ``forget``: among
     themselves, in their insertion order, by the ``add``/``expand``/``join`` rules (one label, so
     no conflicts), with ``C``'s radius floor. Keeping ``C`` whole would leave its centre (the mean
     of members around ``K``) next to ``K``, where it would compete with the new edit and strand
     members on the far side; re-clustering gives every surviving member a centre near itself, so
     members far from ``K`` stay reachable. Under ``split``: exactly as a conflict's moved members
     (below), so each one also routes to its own edit rather than to ``K``.
  3. A new cluster ``{K}`` with radius ``R_init`` is created last, so it has the largest id and wins
     any exact distance tie (see Search): a search for ``K`` returns the new edit's block.

The ``split`` conflict policy keeps the moved members instead of forgetting them. Search goes to
the nearest centre first and only then checks its radius, so what a new cluster can take from the
clusters around it is decided by where its centre lies, not by its radius; the rule is built on that:

  1. The moved members are re-clustered among themselves, in insertion order, by the
     ``add``/``expand``/``join`` rules (one label) with ``C``'s radius floor ``f`` (already lowered
     to at most ``d/2`` by the shrink), as a ``forget`` supersede does with its survivors.
  2. Each resulting cluster ``S`` (centre ``s``, members at most ``spread`` from ``s``) is halved
     against ``K`` as a conflict would halve it: floor ``min(f, |s - K| / 2)``, radius ``max(spread,
     floor)``. A group whose spread exceeds ``|s - K| / 2`` becomes one single-member cluster per
     member instead (spread 0 always fits). So no split cluster's radius exceeds half its distance
     to ``K``: its ball holds no point nearer ``K`` than its own centre.
  3. Routing check, with the exact distances and tie rule of Search over every live centre, the
     planned clusters (newer than every live one) and ``K``'s (newest): (a) every moved member in a
     planned group must route to that group; (b) no member of a live cluster -- ``C``'s remaining
     members above all -- may be *taken* by a planned cluster, i.e. have a planned centre become its
     nearest. A group that fails (a), or takes a member, becomes single-member clusters. A member
     taken by a single-member cluster is *evicted*: it leaves its cluster (whose centre stays, as
     after a conflict, so the cluster's other members route as before; an emptied cluster is
     removed) for a single-member cluster of its own, with floor ``min(its cluster's floor, |key -
     K| / 2)``. Repeat until the check passes. It must: every failing round makes at least one more
     single-member cluster, and a single-member cluster's centre is its member's key, at distance 0.
  4. The planned clusters are created in the order of their first member (moved members in
     insertion order, then evicted ones in eviction order), then ``K``'s cluster.

  A supersede under ``split`` runs the same steps with every member of ``C`` that is not superseded
  as a moved member and ``C``'s floor ``f`` as it is (no shrink came first; step 2 halves each group
  against ``K`` all the same); ``C`` is thereby emptied, hence removed, and ``K``'s cluster has
  radius ``R_init`` as under ``forget``.

  Hence, compared with ``forget`` on the same database: a conflict forgets no member, and a
  supersede only the members that are ``K``'s own input; ``K``'s key routes to ``K``; every moved,
  kept or evicted member's key routes to its own edit (of identical keys, the newest); and every
  other member's key routes to the cluster it routed to before the insert (in a conflict, the same
  as under ``forget``; to its own edit if it did there). ``K``'s centre can take members of nearby
  clusters under both policies, as any new centre can (``add``). Step 3 finds live centres as Search
  does, so with the HNSW graph these guarantees hold wherever the graph finds the true nearest
  centre. Its cost is a scan of every centre per round (one round is the rule, measured).

*Refit* (expand, join, retract): centre = mean of the member keys, radius = max(distance from the new
centre to the farthest member, radius floor). The floor is ``R_init`` until a conflict halves the
cluster (or ``split`` creates it with a halved floor); then it is the halved radius, so a later
refit never re-grows the cluster into the neighbour it conflicted with further than its own members
require. The radius may therefore shrink (when the centre moves towards the farthest member) as
well as grow, and it always contains every member. No radius is ever 0: ``R_init > 0``, a conflict halves a distance ``d > R_C > 0``, and a
split cluster halves a positive distance to ``K``: a member a conflict moves lies within ``R_C < d`` of
``C``'s centre, so it is not ``K``; one a supersede keeps is more than the tolerance from ``K``; an
evicted member is strictly nearer a planned centre than ``K``; and a
kept group has ``0 < spread <= |s - K| / 2`` or identical keys (then ``s`` is a member's key).

A cluster left with no members is removed. Counters: ``conflicts_total`` (conflict + supersede
actions), ``forgotten_total`` (members removed by either), ``retracted_total`` (edits retracted).

Search: for each query the candidates are the ``min(n_clusters, 8)`` nearest centres, from hnswlib
(space ``l2``, whose distances are squared and only used for ranking) or, with few clusters, from an
exact numpy scan (faster there; see bench/RESULTS.md). Candidates are re-checked with exact
float64 L2 distances to the current centres; the nearest wins, an exact tie goes to the newest
cluster (largest id). Inside its radius the hit is the cluster's nearest member key (ties: newest
member); outside, ``None``. Both candidate paths give identical results whenever the true nearest
centre is among the candidates, which the numpy scan guarantees up to float rounding. Labels are
compared as exact strings: the caller passes normalized targets.

Index maintenance: the graph exists only while it can be used, i.e. from the first moment the
database holds more than ``exact_search_max_clusters`` clusters (below that, search scans exactly and
a graph would cost an hnswlib insertion per centre change for nothing). A centre that moves is
marked deleted in the graph and inserted again as a new element (label ``version << 32 | cluster
id``) instead of being updated in place, because hnswlib's in-place update re-prunes neighbours'
links and was measured to orphan unrelated elements. Once deleted elements outnumber live ones (and
1024), the graph is rebuilt from the live centres in cluster-id order.

Persistence (``to_state``/``from_state``) is built so that a snapshot costs new bytes in proportion
to what changed, not to everything held:

- Member keys live in append-only *segments*, one per block: every key inserted with block ``b``,
  in insertion order. A member is the reference ``(block, row)``; forgetting or retracting a member
  removes the reference, never a row, so a segment is written once (the editor inserts each block's
  keys in one call) and a content-addressed store keeps a single copy across versions.
- Centres are not stored: every centre is the float64 mean of a list of member keys, cast to
  float32 (``_mean``), so a loader recomputes it bit for bit from the same keys in the same order.
  That list is the cluster's members, except after a conflict removed members without a refit: the
  centre stays put (see above), and the record lists the members it is the mean of
  (``centre_members``, still present in their immutable segments).
- The graph is a *base* (hnswlib's serialization) plus a *log* of the operations since (add an
  element, mark one deleted, grow capacity), one log part per mutating call. A loader loads the base
  and replays the log, which reproduces the live graph exactly — including hnswlib's level
  generator, which a serialization does not carry: that is why the live database itself swaps its
  graph for the reloaded base whenever it writes one (a *checkpoint*). Checkpoints happen when the
  graph is built or rebuilt and when the log holds more additions than ``max(1024, clusters // 8)``,
  which bounds replay work at load and amortizes the base's bytes over at least that many changes.

A loaded database therefore routes exactly as the saved one, and evolves exactly as it would have.

Thread safety: ``search`` reads only and may run from many threads at once; ``insert``, ``retract``
and ``from_state`` mutate, and must not overlap any other call (the caller serializes, e.g. by
swapping in a new database). Determinism: the same inserts in the same order give the same state,
HNSW graph included (single-threaded graph updates with a fixed seed).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import hnswlib
import numpy as np

STATE_FORMAT = "melo.vectordb/2"
# What a conflict or supersede does with the old cluster's members (module docstring).
CONFLICT_POLICIES = ("forget", "split")
# Under "split", a supersede forgets only members within this fraction of R_init of the new key: the
# same input. Measured with SmolLM2's key (R_init 10.1): the same prompt in another batch moves its
# key by up to 1.0e-4 (1e-5 R_init, padding changes the float sums), while the closest keys of two
# different prompts in 1,000 zsRE + 200 CounterFact edits are 1.74 apart (0.17 R_init).
SAME_INPUT_TOLERANCE = 1e-3
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


@dataclass
class _Cluster:
    radius: float
    floor: float  # smallest radius a refit may give: R_init, or less after a conflict halved it
    label: str
    keys: np.ndarray  # [members, dim] float32, oldest first
    blocks: list[int]
    rows: list[int]  # member i is row rows[i] of segment blocks[i]
    edit_ids: list[str]
    # (block, row) of the keys whose mean the centre is, when that is not the members: set when a
    # conflict removes members (the centre stays), cleared by the next refit.
    centre_members: list[tuple[int, int]] | None = None


@dataclass
class _Group:
    """A cluster being re-formed from a dissolved cluster's survivors (supersede, step 2; split)."""

    centre: np.ndarray
    radius: float
    members: list[int] = field(default_factory=list)  # indices into the dissolved cluster
    floor: float = 0.0  # the cluster's radius floor, where it differs from the regroup's (split)


@dataclass
class _Pool:
    """The members a ``split`` places, by index: keys [n, dim] and what their clusters will need."""

    keys: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    blocks: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    edit_ids: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    floors: list[float] = field(default_factory=list)  # the radius floor of the cluster it came from

    def add(self, key: np.ndarray, block: int, row: int, edit_id: str, label: str, floor: float) -> None:
        self.keys = key[None, :].copy() if not self.blocks else np.concatenate([self.keys, key[None, :]])
        self.blocks.append(block)
        self.rows.append(row)
        self.edit_ids.append(edit_id)
        self.labels.append(label)
        self.floors.append(floor)


@dataclass
class _LogPart:
    """The graph operations of one mutating call since the last checkpoint."""

    seq: int  # the call's number (``mutations`` when it ran): names the part's file
    ops: list[tuple[int, int]] = field(default_factory=list)  # (kind, label or capacity)
    vectors: list[np.ndarray] = field(default_factory=list)  # [dim] float32 per addition, in order


def _distances(point: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Exact L2 distances (float64) from ``point`` [dim] to each of ``rows`` [n, dim]."""
    diff = rows.astype(np.float64) - point.astype(np.float64)
    return np.sqrt(np.einsum("ij,ij->i", diff, diff))


def _mean(keys: np.ndarray) -> np.ndarray:
    # The only way a centre is ever computed: a loader recomputes centres bit for bit with it.
    return keys.astype(np.float64).mean(axis=0).astype(np.float32)


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def segment_name(block: int) -> str:
    """Array name of block ``block``'s key segment in ``to_state``, e.g. ``keys/000003/keys``."""
    return f"keys/{block:06d}/keys"


class VectorDB:
    """MELO clusters of edit keys with an HNSW index over their centres (rules: module docstring).

    Args:
        dim: key dimension.
        r_init: radius of a new cluster (L2 distance on keys), > 0.
        hnsw_m: HNSW graph degree (hnswlib ``M``).
        ef_construction: HNSW build-time beam width.
        ef_search: HNSW query-time beam width (raised to at least the candidate count).
        seed: HNSW level-assignment seed.
        exact_search_max_clusters: up to this many clusters, search scans all centres exactly.
        conflict_policy: ``"forget"`` (the paper's rule) or ``"split"``: what a conflict does with
            the members outside the halved radius (module docstring).
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
        self.exact_search_max_clusters = int(exact_search_max_clusters)
        self.conflict_policy = conflict_policy
        self._clusters: dict[int, _Cluster] = {}
        self._next_id = 0
        # Row i holds cluster i's centre while cluster i exists; ids are never reused.
        self._centres = np.zeros((0, self.dim), dtype=np.float32)
        self._sq_norms = np.zeros(0, dtype=np.float32)  # ||centre||^2, +inf for removed clusters
        self._edit_clusters: dict[str, dict[int, int]] = {}  # edit id -> {cluster id: member count}
        self._conflicts_total = 0
        self._forgotten_total = 0
        self._retracted_total = 0
        # Block -> every key inserted with that block, in order. Arrays are never written in place
        # (an append makes a new array), so copies of the database may share them.
        self._segments: dict[int, np.ndarray] = {}
        self._segment_sha: dict[int, str] = {}  # block -> sha256 of its segment, computed once
        self._mutations = 0  # insert/retract calls so far: numbers the graph log parts
        self._index: hnswlib.Index | None = None  # None while search scans exactly (see docstring)
        self._graph_labels: dict[int, int] = {}  # cluster id -> label of its live HNSW element
        self._graph_deleted = 0  # elements marked deleted since the graph was last built
        self._graph_base: np.ndarray | None = None  # uint8: hnswlib's serialization at the checkpoint
        self._graph_base_capacity = 0
        self._graph_log: list[_LogPart] = []
        self._graph_log_adds = 0

    # ----------------------------------------------------------------------------------- insert

    def insert(
        self,
        keys: np.ndarray,
        labels: Sequence[str],
        blocks: Sequence[int],
        edit_ids: Sequence[str],
    ) -> InsertReport:
        """Insert keys one at a time, in order, by the rules in the module docstring.

        Every argument is validated before anything changes. Each key is appended to its block's
        segment; pass all keys of a block in one call to keep segments write-once.
        """
        keys = self._check_keys(keys, "keys")
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
        self._mutations += 1
        rows = self._append_to_segments(keys, [int(b) for b in blocks])
        report = InsertReport(actions=[], added=0, expanded=0, conflicts=0, forgotten=[])
        for key, label, block, row, edit_id in zip(keys, labels, blocks, rows, edit_ids):
            action = self._insert_one(key, label, int(block), row, edit_id, report.forgotten)
            report.actions.append(action)
            report.added += action == "add"
            report.expanded += action == "expand"
            report.conflicts += action in ("conflict", "supersede")
            self._maintain_graph()
        self._conflicts_total += report.conflicts
        self._forgotten_total += len(report.forgotten)
        return report

    def _append_to_segments(self, keys: np.ndarray, blocks: list[int]) -> list[int]:
        """Append each key to its block's segment; returns each key's row there."""
        rows = []
        for block in sorted(set(blocks)):
            mine = [i for i, b in enumerate(blocks) if b == block]
            old = self._segments.get(block, np.zeros((0, self.dim), np.float32))
            self._segments[block] = np.concatenate([old, keys[mine]])
            self._segment_sha.pop(block, None)
            rows.extend(zip(mine, range(len(old), len(old) + len(mine))))
        return [row for _, row in sorted(rows)]

    def _insert_one(
        self,
        key: np.ndarray,
        label: str,
        block: int,
        row: int,
        edit_id: str,
        forgotten: list[tuple[str, int]],
    ) -> str:
        nearest = self._nearest(key[None, :])[0]
        if nearest is None:
            self._create(key[None, :], label, [block], [row], [edit_id], self.r_init, self.r_init)
            return "add"
        cid, d = nearest
        c = self._clusters[cid]
        if d > c.radius + self.r_init:
            self._create(key[None, :], label, [block], [row], [edit_id], self.r_init, self.r_init)
            return "add"
        if c.label == label:
            action = "join" if d <= c.radius else "expand"
            self._append_member(cid, key, block, row, edit_id)
            self._refit(cid)
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
        c = self._clusters[cid]
        half = d / 2.0
        c.radius = min(c.radius, half)
        c.floor = min(c.floor, c.radius)
        outside = _distances(self._centres[cid], c.keys) > c.radius
        if outside.any() and c.centre_members is None:
            # The centre stays the mean of the members it had; remember them (see docstring).
            c.centre_members = list(zip(c.blocks, c.rows))
        if self.conflict_policy == "split" and outside.any():
            self._split(cid, outside, key)
        else:
            self._remove_members(cid, outside, forgotten)
        self._create(key[None, :], label, [block], [row], [edit_id], half, half)

    def _split(self, cid: int, moved: np.ndarray, key: np.ndarray) -> None:
        """Re-cluster the ``moved`` members of cluster ``cid`` as clusters halved against ``key`` and
        routing-checked, instead of forgetting them (module docstring: ``split``)."""
        c = self._clusters[cid]
        pool = _Pool()  # the members the split places: C's moved ones first, then evicted ones
        for i in np.flatnonzero(moved).tolist():
            pool.add(c.keys[i], c.blocks[i], c.rows[i], c.edit_ids[i], c.label, c.floor)
        n_moved = len(pool.blocks)
        self._remove_members(cid, moved, [])
        singles: set[int] = set()  # pool members that must be single-member clusters
        while True:
            plan = self._plan_split(pool, n_moved, singles, key)
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
            self._create(
                pool.keys[g.members],
                pool.labels[g.members[0]],
                [pool.blocks[i] for i in g.members],
                [pool.rows[i] for i in g.members],
                [pool.edit_ids[i] for i in g.members],
                g.radius,
                g.floor,
            )

    def _plan_split(self, pool: _Pool, n_moved: int, singles: set[int], key: np.ndarray) -> list[_Group]:
        """Steps 1, 2 and 4 of ``split``: the clusters that would be created, in creation order."""
        floor = pool.floors[0]  # C's: every moved member came from C
        groups = self._regroup(pool.keys, [i for i in range(n_moved) if i not in singles], floor)
        groups += [_Group(centre=pool.keys[i].copy(), radius=0.0, members=[i]) for i in sorted(singles)]
        plan = []
        for g in sorted(groups, key=lambda g: g.members[0]):
            spread = float(_distances(g.centre, pool.keys[g.members]).max())
            if spread > float(_distances(key, g.centre[None, :])[0]) / 2.0:
                plan += [_Group(centre=pool.keys[i].copy(), radius=0.0, members=[i]) for i in g.members]
            else:
                plan.append(g)
        for g in plan:
            g.floor = min(pool.floors[g.members[0]], float(_distances(key, g.centre[None, :])[0]) / 2.0)
            g.radius = max(float(_distances(g.centre, pool.keys[g.members]).max()), g.floor)
        return plan

    def _check_split(
        self, pool: _Pool, plan: list[_Group], key: np.ndarray
    ) -> tuple[set[int], dict[tuple[int, int, int], int]]:
        """Step 3 of ``split``: the planned groups that a member of theirs would not route to, and the
        live members ``(cluster id, block, row)`` that a planned cluster would take (-> its index)."""
        planned = np.stack([g.centre for g in plan])
        live = [(cid, m) for cid in self._clusters_near(planned) for m in range(len(self._clusters[cid].blocks))]
        owner = {i: j for j, g in enumerate(plan) for i in g.members if len(g.members) > 1}
        queries = np.concatenate(
            [pool.keys[sorted(owner)].reshape(-1, self.dim)]
            + [self._clusters[i].keys[m][None, :] for i, m in live]
        )
        if not len(queries):
            return set(), {}
        # As in Search: the nearest centre wins and an exact tie goes to the newest cluster; planned
        # clusters are newer than every live one, and K's cluster is created after them.
        diff = queries.astype(np.float64)[:, None, :] - planned.astype(np.float64)[None, :, :]
        planned_d = np.sqrt(np.einsum("nkd,nkd->nk", diff, diff))
        nearest = planned_d.shape[1] - 1 - np.argmin(planned_d[:, ::-1], axis=1)
        best = planned_d[np.arange(len(queries)), nearest]
        key_d = _distances(key, queries)
        existing = self._nearest(queries)
        wins = (best < key_d) & np.array([e is None or b <= e[1] for b, e in zip(best, existing)])
        broken = set()
        for n, i in enumerate(sorted(owner)):
            if not (wins[n] and nearest[n] == owner[i]):
                broken.add(owner[i])
        taken = {}
        for n, (i, m) in enumerate(live, start=len(owner)):
            if wins[n]:
                c = self._clusters[i]
                taken[(i, c.blocks[m], c.rows[m])] = int(nearest[n])
        return broken, taken

    def _clusters_near(self, points: np.ndarray) -> list[int]:
        """Ids of the clusters whose members a new centre at one of ``points`` could take.

        A member is taken only by a centre nearer than the one it routes to now, which is at most
        its cluster's radius away, so the centre lies within twice that radius of the cluster's.
        Scanned like ``_scan_candidates`` (one matrix product over every centre row); the slack
        covers float32 rounding, and a cluster let in by it is only checked exactly, in vain.
        """
        n_rows = self._next_id
        norms = self._sq_norms[:n_rows].astype(np.float64)
        alive = np.isfinite(norms)
        radii = np.zeros(n_rows)
        for cid, c in self._clusters.items():
            radii[cid] = c.radius
        point_norms = np.einsum("ij,ij->i", points.astype(np.float64), points.astype(np.float64))
        sq = norms[None, :] + point_norms[:, None] - 2.0 * (points @ self._centres[:n_rows].T)
        slack = 1e-3 * (np.where(alive, norms, 0.0)[None, :] + point_norms[:, None]) + 1e-12
        near = alive & (sq <= (2.0 * radii) ** 2 + slack).any(axis=0)
        return np.flatnonzero(near).tolist()

    def _evict(self, cid: int, block: int, row: int, pool: _Pool) -> int:
        """Move member ``(block, row)`` out of cluster ``cid`` into ``pool``; returns its pool index.

        The cluster's centre stays (as after a conflict), so its other members route as before.
        """
        c = self._clusters[cid]
        mask = np.array([(b, r) == (block, row) for b, r in zip(c.blocks, c.rows)])
        m = int(np.flatnonzero(mask)[0])
        pool.add(c.keys[m], block, row, c.edit_ids[m], c.label, c.floor)
        if c.centre_members is None:
            c.centre_members = list(zip(c.blocks, c.rows))
        self._remove_members(cid, mask, [])
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
        c = self._clusters[cid]
        if self.conflict_policy == "split":
            same_input = _distances(key, c.keys) <= SAME_INPUT_TOLERANCE * self.r_init
            if self._remove_members(cid, same_input, forgotten):
                self._split(cid, np.ones(len(self._clusters[cid].blocks), dtype=bool), key)
        else:
            superseded = _distances(key, c.keys) <= self.r_init
            forgotten.extend(
                (c.edit_ids[i], c.blocks[i]) for i in np.flatnonzero(superseded).tolist()
            )
            survivors = np.flatnonzero(~superseded).tolist()
            groups = self._regroup(c.keys, survivors, c.floor)
            self._drop_cluster(cid)
            for g in groups:
                self._create(
                    c.keys[g.members],
                    c.label,
                    [c.blocks[i] for i in g.members],
                    [c.rows[i] for i in g.members],
                    [c.edit_ids[i] for i in g.members],
                    g.radius,
                    c.floor,
                )
        self._create(key[None, :], label, [block], [row], [edit_id], self.r_init, self.r_init)

    @staticmethod
    def _regroup(keys: np.ndarray, order: list[int], floor: float) -> list[_Group]:
        """Cluster ``keys[order]`` (one label) by the add/expand/join rules with radius floor ``floor``."""
        groups: list[_Group] = []
        for i in order:
            if groups:
                centres = np.stack([g.centre for g in groups])
                dist = _distances(keys[i], centres)
                j = int(np.argmin(dist))
                if dist[j] <= groups[j].radius + floor:
                    g = groups[j]
                    g.members.append(i)
                    g.centre = _mean(keys[g.members])
                    g.radius = max(float(_distances(g.centre, keys[g.members]).max()), floor)
                    continue
            groups.append(_Group(centre=keys[i].copy(), radius=floor, members=[i]))
        return groups


    # ---------------------------------------------------------------------------------- retract

    def retract(self, edit_id: str) -> int:
        """Remove every member of ``edit_id``; refit the clusters that keep members, drop empty ones.

        Returns the number of members removed (0 for an unknown or already retracted edit). The
        keys stay in their segments (immutable), unreferenced.
        """
        self._mutations += 1
        clusters = sorted(self._edit_clusters.get(edit_id, {}))
        removed = 0
        for cid in clusters:
            mask = np.array([e == edit_id for e in self._clusters[cid].edit_ids])
            removed += int(mask.sum())
            if self._remove_members(cid, mask, []):
                self._refit(cid)
        self._maintain_graph()
        if removed:
            self._retracted_total += 1
        return removed

    # ----------------------------------------------------------------------------------- search

    def search(self, queries: np.ndarray) -> list[Hit | None]:
        """Route each query row: the hit in its nearest cluster if inside the radius, else None."""
        queries = self._check_keys(queries, "queries")
        hits: list[Hit | None] = []
        for cid_d, q in zip(self._nearest(queries), queries):
            if cid_d is None:
                hits.append(None)
                continue
            cid, d = cid_d
            c = self._clusters[cid]
            if d > c.radius:
                hits.append(None)
                continue
            member_d = _distances(q, c.keys)
            # Newest member wins a tie: search the reversed order, map the index back.
            m = len(member_d) - 1 - int(np.argmin(member_d[::-1]))
            hits.append(Hit(cluster_id=cid, block=c.blocks[m], edit_id=c.edit_ids[m], distance=d))
        return hits

    def _nearest(self, queries: np.ndarray) -> list[tuple[int, float] | None]:
        """Nearest live cluster and its exact distance per query row (None: no clusters)."""
        n_live = len(self._clusters)
        if n_live == 0:
            return [None] * len(queries)
        if len(queries) > _RECHECK_CHUNK_ROWS:
            return [
                hit
                for start in range(0, len(queries), _RECHECK_CHUNK_ROWS)
                for hit in self._nearest(queries[start : start + _RECHECK_CHUNK_ROWS])
            ]
        k = min(n_live, CANDIDATES)
        if self._index is None or n_live <= self.exact_search_max_clusters:
            candidates = self._scan_candidates(queries, k)
        else:
            try:
                labels, _ = self._index.knn_query(queries, k=k, num_threads=1)
                candidates = (labels & _ID_MASK).astype(np.int64)
            except RuntimeError:
                # hnswlib raises when its beam found fewer than k live elements (possible once many
                # clusters were removed); the exact scan always can.
                candidates = self._scan_candidates(queries, k)
        diff = self._centres[candidates].astype(np.float64) - queries.astype(np.float64)[:, None, :]
        dist = np.sqrt(np.einsum("nkd,nkd->nk", diff, diff))
        # Sort by (distance, newest first): lexsort's last key is the primary one.
        order = np.lexsort((-candidates, dist), axis=1)[:, 0]
        rows = np.arange(len(queries))
        return [
            (int(cid), float(d))
            for cid, d in zip(candidates[rows, order], dist[rows, order])
        ]

    def _scan_candidates(self, queries: np.ndarray, k: int) -> np.ndarray:
        """The k smallest ||c||^2 - 2 q.c over all centres, by exact numpy scan: [n, k] cluster ids."""
        n_rows = self._next_id
        out = np.empty((len(queries), k), dtype=np.int64)
        step = max(1, _SCAN_CHUNK_CELLS // max(n_rows, 1))
        centres = self._centres[:n_rows]
        norms = self._sq_norms[:n_rows]
        for start in range(0, len(queries), step):
            q = queries[start : start + step]
            scores = norms[None, :] - 2.0 * (q @ centres.T)
            if k < n_rows:
                out[start : start + len(q)] = np.argpartition(scores, k - 1, axis=1)[:, :k]
            else:
                out[start : start + len(q)] = np.argsort(scores, axis=1)[:, :k]
        return out

    # ------------------------------------------------------------------------------ bookkeeping

    def edit_ids(self) -> set[str]:
        """Edits with at least one member left (not forgotten, not retracted)."""
        return set(self._edit_clusters)

    def stats(self) -> dict[str, int]:
        """Sizes and lifetime counters."""
        return {
            "clusters": len(self._clusters),
            "members": sum(len(c.blocks) for c in self._clusters.values()),
            "conflicts_total": self._conflicts_total,
            "forgotten_total": self._forgotten_total,
            "retracted_total": self._retracted_total,
        }


    def clusters(self) -> list[dict[str, Any]]:
        """Every cluster in id order: its record (as in ``to_state``) plus ``centre`` and member ``keys``.

        For inspection and tests; the arrays are copies.
        """
        return [
            {**self._record(cid), "centre": self._centres[cid].copy(), "keys": self._clusters[cid].keys.copy()}
            for cid in sorted(self._clusters)
        ]

    def _create(
        self,
        keys: np.ndarray,
        label: str,
        blocks: list[int],
        rows: list[int],
        edit_ids: list[str],
        radius: float,
        floor: float,
    ) -> int:
        cid = self._next_id
        self._next_id += 1
        self._clusters[cid] = _Cluster(
            radius=float(radius),
            floor=float(floor),
            label=label,
            keys=np.array(keys, dtype=np.float32, copy=True),
            blocks=list(blocks),
            rows=list(rows),
            edit_ids=list(edit_ids),
        )
        for e in edit_ids:
            counts = self._edit_clusters.setdefault(e, {})
            counts[cid] = counts.get(cid, 0) + 1
        self._reserve_centre_rows(cid + 1)
        self._set_centre(cid, _mean(keys))
        return cid

    def _reserve_centre_rows(self, n: int) -> None:
        if n > len(self._centres):
            grow = max(1024, len(self._centres), n - len(self._centres))
            self._centres = np.concatenate([self._centres, np.zeros((grow, self.dim), np.float32)])
            self._sq_norms = np.concatenate([self._sq_norms, np.full(grow, np.inf, np.float32)])

    def _append_member(self, cid: int, key: np.ndarray, block: int, row: int, edit_id: str) -> None:
        c = self._clusters[cid]
        c.keys = np.concatenate([c.keys, key[None, :]])
        c.blocks.append(block)
        c.rows.append(row)
        c.edit_ids.append(edit_id)
        counts = self._edit_clusters.setdefault(edit_id, {})
        counts[cid] = counts.get(cid, 0) + 1

    def _remove_members(
        self, cid: int, mask: np.ndarray, forgotten: list[tuple[str, int]]
    ) -> bool:
        """Remove the members where ``mask`` is true (recorded in ``forgotten``).

        Drops the cluster if it is left empty; returns whether it still exists.
        """
        c = self._clusters[cid]
        gone = np.flatnonzero(mask).tolist()
        for i in gone:
            forgotten.append((c.edit_ids[i], c.blocks[i]))
            self._uncount(c.edit_ids[i], cid)
        if len(gone) == len(c.blocks):
            self._drop_cluster(cid, uncount=False)
            return False
        keep = np.flatnonzero(~mask).tolist()
        c.keys = c.keys[keep]
        c.blocks = [c.blocks[i] for i in keep]
        c.rows = [c.rows[i] for i in keep]
        c.edit_ids = [c.edit_ids[i] for i in keep]
        return True

    def _uncount(self, edit_id: str, cid: int) -> None:
        counts = self._edit_clusters[edit_id]
        counts[cid] -= 1
        if counts[cid] == 0:
            del counts[cid]
            if not counts:
                del self._edit_clusters[edit_id]

    def _drop_cluster(self, cid: int, *, uncount: bool = True) -> None:
        c = self._clusters.pop(cid)
        if uncount:
            for e in c.edit_ids:
                self._uncount(e, cid)
        self._sq_norms[cid] = np.inf
        self._centres[cid] = 0.0
        if self._index is not None:
            self._graph_delete(self._graph_labels.pop(cid))

    def _refit(self, cid: int) -> None:
        c = self._clusters[cid]
        centre = _mean(c.keys)
        c.radius = max(float(_distances(centre, c.keys).max()), c.floor)
        c.centre_members = None
        self._set_centre(cid, centre)

    def _set_centre(self, cid: int, centre: np.ndarray) -> None:
        self._centres[cid] = centre
        self._sq_norms[cid] = float(centre.astype(np.float64) @ centre.astype(np.float64))
        if self._index is None:
            return
        # A moved centre becomes a new element rather than an in-place hnswlib update: updates
        # re-prune neighbours' links and measurably orphan unrelated elements (0.05% of queries
        # missed their nearest centre at 3k clusters); a plain insertion does not.
        old = self._graph_labels.get(cid)
        if old is not None:
            self._graph_delete(old)
        label = cid if old is None else old + (1 << _ID_BITS)
        self._graph_add(label, centre)
        self._graph_labels[cid] = label

    # ------------------------------------------------------------------------------------ graph

    def _graph_add(self, label: int, vector: np.ndarray) -> None:
        assert self._index is not None
        if self._index.element_count >= self._index.get_max_elements():
            capacity = max(1024, 2 * self._index.get_max_elements())
            self._index.resize_index(capacity)
            self._log(_OP_RESIZE, capacity)
        # One thread keeps the graph a deterministic function of the operation sequence.
        self._index.add_items(vector[None, :], np.array([label], dtype=np.uint64), num_threads=1)
        self._log(_OP_ADD, label, vector)
        self._graph_log_adds += 1

    def _graph_delete(self, label: int) -> None:
        assert self._index is not None
        self._index.mark_deleted(label)
        self._log(_OP_DELETE, label)
        self._graph_deleted += 1

    def _log(self, kind: int, value: int, vector: np.ndarray | None = None) -> None:
        if not self._graph_log or self._graph_log[-1].seq != self._mutations:
            self._graph_log.append(_LogPart(seq=self._mutations))
        part = self._graph_log[-1]
        part.ops.append((kind, int(value)))
        if vector is not None:
            part.vectors.append(np.array(vector, dtype=np.float32, copy=True))

    def _maintain_graph(self) -> None:
        """Build, compact or checkpoint the graph where due (rules: module docstring)."""
        n_live = len(self._clusters)
        if self._index is None:
            if n_live > self.exact_search_max_clusters:
                self._index = self._build_index()
                self._checkpoint()
        elif self._graph_deleted > max(_COMPACT_MIN_DELETED, n_live):
            self._index = self._build_index()
            self._checkpoint()
        elif self._graph_log_adds > max(_CHECKPOINT_MIN_ADDS, n_live // _CHECKPOINT_FRACTION):
            self._checkpoint()

    def _checkpoint(self) -> None:
        """Make the current graph the base: serialize it, and continue from the reloaded copy.

        Continuing from the reload, not the original, matters: a reload restarts hnswlib's level
        generator, so only then does a loader that replays later operations on the same base
        build the same graph.
        """
        assert self._index is not None
        self._graph_base = self._index_bytes()
        self._graph_base_capacity = self._index.get_max_elements()
        self._index = self._load_index(self._graph_base, self._graph_base_capacity)
        self._graph_log = []
        self._graph_log_adds = 0

    def _build_index(self) -> hnswlib.Index:
        """A fresh graph of the live centres, inserted in cluster-id order (labels = cluster ids)."""
        ids = sorted(self._clusters)
        index = self._new_index(capacity=max(1024, 2 * len(ids)))
        if ids:
            index.add_items(self._centres[ids], np.array(ids, dtype=np.uint64), num_threads=1)
        self._graph_labels = {cid: cid for cid in ids}
        self._graph_deleted = 0
        return index

    def _new_index(self, capacity: int) -> hnswlib.Index:
        index = hnswlib.Index(space="l2", dim=self.dim)
        index.init_index(
            max_elements=capacity, ef_construction=self.ef_construction, M=self.hnsw_m, random_seed=self.seed
        )
        index.set_ef(max(self.ef_search, CANDIDATES))
        index.set_num_threads(1)
        return index

    def _index_bytes(self) -> np.ndarray:
        assert self._index is not None
        # hnswlib serializes only to a file path; a private temp dir keeps concurrent savers apart.
        with tempfile.TemporaryDirectory(prefix="melo-hnsw-") as tmp:
            path = os.path.join(tmp, "index.bin")
            self._index.save_index(path)
            with open(path, "rb") as f:
                return np.frombuffer(f.read(), dtype=np.uint8).copy()

    def _load_index(self, blob: np.ndarray, capacity: int) -> hnswlib.Index:
        index = hnswlib.Index(space="l2", dim=self.dim)
        with tempfile.TemporaryDirectory(prefix="melo-hnsw-") as tmp:
            path = os.path.join(tmp, "index.bin")
            with open(path, "wb") as f:
                f.write(blob.tobytes())
            index.load_index(path, max_elements=capacity)
        index.set_ef(max(self.ef_search, CANDIDATES))
        index.set_num_threads(1)
        return index

    def _check_keys(self, keys: np.ndarray, name: str) -> np.ndarray:
        arr = np.asarray(keys)
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ValueError(f"{name} must have shape [n, {self.dim}], got {arr.shape}")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} contain NaN or infinite values; keys must be finite")
        return arr

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
        state: dict[str, Any] = {
            "format": STATE_FORMAT,
            "dim": self.dim,
            "r_init": self.r_init,
            "hnsw_m": self.hnsw_m,
            "ef_construction": self.ef_construction,
            "ef_search": self.ef_search,
            "seed": self.seed,
            "exact_search_max_clusters": self.exact_search_max_clusters,
            "conflict_policy": self.conflict_policy,
            "next_cluster_id": self._next_id,
            "conflicts_total": self._conflicts_total,
            "forgotten_total": self._forgotten_total,
            "retracted_total": self._retracted_total,
            "mutations": self._mutations,
            "segments": [
                {"block": block, "rows": len(keys), "sha256": self._segment_digest(block)}
                for block, keys in sorted(self._segments.items())
            ],
            "graph": self._index is not None,
            "graph_elements": 0 if self._index is None else self._index.element_count,
            "graph_capacity": 0 if self._index is None else self._index.get_max_elements(),
            "graph_deleted": self._graph_deleted,
            "graph_base_capacity": self._graph_base_capacity,
            "graph_log": [part.seq for part in self._graph_log],
            "clusters": [self._record(cid) for cid in sorted(self._clusters)],
        }
        arrays = {segment_name(block): keys for block, keys in sorted(self._segments.items())}
        if include_index and self._graph_base is not None:
            arrays["graph/base/index"] = self._graph_base
            for part in self._graph_log:
                arrays[f"graph/{part.seq:08d}/ops"] = np.array(part.ops, dtype=np.uint64).reshape(-1, 2)
                arrays[f"graph/{part.seq:08d}/vectors"] = (
                    np.stack(part.vectors) if part.vectors else np.zeros((0, self.dim), np.float32)
                )
        return state, arrays

    def _segment_digest(self, block: int) -> str:
        if block not in self._segment_sha:
            self._segment_sha[block] = _sha256(self._segments[block])
        return self._segment_sha[block]

    def _record(self, cid: int) -> dict[str, Any]:
        c = self._clusters[cid]
        record: dict[str, Any] = {
            "id": cid,
            "label": c.label,
            "radius": c.radius,
            "floor": c.floor,
            "blocks": list(c.blocks),
            "rows": list(c.rows),
            "edit_ids": list(c.edit_ids),
        }
        if c.centre_members is not None:
            record["centre_members"] = [[block, row] for block, row in c.centre_members]
        if self._index is not None:
            record["graph_label"] = self._graph_labels[cid]
        return record

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
        db._segments = db._segments_from(state["segments"], arrays, verify=verify)
        db._segment_sha = {int(r["block"]): r["sha256"] for r in state["segments"]}
        db._next_id = int(state["next_cluster_id"])
        db._reserve_centre_rows(db._next_id)
        for record in state["clusters"]:
            db._restore_cluster(record)
        db._conflicts_total = int(state["conflicts_total"])
        db._forgotten_total = int(state["forgotten_total"])
        db._retracted_total = int(state["retracted_total"])
        db._mutations = int(state["mutations"])
        graph_arrays = {name: a for name, a in arrays.items() if name.startswith("graph/")}
        if state["graph"] and graph_arrays:
            db._restore_graph(state, graph_arrays)
        elif graph_arrays:
            raise ValueError(
                f"arrays do not match the state: graph arrays {sorted(graph_arrays)[:3]} for a state without a graph"
            )
        else:
            db._maintain_graph()  # a saved graph left out: build it as the live database would
        return db

    def _segments_from(
        self, records: list[dict[str, Any]], arrays: dict[str, np.ndarray], *, verify: bool
    ) -> dict[int, np.ndarray]:
        segments = {}
        for record in records:
            block, name = int(record["block"]), segment_name(int(record["block"]))
            keys = arrays.get(name)
            expected = (int(record["rows"]), self.dim)
            if (
                keys is None
                or keys.shape != expected
                or (verify and _sha256(np.asarray(keys, np.float32)) != record["sha256"])
            ):
                got = "missing" if keys is None else f"shape {keys.shape}"
                raise ValueError(
                    f"arrays do not match the state: segment {name!r} is {got}, expected shape {expected} "
                    f"and sha256 {record['sha256'][:12]}..; load the files of one snapshot together"
                )
            segments[block] = np.asarray(keys, dtype=np.float32)
        names = {segment_name(b) for b in segments}
        extra = sorted(n for n in arrays if n.startswith("keys/") and n not in names)
        if extra:
            raise ValueError(f"arrays do not match the state: segments {extra[:3]} are not in the state")
        return segments

    def _member_keys(self, refs: list[tuple[int, int]], cid: int) -> np.ndarray:
        for block, row in refs:
            if block not in self._segments or not 0 <= row < len(self._segments[block]):
                raise ValueError(f"cluster {cid} refers to key (block {block}, row {row}), which no segment holds")
        return np.stack([self._segments[block][row] for block, row in refs])

    def _restore_cluster(self, record: dict[str, Any]) -> None:
        cid = int(record["id"])
        blocks, rows = [int(b) for b in record["blocks"]], [int(r) for r in record["rows"]]
        m = len(blocks)
        ragged = not len(rows) == len(record["edit_ids"]) == m
        if not 0 <= cid < self._next_id or cid in self._clusters or m == 0 or ragged:
            raise ValueError(f"invalid cluster record {cid}: bad id, duplicate, empty or ragged members")
        keys = self._member_keys(list(zip(blocks, rows)), cid)
        centre_members = record.get("centre_members")
        if centre_members is not None:
            centre_members = [(int(b), int(r)) for b, r in centre_members]
        self._clusters[cid] = _Cluster(
            radius=float(record["radius"]),
            floor=float(record["floor"]),
            label=record["label"],
            keys=keys,
            blocks=blocks,
            rows=rows,
            edit_ids=list(record["edit_ids"]),
            centre_members=centre_members,
        )
        for e in record["edit_ids"]:
            counts = self._edit_clusters.setdefault(e, {})
            counts[cid] = counts.get(cid, 0) + 1
        centre = _mean(keys if centre_members is None else self._member_keys(centre_members, cid))
        self._centres[cid] = centre
        self._sq_norms[cid] = float(centre.astype(np.float64) @ centre.astype(np.float64))

    def _restore_graph(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Load the base graph and replay the log parts, as the saved database built them."""
        expected = {"graph/base/index"} | {
            f"graph/{seq:08d}/{t}" for seq in state["graph_log"] for t in ("ops", "vectors")
        }
        if set(arrays) != expected:
            raise ValueError(
                f"arrays do not match the state: graph arrays differ by {sorted(set(arrays) ^ expected)[:4]}"
            )
        self._graph_base = np.asarray(arrays["graph/base/index"], dtype=np.uint8)
        self._graph_base_capacity = int(state["graph_base_capacity"])
        index = self._load_index(self._graph_base, self._graph_base_capacity)
        for seq in state["graph_log"]:
            ops = np.asarray(arrays[f"graph/{seq:08d}/ops"], dtype=np.uint64).reshape(-1, 2)
            vectors = np.asarray(arrays[f"graph/{seq:08d}/vectors"], dtype=np.float32)
            part = _LogPart(seq=int(seq), ops=[(int(k), int(v)) for k, v in ops], vectors=list(vectors))
            if sum(k == _OP_ADD for k, _ in part.ops) != len(part.vectors):
                raise ValueError(f"graph log part {seq} has {len(part.vectors)} vectors for its additions")
            added = iter(part.vectors)
            for kind, value in part.ops:
                if kind == _OP_ADD:
                    index.add_items(next(added)[None, :], np.array([value], dtype=np.uint64), num_threads=1)
                    self._graph_log_adds += 1
                elif kind == _OP_DELETE:
                    index.mark_deleted(value)
                elif kind == _OP_RESIZE:
                    index.resize_index(value)
                else:
                    raise ValueError(f"graph log part {seq} has an unknown operation kind {kind}")
            self._graph_log.append(part)
        if index.element_count != state["graph_elements"] or index.get_max_elements() != state["graph_capacity"]:
            raise ValueError(
                f"the replayed graph holds {index.element_count} elements (capacity {index.get_max_elements()}) "
                f"but the state says {state['graph_elements']} ({state['graph_capacity']}); the arrays come "
                "from a different snapshot"
            )
        if any("graph_label" not in r for r in state["clusters"]):
            raise ValueError("a cluster record lacks its graph_label although the state has a graph")
        self._graph_labels = {int(r["id"]): int(r["graph_label"]) for r in state["clusters"]}
        if not set(self._graph_labels.values()) <= set(index.get_ids_list()):
            raise ValueError("the replayed graph is missing live clusters; the arrays come from a different snapshot")
        self._graph_deleted = int(state["graph_deleted"])
        self._index = index
