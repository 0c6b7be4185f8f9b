"""SlotTable in a real Redis: renewal, least-loaded pinning, capacity, failover, expiry, and two OS
processes racing for the same slots."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from backend.errors import RedisUnavailable
from backend.metrics import Metrics
from backend.serving.slots import SlotTable

A, B = "http://a:8000/v1", "http://b:8000/v1"
TTL_S = 120


def table(client: aioredis.Redis, *, capacity: int = 2, ttl_s: int = TTL_S) -> SlotTable:
    return SlotTable(client, capacity=capacity, ttl_s=ttl_s)


async def test_first_acquire_pins_new(redis_client: aioredis.Redis) -> None:
    lease = await table(redis_client).acquire("s1", replicas=[A, B])
    assert lease is not None
    assert (lease.session_id, lease.replica, lease.new) == ("s1", A, True)


async def test_returning_session_renews_same_replica(redis_client: aioredis.Redis) -> None:
    slots = table(redis_client)
    first = await slots.acquire("s1", replicas=[B, A])
    again = await slots.acquire("s1", replicas=[A, B])
    assert first is not None and again is not None
    assert (again.replica, again.new) == (first.replica, False)


async def test_renewal_restarts_ttl(redis_client: aioredis.Redis) -> None:
    slots = table(redis_client)
    first = await slots.acquire("s1", replicas=[A])
    await asyncio.sleep(0.05)
    again = await slots.acquire("s1", replicas=[A])
    assert first is not None and again is not None
    assert again.expires_at > first.expires_at


async def test_expiry_is_ttl_after_redis_time(redis_client: aioredis.Redis) -> None:
    seconds, _micros = await redis_client.time()
    lease = await table(redis_client).acquire("s1", replicas=[A])
    assert lease is not None
    assert seconds + TTL_S <= lease.expires_at < seconds + TTL_S + 5


async def test_returning_session_renews_at_capacity(redis_client: aioredis.Redis) -> None:
    slots = table(redis_client, capacity=1)
    await slots.acquire("s1", replicas=[A])
    again = await slots.acquire("s1", replicas=[A])
    assert again is not None and again.new is False


async def test_new_session_goes_to_least_loaded(redis_client: aioredis.Redis) -> None:
    slots = table(redis_client, capacity=3)
    await slots.acquire("s1", replicas=[A, B])
    lease = await slots.acquire("s2", replicas=[A, B])
    assert lease is not None and lease.replica == B


async def test_tie_goes_to_first_listed(redis_client: aioredis.Redis) -> None:
    slots = table(redis_client, capacity=3)
    await slots.acquire("s1", replicas=[A])
    await slots.acquire("s2", replicas=[B])
    lease = await slots.acquire("s3", replicas=[B, A])
    assert lease is not None and lease.replica == B


async def test_full_returns_none(redis_client: aioredis.Redis) -> None:
    slots = table(redis_client, capacity=1)
    await slots.acquire("s1", replicas=[A, B])
    await slots.acquire("s2", replicas=[A, B])
    assert await slots.acquire("s3", replicas=[A, B]) is None


async def test_no_replicas_returns_none(redis_client: aioredis.Redis) -> None:
    assert await table(redis_client).acquire("s1", replicas=[]) is None


async def test_unhealthy_replica_session_moves(redis_client: aioredis.Redis) -> None:
    slots = table(redis_client)
    await slots.acquire("s1", replicas=[A, B])
    moved = await slots.acquire("s1", replicas=[B])
    assert moved is not None and (moved.replica, moved.new) == (B, True)


async def test_moved_session_frees_old_slot(redis_client: aioredis.Redis) -> None:
    slots = table(redis_client)
    await slots.acquire("s1", replicas=[A, B])
    await slots.acquire("s1", replicas=[B])
    assert await slots.occupancy([A, B]) == {A: 0, B: 1}


async def test_failed_move_keeps_old_lease(redis_client: aioredis.Redis) -> None:
    slots = table(redis_client, capacity=1)
    await slots.acquire("s1", replicas=[A])
    await slots.acquire("s2", replicas=[B])
    assert await slots.acquire("s1", replicas=[B]) is None
    assert await slots.occupancy([A, B]) == {A: 1, B: 1}


async def test_renew_never_pins(redis_client: aioredis.Redis) -> None:
    slots = table(redis_client)
    assert await slots.renew("s1", replicas=[A]) is None
    assert await slots.occupancy([A]) == {A: 0}


async def test_renew_keeps_live_lease(redis_client: aioredis.Redis) -> None:
    slots = table(redis_client)
    await slots.acquire("s1", replicas=[A])
    lease = await slots.renew("s1", replicas=[A, B])
    assert lease is not None and (lease.replica, lease.new) == (A, False)


async def test_release_frees_slot(redis_client: aioredis.Redis) -> None:
    slots = table(redis_client, capacity=1)
    await slots.acquire("s1", replicas=[A])
    await slots.release("s1")
    lease = await slots.acquire("s2", replicas=[A])
    assert lease is not None and lease.replica == A


async def test_slot_gauge_follows_acquire_and_release(redis_client: aioredis.Redis) -> None:
    """As chat_ui's /metrics sets it: read from Redis at scrape, so a lease taken by another
    process (another table on the same Redis) shows too."""
    slots, other, metrics = table(redis_client), table(redis_client), Metrics()

    async def scrape() -> dict[str, float | None]:
        metrics.set_slots(await slots.occupancy([A, B]), capacity={A: 2, B: 0})
        get = metrics.registry.get_sample_value
        return {replica: get("qwen_slots_in_use", {"replica": replica}) for replica in (A, B)}

    await slots.acquire("s1", replicas=[A])
    await other.acquire("s2", replicas=[A])
    assert await scrape() == {A: 2, B: 0}
    await other.release("s1")
    assert await scrape() == {A: 1, B: 0}
    assert metrics.registry.get_sample_value("qwen_slots_capacity", {"replica": B}) == 0


async def test_slot_gauge_is_emptied_when_unreadable() -> None:
    metrics = Metrics()
    metrics.set_slots({A: 1}, capacity={A: 2})
    metrics.set_slots(None, capacity={A: 2})
    assert metrics.registry.get_sample_value("qwen_slots_in_use", {"replica": A}) is None
    assert metrics.registry.get_sample_value("qwen_slots_capacity", {"replica": A}) == 2


async def test_occupancy_counts_per_replica(redis_client: aioredis.Redis) -> None:
    slots = table(redis_client, capacity=3)
    for session in ("s1", "s2", "s3"):
        await slots.acquire(session, replicas=[A, B])
    assert await slots.occupancy([A, B, "http://c:8000/v1"]) == {A: 2, B: 1, "http://c:8000/v1": 0}


async def test_expiry_frees_capacity(redis_client: aioredis.Redis) -> None:
    slots = table(redis_client, capacity=1, ttl_s=1)
    await slots.acquire("s1", replicas=[A])
    assert await slots.acquire("s2", replicas=[A]) is None
    lease = None
    for _ in range(100):  # the lease lives 1 s; poll for up to ~10 s
        await asyncio.sleep(0.1)
        lease = await slots.acquire("s2", replicas=[A])
        if lease is not None:
            break
    assert lease is not None and lease.new


async def test_keys_expire_with_their_leases(redis_client: aioredis.Redis) -> None:
    await table(redis_client).acquire("s1", replicas=[A])
    ttls = [await redis_client.pttl(key) for key in await redis_client.keys("qs:slots:*")]
    assert len(ttls) == 2 and all(0 < ttl <= TTL_S * 1000 for ttl in ttls)


async def test_unreachable_redis_raises(tmp_path: Path) -> None:
    client = aioredis.Redis(unix_socket_path=str(tmp_path / "missing.sock"))
    try:
        with pytest.raises(RedisUnavailable):
            await table(client).acquire("s1", replicas=[A])
    finally:
        await client.aclose()


# Each worker process: connect, say "ready", wait for the go signal, then fire ATTEMPTS acquires of
# distinct sessions at once and print the granted ones as JSON.
WORKER = """
import asyncio, json, sys
import redis.asyncio as aioredis
from backend.serving.slots import SlotTable

async def main(url, name, capacity, attempts):
    client = aioredis.Redis.from_url(url, decode_responses=True)
    slots = SlotTable(client, capacity=capacity, ttl_s=120)
    await client.ping()
    print("ready", flush=True)
    await client.blpop(["race:go"], timeout=30)
    leases = await asyncio.gather(
        *(slots.acquire(f"{name}-{i}", replicas=sys.argv[5:]) for i in range(attempts))
    )
    print(json.dumps([lease.session_id for lease in leases if lease is not None]), flush=True)
    await client.aclose()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
"""
RACE_CAPACITY = 3
ATTEMPTS = 60


async def run_race(redis_url: str, redis_client: aioredis.Redis) -> list[str]:
    argv = [str(RACE_CAPACITY), str(ATTEMPTS), A, B]
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", WORKER, redis_url, name, *argv, stdout=asyncio.subprocess.PIPE
        )
        for name in ("p1", "p2")
    ]
    try:
        for worker in workers:
            assert worker.stdout is not None
            assert (await worker.stdout.readline()).strip() == b"ready"
        await redis_client.rpush("race:go", "go", "go")  # type: ignore[misc]
        granted: list[str] = []
        for worker in workers:
            out, _ = await worker.communicate()
            assert worker.returncode == 0
            granted += json.loads(out)
        return granted
    finally:
        for worker in workers:
            if worker.returncode is None:
                worker.kill()
                await worker.wait()


async def test_two_processes_get_exactly_capacity(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    granted = await run_race(redis_url, redis_client)
    assert len(granted) == 2 * RACE_CAPACITY


async def test_two_processes_fill_every_replica_exactly(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    await run_race(redis_url, redis_client)
    occupancy = await SlotTable(redis_client, capacity=RACE_CAPACITY, ttl_s=TTL_S).occupancy([A, B])
    assert occupancy == {A: RACE_CAPACITY, B: RACE_CAPACITY}


async def test_two_processes_race_for_last_slot(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    slots = SlotTable(redis_client, capacity=RACE_CAPACITY, ttl_s=TTL_S)
    for i in range(2 * RACE_CAPACITY - 1):
        assert await slots.acquire(f"held-{i}", replicas=[A, B]) is not None
    granted = await run_race(redis_url, redis_client)
    assert len(granted) == 1
