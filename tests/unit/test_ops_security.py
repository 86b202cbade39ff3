"""docs/security.md's Redis ACL is enough for a writer and no more, proven on a real Redis/Valkey.

The ACL is read from the document itself, so the document and this test cannot drift apart.
"""

from __future__ import annotations

import re

import pytest
import redis
from pydantic import SecretStr

from daemon.records_redis import RedisRecordStore
from daemon.settings import RedisSettings
from tests.unit.test_ops_common import REPO_ROOT

SECURITY = (REPO_ROOT / "docs" / "security.md").read_text()
PASSWORD = "CHANGE-ME"


def documented_acl() -> list[str]:
    """The `ACL SETUSER` rule from docs/security.md as arguments (user name first)."""
    block = re.search(r"^ACL SETUSER (.+?)\n```", SECURITY, re.M | re.S)
    assert block, "docs/security.md has no ACL SETUSER block"
    return block.group(1).split()


@pytest.fixture
def writer_store(redis_server) -> RedisRecordStore:
    """A record store that logs in as the documented ACL user, through the real settings path."""
    args = documented_acl()
    assert args[0] == "melo-writer" and f">{PASSWORD}" in args
    redis_server.client().execute_command("ACL", "SETUSER", *args)
    settings = RedisSettings(url=redis_server.url, username="melo-writer", password=SecretStr(PASSWORD))
    return RedisRecordStore(settings.client())


def test_documented_acl_user_can_do_everything_a_writer_does(writer_store: RedisRecordStore) -> None:
    token = writer_store.acquire_lease("acl-model", "writer-1", ttl_s=30)
    assert token is not None
    assert writer_store.renew_lease("acl-model", "writer-1", token, ttl_s=30)
    assert writer_store.lease_holder("acl-model").owner == "writer-1"
    writer_store.commit_version(
        "acl-model", token, 0, 1, applied_ids=["e1", "e2"], clusters=[{"id": 0, "radius": 0.5}], removed_ids=["e2"]
    )
    assert writer_store.current_version("acl-model") == 1
    assert writer_store.applied("acl-model", ["e1", "e3"]) == {"e1"}
    assert writer_store.removed("acl-model") == {"e2"}
    assert writer_store.clusters("acl-model") == [{"id": 0, "radius": 0.5}]
    writer_store.release_lease("acl-model", "writer-1", token)
    assert writer_store.lease_holder("acl-model") is None


def test_documented_acl_user_cannot_touch_other_keys_or_administer(writer_store: RedisRecordStore) -> None:
    with pytest.raises(redis.exceptions.NoPermissionError):
        writer_store.client.set("someone-else:key", "x")
    with pytest.raises(redis.exceptions.NoPermissionError):
        writer_store.client.flushall()
    with pytest.raises(redis.exceptions.NoPermissionError):
        writer_store.client.config_get("*")
