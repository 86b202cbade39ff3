"""What a ``VectorDB`` holds: clusters by id, their centres, the key segments and the counters.

``ClusterStore`` keeps these consistent with one another (a cluster's centre in the centre index,
each edit's member counts, segments and their checksums); ``VectorDB`` decides, by the rules of
docs/vectordb.md, which clusters to create, change or drop.
"""

from __future__ import annotations

import numpy as np

from melo_runtime.vectordb.algebra import Cluster, distances, mean, sha256
from melo_runtime.vectordb.centres import CentreIndex


class ClusterStore:
    """Clusters, their centre index, the append-only key segments, and lifetime counters."""

    def __init__(self, dim: int, index: CentreIndex) -> None:
        self.dim = dim
        self.index = index
        self.clusters: dict[int, Cluster] = {}
        self.next_id = 0  # ids are never reused
        self.edit_clusters: dict[str, dict[int, int]] = {}  # edit id -> {cluster id: member count}
        # Block -> every key inserted with that block, in order. Arrays are never written in place
        # (an append makes a new array), so copies of the database may share them.
        self.segments: dict[int, np.ndarray] = {}
        self.segment_sha: dict[int, str] = {}  # block -> sha256 of its segment, computed once
        self.conflicts_total = 0
        self.forgotten_total = 0
        self.retracted_total = 0
        self.mutations = 0  # insert/retract calls so far: numbers the graph log parts

    def count_mutation(self) -> None:
        """Start a mutating call: later graph operations are logged under its number."""
        self.mutations += 1
        self.index.seq = self.mutations

    def maintain(self) -> None:
        """Build, compact or checkpoint the centre graph where due."""
        self.index.maintain(sorted(self.clusters))

    # --------------------------------------------------------------------------------- segments

    def append_to_segments(self, keys: np.ndarray, blocks: list[int]) -> list[int]:
        """Append each key to its block's segment; returns each key's row there."""
        rows = []
        for block in sorted(set(blocks)):
            mine = [i for i, b in enumerate(blocks) if b == block]
            old = self.segments.get(block, np.zeros((0, self.dim), np.float32))
            self.segments[block] = np.concatenate([old, keys[mine]])
            self.segment_sha.pop(block, None)
            rows.extend(zip(mine, range(len(old), len(old) + len(mine))))
        return [row for _, row in sorted(rows)]

    def segment_digest(self, block: int) -> str:
        """SHA-256 of block ``block``'s segment (computed once per segment content)."""
        if block not in self.segment_sha:
            self.segment_sha[block] = sha256(self.segments[block])
        return self.segment_sha[block]

    # ----------------------------------------------------------------------------------- lookup

    def nearest(self, queries: np.ndarray) -> list[tuple[int, float] | None]:
        """Nearest live cluster and its exact distance per query row (None: no clusters)."""
        return self.index.nearest(queries, len(self.clusters), self.next_id)

    def clusters_near(self, points: np.ndarray) -> list[int]:
        """Ids of the clusters whose members a new centre at one of ``points`` could take.

        A member is taken only by a centre nearer than the one it routes to now, which is at most
        its cluster's radius away, so the centre lies within twice that radius of the cluster's.
        """
        radii = np.zeros(self.next_id)
        for cid, c in self.clusters.items():
            radii[cid] = c.radius
        return self.index.near(points, radii)

    def stats(self) -> dict[str, int]:
        """Sizes and lifetime counters."""
        return {
            "clusters": len(self.clusters),
            "members": sum(len(c.blocks) for c in self.clusters.values()),
            "conflicts_total": self.conflicts_total,
            "forgotten_total": self.forgotten_total,
            "retracted_total": self.retracted_total,
        }

    # ---------------------------------------------------------------------------------- changes

    def create(
        self,
        keys: np.ndarray,
        label: str,
        blocks: list[int],
        rows: list[int],
        edit_ids: list[str],
        radius: float,
        floor: float,
    ) -> int:
        """A new cluster of these members, centred on their mean; returns its id (the next one)."""
        cid = self.next_id
        self.next_id += 1
        self.clusters[cid] = Cluster(
            radius=float(radius),
            floor=float(floor),
            label=label,
            keys=np.array(keys, dtype=np.float32, copy=True),
            blocks=list(blocks),
            rows=list(rows),
            edit_ids=list(edit_ids),
        )
        self.count_members(cid, edit_ids)
        self.index.reserve(cid + 1)
        self.index.set(cid, mean(keys))
        return cid

    def count_members(self, cid: int, edit_ids: list[str]) -> None:
        """Record that cluster ``cid`` holds one more member of each of ``edit_ids``."""
        for e in edit_ids:
            counts = self.edit_clusters.setdefault(e, {})
            counts[cid] = counts.get(cid, 0) + 1

    def append_member(self, cid: int, key: np.ndarray, block: int, row: int, edit_id: str) -> None:
        """Add one member to cluster ``cid`` (its centre moves only at the next refit)."""
        c = self.clusters[cid]
        c.keys = np.concatenate([c.keys, key[None, :]])
        c.blocks.append(block)
        c.rows.append(row)
        c.edit_ids.append(edit_id)
        self.count_members(cid, [edit_id])

    def remove_members(self, cid: int, mask: np.ndarray, forgotten: list[tuple[str, int]]) -> bool:
        """Remove the members where ``mask`` is true (recorded in ``forgotten``).

        Drops the cluster if it is left empty; returns whether it still exists.
        """
        c = self.clusters[cid]
        gone = np.flatnonzero(mask).tolist()
        for i in gone:
            forgotten.append((c.edit_ids[i], c.blocks[i]))
            self._uncount(c.edit_ids[i], cid)
        if len(gone) == len(c.blocks):
            self.drop(cid, uncount=False)
            return False
        keep = np.flatnonzero(~mask).tolist()
        c.keys = c.keys[keep]
        c.blocks = [c.blocks[i] for i in keep]
        c.rows = [c.rows[i] for i in keep]
        c.edit_ids = [c.edit_ids[i] for i in keep]
        return True

    def _uncount(self, edit_id: str, cid: int) -> None:
        counts = self.edit_clusters[edit_id]
        counts[cid] -= 1
        if counts[cid] == 0:
            del counts[cid]
            if not counts:
                del self.edit_clusters[edit_id]

    def drop(self, cid: int, *, uncount: bool = True) -> None:
        """Remove cluster ``cid`` and its centre."""
        c = self.clusters.pop(cid)
        if uncount:
            for e in c.edit_ids:
                self._uncount(e, cid)
        self.index.remove(cid)

    def refit(self, cid: int) -> None:
        """Centre = mean of the members, radius = max(farthest member, floor) (docs/vectordb.md)."""
        c = self.clusters[cid]
        centre = mean(c.keys)
        c.radius = max(float(distances(centre, c.keys).max()), c.floor)
        c.centre_members = None
        self.index.set(cid, centre)
