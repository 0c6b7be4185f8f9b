"""Entrance in a real Redis: the rate limits, the first try for a slot and the history in one
script, each with the rules it has on its own."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from backend.chat.entrance import Entrance
from backend.chat.history import History
from backend.config import RateLimitSettings
from backend.errors import RateLimited, RedisUnavailable
from backend.ratelimit import RateLimiter
from backend.serving.engine import Message
from backend.serving.queue import Position, WaitQueue
from backend.serving.slots import SlotTable

A, B = "http://a:8000/v1", "http://b:8000/v1"
LIMITS = RateLimitSettings(
    messages_per_minute=6, message_burst=3, concurrent_answers=1,
    tokens_per_minute=600, token_burst=1000,
)  # fmt: skip
PAST = [Message(role="user", content="你好"), Message(role="assistant", content="你好！")]


class Parts:
    def __init__(self, client: aioredis.Redis, *, capacity: int = 1, limits: bool = True) -> None:
        self.limiter = RateLimiter(client, settings=LIMITS) if limits else None
        self.queue = WaitQueue(client, max_depth=10, heartbeat_s=5, poll_s=5)
        self.slots = SlotTable(client, capacity=capacity, ttl_s=120)
        self.history = History(client, ttl_s=600, max_messages=40)
        self.entrance = Entrance(
            client, limiter=self.limiter, queue=self.queue, slots=self.slots, history=self.history
        )


async def test_admits_seats_and_reads_history(redis_client: aioredis.Redis) -> None:
    parts = Parts(redis_client)
    await parts.history.append("t1", *PAST)
    async with parts.entrance.enter("u", request_id="r1", thread_id="t1", replicas=[A]) as entry:
        assert parts.limiter is not None and await parts.limiter.in_flight("u") == 1
        assert entry.seated is not None
        assert (entry.seated.lease.replica, entry.seated.lease.new, entry.seated.waiting) == (
            A, True, 0,
        )  # fmt: skip
        assert entry.history == PAST
    assert await parts.limiter.in_flight("u") == 0  # the place is held only for the body


async def test_returning_session_renewed_on_its_replica(redis_client: aioredis.Redis) -> None:
    parts = Parts(redis_client, capacity=2)
    assert await parts.slots.acquire("t1", replicas=[B]) is not None
    async with parts.entrance.enter("u", request_id="r1", thread_id="t1", replicas=[A, B]) as entry:
        assert entry.seated is not None
        assert (entry.seated.lease.replica, entry.seated.lease.new) == (B, False)
        assert entry.history == []


async def test_refusal_takes_no_slot(redis_client: aioredis.Redis) -> None:
    parts = Parts(redis_client, capacity=2)  # a slot left for the refused request to take
    async with parts.entrance.enter("u", request_id="r1", thread_id="t1", replicas=[A]):
        with pytest.raises(RateLimited) as refused:  # one concurrent answer per user
            async with parts.entrance.enter("u", request_id="r2", thread_id="t2", replicas=[A]):
                pytest.fail("a second concurrent answer was admitted")
    assert refused.value.kind == "concurrency"
    assert await parts.slots.occupancy([A]) == {A: 1}  # t1's only


async def test_full_replica_leaves_the_request_unseated(redis_client: aioredis.Redis) -> None:
    parts = Parts(redis_client)
    assert await parts.slots.acquire("holder", replicas=[A]) is not None
    async with parts.entrance.enter("u", request_id="r1", thread_id="t1", replicas=[A]) as entry:
        assert entry.seated is None
        assert parts.limiter is not None and await parts.limiter.in_flight("u") == 1


async def test_never_jumps_the_line(redis_client: aioredis.Redis) -> None:
    parts = Parts(redis_client)
    assert await parts.slots.acquire("holder", replicas=[A]) is not None
    reported = asyncio.Event()

    async def report(position: Position) -> None:
        reported.set()

    waiter = asyncio.create_task(
        parts.queue.wait_for_slot(
            "waiter", slots=parts.slots, replicas=lambda: [A], priority=0, budget_s=30,
            on_position=report,
        )
    )  # fmt: skip
    try:
        await asyncio.wait_for(reported.wait(), 10)
        await parts.slots.release("holder")  # a free slot, and somebody waiting for it
        async with parts.entrance.enter("u", request_id="r", thread_id="t", replicas=[A]) as entry:
            assert entry.seated is None
    finally:
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)


async def test_without_limits_or_replicas(redis_client: aioredis.Redis) -> None:
    parts = Parts(redis_client, limits=False)
    await parts.history.append("t1", *PAST)
    async with parts.entrance.enter("u", request_id="r1", thread_id="t1", replicas=[]) as entry:
        assert (entry.seated, entry.history) == (None, PAST)
    async with parts.entrance.enter("u", request_id="r2", thread_id="t1", replicas=[A]) as entry:
        assert entry.seated is not None and entry.seated.lease.replica == A


async def test_unreachable_redis_raises(tmp_path: Path) -> None:
    client = aioredis.Redis(unix_socket_path=str(tmp_path / "missing.sock"))
    try:
        with pytest.raises(RedisUnavailable):
            async with Parts(client).entrance.enter(
                "u", request_id="r", thread_id="t", replicas=[A]
            ):
                pytest.fail("entered without Redis")
    finally:
        await client.aclose()
