"""Record store in Redis (or Valkey), one hash-tagged key family per model.

```
melo:{<model>}:version       committed snapshot version (string integer)
melo:{<model>}:fence         fencing counter: the newest token ever issued
melo:{<model>}:lease         hash {owner, token} with a TTL = the writer lease
melo:{<model>}:applied       set of applied edit ids
melo:{<model>}:removed       set of applied edit ids that left the index
melo:{<model>}:clusters      list of cluster records (JSON strings)
melo:{<model>}:last_commit   "<token>:<version>" of the last commit (makes a retried commit a no-op)
```

The "{model}" hash tag puts all of a model's keys in one Redis Cluster slot, so every multi-key
step below is a single Lua script: atomic on a standalone server and on a cluster alike.
Connection problems (refused, reset, timeout, server still loading its AOF, read-only replica)
become `RecordStoreUnavailable`, which the worker retries.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import redis
from redis import exceptions as rx

from daemon.errors import Fenced, RecordStoreUnavailable, VersionMoved
from daemon.records import Lease, encode_clusters
from schemas import MODEL_NAME

_ACQUIRE = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= ARGV[1] then return false end
if tonumber(redis.call('GET', KEYS[2]) or '0') < tonumber(ARGV[3]) then redis.call('SET', KEYS[2], ARGV[3]) end
local token = redis.call('INCR', KEYS[2])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'token', token)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return token
"""

_RENEW = """
local owner = redis.call('HGET', KEYS[1], 'owner')
local token = redis.call('HGET', KEYS[1], 'token')
if owner == ARGV[1] and token == ARGV[2] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
-- Lapsed but nobody acquired since (the fence has not moved): nobody else can have written.
if not owner and redis.call('GET', KEYS[2]) == ARGV[2] then
  redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'token', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
"""

_RELEASE = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] and redis.call('HGET', KEYS[1], 'token') == ARGV[2] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS: fence, version, applied, removed, clusters, last_commit
# ARGV: token, expected, new, n_applied, n_removed, applied ids..., removed ids..., cluster JSON...
_COMMIT = """
local token, expected, new = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local version = tonumber(redis.call('GET', KEYS[2]) or '0')
local marker = token .. ':' .. ARGV[3]
if version == new and redis.call('GET', KEYS[6]) == marker then return {'ok', 'repeat'} end
local fence = redis.call('GET', KEYS[1]) or '0'
if fence ~= token then return {'fenced', fence} end
if version ~= expected then return {'moved', tostring(version)} end
local function add_all(key, first, last)
  for i = first, last, 1000 do
    redis.call('SADD', key, unpack(ARGV, i, math.min(i + 999, last)))
  end
end
local n_applied, n_removed = tonumber(ARGV[4]), tonumber(ARGV[5])
local first_removed = 6 + n_applied
local first_cluster = first_removed + n_removed
add_all(KEYS[3], 6, first_removed - 1)
add_all(KEYS[4], first_removed, first_cluster - 1)
redis.call('DEL', KEYS[5])
for i = first_cluster, #ARGV, 1000 do
  redis.call('RPUSH', KEYS[5], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('SET', KEYS[2], ARGV[3])
redis.call('SET', KEYS[6], marker)
return {'ok', 'done'}
"""


class RedisRecordStore:
    """`RecordStore` on a redis-py client (standalone Redis/Valkey, or a cluster client)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._commit = client.register_script(_COMMIT)

    def acquire_lease(self, model: str, owner: str, ttl_s: float, *, above: int = 0) -> int | None:
        """Take the lease if free, lapsed or ours; return a new fencing token (> ``above``), else None."""
        with _translated(model):
            token = self._acquire(
                keys=[self._key(model, "lease"), self._key(model, "fence")], args=[owner, _ms(ttl_s), int(above)]
            )
        return None if token is None else int(token)

    def renew_lease(self, model: str, owner: str, token: int, ttl_s: float) -> bool:
        """Extend the lease; False once another owner has acquired it."""
        with _translated(model):
            renewed = self._renew(
                keys=[self._key(model, "lease"), self._key(model, "fence")], args=[owner, str(token), _ms(ttl_s)]
            )
        return bool(renewed)

    def release_lease(self, model: str, owner: str, token: int) -> None:
        """Drop the lease now if we still hold it (the fence keeps its value)."""
        with _translated(model):
            self._release(keys=[self._key(model, "lease")], args=[owner, str(token)])

    def lease_holder(self, model: str) -> Lease | None:
        """The live lease, or None."""
        key = self._key(model, "lease")
        with _translated(model):
            pipe = self.client.pipeline(transaction=True)
            pipe.hgetall(key)
            pipe.pttl(key)
            fields, ttl_ms = pipe.execute()
        if not fields or ttl_ms < 0:
            return None
        fields = {_text(k): _text(v) for k, v in fields.items()}
        return Lease(fields["owner"], int(fields["token"]), time.time() + ttl_ms / 1000)

    def current_version(self, model: str) -> int:
        """The last committed version (0 before the first commit)."""
        with _translated(model):
            value = self.client.get(self._key(model, "version"))
        return 0 if value is None else int(value)

    def applied(self, model: str, edit_ids: Iterable[str]) -> set[str]:
        """The subset of `edit_ids` already applied."""
        ids = list(dict.fromkeys(edit_ids))
        if not ids:
            return set()
        with _translated(model):
            flags = self.client.smismember(self._key(model, "applied"), ids)
        return {edit_id for edit_id, flag in zip(ids, flags, strict=True) if flag}

    def removed(self, model: str) -> set[str]:
        """Applied edit ids that have left the index."""
        with _translated(model):
            members = self.client.smembers(self._key(model, "removed"))
        return {_text(m) for m in members}

    def clusters(self, model: str) -> list[dict[str, Any]]:
        """The cluster records as of the committed version."""
        with _translated(model):
            records = self.client.lrange(self._key(model, "clusters"), 0, -1)
        return [json.loads(r) for r in records]

    def commit_version(
        self,
        model: str,
        token: int,
        expected_version: int,
        new_version: int,
        *,
        applied_ids: Iterable[str],
        clusters: list[dict[str, Any]],
        removed_ids: Iterable[str],
    ) -> None:
        """Atomically move from `expected_version` to `new_version` in one Lua script."""
        if new_version <= expected_version:
            raise ValueError(f"new_version {new_version} must be greater than expected_version {expected_version}")
        if token < 1:
            raise Fenced(f"{model}: token {token} was never issued; acquire the lease first")
        applied = list(dict.fromkeys(applied_ids))
        removed = list(dict.fromkeys(removed_ids))
        keys = [
            self._key(model, name) for name in ("fence", "version", "applied", "removed", "clusters", "last_commit")
        ]
        args = [
            str(token),
            str(expected_version),
            str(new_version),
            len(applied),
            len(removed),
            *applied,
            *removed,
            *encode_clusters(clusters),
        ]
        with _translated(model):
            status, detail = map(_text, self._commit(keys=keys, args=args))
        if status == "fenced":
            raise Fenced(f"{model}: fencing token {token} is stale (newest is {detail}); another writer took over")
        if status == "moved":
            raise VersionMoved(
                f"{model}: records are at version {detail}, not {expected_version}; reload before committing"
            )

    @staticmethod
    def _key(model: str, name: str) -> str:
        if not isinstance(model, str) or not MODEL_NAME.match(model):
            raise ValueError(f"model name {model!r} is not a valid namespace (pattern {MODEL_NAME.pattern})")
        return f"melo:{{{model}}}:{name}"


@contextmanager
def _translated(model: str) -> Iterator[None]:
    """Turn "the server is not there right now" into the retryable `RecordStoreUnavailable`."""
    try:
        yield
    except (rx.ConnectionError, rx.TimeoutError, rx.ClusterDownError, rx.TryAgainError, rx.ReadOnlyError) as exc:
        raise RecordStoreUnavailable(f"Redis unavailable for {model}: {exc}; retrying later") from exc


def _text(value: bytes | str) -> str:
    # The client may or may not have been built with decode_responses=True.
    return value.decode() if isinstance(value, bytes) else value


def _ms(seconds: float) -> int:
    if not seconds > 0:
        raise ValueError(f"lease ttl_s must be positive, got {seconds!r}")
    return max(1, round(seconds * 1000))
