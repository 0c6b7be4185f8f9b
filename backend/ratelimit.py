"""Per-user rate limits in Redis, shared by every chat_ui replica (ARCHITECTURE step 2).

    limiter = RateLimiter(redis, settings=settings.ratelimit, metrics=metrics)
    async with limiter.admit(user, request_id=rid):   # raises RateLimited (the user's message)
        ...answer...
    await limiter.charge(user, prompt_tokens + completion_tokens)   # after it, whatever it cost
    logins = LoginLimiter(redis, settings=settings.ratelimit, metrics=metrics)
    await logins.check(name, ip=ip); ...; await logins.failed(name, ip=ip) / succeeded(name)

Four limits, each one Lua script, atomic on the Redis server, with time read by `TIME` inside the
script (never a caller's clock), so any number of processes share them exactly (`admit` runs the
three chat checks as one script, one round trip before every answer):

    <prefix>bucket:<user>     HASH  tokens, ts      token bucket: `message_burst` deep, refilled at
                                                    `messages_per_minute`; one token per message
    <prefix>tokens:<user>     HASH  tokens, ts      token bucket of model tokens: `token_burst`
                                                    deep, refilled at `tokens_per_minute`; an
                                                    answer is admitted while the level is above
                                                    zero and charged its prompt + completion tokens
                                                    afterwards, so the level may go below zero (an
                                                    answer's cost is known only at its end) and the
                                                    next one waits until it is back above
    <prefix>inflight:<user>   ZSET  request -> expiry ms   answers generating now; a place expires
                                                    `inflight_ttl_s` after its last renewal (renewed
                                                    while held), so a crashed process frees it
    <prefix>login:user:<n>, <prefix>login:ip:<a>  STRING  failed logins in a fixed window

Users and IPs appear in keys only as a SHA-256 prefix. Every key expires on its own once idle
(a bucket once it would be full again). Rejections raise RateLimited (with the seconds until the
limit would pass; kind `messages`, `tokens`, `concurrency` or `login`) and are counted in
`qwen_rate_limited_total{kind}`.

When Redis is down (unreachable, or answering with errors) the limits fail closed for whatever
they admit: `admit` (so `check_message`, `check_tokens`, `answering`) and `LoginLimiter.check`
raise RedisUnavailable, so no message is answered and no password is checked that could not be
counted; chat_ui shows RedisUnavailable's message (会话存储（Redis）暂时不可用，请稍后重试。) and
refuses the login. Failing open would buy nothing here: history, session slots and the queue live
in the same Redis, so an answer could not be served anyway. What runs after admission never fails
an answer already under way: renewing and releasing a concurrent-answer place and charging
an answer's tokens only log the failure (the place then expires by itself; those tokens go
uncharged). `LoginLimiter.failed` / `succeeded` raise RedisUnavailable; the UI ignores it.
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

# KEYS: token bucket. ARGV: rate (tokens per second), burst, charge (0: only look). The level is
# refilled towards `burst`, then the charge taken in full: it may go below zero. Returns {level,
# seconds until the level is back at zero (0 when it is not below)}, as strings.
_TOKENS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst, charge = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local level, ts = tonumber(state[1]), tonumber(state[2])
if level == nil or ts == nil then level, ts = burst, now end
level = math.min(burst, level + math.max(0, now - ts) * rate) - charge
redis.call('HSET', KEYS[1], 'tokens', string.format('%.9f', level),
           'ts', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - level) / rate * 1000) + 1000)
return {string.format('%.6f', level), string.format('%.6f', math.max(0, -level) / rate)}
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

# KEYS: model-token bucket, message bucket, inflight. ARGV: token rate, token burst, message rate,
# message burst, request id, concurrent limit, ttl ms. The three checks of `admit` in its order, in
# one round trip (each script above as a function of its own KEYS and ARGV). Returns {kind,
# retry seconds}: kind '' when admitted, else the limit that refused.
_ADMIT = f"""
local function look(KEYS, ARGV)
{_TOKENS}
end
local function take(KEYS, ARGV)
{_BUCKET}
end
local function enter(KEYS, ARGV)
{_ENTER}
end
local level = look({{KEYS[1]}}, {{ARGV[1], ARGV[2], 0}})
if tonumber(level[1]) <= 0 then return {{'tokens', level[2]}} end
local message = take({{KEYS[2]}}, {{ARGV[3], ARGV[4], 1}})
if message[1] == 0 then return {{'messages', message[2]}} end
if enter({{KEYS[3]}}, {{ARGV[5], ARGV[6], ARGV[7]}}) == 0 then return {{'concurrency', '0'}} end
return {{'', '0'}}
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
    TOKENS = "tokens"
    CONCURRENCY = "concurrency"
    LOGIN = "login"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_s: float  # 0 when allowed


@dataclass(frozen=True)
class Balance:
    """A user's model-token bucket: `level` tokens (below zero after answers that cost more than
    was left) and the seconds until it is back at zero (0 when it is not below)."""

    level: float
    retry_after_s: float

    @property
    def allowed(self) -> bool:
        """Whether an answer may start now."""
        return self.level > 0


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
    """Chat limits of one user: messages per minute and model tokens per minute (token buckets),
    and concurrent answers."""

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
        if settings.tokens_per_minute <= 0 or settings.token_burst < 1:
            raise ValueError("tokens_per_minute must be > 0 and token_burst >= 1")
        if settings.concurrent_answers < 1 or inflight_ttl_s <= 0:
            raise ValueError("concurrent_answers must be >= 1 and inflight_ttl_s > 0")
        super().__init__(client, metrics=metrics, prefix=prefix)
        self._rate = settings.messages_per_minute / 60.0
        self._burst = settings.message_burst
        self._token_rate = settings.tokens_per_minute / 60.0
        self._token_burst = settings.token_burst
        self._concurrent = settings.concurrent_answers
        self._ttl_ms = round(inflight_ttl_s * 1000)
        self._bucket = client.register_script(_BUCKET)
        self._tokens = client.register_script(_TOKENS)
        self._enter = client.register_script(_ENTER)
        self._admit = client.register_script(_ADMIT)

    async def take(self, user: str) -> Decision:
        """Take one message token from the user's bucket. Raises RedisUnavailable."""
        key = self._key("bucket", user)
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

    async def spend(self, user: str, tokens: int) -> Balance:
        """Take `tokens` (0: only look) from the user's model-token bucket, in full, even below
        zero; the balance after. Raises ValueError for a negative count, RedisUnavailable."""
        if tokens < 0:
            raise ValueError("cannot spend a negative number of tokens")
        key = self._key("tokens", user)
        try:
            reply: Any = await self._tokens(
                keys=[key], args=[self._token_rate, self._token_burst, tokens]
            )
        except RedisError as exc:
            raise RedisUnavailable("token limit check failed") from exc
        level, retry = reply
        return Balance(level=float(level), retry_after_s=float(retry))

    async def check_tokens(self, user: str) -> None:
        """Refuse while the user's model-token bucket is not above zero. Raises RateLimited (kind
        `tokens`, retry after the seconds until the level is back at zero), RedisUnavailable."""
        balance = await self.spend(user, 0)
        if not balance.allowed:
            raise self._refuse(LimitKind.TOKENS, balance.retry_after_s)

    async def charge(self, user: str, tokens: int) -> Balance | None:
        """Charge an answer's `tokens` (prompt + completion) to the user's bucket, however far
        below zero that takes it; the balance after. Never fails the answer: a Redis failure is
        logged and None returned (those tokens go uncharged). Raises ValueError for a negative
        count."""
        try:
            return await self.spend(user, tokens)
        except RedisUnavailable as exc:
            logger.warning("%d tokens not charged: %s", tokens, exc.__cause__)
            return None

    @contextlib.asynccontextmanager
    async def answering(self, user: str, *, request_id: str) -> AsyncIterator[None]:
        """Hold one of the user's concurrent-answer places while the body runs, renewing it every
        third of the TTL. Raises RateLimited (kind `concurrency`) when all are held,
        RedisUnavailable. Release failures are only logged: the place expires by itself."""
        key = self._key("inflight", user)
        if not await self._take_place(key, request_id):
            raise self._refuse(LimitKind.CONCURRENCY, CONCURRENCY_RETRY_S)
        async with self._holding(key, request_id):
            yield

    ADMIT = _ADMIT
    """`admit`'s script (KEYS and ARGV from `admission`; its reply for `admitted`), for scripts
    that admit a message together with other steps in one round trip."""

    def admission(self, user: str, *, request_id: str) -> tuple[list[str], list[str | int | float]]:
        """KEYS and ARGV of the admission script for one message of `user`."""
        keys = [self._key(name, user) for name in ("tokens", "bucket", "inflight")]
        args: list[str | int | float] = [self._token_rate, self._token_burst, self._rate, self._burst,
                request_id, self._concurrent, self._ttl_ms]  # fmt: skip
        return keys, args

    @contextlib.asynccontextmanager
    async def admit(self, user: str, *, request_id: str) -> AsyncIterator[None]:
        """One message: the model-token bucket must be above zero (nothing is spent when it is
        not), then a message token from its bucket (spent even when the concurrency cap then
        refuses), then a concurrent-answer place held for the body -- `check_tokens`,
        `check_message` and `answering` in one script, one round trip. The caller charges the
        answer's tokens afterwards (`charge`). Raises RateLimited, RedisUnavailable."""
        keys, args = self.admission(user, request_id=request_id)
        try:
            reply: Any = await self._admit(keys=keys, args=args)
        except RedisError as exc:
            raise RedisUnavailable("rate limit check failed") from exc
        async with self.admitted(user, request_id=request_id, reply=reply):
            yield

    @contextlib.asynccontextmanager
    async def admitted(self, user: str, *, request_id: str, reply: Any) -> AsyncIterator[None]:
        """The body of `admit` once the admission script has replied `reply` (run by the caller,
        maybe inside a script of its own): raises RateLimited for a refusal, else holds the
        concurrent-answer place the script took while the body runs."""
        refused, retry = (part.decode() if isinstance(part, bytes) else str(part) for part in reply)
        if refused:
            kind = LimitKind(refused)
            wait = CONCURRENCY_RETRY_S if kind is LimitKind.CONCURRENCY else float(retry)
            raise self._refuse(kind, wait)
        async with self._holding(self._key("inflight", user), request_id):
            yield

    @contextlib.asynccontextmanager
    async def _holding(self, key: str, request_id: str) -> AsyncIterator[None]:
        """The body runs holding the place taken: renewed every third of the TTL, released after."""
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

    def _key(self, name: str, user: str) -> str:
        return f"{self._prefix}{name}:{_tag(user)}"

    async def in_flight(self, user: str) -> int:
        """The user's live concurrent-answer places (expired ones are not counted)."""
        key = self._key("inflight", user)
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
