"""MELO cluster vector DB: the insertion rules on hand-built keys, retract, persistence, routing."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from melo_runtime.vectordb import SAME_INPUT_TOLERANCE, Hit, VectorDB


def _keys(*points: tuple[float, ...]) -> np.ndarray:
    return np.array(points, dtype=np.float32)


def _clusters(db: VectorDB) -> dict[int, dict]:
    """Cluster records by id, with centres as lists."""
    return {c["id"]: {**c, "centre": c["centre"].tolist()} for c in db.clusters()}


def _insert(db: VectorDB, points, labels, edit_ids, blocks=None):
    blocks = blocks if blocks is not None else [0] * len(points)
    return db.insert(_keys(*points), labels, blocks, edit_ids)


def test_first_key_adds_a_cluster_with_radius_r_init():
    db = VectorDB(2, 1.0)
    report = _insert(db, [(3.0, 4.0)], ["a"], ["e1"], [7])
    assert report.actions == ["add"] and report.added == 1
    (c,) = _clusters(db).values()
    assert c["centre"] == [3.0, 4.0] and c["radius"] == 1.0 and c["label"] == "a"
    assert db.search(_keys((3.0, 4.0)))[0] == Hit(cluster_id=0, block=7, edit_id="e1", distance=0.0)


def test_key_beyond_radius_plus_r_init_adds_a_second_cluster():
    db = VectorDB(2, 1.0)
    report = _insert(db, [(0.0, 0.0), (2.01, 0.0)], ["a", "a"], ["e1", "e2"])
    assert report.actions == ["add", "add"]
    assert [c["radius"] for c in _clusters(db).values()] == [1.0, 1.0]


def test_expand_moves_centre_to_mean_and_radius_to_farthest_member():
    db = VectorDB(2, 1.0)
    # (2,0) is exactly at R + R_init = 2: expand, centre (1,0), radius max(1, R_init) = 1.
    # (2.8,0) is 1.8 from (1,0), within 1 + 1: expand, centre (1.6, 0), farthest member (0,0).
    report = _insert(db, [(0.0, 0.0), (2.0, 0.0), (2.8, 0.0)], ["a"] * 3, ["e1", "e2", "e3"])
    assert report.actions == ["add", "expand", "expand"] and report.expanded == 2
    (c,) = _clusters(db).values()
    assert c["centre"] == pytest.approx([1.6, 0.0])
    assert c["radius"] == pytest.approx(1.6)


def test_join_inside_radius_refits_and_may_shrink_the_radius():
    db = VectorDB(2, 1.0)
    _insert(db, [(0.0, 0.0), (2.0, 0.0), (2.8, 0.0)], ["a"] * 3, ["e1", "e2", "e3"])
    report = _insert(db, [(1.5, 0.0)], ["a"], ["e4"])
    assert report.actions == ["join"]
    (c,) = _clusters(db).values()
    # Centre (6.3/4, 0); the farthest member (0,0) is now 1.575 away, less than the old 1.6.
    assert c["centre"] == pytest.approx([1.575, 0.0])
    assert c["radius"] == pytest.approx(1.575)
    assert c["edit_ids"] == ["e1", "e2", "e3", "e4"]


def test_conflict_shrinks_radius_and_forgets_outside_members():
    db = VectorDB(2, 1.0)
    # Cluster "a": (0,0) add; (2,0) expand -> centre (1,0) r 1; (1,0) joins -> centre (1,0) r 1.
    _insert(db, [(0.0, 0.0), (2.0, 0.0), (1.0, 0.0)], ["a"] * 3, ["e1", "e2", "e3"], [0, 0, 1])
    report = _insert(db, [(2.6, 0.0)], ["b"], ["e4"], [2])
    assert report.actions == ["conflict"] and report.conflicts == 1
    # d = 1.6: R_C <- 0.8; (0,0) and (2,0) are 1 from the centre, outside 0.8: forgotten.
    assert report.forgotten == [("e1", 0), ("e2", 0)]
    old, new = _clusters(db).values()
    assert old["centre"] == [1.0, 0.0] and old["radius"] == pytest.approx(0.8)
    assert old["edit_ids"] == ["e3"]
    assert new["centre"] == pytest.approx([2.6, 0.0]) and new["radius"] == pytest.approx(0.8)
    assert db.stats() == {
        "clusters": 2, "members": 2, "conflicts_total": 1, "forgotten_total": 2, "retracted_total": 0,
    }
    assert db.edit_ids() == {"e3", "e4"}
    hits = db.search(_keys((1.0, 0.0), (2.6, 0.0), (0.0, 0.0)))
    assert [h.edit_id if h else None for h in hits] == ["e3", "e4", None]


def test_conflict_that_forgets_every_member_removes_the_cluster():
    db = VectorDB(2, 1.0)
    _insert(db, [(0.0, 0.0), (2.0, 0.0)], ["a", "a"], ["e1", "e2"])  # centre (1,0), r 1
    report = _insert(db, [(2.6, 0.0)], ["b"], ["e3"])
    assert report.forgotten == [("e1", 0), ("e2", 0)]
    (c,) = _clusters(db).values()
    assert c["edit_ids"] == ["e3"] and c["radius"] == pytest.approx(0.8)


def test_conflict_never_grows_an_already_halved_cluster():
    db = VectorDB(2, 1.0)
    _insert(db, [(0.0, 0.0), (1.6, 0.0)], ["a", "b"], ["e1", "e2"])  # both radii 0.8
    report = _insert(db, [(-1.7, 0.0)], ["c"], ["e3"])  # d = 1.7 <= 0.8 + 1, d/2 = 0.85 > 0.8
    assert report.actions == ["conflict"] and report.forgotten == []
    radii = {c["label"]: c["radius"] for c in _clusters(db).values()}
    assert radii["a"] == pytest.approx(0.8) and radii["c"] == pytest.approx(0.85)


def test_later_join_never_regrows_a_halved_cluster_past_its_members():
    db = VectorDB(2, 1.0)
    _insert(db, [(0.0, 0.0)], ["a"], ["e1"])
    _insert(db, [(1.6, 0.0)], ["b"], ["e2"])  # conflict at d = 1.6: both radii 0.8
    report = _insert(db, [(-0.2, 0.0)], ["a"], ["e3"])
    assert report.actions == ["join"]
    a = _clusters(db)[0]
    # Centre (-0.1, 0), farthest member 0.1 away; the floor is the halved 0.8, not R_init.
    assert a["centre"] == pytest.approx([-0.1, 0.0]) and a["radius"] == pytest.approx(0.8)


def test_reediting_the_same_prompt_with_a_new_label_makes_the_newest_win():
    db = VectorDB(2, 1.0)
    _insert(db, [(0.0, 0.0), (1.5, 0.0)], ["a", "a"], ["old", "other"], [0, 0])  # centre (.75,0) r 1
    report = db.insert(_keys((0.0, 0.0)), ["b"], [5], ["new"])
    assert report.actions == ["supersede"] and report.conflicts == 1
    assert report.forgotten == [("old", 0)]
    assert db.edit_ids() == {"other", "new"}
    hits = db.search(_keys((0.0, 0.0), (0.1, 0.05), (1.5, 0.0)))
    assert [(h.edit_id, h.block) for h in hits] == [("new", 5), ("new", 5), ("other", 0)]
    assert all(c["radius"] == 1.0 for c in _clusters(db).values())
    assert db.stats()["forgotten_total"] == 1 and db.stats()["conflicts_total"] == 1


def test_supersede_of_a_single_identical_key_replaces_the_cluster_with_radius_r_init():
    db = VectorDB(3, 0.5)
    _insert(db, [(1.0, 2.0, 3.0)], ["a"], ["old"])
    report = _insert(db, [(1.0, 2.0, 3.0)], ["b"], ["new"], [1])
    assert report.forgotten == [("old", 0)]
    (c,) = _clusters(db).values()
    assert c["label"] == "b" and c["radius"] == 0.5 and c["edit_ids"] == ["new"]


def test_supersede_keeps_members_far_from_the_new_key_reachable():
    db = VectorDB(2, 1.25)
    _insert(db, [(-1.25, 0.0), (1.25, 0.0)], ["a", "a"], ["left", "right"], [0, 1])  # centre 0, r 1.25
    report = _insert(db, [(0.0, 0.25)], ["b"], ["new"], [2])
    # Both old keys are sqrt(1.625) > R_init from the new key: nothing is forgotten.
    assert report.actions == ["supersede"] and report.forgotten == []
    hits = db.search(_keys((-1.25, 0.0), (1.25, 0.0), (0.0, 0.25), (0.0, 0.4)))
    assert [h.edit_id for h in hits] == ["left", "right", "new", "new"]
    assert min(c["radius"] for c in _clusters(db).values()) > 0


def test_identical_key_of_a_newer_same_label_edit_wins_the_member_tie():
    db = VectorDB(2, 1.0)
    _insert(db, [(0.0, 0.0), (0.0, 0.0)], ["a", "a"], ["e1", "e2"], [0, 1])
    assert db.search(_keys((0.0, 0.0)))[0].edit_id == "e2"


def test_split_conflict_keeps_outside_members_routable_to_their_own_edits():
    db = VectorDB(2, 1.0, conflict_policy="split")
    # The forget test's database: the same conflict at d = 1.6 leaves (0,0) and (2,0) outside 0.8.
    _insert(db, [(0.0, 0.0), (2.0, 0.0), (1.0, 0.0)], ["a"] * 3, ["e1", "e2", "e3"], [0, 0, 1])
    report = _insert(db, [(2.6, 0.0)], ["b"], ["e4"], [2])
    assert report.actions == ["conflict"] and report.conflicts == 1 and report.forgotten == []
    kept, left, right, new = _clusters(db).values()
    assert kept["edit_ids"] == ["e3"] and kept["radius"] == pytest.approx(0.8)
    # Re-clustered with C's halved floor 0.8, each halved against K: (0,0) is 2.6 from K, keeps 0.8;
    # (2,0) is 0.6 from K, gets 0.3 -- its ball holds no point nearer K than (2,0).
    assert left["edit_ids"] == ["e1"] and left["centre"] == [0.0, 0.0] and left["radius"] == pytest.approx(0.8)
    assert right["edit_ids"] == ["e2"] and right["centre"] == [2.0, 0.0] and right["radius"] == pytest.approx(0.3)
    assert new["edit_ids"] == ["e4"] and new["radius"] == pytest.approx(0.8) and new["id"] == max(_clusters(db))
    hits = db.search(_keys((0.0, 0.0), (2.0, 0.0), (1.0, 0.0), (2.6, 0.0), (2.4, 0.0), (2.2, 0.0)))
    assert [h.edit_id if h else None for h in hits] == ["e1", "e2", "e3", "e4", "e4", "e2"]
    assert db.edit_ids() == {"e1", "e2", "e3", "e4"}
    assert db.stats() == {
        "clusters": 4, "members": 4, "conflicts_total": 1, "forgotten_total": 0, "retracted_total": 0,
    }


def test_split_regroups_outside_members_that_lie_together():
    points = [(1.5, -1.5), (0.5, 0.0), (1.5, 0.5), (0.0, -0.5)]  # one cluster, centre (0.875, -0.375)
    forget, split = VectorDB(2, 1.0), VectorDB(2, 1.0, conflict_policy="split")
    for db in (forget, split):
        _insert(db, points, ["a"] * 4, ["e0", "e1", "e2", "e3"])
    # d = 2.07 from the centre: R_C 1.287 -> 1.035, leaving (1.5,-1.5) and (1.5,0.5) outside.
    assert _insert(forget, [(-1.0, 0.5)], ["b"], ["e4"]).forgotten == [("e0", 0), ("e2", 0)]
    assert _insert(split, [(-1.0, 0.5)], ["b"], ["e4"]).forgotten == []
    kept, pair, new = _clusters(split).values()
    assert kept["edit_ids"] == ["e1", "e3"] and pair["edit_ids"] == ["e0", "e2"] and new["edit_ids"] == ["e4"]
    assert pair["centre"] == [1.5, -0.5] and pair["radius"] == pytest.approx(1.0)
    hits = split.search(_keys(*points, (-1.0, 0.5)))
    assert [h.edit_id for h in hits] == ["e0", "e1", "e2", "e3", "e4"]
    assert [h.edit_id if h else None for h in forget.search(_keys(*points))] == [None, "e1", None, "e3"]


def test_split_evicts_a_remaining_member_that_a_new_cluster_would_take():
    points = [(1.0, -1.5), (0.5, 0.0), (1.5, -1.5), (0.0, 0.0)]  # centre (0.75, -0.75)
    db = VectorDB(2, 1.0, conflict_policy="split")
    _insert(db, points, ["a"] * 4, ["e0", "e1", "e2", "e3"])
    report = _insert(db, [(1.5, 1.0)], ["b"], ["e4"])
    # R_C -> 0.952 moves (1.5,-1.5) and (0,0) out. Each, as its own cluster, would be the nearest
    # centre of a member left in C: (1,-1.5) is 0.5 from (1.5,-1.5) but 0.79 from C's centre, so
    # C's members leave it too, and every key keeps a centre of its own.
    assert report.actions == ["conflict"] and report.forgotten == []
    clusters = _clusters(db)
    assert sorted(c["edit_ids"] for c in clusters.values()) == [["e0"], ["e1"], ["e2"], ["e3"], ["e4"]]
    assert 0 not in clusters  # C was emptied, hence removed
    hits = db.search(_keys(*points, (1.5, 1.0)))
    assert [h.edit_id for h in hits] == ["e0", "e1", "e2", "e3", "e4"]
    for c in clusters.values():
        if c["label"] == "a":
            assert c["radius"] <= np.linalg.norm(np.array(c["centre"]) - [1.5, 1.0]) / 2


@pytest.mark.parametrize("policy", ["forget", "split"])
@pytest.mark.parametrize("noise", [0.0, 1e-4])
def test_reediting_the_same_input_supersedes_it_under_both_conflict_policies(policy, noise):
    # The same prompt computed again gives the same key, up to float noise (batch padding): the
    # newest edit prevails (MELO Property 4) under either policy.
    db = VectorDB(2, 1.0, conflict_policy=policy)
    _insert(db, [(0.0, 0.0), (1.5, 0.0)], ["a", "a"], ["old", "other"])
    report = _insert(db, [(noise, 0.0)], ["b"], ["new"], [5])
    assert report.actions == ["supersede"] and report.forgotten == [("old", 0)]
    assert db.edit_ids() == {"other", "new"}
    hits = db.search(_keys((0.0, 0.0), (noise, 0.0), (1.5, 0.0)))
    assert [(h.edit_id, h.block) for h in hits] == [("new", 5), ("new", 5), ("other", 0)]


def test_split_supersede_keeps_a_close_different_input_that_forget_supersedes():
    # Cluster "a": (0,0) add, (1.5,0) expand -> centre (0.75,0), radius 1. K = (0.3,0) is inside it.
    points, forgotten = [(0.0, 0.0), (1.5, 0.0)], {}
    for policy in ("forget", "split"):
        db = VectorDB(2, 1.0, conflict_policy=policy)
        _insert(db, points, ["a", "a"], ["near", "far"])
        report = _insert(db, [(0.3, 0.0)], ["b"], ["new"], [5])
        assert report.actions == ["supersede"]
        forgotten[policy] = report.forgotten
        hits = db.search(_keys(*points, (0.3, 0.0), (0.2, 0.0), (0.1, 0.0)))
        routes = [h.edit_id if h else None for h in hits]
        if policy == "forget":
            # (0,0) is within R_init of K: "the same input" by the paper's scope; its key now routes to K.
            assert routes == ["new", "far", "new", "new", "new"]
            continue
        # Only an identical key is the same input: both old members are kept, each as a cluster
        # halved against K -- (0,0) radius 0.3/2, (1.5,0) radius min(1, 1.2/2) -- and K has R_init.
        assert routes == ["near", "far", "new", "new", "near"]
        near, far, new = _clusters(db).values()
        assert (near["edit_ids"], near["centre"], near["radius"]) == (["near"], [0.0, 0.0], pytest.approx(0.15))
        assert (far["edit_ids"], far["centre"], far["radius"]) == (["far"], [1.5, 0.0], pytest.approx(0.6))
        assert new["edit_ids"] == ["new"] and new["radius"] == 1.0 and new["id"] == max(_clusters(db))
        assert db.stats()["forgotten_total"] == 0 and db.stats()["conflicts_total"] == 1
    assert forgotten == {"forget": [("near", 0)], "split": []}


def test_split_supersede_tolerance_separates_float_noise_from_a_different_input():
    tolerance = SAME_INPUT_TOLERANCE * 1.0
    for offset, superseded in ((0.5 * tolerance, True), (2.0 * tolerance, False)):
        db = VectorDB(2, 1.0, conflict_policy="split")
        _insert(db, [(0.0, 0.0)], ["a"], ["old"])
        report = _insert(db, [(offset, 0.0)], ["b"], ["new"], [1])
        assert report.actions == ["supersede"]
        assert report.forgotten == ([("old", 0)] if superseded else [])
        hits = db.search(_keys((0.0, 0.0), (offset, 0.0)))
        assert [h.edit_id for h in hits] == (["new", "new"] if superseded else ["old", "new"])


def _routable(db: VectorDB) -> tuple[set[str], set[str]]:
    """Edits with a member whose key routes to a cluster of its label, and to its own edit."""
    clusters = db.clusters()
    labels = {c["id"]: c["label"] for c in clusters}
    members = [(c["label"], edit_id) for c in clusters for edit_id in c["edit_ids"]]
    hits = db.search(np.concatenate([c["keys"] for c in clusters]))
    to_label = {e for (label, e), h in zip(members, hits) if h is not None and labels[h.cluster_id] == label}
    to_own = {e for (_, e), h in zip(members, hits) if h is not None and h.edit_id == e}
    return to_label, to_own


def _check_invariants(db: VectorDB) -> None:
    clusters = db.clusters()
    for record in clusters:
        assert record["radius"] > 0
        assert np.linalg.norm(record["keys"] - record["centre"], axis=1).max() <= record["radius"] + 1e-5
    assert db.edit_ids() == {e for r in clusters for e in r["edit_ids"]}
    assert db.stats()["members"] == sum(len(r["blocks"]) for r in clusters)


@pytest.mark.parametrize("dim,spread,exact_max", [(2, 0.4, 4096), (3, 0.3, 0), (8, 0.3, 4096)])
def test_random_streams_split_forgets_only_identical_inputs_and_routes_no_worse_than_forget(dim, spread, exact_max):
    # Every insert into a "split" database is replayed on a "forget" copy of it, so each conflict and
    # supersede is compared on the same database. One key in six re-edits an earlier input (its key,
    # exactly or with float noise) under a random label. Both keep the invariants; under "split" a
    # conflict forgets nothing and a supersede only members whose key is the new one (within the
    # tolerance); the new key and every member "forget" drops but "split" keeps route to their own
    # edit (of identical keys, the newest); every member that routes to its label (or own edit)
    # under "forget" still does; and every cluster the split creates is halved against the new key.
    # exact_max=0 routes through the HNSW graph.
    rng = np.random.default_rng(20 + dim)
    r_init = 0.5
    db = VectorDB(dim, r_init, conflict_policy="split", exact_search_max_clusters=exact_max)
    anchors = rng.normal(size=(25, dim)).astype(np.float32) * 2
    actions, kept, supersede_losses, supersede_kept = [], 0, 0, 0
    inserted: dict[str, np.ndarray] = {}
    for step in range(200):
        if step and rng.random() < 1 / 6:
            noise = rng.choice([0.0, 0.1 * SAME_INPUT_TOLERANCE * r_init])
            key = inserted[f"e{rng.integers(0, step)}"] + np.float32(noise)
        else:
            key = anchors[rng.integers(0, 25)] + rng.normal(size=(1, dim)).astype(np.float32) * spread
        inserted[f"e{step}"] = key
        args = ([f"y{rng.integers(0, 3)}"], [step], [f"e{step}"])
        next_id = db.to_state(include_index=False)[0]["next_cluster_id"]
        forget = db.copy()
        forget.conflict_policy = "forget"
        expected = forget.insert(key, *args)
        report = db.insert(key, *args)
        actions += report.actions
        assert report.actions == expected.actions
        if report.actions[0] in ("add", "conflict", "supersede"):
            assert db.search(key)[0].edit_id == f"e{step}"
        if report.actions[0] in ("add", "expand", "join"):
            assert report.forgotten == expected.forgotten == []  # these rules do not depend on the policy
            continue
        if report.actions == ["supersede"]:
            assert set(report.forgotten) <= set(expected.forgotten)
            for edit_id, _ in report.forgotten:
                assert np.linalg.norm(inserted[edit_id] - key) <= SAME_INPUT_TOLERANCE * r_init
            supersede_losses += len(report.forgotten)
            supersede_kept += len(expected.forgotten) - len(report.forgotten)
        else:
            assert report.forgotten == []
            kept += len(expected.forgotten)
        for either in (db, forget):
            _check_invariants(either)
        split_label, split_own = _routable(db)
        forget_label, forget_own = _routable(forget)
        assert forget_label <= split_label and forget_own <= split_own
        for edit_id in {e for e, _ in expected.forgotten} - {e for e, _ in report.forgotten}:
            # Its own edit, or the newest edit of the same input (a re-edit with the same label).
            hit = db.search(inserted[edit_id])[0]
            assert np.linalg.norm(inserted[hit.edit_id] - inserted[edit_id]) <= SAME_INPUT_TOLERANCE * r_init
        for record in db.clusters()[:-1]:
            if record["id"] >= next_id:  # created by this split
                assert record["radius"] <= np.linalg.norm(record["centre"] - key[0]) / 2 + 1e-6
    # Members kept that "forget" drops: 4-10 by conflicts, 0-47 by supersedes (0 at dim 8).
    assert actions.count("conflict") > 20 and actions.count("supersede") > 5 and supersede_losses > 0
    assert kept + supersede_kept > 5
    assert db.stats()["forgotten_total"] == supersede_losses


def test_retract_removes_members_refits_and_drops_empty_clusters():
    db = VectorDB(2, 1.0)
    _insert(db, [(0.0, 0.0), (1.5, 0.0), (10.0, 0.0)], ["a", "a", "b"], ["e1", "e2", "e3"])
    assert db.retract("e2") == 1
    c0 = _clusters(db)[0]
    assert c0["centre"] == [0.0, 0.0] and c0["radius"] == 1.0
    assert db.search(_keys((1.5, 0.0))) == [None]  # the retracted input falls back to the base model
    assert db.retract("e3") == 1 and db.retract("e3") == 0 and db.retract("unknown") == 0
    assert db.edit_ids() == {"e1"}
    assert db.stats() == {
        "clusters": 1, "members": 1, "conflicts_total": 0, "forgotten_total": 0, "retracted_total": 2,
    }


def test_invalid_input_raises_value_error_and_changes_nothing():
    db = VectorDB(2, 1.0)
    _insert(db, [(0.0, 0.0)], ["a"], ["e1"])
    before = db.to_state()
    with pytest.raises(ValueError, match="shape"):
        db.insert(np.zeros((1, 3), np.float32), ["a"], [0], ["e2"])
    with pytest.raises(ValueError, match="labels has 1 entries for 2 keys"):
        db.insert(np.zeros((2, 2), np.float32), ["a"], [0, 0], ["e2", "e3"])
    with pytest.raises(ValueError, match="NaN"):
        db.insert(np.array([[0.5, 0.5], [np.nan, 0.0]], np.float32), ["a", "a"], [0, 0], ["e2", "e3"])
    with pytest.raises(ValueError, match="edit_ids"):
        db.insert(np.zeros((1, 2), np.float32), ["a"], [0], [""])
    with pytest.raises(ValueError, match="blocks"):
        db.insert(np.zeros((2, 2), np.float32), ["a", "a"], [0, -1], ["e2", "e3"])
    with pytest.raises(ValueError, match="r_init"):
        VectorDB(2, 0.0)
    after = db.to_state()
    assert json.dumps(after[0]) == json.dumps(before[0])
    assert all(np.array_equal(after[1][k], before[1][k]) for k in before[1])


def _random_db(n_keys: int, dim: int, seed: int, **kwargs) -> tuple[VectorDB, np.ndarray]:
    """A database built from clumped random keys with mixed labels: every rule fires."""
    rng = np.random.default_rng(seed)
    anchors = rng.normal(size=(n_keys // 4, dim)).astype(np.float32) * 4
    keys = anchors[rng.integers(0, len(anchors), n_keys)] + rng.normal(size=(n_keys, dim)).astype(
        np.float32
    ) * 0.3
    labels = [f"y{v}" for v in rng.integers(0, 3, n_keys)]
    db = VectorDB(dim, 0.6, **kwargs)
    db.insert(keys, labels, [i // 10 for i in range(n_keys)], [f"e{i}" for i in range(n_keys)])
    return db, keys


def _brute_force_routes(db: VectorDB, queries: np.ndarray) -> list[tuple | None]:
    """Routing by exhaustive float64 numpy search over the clusters' centres and member keys."""
    clusters = db.clusters()
    ids = np.array([c["id"] for c in clusters])
    centres = np.stack([c["centre"] for c in clusters]).astype(np.float64)
    routes: list[tuple | None] = []
    for chunk in np.array_split(queries.astype(np.float64), max(1, len(queries) // 200)):
        dist = np.sqrt(((chunk[:, None, :] - centres[None, :, :]) ** 2).sum(-1))
        # Ids ascend along columns: the last minimum is the newest cluster, as ties require.
        best_cols = dist.shape[1] - 1 - np.argmin(dist[:, ::-1], axis=1)
        for row, qd, best in zip(chunk, dist, best_cols):
            record = clusters[best]
            if qd[best] > record["radius"]:
                routes.append(None)
                continue
            members = record["keys"].astype(np.float64)
            md = np.sqrt(((members - row) ** 2).sum(-1))
            m = len(md) - 1 - int(np.argmin(md[::-1]))
            routes.append((int(ids[best]), record["blocks"][m], record["edit_ids"][m], float(qd[best])))
    return routes


def _routes(hits: list[Hit | None]) -> list[tuple | None]:
    return [None if h is None else (h.cluster_id, h.block, h.edit_id, h.distance) for h in hits]


def _same_routes(got: list[tuple | None], expected: list[tuple | None]) -> bool:
    """Equal routes; distances may differ in the last bits between two ways of summing squares."""
    return len(got) == len(expected) and all(
        g == e or (g is not None and e is not None and g[:3] == e[:3] and g[3] == pytest.approx(e[3]))
        for g, e in zip(got, expected)
    )


def test_hnsw_routing_equals_brute_force_nearest_cluster_on_10000_random_keys():
    db, keys = _random_db(3000, 16, seed=1, exact_search_max_clusters=0)
    stats = db.stats()
    assert stats["clusters"] > 1000 and stats["conflicts_total"] > 0 and stats["forgotten_total"] > 0
    rng = np.random.default_rng(2)
    queries = keys[rng.integers(0, len(keys), 10_000)] + rng.normal(size=(10_000, 16)).astype(
        np.float32
    ) * rng.choice([0.0, 0.1, 0.5], size=(10_000, 1)).astype(np.float32)
    routes = _routes(db.search(queries))
    expected = _brute_force_routes(db, queries)
    assert sum(r is not None for r in expected) > 3000  # many queries land inside a cluster
    assert _same_routes(routes, expected)


def test_exact_scan_and_hnsw_give_identical_routes():
    db, keys = _random_db(400, 8, seed=3)
    state, arrays = db.to_state()
    hnsw = VectorDB.from_state({**state, "exact_search_max_clusters": 0}, arrays)
    queries = keys + np.random.default_rng(4).normal(size=keys.shape).astype(np.float32) * 0.2
    assert _routes(db.search(queries)) == _routes(hnsw.search(queries))


def test_state_round_trip_gives_identical_state_and_routes():
    db, keys = _random_db(600, 8, seed=5, exact_search_max_clusters=0)
    db.retract("e7")
    state, arrays = db.to_state()
    loaded = VectorDB.from_state(json.loads(json.dumps(state)), arrays)
    state2, arrays2 = loaded.to_state()
    assert state2 == state
    assert arrays2.keys() == arrays.keys()
    assert all(np.array_equal(arrays2[k], arrays[k]) for k in arrays)
    queries = keys + np.random.default_rng(6).normal(size=keys.shape).astype(np.float32) * 0.3
    assert _routes(loaded.search(queries)) == _routes(db.search(queries))
    rebuilt = VectorDB.from_state(state, {k: v for k, v in arrays.items() if not k.startswith("graph/")})
    assert _routes(rebuilt.search(queries)) == _routes(db.search(queries))


def test_the_conflict_policy_round_trips_and_older_states_load_as_forget():
    db, keys = _random_db(300, 4, seed=18, conflict_policy="split")
    state, arrays = db.to_state()
    assert state["conflict_policy"] == "split" and db.stats()["conflicts_total"] > 0
    loaded = VectorDB.from_state(json.loads(json.dumps(state)), arrays)
    assert loaded.conflict_policy == "split" and loaded.copy().conflict_policy == "split"
    # Both go on identically, through conflicts that split clusters.
    more = keys[:60] + np.random.default_rng(19).normal(size=(60, 4)).astype(np.float32) * 0.3
    for either in (db, loaded):
        either.insert(more, [f"y{i % 3}" for i in range(60)], [90] * 60, [f"m{i}" for i in range(60)])
    assert _same_state(db, loaded)
    older = {k: v for k, v in VectorDB(2, 1.0).to_state()[0].items() if k != "conflict_policy"}
    assert VectorDB.from_state(older, {}).conflict_policy == "forget"
    with pytest.raises(ValueError, match="conflict_policy"):
        VectorDB(2, 1.0, conflict_policy="keep")


def test_empty_database_round_trips_and_accepts_inserts():
    loaded = VectorDB.from_state(*VectorDB(3, 0.5).to_state())
    assert loaded.search(_keys((0.0, 0.0, 0.0))) == [None]
    _insert(loaded, [(0.0, 0.0, 0.0)], ["a"], ["e1"], [4])
    assert loaded.search(_keys((0.0, 0.0, 0.0)))[0].block == 4


def test_same_inserts_give_the_same_state_including_the_hnsw_graph():
    (a, _), (b, _) = _random_db(500, 8, seed=7), _random_db(500, 8, seed=7)
    (sa, aa), (sb, ab) = a.to_state(), b.to_state()
    assert sa == sb and all(np.array_equal(aa[k], ab[k]) for k in aa)


def test_from_state_refuses_arrays_of_another_snapshot():
    small, _ = _random_db(40, 4, seed=8)
    big, _ = _random_db(80, 4, seed=9)
    state, _ = small.to_state()
    with pytest.raises(ValueError, match="do not match"):
        VectorDB.from_state(state, big.to_state()[1])


def test_concurrent_searches_match_a_single_thread():
    db, keys = _random_db(800, 8, seed=10, exact_search_max_clusters=0)
    chunks = np.array_split(keys + 0.05, 8)
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = [h for hits in pool.map(db.search, chunks) for h in hits]
    assert parallel == db.search(keys + 0.05)


def test_graph_is_rebuilt_once_moved_centres_outnumber_live_ones():
    db = VectorDB(2, 1.0, exact_search_max_clusters=0)
    rng = np.random.default_rng(11)
    far = _keys((100.0, 100.0))
    db.insert(far, ["z"], [9], ["far"])
    keys = rng.normal(size=(1100, 2)).astype(np.float32) * 0.1
    db.insert(keys, ["a"] * 1100, [1] * 1100, [f"e{i}" for i in range(1100)])  # 1099 joins
    state, _ = db.to_state()
    assert state["graph_elements"] < 1100 and state["graph_deleted"] < 1100
    assert db.search(np.vstack([far, keys[-1:]]))[0].edit_id == "far"
    assert _same_routes(_routes(db.search(keys)), _brute_force_routes(db, keys))


def test_random_stream_keeps_invariants_and_new_clusters_route_to_their_edit():
    rng = np.random.default_rng(12)
    db = VectorDB(3, 0.5, exact_search_max_clusters=0)
    anchors = rng.normal(size=(30, 3)).astype(np.float32) * 2
    starts = 0
    for step in range(300):
        key = anchors[rng.integers(0, 30)] + rng.normal(size=3).astype(np.float32) * 0.3
        edit_id = f"e{step}"
        (action,) = db.insert(key[None, :], [f"y{rng.integers(0, 3)}"], [step], [edit_id]).actions
        if action in ("add", "conflict", "supersede"):
            # The key is now the centre of the newest cluster: it routes to its own edit.
            assert db.search(key[None, :])[0].edit_id == edit_id
            starts += 1
        if step % 7 == 6:
            db.retract(f"e{step - 3}")
        if step % 10 == 9:
            # Every member lies inside its cluster's ball; no radius is 0; bookkeeping agrees.
            clusters = db.clusters()
            start = 0
            for record in clusters:
                members = record["keys"]
                start += len(record["blocks"])
                assert record["radius"] > 0
                assert np.linalg.norm(members - record["centre"], axis=1).max() <= record["radius"] + 1e-5
            assert db.edit_ids() == {e for r in clusters for e in r["edit_ids"]}
            assert db.stats()["members"] == start
    stats = db.stats()
    assert starts > 30 and stats["conflicts_total"] > 10 and stats["forgotten_total"] > 0


def _same_state(a: VectorDB, b: VectorDB) -> bool:
    (sa, aa), (sb, ab) = a.to_state(), b.to_state()
    return sa == sb and aa.keys() == ab.keys() and all(np.array_equal(aa[k], ab[k]) for k in aa)


def test_loaded_database_evolves_exactly_like_the_live_one_through_checkpoints_and_compaction():
    live, keys = _random_db(300, 4, seed=13, exact_search_max_clusters=0)
    loaded = VectorDB.from_state(*live.to_state())
    rng = np.random.default_rng(14)
    # 1500 joins into one far cluster: > 1024 graph additions (a checkpoint) and > 1024 deletions
    # (a rebuild), so the replayed level generator and both maintenance paths are exercised.
    far = rng.normal(size=(1500, 4)).astype(np.float32) * 0.05 + 50
    for db in (live, loaded):
        db.insert(far, ["z"] * 1500, [99] * 1500, [f"far{i}" for i in range(1500)])
        db.retract("e3")
    assert _same_state(live, loaded)
    queries = np.vstack([keys, far]) + rng.normal(size=(1800, 4)).astype(np.float32) * 0.2
    assert _routes(loaded.search(queries)) == _routes(live.search(queries))
    again = VectorDB.from_state(*live.to_state())
    assert _same_state(again, live) and _routes(again.search(queries)) == _routes(live.search(queries))


def test_centres_are_recomputed_bit_identically_including_centres_kept_by_a_conflict():
    db = VectorDB(2, 1.0)
    _insert(db, [(0.0, 0.0), (2.0, 0.0), (1.0, 0.0)], ["a"] * 3, ["e1", "e2", "e3"])
    _insert(db, [(2.6, 0.0)], ["b"], ["e4"], [1])  # conflict: the centre stays the mean of 3 keys
    many, _ = _random_db(400, 8, seed=15)
    for original in (db, many):
        state, arrays = original.to_state()
        assert "centres" not in arrays and not any(k.startswith("graph/") for k in arrays)
        loaded = VectorDB.from_state(json.loads(json.dumps(state)), arrays)
        for a, b in zip(original.clusters(), loaded.clusters(), strict=True):
            assert a["centre"].tobytes() == b["centre"].tobytes()
    kept = db.clusters()[0]
    assert kept["edit_ids"] == ["e3"] and kept["centre_members"] == [[0, 0], [0, 1], [0, 2]]


def test_segments_are_append_only_and_forgetting_or_retracting_never_rewrites_them():
    db = VectorDB(2, 1.0)
    _insert(db, [(0.0, 0.0), (2.0, 0.0), (1.0, 0.0)], ["a"] * 3, ["e1", "e2", "e3"], [0, 0, 0])
    segment = db.to_state()[1]["keys/000000/keys"].copy()
    _insert(db, [(2.6, 0.0)], ["b"], ["e4"], [1])  # forgets e1 and e2
    db.retract("e3")
    state, arrays = db.to_state()
    assert np.array_equal(arrays["keys/000000/keys"], segment) and len(segment) == 3
    assert [(s["block"], s["rows"]) for s in state["segments"]] == [(0, 3), (1, 1)]
    assert [(c["blocks"], c["rows"]) for c in state["clusters"]] == [([1], [0])]


def test_the_graph_exists_only_above_the_exact_search_size_and_routes_the_same():
    db = VectorDB(2, 0.1, exact_search_max_clusters=3)
    _insert(db, [(0.0, 0.0), (1.0, 0.0), (2.0, 0.0)], ["a"] * 3, ["e1", "e2", "e3"])
    state, arrays = db.to_state()
    assert state["graph"] is False and not any(k.startswith("graph/") for k in arrays)
    _insert(db, [(3.0, 0.0), (4.0, 0.0)], ["a"] * 2, ["e4", "e5"], [1, 1])
    state, arrays = db.to_state()
    assert state["graph"] is True and state["graph_elements"] == 5 and "graph/base/index" in arrays
    loaded = VectorDB.from_state(state, arrays)
    queries = _keys(*[(x / 2, 0.05) for x in range(10)])
    assert _routes(loaded.search(queries)) == _routes(db.search(queries))
    assert [h.edit_id if h else None for h in db.search(_keys((4.0, 0.0), (3.5, 0.0)))] == ["e5", None]


def test_from_state_refuses_a_graph_log_part_that_is_missing():
    db, _ = _random_db(200, 4, seed=16, exact_search_max_clusters=0)
    db.insert(np.full((1, 4), 9.0, np.float32), ["y0"], [50], ["late"])
    state, arrays = db.to_state()
    part = f"graph/{state['graph_log'][-1]:08d}/ops"
    with pytest.raises(ValueError, match="do not match"):
        VectorDB.from_state(state, {k: v for k, v in arrays.items() if k != part})


def test_copy_is_independent_and_evolves_exactly_like_the_original():
    original, keys = _random_db(300, 4, seed=17, exact_search_max_clusters=0)
    copied = original.copy()
    before = original.to_state()
    copied.insert(keys[:20] + 0.01, ["y9"] * 20, [77] * 20, [f"c{i}" for i in range(20)])
    copied.retract("e5")
    after = original.to_state()
    assert after[0] == before[0] and all(np.array_equal(after[1][k], before[1][k]) for k in before[1])
    original.insert(keys[:20] + 0.01, ["y9"] * 20, [77] * 20, [f"c{i}" for i in range(20)])
    original.retract("e5")
    assert _same_state(original, copied)
