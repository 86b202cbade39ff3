"""Record store contract (shared with the Redis store's integration test) run on the local file store."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.errors import Fenced, VersionMoved
from daemon.records import RecordStore
from daemon.records_local import LocalRecordStore

MODEL = "tiny-gpt2"
CLUSTERS = [{"id": 0, "centre": [0.5, 1.0], "radius": 0.1, "label": " Lyon", "members": [["e1", 0]]}]


def wait_until(condition: Callable[[], object], timeout_s: float = 10.0) -> object:
    """Poll `condition` until it returns something truthy; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout_s}s")


class RecordStoreContract:
    """Behaviour every RecordStore must have. Subclasses provide `store` and `reopen` fixtures."""

    def test_fresh_model_has_no_version_records_or_lease(self, store: RecordStore) -> None:
        assert store.current_version(MODEL) == 0
        assert store.clusters(MODEL) == [] and store.applied(MODEL, ["e1"]) == set() and store.removed(MODEL) == set()
        assert store.lease_holder(MODEL) is None

    def test_commit_moves_version_and_records_together(self, store: RecordStore) -> None:
        token = store.acquire_lease(MODEL, "a", 30)
        store.commit_version(MODEL, token, 0, 1, applied_ids=["e1", "e2"], clusters=CLUSTERS, removed_ids=[])
        store.commit_version(MODEL, token, 1, 2, applied_ids=["e3"], clusters=CLUSTERS * 2, removed_ids=["e1"])
        assert store.current_version(MODEL) == 2
        assert store.applied(MODEL, ["e1", "e2", "e3", "e4"]) == {"e1", "e2", "e3"}  # forgotten stays applied
        assert store.removed(MODEL) == {"e1"}
        assert store.clusters(MODEL) == CLUSTERS * 2

    def test_repeating_a_successful_commit_is_a_no_op(self, store: RecordStore) -> None:
        token = store.acquire_lease(MODEL, "a", 30)
        commit = dict(applied_ids=["e1"], clusters=CLUSTERS, removed_ids=[])
        store.commit_version(MODEL, token, 0, 1, **commit)
        store.commit_version(MODEL, token, 0, 1, **commit)  # the reply to the first was "lost"
        assert store.current_version(MODEL) == 1 and store.clusters(MODEL) == CLUSTERS

    def test_commit_on_a_moved_version_changes_nothing(self, store: RecordStore) -> None:
        token = store.acquire_lease(MODEL, "a", 30)
        store.commit_version(MODEL, token, 0, 1, applied_ids=["e1"], clusters=CLUSTERS, removed_ids=[])
        with pytest.raises(VersionMoved, match="version 1"):
            store.commit_version(MODEL, token, 0, 2, applied_ids=["e2"], clusters=[], removed_ids=["e1"])
        assert store.current_version(MODEL) == 1 and store.applied(MODEL, ["e2"]) == set()
        assert store.clusters(MODEL) == CLUSTERS and store.removed(MODEL) == set()

    def test_second_owner_cannot_take_a_live_lease_or_commit(self, store: RecordStore) -> None:
        token_a = store.acquire_lease(MODEL, "a", 30)
        assert token_a == 1
        assert store.acquire_lease(MODEL, "b", 30) is None
        holder = store.lease_holder(MODEL)
        assert (holder.owner, holder.token) == ("a", 1) and holder.expires_at > time.time()
        with pytest.raises(Fenced):
            store.commit_version(MODEL, 0, 0, 1, applied_ids=["x"], clusters=[], removed_ids=[])
        assert store.current_version(MODEL) == 0

    def test_lapsed_lease_goes_to_a_new_owner_with_a_higher_token_and_fences_the_old(self, store: RecordStore) -> None:
        token_a = store.acquire_lease(MODEL, "a", 0.2)
        store.commit_version(MODEL, token_a, 0, 1, applied_ids=["e1"], clusters=CLUSTERS, removed_ids=[])
        token_b = wait_until(lambda: store.acquire_lease(MODEL, "b", 30))
        assert token_b > token_a
        assert store.renew_lease(MODEL, "a", token_a, 30) is False
        with pytest.raises(Fenced, match="stale"):
            store.commit_version(MODEL, token_a, 1, 2, applied_ids=["late"], clusters=[], removed_ids=[])
        store.commit_version(MODEL, token_b, 1, 2, applied_ids=["e2"], clusters=[], removed_ids=[])
        assert store.applied(MODEL, ["late", "e2"]) == {"e2"} and store.lease_holder(MODEL).owner == "b"

    def test_reacquiring_issues_a_new_token_that_fences_the_old_one(self, store: RecordStore) -> None:
        first = store.acquire_lease(MODEL, "a", 30)
        second = store.acquire_lease(MODEL, "a", 30)
        assert second == first + 1
        with pytest.raises(Fenced):
            store.commit_version(MODEL, first, 0, 1, applied_ids=[], clusters=[], removed_ids=[])

    def test_a_lease_taken_above_the_snapshot_fence_gets_a_larger_token(self, store: RecordStore) -> None:
        # A store that lost its counter (Redis back empty) must still out-rank the snapshot store's fence.
        assert store.acquire_lease(MODEL, "a", 30, above=41) == 42
        assert store.acquire_lease(MODEL, "a", 30, above=10) == 43, "`above` never lowers the counter"
        store.commit_version(MODEL, 43, 0, 1, applied_ids=["e1"], clusters=[], removed_ids=[])
        assert store.current_version(MODEL) == 1

    def test_renew_keeps_the_lease_and_release_frees_it_at_once(self, store: RecordStore) -> None:
        token = store.acquire_lease(MODEL, "a", 0.5)
        assert store.renew_lease(MODEL, "a", token, 30)
        assert store.lease_holder(MODEL).expires_at > time.time() + 20
        assert store.renew_lease(MODEL, "b", token, 30) is False
        store.release_lease(MODEL, "b", token)  # not b's to release
        assert store.lease_holder(MODEL).owner == "a"
        store.release_lease(MODEL, "a", token)
        assert store.lease_holder(MODEL) is None
        assert store.acquire_lease(MODEL, "b", 30) == token + 1

    def test_lapsed_lease_nobody_took_can_still_be_renewed(self, store: RecordStore) -> None:
        token = store.acquire_lease(MODEL, "a", 0.1)
        wait_until(lambda: store.lease_holder(MODEL) is None)
        assert store.renew_lease(MODEL, "a", token, 30)
        assert store.lease_holder(MODEL).token == token

    def test_models_are_independent(self, store: RecordStore) -> None:
        token = store.acquire_lease(MODEL, "a", 30)
        assert store.acquire_lease("other-model", "b", 30) == 1
        store.commit_version(MODEL, token, 0, 1, applied_ids=["e1"], clusters=CLUSTERS, removed_ids=[])
        assert store.current_version("other-model") == 0 and store.applied("other-model", ["e1"]) == set()

    def test_records_survive_reopening(self, store: RecordStore, reopen: Callable[[], RecordStore]) -> None:
        token = store.acquire_lease(MODEL, "a", 30)
        store.commit_version(MODEL, token, 0, 1, applied_ids=["e1"], clusters=CLUSTERS, removed_ids=["e0"])
        again = reopen()
        assert again.current_version(MODEL) == 1 and again.clusters(MODEL) == CLUSTERS
        assert again.applied(MODEL, ["e1"]) == {"e1"} and again.removed(MODEL) == {"e0"}
        assert again.lease_holder(MODEL).token == token

    def test_bad_arguments_are_refused_before_touching_records(self, store: RecordStore) -> None:
        token = store.acquire_lease(MODEL, "a", 30)
        with pytest.raises(ValueError, match="greater"):
            store.commit_version(MODEL, token, 3, 3, applied_ids=[], clusters=[], removed_ids=[])
        with pytest.raises(ValueError, match="cluster record 0"):
            store.commit_version(
                MODEL, token, 0, 1, applied_ids=[], clusters=[{"centre": float("nan")}], removed_ids=[]
            )
        with pytest.raises(ValueError, match="namespace"):
            store.current_version("{bad}")
        assert store.current_version(MODEL) == 0


class TestLocalRecordStore(RecordStoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> LocalRecordStore:
        return LocalRecordStore(tmp_path / "records")

    @pytest.fixture
    def reopen(self, tmp_path: Path) -> Callable[[], LocalRecordStore]:
        return lambda: LocalRecordStore(tmp_path / "records")

    def test_two_processes_worth_of_store_objects_share_one_lease(self, tmp_path: Path) -> None:
        first, second = LocalRecordStore(tmp_path / "r"), LocalRecordStore(tmp_path / "r")
        assert first.acquire_lease(MODEL, "a", 30) == 1
        assert second.acquire_lease(MODEL, "b", 30) is None
