"""StatusBoard in a real Redis: round trip, expiry, unknown names, an unreachable Redis."""

from __future__ import annotations

from pathlib import Path

import redis.asyncio as aioredis

from backend.serving.status import ProcessState, ProcessStatus, StatusBoard

TTL_S = 30
RESTARTING = ProcessStatus(
    name="engine", state=ProcessState.RESTARTING, restarts=3, since=1_700_000_000.25,
    retry_in_s=4.0,
)  # fmt: skip


async def test_get_returns_published(redis_client: aioredis.Redis) -> None:
    board = StatusBoard(redis_client, ttl_s=TTL_S)
    await board.publish(RESTARTING)
    assert await board.get("engine") == RESTARTING


async def test_publish_replaces(redis_client: aioredis.Redis) -> None:
    board = StatusBoard(redis_client, ttl_s=TTL_S)
    await board.publish(RESTARTING)
    running = ProcessStatus(name="engine", state=ProcessState.RUNNING, restarts=4, since=1.0)
    await board.publish(running)
    assert await board.get("engine") == running


async def test_publish_sets_ttl(redis_client: aioredis.Redis) -> None:
    await StatusBoard(redis_client, ttl_s=TTL_S).publish(RESTARTING)
    [key] = await redis_client.keys("*")
    assert 0 < await redis_client.ttl(key) <= TTL_S


async def test_unknown_name_is_none(redis_client: aioredis.Redis) -> None:
    assert await StatusBoard(redis_client).get("nobody") is None


async def test_unreachable_redis_reads_none(tmp_path: Path) -> None:
    client = aioredis.Redis(unix_socket_path=str(tmp_path / "missing.sock"))
    try:
        assert await StatusBoard(client).get("engine") is None
    finally:
        await client.aclose()
