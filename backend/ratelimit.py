"""Per-user rate limits in Redis, shared by every chat_ui replica (ARCHITECTURE step 2).

    limiter = RateLimiter(redis, settings=settings.ratelimit, metrics=metrics)
    async with limiter.admit(user, request_id=rid):   # raises RateLimited (the user's message)
        ...answer...
    logins = LoginLimiter(redis, settings=settings.ratelimit, metrics=metrics)
    await logins.check(name, ip=ip); ...; await logins.failed(name, ip=ip) / succeeded(name)

Three limits, each one Lua script, atomic on the Redis server, with time read by `TIME` inside the
script (never a caller's clock), so any number of processes share them exactly:

    <prefix>bucket:<user>     HASH  tokens, ts      token bucket: `message_burst` deep, refilled at
                                                    `messages_per_minute`; one token per message
    <prefix>inflight:<user>   ZSET  request -> expiry ms   answers generating now; a place expires
                                                    `inflight_ttl_s` after its last renewal (renewed
                                                    while held), so a crashed process frees it
    <prefix>login:user:<n>, <prefix>login:ip:<a>  STRING  failed logins in a fixed window

Users and IPs appear in keys only as a SHA-256 prefix. Every key expires on its own once idle.
Rejections raise RateLimited (with the seconds until the limit would pass) and are counted in
`qwen_rate_limited_total{kind}`; Redis failures raise RedisUnavailable.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from backend.config import RateLimitSettings
from backend.errors import RateLimited, RedisUnavailable
from backend.metrics import Metrics

logger = logging.getLogger(__name__)

CONCURRENCY_RETRY_S = 5.0  # a hint: answers take seconds, and the place frees when one ends

# KEYS: bucket. ARGV: rate (tokens per second), burst, cost. Returns {allowed 0/1, retry seconds}.
# Numbers go back as strings: Redis truncates Lua numbers to integers.
_BUCKET = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(state[1]), tonumber(state[2])
if tokens == nil or ts == nil then tokens, ts = burst, now end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local allowed, retry = 0, (cost - tokens) / rate
if tokens >= cost then tokens, allowed, retry = tokens - cost, 1, 0 end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.9f', tokens),
           'ts', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, string.format('%.6f', retry)}
"""

# KEYS: inflight. ARGV: request id, limit, ttl ms. Takes (or renews) the request's place.
_ENTER = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1])
   and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"""

# KEYS: login counters. ARGV: their limits. Returns the ms until all are under their limits.
_LOGIN_CHECK = """
local wait = 0
for i, key in ipairs(KEYS) do
  if tonumber(redis.call('GET', key) or '0') >= tonumber(ARGV[i]) then
    wait = math.max(wait, redis.call('PTTL', key), 1)
  end
end
return wait
"""

# KEYS: login counters. ARGV: window ms. A window starts at the first failure.
_LOGIN_FAILED = """
for _, key in ipairs(KEYS) do
  if redis.call('INCR', key) == 1 then redis.call('PEXPIRE', key, ARGV[1]) end
end
return 1
"""


class LimitKind(enum.StrEnum):
    MESSAGES = "messages"
    CONCURRENCY = "concurrency"
    LOGIN = "login"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_s: float  # 0 when allowed


def _tag(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()[:32]


class _Limits:
    def __init__(self, client: aioredis.Redis, *, metrics: Metrics | None, prefix: str) -> None:
        self._redis = client
        self._metrics = metrics
        self._prefix = prefix

    def _refuse(self, kind: LimitKind, retry_after_s: float) -> RateLimited:
        if self._metrics is not None:
            self._metrics.rate_limited.labels(kind.value).inc()
        return RateLimited(retry_after_s, kind=kind.value)


class RateLimiter(_Limits):
    """Chat limits of one user: messages per minute (token bucket) and concurrent answers."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        settings: RateLimitSettings,
        metrics: Metrics | None = None,
        inflight_ttl_s: float = 30.0,
        prefix: str = "qs:rl:",
    ) -> None:
        if settings.messages_per_minute <= 0 or settings.message_burst < 1:
            raise ValueError("messages_per_minute must be > 0 and message_burst >= 1")
        if settings.concurrent_answers < 1 or inflight_ttl_s <= 0:
            raise ValueError("concurrent_answers must be >= 1 and inflight_ttl_s > 0")
        super().__init__(client, metrics=metrics, prefix=prefix)
        self._rate = settings.messages_per_minute / 60.0
        self._burst = settings.message_burst
        self._concurrent = settings.concurrent_answers
        self._ttl_ms = round(inflight_ttl_s * 1000)
        self._bucket = client.register_script(_BUCKET)
        self._enter = client.register_script(_ENTER)

    async def take(self, user: str) -> Decision:
        """Take one message token from the user's bucket. Raises RedisUnavailable."""
        key = f"{self._prefix}bucket:{_tag(user)}"
        try:
            reply: Any = await self._bucket(keys=[key], args=[self._rate, self._burst, 1])
        except RedisError as exc:
            raise RedisUnavailable("rate limit check failed") from exc
        allowed, retry = reply
        return Decision(allowed=bool(int(allowed)), retry_after_s=float(retry))

    async def check_message(self, user: str) -> None:
        """Count one message. Raises RateLimited (kind `messages`), RedisUnavailable."""
        decision = await self.take(user)
        if not decision.allowed:
            raise self._refuse(LimitKind.MESSAGES, decision.retry_after_s)

    @contextlib.asynccontextmanager
    async def answering(self, user: str, *, request_id: str) -> AsyncIterator[None]:
        """Hold one of the user's concurrent-answer places while the body runs, renewing it every
        third of the TTL. Raises RateLimited (kind `concurrency`) when all are held,
        RedisUnavailable. Release failures are only logged: the place expires by itself."""
        key = f"{self._prefix}inflight:{_tag(user)}"
        if not await self._take_place(key, request_id):
            raise self._refuse(LimitKind.CONCURRENCY, CONCURRENCY_RETRY_S)
        renewer = asyncio.create_task(self._renew(key, request_id))
        try:
            yield
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            try:
                await self._redis.zrem(key, request_id)
            except RedisError as exc:
                logger.warning("concurrent-answer place not released (it expires): %s", exc)

    @contextlib.asynccontextmanager
    async def admit(self, user: str, *, request_id: str) -> AsyncIterator[None]:
        """One message: a token from the bucket (spent even when the concurrency cap then
        refuses), then a concurrent-answer place held for the body. Raises RateLimited,
        RedisUnavailable."""
        await self.check_message(user)
        async with self.answering(user, request_id=request_id):
            yield

    async def in_flight(self, user: str) -> int:
        """The user's live concurrent-answer places (expired ones are not counted)."""
        key = f"{self._prefix}inflight:{_tag(user)}"
        try:
            now_s, now_us = await self._redis.time()
            return int(await self._redis.zcount(key, f"({now_s * 1000 + now_us // 1000}", "+inf"))
        except RedisError as exc:
            raise RedisUnavailable("rate limit read failed") from exc

    async def _take_place(self, key: str, request_id: str) -> bool:
        try:
            reply: Any = await self._enter(
                keys=[key], args=[request_id, self._concurrent, self._ttl_ms]
            )
        except RedisError as exc:
            raise RedisUnavailable("concurrency limit check failed") from exc
        return bool(int(reply))

    async def _renew(self, key: str, request_id: str) -> None:
        while True:
            await asyncio.sleep(self._ttl_ms / 3000)
            try:
                if not await self._take_place(key, request_id):
                    logger.warning("a concurrent-answer place expired while its answer ran")
            except RedisUnavailable as exc:
                logger.warning("concurrent-answer place not renewed: %s", exc.__cause__)


class LoginLimiter(_Limits):
    """Failed logins per user name and per client IP, each in a fixed window that starts at the
    first failure. Meant for the UI's password callback:

        await logins.check(name, ip=ip)        # RateLimited (kind `login`) before the password
        ok -> await logins.succeeded(name)     # clears the name's count (not the IP's)
        bad -> await logins.failed(name, ip=ip)
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        settings: RateLimitSettings,
        metrics: Metrics | None = None,
        prefix: str = "qs:rl:",
    ) -> None:
        super().__init__(client, metrics=metrics, prefix=prefix)
        self._per_user = settings.login_attempts_per_user
        self._per_ip = settings.login_attempts_per_ip
        self._window_ms = settings.login_window_s * 1000
        self._check = client.register_script(_LOGIN_CHECK)
        self._failed = client.register_script(_LOGIN_FAILED)

    def _keys(self, identifier: str, ip: str | None) -> tuple[list[str], list[int]]:
        keys = [f"{self._prefix}login:user:{_tag(identifier.strip().casefold())}"]
        limits = [self._per_user]
        if ip:
            keys.append(f"{self._prefix}login:ip:{_tag(ip)}")
            limits.append(self._per_ip)
        return keys, limits

    async def check(self, identifier: str, *, ip: str | None) -> None:
        """Raises RateLimited while the name or the IP has too many recent failures;
        RedisUnavailable."""
        keys, limits = self._keys(identifier, ip)
        try:
            wait_ms: Any = await self._check(keys=keys, args=limits)
        except RedisError as exc:
            raise RedisUnavailable("login limit check failed") from exc
        if int(wait_ms) > 0:
            raise self._refuse(LimitKind.LOGIN, int(wait_ms) / 1000)

    async def failed(self, identifier: str, *, ip: str | None) -> None:
        """Count a failed login against the name and the IP. Raises RedisUnavailable."""
        keys, _ = self._keys(identifier, ip)
        try:
            await self._failed(keys=keys, args=[self._window_ms])
        except RedisError as exc:
            raise RedisUnavailable("login limit update failed") from exc

    async def succeeded(self, identifier: str) -> None:
        """Forget the name's failures (the IP's stay counted). Raises RedisUnavailable."""
        keys, _ = self._keys(identifier, None)
        try:
            await self._redis.delete(*keys)
        except RedisError as exc:
            raise RedisUnavailable("login limit reset failed") from exc
