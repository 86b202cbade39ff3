"""Cluster algebra in pure numpy: distances, centres, and re-forming clusters from members.

Nothing here holds state between calls or knows about the centre index: these are the computations
the insertion rules of docs/vectordb.md are made of, and the only place a centre is computed
(``mean``), so a loader recomputes every centre bit for bit.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

# What a conflict or supersede does with the old cluster's members (docs/vectordb.md).
CONFLICT_POLICIES = ("forget", "split")
# Under "split", a supersede forgets only members within this fraction of R_init of the new key: the
# same input. Measured with SmolLM2's key (R_init 10.1): the same prompt in another batch moves its
# key by up to 1.0e-4 (1e-5 R_init, padding changes the float sums), while the closest keys of two
# different prompts in 1,000 zsRE + 200 CounterFact edits are 1.74 apart (0.17 R_init).
SAME_INPUT_TOLERANCE = 1e-3


@dataclass
class Cluster:
    """A labelled ball of member keys; member i is row ``rows[i]`` of block ``blocks[i]``'s segment."""

    radius: float
    floor: float  # smallest radius a refit may give: R_init, or less after a conflict halved it
    label: str
    keys: np.ndarray  # [members, dim] float32, oldest first
    blocks: list[int]
    rows: list[int]
    edit_ids: list[str]
    # (block, row) of the keys whose mean the centre is, when that is not the members: set when a
    # conflict removes members (the centre stays), cleared by the next refit.
    centre_members: list[tuple[int, int]] | None = None


@dataclass
class Group:
    """A cluster being re-formed from a dissolved cluster's survivors (supersede, step 2; split)."""

    centre: np.ndarray
    radius: float
    members: list[int] = field(default_factory=list)  # indices into the dissolved cluster
    floor: float = 0.0  # the cluster's radius floor, where it differs from the regroup's (split)


@dataclass
class Pool:
    """The members a ``split`` places, by index: keys [n, dim] and what their clusters will need."""

    keys: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    blocks: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    edit_ids: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    floors: list[float] = field(default_factory=list)  # the radius floor of the cluster it came from

    def add(self, key: np.ndarray, block: int, row: int, edit_id: str, label: str, floor: float) -> None:
        """Append one member (its key is copied)."""
        self.keys = key[None, :].copy() if not self.blocks else np.concatenate([self.keys, key[None, :]])
        self.blocks.append(block)
        self.rows.append(row)
        self.edit_ids.append(edit_id)
        self.labels.append(label)
        self.floors.append(floor)


def distances(point: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Exact L2 distances (float64) from ``point`` [dim] to each of ``rows`` [n, dim]."""
    diff = rows.astype(np.float64) - point.astype(np.float64)
    return np.sqrt(np.einsum("ij,ij->i", diff, diff))


def mean(keys: np.ndarray) -> np.ndarray:
    """The centre of ``keys``: their float64 mean cast to float32, the only way a centre is computed."""
    return keys.astype(np.float64).mean(axis=0).astype(np.float32)


def sq_norm(centre: np.ndarray) -> float:
    """``||centre||^2`` in float64, as the exact scan ranks centres by it."""
    return float(centre.astype(np.float64) @ centre.astype(np.float64))


def sha256(array: np.ndarray) -> str:
    """Hex SHA-256 of an array's bytes (C order)."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def check_keys(keys: np.ndarray, name: str, dim: int) -> np.ndarray:
    """``keys`` as a C-contiguous float32 [n, dim] array; ValueError naming ``name`` otherwise."""
    arr = np.asarray(keys)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"{name} must have shape [n, {dim}], got {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contain NaN or infinite values; keys must be finite")
    return arr


def regroup(keys: np.ndarray, order: list[int], floor: float) -> list[Group]:
    """Cluster ``keys[order]`` (one label) by the add/expand/join rules with radius floor ``floor``."""
    groups: list[Group] = []
    for i in order:
        if groups:
            centres = np.stack([g.centre for g in groups])
            dist = distances(keys[i], centres)
            j = int(np.argmin(dist))
            if dist[j] <= groups[j].radius + floor:
                g = groups[j]
                g.members.append(i)
                g.centre = mean(keys[g.members])
                g.radius = max(float(distances(g.centre, keys[g.members]).max()), floor)
                continue
        groups.append(Group(centre=keys[i].copy(), radius=floor, members=[i]))
    return groups


def plan_split(pool: Pool, n_moved: int, singles: set[int], key: np.ndarray) -> list[Group]:
    """Steps 1, 2 and 4 of ``split``: the clusters that would be created, in creation order.

    The first ``n_moved`` pool members are the moved ones (regrouped unless in ``singles``); the
    rest were evicted and each becomes a single-member cluster, as does every member of ``singles``.
    """
    floor = pool.floors[0]  # C's: every moved member came from C
    groups = regroup(pool.keys, [i for i in range(n_moved) if i not in singles], floor)
    groups += [Group(centre=pool.keys[i].copy(), radius=0.0, members=[i]) for i in sorted(singles)]
    plan = []
    for g in sorted(groups, key=lambda g: g.members[0]):
        spread = float(distances(g.centre, pool.keys[g.members]).max())
        if spread > float(distances(key, g.centre[None, :])[0]) / 2.0:
            plan += [Group(centre=pool.keys[i].copy(), radius=0.0, members=[i]) for i in g.members]
        else:
            plan.append(g)
    for g in plan:
        g.floor = min(pool.floors[g.members[0]], float(distances(key, g.centre[None, :])[0]) / 2.0)
        g.radius = max(float(distances(g.centre, pool.keys[g.members]).max()), g.floor)
    return plan
