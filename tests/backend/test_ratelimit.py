"""Per-user limits on a real Redis: the message bucket (exact across two OS processes), the
model-token bucket, the concurrent-answer cap, the login limiter, what they tell the user and the
metrics, and what they do while Redis is down."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from backend.config import RateLimitSettings
from backend.errors import RateLimited, RedisUnavailable
from backend.metrics import Metrics
from backend.ratelimit import LoginLimiter, RateLimiter, _tag
from tests.fixtures.engines import free_port

REPO = Path(__file__).resolve().parents[2]
LIMITS = RateLimitSettings(
    messages_per_minute=6, message_burst=3, concurrent_answers=2,
    tokens_per_minute=600, token_burst=1000,  # 10 tokens a second
    login_attempts_per_user=3, login_attempts_per_ip=5, login_window_s=900,
)  # fmt: skip


def limiter(client: aioredis.Redis, metrics: Metrics | None = None, **kw: float) -> RateLimiter:
    return RateLimiter(client, settings=LIMITS, metrics=metrics, **kw)


def rejected(metrics: Metrics, kind: str) -> float:
    return metrics.registry.get_sample_value("qwen_rate_limited_total", {"kind": kind}) or 0.0


async def test_burst_then_refused(redis_client: aioredis.Redis) -> None:
    rl = limiter(redis_client)
    decisions = [await rl.take("alice") for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]


async def test_retry_after_is_time_to_next_token(redis_client: aioredis.Redis) -> None:
    rl = limiter(redis_client)
    for _ in range(3):
        await rl.take("alice")
    refused = await rl.take("alice")
    assert 0 < refused.retry_after_s <= 10.0  # 6 per minute: one token every 10 s


async def test_bucket_refills_on_redis_time(redis_client: aioredis.Redis) -> None:
    rl = limiter(redis_client)
    for _ in range(4):
        await rl.take("alice")
    key = f"qs:rl:bucket:{_tag('alice')}"
    ts = float(await redis_client.hget(key, "ts"))
    await redis_client.hset(key, "ts", f"{ts - 20:.6f}")  # as if 20 s had passed: two tokens
    assert [(await rl.take("alice")).allowed for _ in range(3)] == [True, True, False]


async def test_users_have_separate_buckets(redis_client: aioredis.Redis) -> None:
    rl = limiter(redis_client)
    for _ in range(4):
        await rl.take("alice")
    assert (await rl.take("bob")).allowed


async def test_refusal_message_names_seconds(redis_client: aioredis.Redis) -> None:
    metrics = Metrics()
    rl = limiter(redis_client, metrics)
    for _ in range(3):
        await rl.check_message("alice")
    with pytest.raises(RateLimited) as caught:
        await rl.check_message("alice")
    assert caught.value.kind == "messages" and 1 <= caught.value.retry_after_s <= 10
    assert (
        caught.value.user_message.startswith("发送太频繁，请 ")
        and "秒后再试" in caught.value.user_message
    )
    assert rejected(metrics, "messages") == 1


async def test_keys_do_not_name_the_user(redis_client: aioredis.Redis) -> None:
    await limiter(redis_client).take("alice@example.com")
    keys = [k async for k in redis_client.scan_iter("qs:rl:*")]
    assert keys and not any("alice" in k for k in keys)


async def test_bucket_key_expires_when_idle(redis_client: aioredis.Redis) -> None:
    await limiter(redis_client).take("alice")
    ttl_ms = await redis_client.pttl(f"qs:rl:bucket:{_tag('alice')}")
    assert 0 < ttl_ms <= 31_000  # a full refill (3 tokens at one per 10 s) plus a second


_HAMMER = """
import asyncio, sys
import redis.asyncio as aioredis
from backend.config import RateLimitSettings
from backend.ratelimit import RateLimiter

async def main(url, count):
    client = aioredis.from_url(url)
    settings = RateLimitSettings(messages_per_minute=1800, message_burst=10)
    limiter = RateLimiter(client, settings=settings)
    await limiter.take("warm-up")  # loads the script and opens the connection
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    print(sum([(await limiter.take("hammered")).allowed for _ in range(count)]), flush=True)
    await client.aclose()

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def test_two_processes_share_one_bucket_exactly(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    """Two OS processes hammer one user's bucket (30/s, burst 10) as fast as they can: together
    they get burst + rate × elapsed within one. Elapsed runs from the test's own first take to
    the last take of all, both read as the Redis TIME the script stored in the bucket."""
    count, rate, burst = 1500, 30.0, 10
    rl = RateLimiter(
        redis_client, settings=RateLimitSettings(messages_per_minute=rate * 60, message_burst=burst)
    )
    bucket = f"qs:rl:bucket:{_tag('hammered')}"
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _HAMMER, redis_url, str(count), cwd=REPO,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        for _ in range(2)
    ]  # fmt: skip
    try:
        for proc in procs:
            assert proc.stdout is not None and await proc.stdout.readline() == b"ready\n"
        assert (await rl.take("hammered")).allowed  # the bucket starts full, now
        first = float(await redis_client.hget(bucket, "ts"))
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
        allowed = 1 + sum([int((await proc.communicate())[0]) for proc in procs])
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    last = float(await redis_client.hget(bucket, "ts"))
    expected = burst + rate * (last - first)
    assert allowed < 2 * count  # the limit was reached
    assert expected - 1 < allowed <= expected + 1e-6, (allowed, expected)


async def test_concurrency_cap_refuses_third(redis_client: aioredis.Redis) -> None:
    metrics = Metrics()
    rl = limiter(redis_client, metrics)
    async with rl.answering("alice", request_id="a"), rl.answering("alice", request_id="b"):
        with pytest.raises(RateLimited) as caught:
            async with rl.answering("alice", request_id="c"):
                pass
    assert caught.value.kind == "concurrency" and rejected(metrics, "concurrency") == 1


async def test_concurrency_place_freed_on_exit(redis_client: aioredis.Redis) -> None:
    rl = limiter(redis_client)
    with pytest.raises(RuntimeError):
        async with rl.answering("alice", request_id="a"):
            raise RuntimeError("the answer failed")
    assert await rl.in_flight("alice") == 0


async def test_concurrency_is_per_user(redis_client: aioredis.Redis) -> None:
    rl = limiter(redis_client)
    async with (
        rl.answering("alice", request_id="a"),
        rl.answering("alice", request_id="b"),
        rl.answering("bob", request_id="c"),
    ):
        assert await rl.in_flight("bob") == 1


async def test_dead_holder_place_expires(redis_client: aioredis.Redis) -> None:
    """A process that died stops renewing its places; once their expiry passes they are free."""
    rl = limiter(redis_client)
    key = f"qs:rl:inflight:{_tag('alice')}"
    await redis_client.zadd(key, {"crashed-1": 1, "crashed-2": 1})  # expired long ago
    async with rl.answering("alice", request_id="live"):
        assert await rl.in_flight("alice") == 1


async def test_held_place_is_renewed(redis_client: aioredis.Redis) -> None:
    rl = limiter(redis_client, inflight_ttl_s=1.5)
    async with rl.answering("alice", request_id="long"):
        await asyncio.sleep(3.5)  # more than twice the TTL
        assert await rl.in_flight("alice") == 1


async def test_admit_spends_token_and_holds_place(redis_client: aioredis.Redis) -> None:
    rl = limiter(redis_client)
    async with rl.admit("alice", request_id="a"):
        assert await rl.in_flight("alice") == 1
    assert [(await rl.take("alice")).allowed for _ in range(3)] == [True, True, False]


async def test_redis_down_raises_unavailable() -> None:
    client = aioredis.Redis(port=free_port(), socket_connect_timeout=1)
    try:
        with pytest.raises(RedisUnavailable):
            await limiter(client).take("alice")
    finally:
        await client.aclose()


async def test_fresh_token_bucket_is_full(redis_client: aioredis.Redis) -> None:
    balance = await limiter(redis_client).spend("alice", 0)
    assert (balance.level, balance.retry_after_s, balance.allowed) == (1000, 0, True)


async def test_charge_reduces_the_level(redis_client: aioredis.Redis) -> None:
    rl = limiter(redis_client)
    balance = await rl.charge("alice", 300)
    assert balance is not None and balance.level == 700
    await rl.check_tokens("alice")  # still above zero


async def test_charge_may_go_below_zero(redis_client: aioredis.Redis) -> None:
    balance = await limiter(redis_client).charge("alice", 1600)
    assert balance is not None and (balance.level, balance.retry_after_s) == (-600, 60)


async def test_overspent_user_is_refused_until_refilled(redis_client: aioredis.Redis) -> None:
    metrics = Metrics()
    rl = limiter(redis_client, metrics)
    await rl.charge("alice", 1600)  # 600 below zero: a minute at 10 tokens a second
    with pytest.raises(RateLimited) as caught:
        await rl.check_tokens("alice")
    assert caught.value.kind == "tokens" and 50 < caught.value.retry_after_s <= 60
    assert rejected(metrics, "tokens") == 1


async def test_token_bucket_refills_on_redis_time(redis_client: aioredis.Redis) -> None:
    rl = limiter(redis_client)
    await rl.charge("alice", 1600)
    key = f"qs:rl:tokens:{_tag('alice')}"
    ts = float(await redis_client.hget(key, "ts"))
    await redis_client.hset(key, "ts", f"{ts - 59:.6f}")  # as if 59 s had passed: still -10
    with pytest.raises(RateLimited):
        await rl.check_tokens("alice")
    ts = float(await redis_client.hget(key, "ts"))
    await redis_client.hset(key, "ts", f"{ts - 2:.6f}")  # two more seconds: +10 above zero
    await rl.check_tokens("alice")


async def test_refill_stops_at_the_burst(redis_client: aioredis.Redis) -> None:
    rl = limiter(redis_client)
    await rl.charge("alice", 100)
    key = f"qs:rl:tokens:{_tag('alice')}"
    ts = float(await redis_client.hget(key, "ts"))
    await redis_client.hset(key, "ts", f"{ts - 3600:.6f}")  # an hour idle
    assert (await rl.spend("alice", 0)).level == 1000


async def test_admit_refuses_on_tokens_without_spending_a_message(
    redis_client: aioredis.Redis,
) -> None:
    rl = limiter(redis_client)
    await rl.charge("alice", 1200)
    with pytest.raises(RateLimited) as caught:
        async with rl.admit("alice", request_id="a"):
            pass
    assert caught.value.kind == "tokens" and await rl.in_flight("alice") == 0
    assert [(await rl.take("alice")).allowed for _ in range(4)] == [True, True, True, False]


async def test_token_charges_are_per_user(redis_client: aioredis.Redis) -> None:
    rl = limiter(redis_client)
    await rl.charge("alice", 1200)
    await rl.check_tokens("bob")


async def test_token_bucket_expires_once_it_would_be_full(redis_client: aioredis.Redis) -> None:
    await limiter(redis_client).charge("alice", 500)
    ttl_ms = await redis_client.pttl(f"qs:rl:tokens:{_tag('alice')}")
    assert 50_000 < ttl_ms <= 51_000  # 500 tokens at 10 a second, plus a second


async def test_negative_charge_is_refused(redis_client: aioredis.Redis) -> None:
    with pytest.raises(ValueError):
        await limiter(redis_client).charge("alice", -1)


def test_token_limits_must_be_positive(redis_client: aioredis.Redis) -> None:
    with pytest.raises(ValueError):
        RateLimiter(redis_client, settings=LIMITS.model_copy(update={"tokens_per_minute": 0}))


async def test_redis_down_refuses_admission() -> None:
    """Fail closed: nothing is admitted that could not be counted."""
    client = aioredis.Redis(port=free_port(), socket_connect_timeout=1)
    try:
        with pytest.raises(RedisUnavailable):
            async with limiter(client).admit("alice", request_id="a"):
                pass
    finally:
        await client.aclose()


async def test_redis_down_charge_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    """An answer already given is not failed by its charge: the tokens go uncharged, logged."""
    client = aioredis.Redis(port=free_port(), socket_connect_timeout=1)
    try:
        with caplog.at_level(logging.WARNING, logger="backend.ratelimit"):
            assert await limiter(client).charge("alice", 500) is None
    finally:
        await client.aclose()
    assert "500 tokens not charged" in caplog.text


def logins(client: aioredis.Redis, metrics: Metrics | None = None) -> LoginLimiter:
    return LoginLimiter(client, settings=LIMITS, metrics=metrics)


async def test_login_refused_after_failures(redis_client: aioredis.Redis) -> None:
    metrics = Metrics()
    limiter_ = logins(redis_client, metrics)
    for _ in range(3):
        await limiter_.check("alice", ip="10.0.0.1")
        await limiter_.failed("alice", ip="10.0.0.1")
    with pytest.raises(RateLimited) as caught:
        await limiter_.check("alice", ip="10.0.0.2")  # the name is limited from any address
    assert caught.value.kind == "login" and 890 < caught.value.retry_after_s <= 900
    assert "登录" in caught.value.user_message and rejected(metrics, "login") == 1


async def test_login_name_is_case_insensitive(redis_client: aioredis.Redis) -> None:
    limiter_ = logins(redis_client)
    for name in ("Alice", "ALICE", " alice"):
        await limiter_.failed(name, ip=None)
    with pytest.raises(RateLimited):
        await limiter_.check("alice", ip=None)


async def test_login_ip_limit_spans_names(redis_client: aioredis.Redis) -> None:
    limiter_ = logins(redis_client)
    for n in range(5):
        await limiter_.failed(f"user{n}", ip="10.0.0.9")
    with pytest.raises(RateLimited):
        await limiter_.check("someone-else", ip="10.0.0.9")
    await limiter_.check("someone-else", ip="10.0.0.10")


async def test_login_success_clears_name_not_ip(redis_client: aioredis.Redis) -> None:
    limiter_ = logins(redis_client)
    for n in range(5):
        await limiter_.failed("alice" if n < 3 else f"other{n}", ip="10.0.0.1")
    await limiter_.succeeded("alice")
    await limiter_.check("alice", ip="10.0.0.2")
    with pytest.raises(RateLimited):
        await limiter_.check("alice", ip="10.0.0.1")


async def test_metrics_carry_no_user(redis_client: aioredis.Redis) -> None:
    metrics = Metrics()
    rl, limiter_ = limiter(redis_client, metrics), logins(redis_client, metrics)
    with contextlib.suppress(RateLimited):
        for _ in range(4):
            await rl.check_message("alice")
    for _ in range(4):
        await limiter_.failed("alice", ip="10.0.0.1")
    with contextlib.suppress(RateLimited):
        await limiter_.check("alice", ip="10.0.0.1")
    values = {v for m in metrics.registry.collect() for s in m.samples for v in s.labels.values()}
    assert values and not any("alice" in v or "10.0.0.1" in v for v in values)
