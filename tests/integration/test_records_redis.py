"""The record store contract on a real Redis, plus what only a server can do: die, restart, keep data (AOF)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis

from daemon.errors import RecordStoreUnavailable
from daemon.records_redis import RedisRecordStore
from melo_testkit.services import RedisServer
from tests.unit.test_records_local import CLUSTERS, MODEL, RecordStoreContract, wait_until


def connect(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url, socket_timeout=2, socket_connect_timeout=2)


class TestRedisRecordStore(RecordStoreContract):
    @pytest.fixture
    def store(self, redis_server: RedisServer) -> Iterator[RedisRecordStore]:
        client = connect(redis_server)
        yield RedisRecordStore(client)
        client.close()

    @pytest.fixture
    def reopen(self, redis_server: RedisServer) -> Callable[[], RedisRecordStore]:
        return lambda: RedisRecordStore(connect(redis_server))

    def test_all_keys_of_a_model_share_its_hash_tag(self, store: RedisRecordStore) -> None:
        token = store.acquire_lease(MODEL, "a", 30)
        store.commit_version(MODEL, token, 0, 1, applied_ids=["e1"], clusters=CLUSTERS, removed_ids=["e0"])
        keys = {k.decode() for k in store.client.keys("*")}
        assert keys == {
            f"melo:{{{MODEL}}}:{name}"
            for name in ("version", "fence", "lease", "applied", "removed", "clusters", "last_commit")
        }
        slots = {redis.crc.key_slot(k.encode()) for k in keys}
        assert len(slots) == 1

    def test_large_commit_is_applied_in_one_step(self, store: RedisRecordStore) -> None:
        token = store.acquire_lease(MODEL, "a", 30)
        ids = [f"e{i}" for i in range(5000)]
        clusters = [{"id": i, "centre": [float(i)] * 8} for i in range(2500)]
        store.commit_version(MODEL, token, 0, 1, applied_ids=ids, clusters=clusters, removed_ids=ids[:2500])
        assert store.applied(MODEL, ids) == set(ids) and len(store.removed(MODEL)) == 2500
        assert store.clusters(MODEL) == clusters

    def test_killed_redis_is_a_retryable_error_and_data_survives_restart(
        self, redis_server: RedisServer, store: RedisRecordStore
    ) -> None:
        token = store.acquire_lease(MODEL, "a", 60)
        store.commit_version(MODEL, token, 0, 1, applied_ids=["e1"], clusters=CLUSTERS, removed_ids=[])

        redis_server.kill9()
        for call in (
            lambda: store.current_version(MODEL),
            lambda: store.applied(MODEL, ["e1"]),
            lambda: store.renew_lease(MODEL, "a", token, 60),
            lambda: store.commit_version(MODEL, token, 1, 2, applied_ids=["e2"], clusters=[], removed_ids=[]),
        ):
            with pytest.raises(RecordStoreUnavailable):
                call()

        redis_server.restart()
        # The same client object reconnects by itself once the server answers again.
        wait_until(lambda: _reachable(store))
        assert store.current_version(MODEL) == 1
        assert store.applied(MODEL, ["e1", "e2"]) == {"e1"} and store.clusters(MODEL) == CLUSTERS
        assert store.lease_holder(MODEL).token == token
        store.commit_version(MODEL, token, 1, 2, applied_ids=["e2"], clusters=[], removed_ids=[])
        assert store.current_version(MODEL) == 2


def _reachable(store: RedisRecordStore) -> bool:
    try:
        store.current_version(MODEL)
    except RecordStoreUnavailable:
        return False
    return True
