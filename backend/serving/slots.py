"""Session slots: leases in Redis that pin a conversation to one engine replica.

A conversation that keeps coming back to the same replica finds its earlier prompt in that replica's
prefix cache (vLLM) or prompt cache (llama.cpp), so its next turn skips most of the prefill. Each
replica holds at most `capacity` leases; a lease lives `ttl_s` seconds after its last turn, so a
crashed chat_ui process leaks nothing.

Layout (two keys, both named in KEYS, so a prefix with a hash tag such as `{qs:slots}:` keeps them
on one Redis Cluster slot):

    <prefix>expiry   ZSET  session id -> expiry, unix milliseconds on the Redis clock
    <prefix>owner    HASH  session id -> replica id

Every script first drops the leases whose expiry has passed (ZRANGEBYSCORE + HDEL), then counts
what is left. So expiry frees capacity with no cleanup job, and a replica's load is always derived
from live leases (nothing to drift). Both keys expire `ttl_s` after the last write, when every
lease in them is dead anyway.

Concurrency: every method is one Lua script (or one MULTI/EXEC), atomic on the Redis server, so any
number of chat_ui processes may share a table: two of them racing for the last slot can never both
get it. Time comes from Redis (`TIME` inside the script), never from the callers' clocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from backend.errors import RedisUnavailable

# Shared head of every script: `now` in Redis milliseconds, then expired leases dropped.
# HDEL takes the expired ids in batches: Lua's unpack() has a stack limit of a few thousand values.
_PRUNE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  for i = 1, #expired, 500 do
    redis.call('HDEL', KEYS[2], unpack(expired, i, math.min(i + 499, #expired)))
  end
end
"""

# KEYS: expiry, owner. ARGV: session, ttl_ms, capacity, renew_only (0/1), replica...
# Returns {replica, expires_ms, new (0/1)} or false. (The wait queue runs it inside a script of
# its own too: `SlotTable.ACQUIRE`.)
_ACQUIRE = (
    _PRUNE
    + """
local session, ttl = ARGV[1], tonumber(ARGV[2])
local capacity, renew_only = tonumber(ARGV[3]), ARGV[4] == '1'
local load = {}
for i = 5, #ARGV do load[ARGV[i]] = 0 end
local expires = now + ttl
local function keep(replica, new)
  redis.call('HSET', KEYS[2], session, replica)
  redis.call('ZADD', KEYS[1], expires, session)
  for _, key in ipairs(KEYS) do
    if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
  end
  return {replica, expires, new}
end
local current = redis.call('HGET', KEYS[2], session)
if current and load[current] then
  return keep(current, 0)
end
if renew_only then return false end
for _, replica in ipairs(redis.call('HVALS', KEYS[2])) do
  if load[replica] then load[replica] = load[replica] + 1 end
end
local best, best_load = nil, capacity
for i = 5, #ARGV do
  if load[ARGV[i]] < best_load then best, best_load = ARGV[i], load[ARGV[i]] end
end
if not best then return false end
return keep(best, 1)
"""
)

# KEYS: expiry, owner. ARGV: replica... Returns the live lease count of each, in order.
_OCCUPANCY = (
    _PRUNE
    + """
local load = {}
for i = 1, #ARGV do load[ARGV[i]] = 0 end
for _, replica in ipairs(redis.call('HVALS', KEYS[2])) do
  if load[replica] then load[replica] = load[replica] + 1 end
end
local counts = {}
for i = 1, #ARGV do counts[i] = load[ARGV[i]] end
return counts
"""
)


@dataclass(frozen=True)
class Lease:
    """A session's hold on one replica's slot."""

    session_id: str
    replica: str  # an engine replica id (its base URL)
    expires_at: float  # unix seconds, Redis clock
    new: bool  # True when this call pinned the session (a warm-up candidate)


class SlotTable:
    """Bounded per-replica session leases shared by every chat_ui process through one Redis.

    `capacity` is the number of live leases one replica may hold; `ttl_s` is how long a lease lives
    after its last acquire. Every method raises RedisUnavailable when Redis cannot be reached.
    """

    ACQUIRE = _ACQUIRE
    """The acquire script (KEYS `keys`, ARGV `acquire_args`; reply for `lease_from`), for scripts
    that take a slot together with other checks in one round trip."""

    def __init__(
        self, client: aioredis.Redis, *, capacity: int, ttl_s: int, prefix: str = "qs:slots:"
    ) -> None:
        if capacity < 1 or ttl_s < 1:
            raise ValueError("capacity and ttl_s must be at least 1")
        self._redis = client
        self._capacity = capacity
        self._ttl_ms = ttl_s * 1000
        self._keys = [prefix + "expiry", prefix + "owner"]
        # register_script only hashes the text; the script is loaded on first use (EVALSHA, then
        # SCRIPT LOAD if the server does not know it, e.g. after a Redis restart).
        self._acquire = client.register_script(_ACQUIRE)
        self._occupancy = client.register_script(_OCCUPANCY)

    @property
    def capacity(self) -> int:
        """Live leases one replica may hold."""
        return self._capacity

    async def acquire(self, session_id: str, *, replicas: Sequence[str]) -> Lease | None:
        """Renew the session's lease, or pin it to a replica; None when every replica is full.

        `replicas` are the healthy replicas, in the caller's order of preference. A lease alive on
        one of them is renewed there (`new=False`), even when that replica is at capacity: the
        session already holds the slot. Otherwise (no lease, an expired one, or one on a replica
        no longer listed) the session is pinned to the least-loaded listed replica with a free
        slot, ties going to the earlier one (`new=True`); its old lease, if any, is given up. When
        no listed replica has a free slot, nothing changes and None is returned.
        """
        return await self._call_acquire(session_id, replicas=replicas, renew_only=False)

    async def renew(self, session_id: str, *, replicas: Sequence[str]) -> Lease | None:
        """Renew a lease alive on one of `replicas` (`new=False`); None otherwise, changing nothing.

        Never takes a free slot, so callers may use it before joining the wait queue.
        """
        return await self._call_acquire(session_id, replicas=replicas, renew_only=True)

    async def release(self, session_id: str) -> None:
        """Give up the session's lease at once (no-op without one)."""
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.zrem(self._keys[0], session_id)
                pipe.hdel(self._keys[1], session_id)
                await pipe.execute()
        except RedisError as exc:
            raise RedisUnavailable("slot release failed") from exc

    async def occupancy(self, replicas: Sequence[str]) -> dict[str, int]:
        """Live leases per listed replica (0 for one without any)."""
        if not replicas:
            return {}
        try:
            counts = await self._occupancy(keys=self._keys, args=list(replicas))
        except RedisError as exc:
            raise RedisUnavailable("slot occupancy read failed") from exc
        return {replica: int(count) for replica, count in zip(replicas, counts, strict=True)}

    @property
    def keys(self) -> list[str]:
        """The table's Redis keys, in the order its scripts take them."""
        return list(self._keys)

    def acquire_args(
        self, session_id: str, *, replicas: Sequence[str], renew_only: bool
    ) -> list[str | int]:
        """ARGV of the acquire script for this call."""
        return [session_id, self._ttl_ms, self._capacity, int(renew_only), *replicas]

    @staticmethod
    def lease_from(session_id: str, reply: Any) -> Lease | None:
        """The Lease in an acquire script's reply (None: no slot)."""
        if reply is None:
            return None
        replica, expires_ms, new = reply
        return Lease(
            session_id=session_id,
            replica=replica.decode() if isinstance(replica, bytes) else str(replica),
            expires_at=int(expires_ms) / 1000,
            new=bool(int(new)),
        )

    async def _call_acquire(
        self, session_id: str, *, replicas: Sequence[str], renew_only: bool
    ) -> Lease | None:
        if not replicas:
            return None
        args = self.acquire_args(session_id, replicas=replicas, renew_only=renew_only)
        try:
            reply: Any = await self._acquire(keys=self._keys, args=args)
        except RedisError as exc:
            raise RedisUnavailable("slot acquire failed") from exc
        return self.lease_from(session_id, reply)
