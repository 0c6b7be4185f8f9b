"""History in a real Redis: order, cap, expiry, restore, and a Redis that is not there."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from backend.chat.history import History
from backend.errors import RedisUnavailable
from backend.serving.engine import Message

TTL_S = 60
MAX_MESSAGES = 4


def _turns(count: int) -> list[Message]:
    roles = ("user", "assistant")
    return [Message(role=roles[i % 2], content=f"消息 {i}") for i in range(count)]


@pytest.fixture
def history(redis_client: aioredis.Redis) -> History:
    return History(redis_client, ttl_s=TTL_S, max_messages=MAX_MESSAGES)


@pytest.fixture
async def dead_history(tmp_path: Path) -> AsyncIterator[History]:
    client = aioredis.Redis(unix_socket_path=str(tmp_path / "missing.sock"))
    try:
        yield History(client, ttl_s=TTL_S, max_messages=MAX_MESSAGES)
    finally:
        await client.aclose()


async def test_load_returns_appended_in_order(history: History) -> None:
    first, second, third = _turns(3)
    await history.append("t1", first, second)
    await history.append("t1", third)
    assert await history.load("t1") == [first, second, third]


async def test_unknown_thread_is_empty(history: History) -> None:
    assert await history.load("never-written") == []


async def test_threads_are_separate(history: History) -> None:
    await history.append("t1", *_turns(2))
    assert await history.load("t2") == []


async def test_append_caps_to_newest(history: History) -> None:
    messages = _turns(MAX_MESSAGES + 3)
    await history.append("t1", *messages)
    assert await history.load("t1") == messages[-MAX_MESSAGES:]


async def test_append_sets_ttl(history: History, redis_client: aioredis.Redis) -> None:
    await history.append("t1", *_turns(1))
    [key] = await redis_client.keys("*")
    assert 0 < await redis_client.ttl(key) <= TTL_S


async def test_restore_replaces(history: History) -> None:
    await history.append("t1", *_turns(3))
    restored = [Message(role="user", content="恢复的问题"), Message(role="assistant", content="答")]
    await history.restore("t1", restored)
    assert await history.load("t1") == restored


async def test_restore_caps_to_newest(history: History) -> None:
    messages = _turns(MAX_MESSAGES + 2)
    await history.restore("t1", messages)
    assert await history.load("t1") == messages[-MAX_MESSAGES:]


async def test_restore_empty_clears(history: History) -> None:
    await history.append("t1", *_turns(2))
    await history.restore("t1", [])
    assert await history.load("t1") == []


async def test_dead_redis_load_raises(dead_history: History) -> None:
    with pytest.raises(RedisUnavailable):
        await dead_history.load("t1")


async def test_dead_redis_append_raises(dead_history: History) -> None:
    with pytest.raises(RedisUnavailable):
        await dead_history.append("t1", *_turns(1))
