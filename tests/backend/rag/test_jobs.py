from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from backend.errors import RedisUnavailable
from backend.rag.jobs import Job, JobQueue

IDLE_MS = 200  # reclaim threshold of these tests
LONG_MS = 60_000  # a threshold no test reaches


@pytest.fixture
async def queue(redis_client: aioredis.Redis) -> JobQueue:
    jobs = JobQueue(redis_client)
    await jobs.ensure_group()
    return jobs


async def _take(queue: JobQueue, consumer: str, *, idle_ms: int = LONG_MS) -> Job | None:
    return await queue.next(consumer, block_ms=0, reclaim_idle_ms=idle_ms)


async def _go_idle() -> None:
    """Let entries become idle past IDLE_MS."""
    await asyncio.sleep(IDLE_MS * 1.5 / 1000)


async def test_enqueue_next_ack(queue: JobQueue, redis_client: aioredis.Redis) -> None:
    entry_id = await queue.enqueue("doc-1")
    job = await _take(queue, "c1")
    assert job == Job(entry_id=entry_id, document_id="doc-1", deliveries=1)
    assert await queue.pending() == 1
    assert await queue.ack(job) is True
    assert await queue.pending() == 0
    assert await redis_client.xlen(queue.stream) == 0
    assert await queue.ack(job) is False


async def test_next_is_none_when_empty(queue: JobQueue) -> None:
    assert await _take(queue, "c1") is None


async def test_next_blocks_until_an_entry_arrives(
    queue: JobQueue, redis_client: aioredis.Redis
) -> None:
    other = JobQueue(aioredis.Redis(connection_pool=redis_client.connection_pool))
    waiting = asyncio.create_task(queue.next("c1", block_ms=10_000, reclaim_idle_ms=LONG_MS))
    await asyncio.sleep(0.1)
    await other.enqueue("late")
    job = await waiting
    assert job is not None and job.document_id == "late"


async def test_entries_go_out_in_order_once(queue: JobQueue) -> None:
    for name in ("a", "b", "c"):
        await queue.enqueue(name)
    taken = [await _take(queue, consumer) for consumer in ("c1", "c2", "c1")]
    assert [job.document_id for job in taken if job] == ["a", "b", "c"]
    assert await _take(queue, "c2") is None


async def test_jobs_enqueued_before_the_group_exist_are_delivered(
    redis_client: aioredis.Redis,
) -> None:
    queue = JobQueue(redis_client)
    await queue.enqueue("early")
    await queue.ensure_group()
    await queue.ensure_group()  # idempotent
    job = await _take(queue, "c1")
    assert job is not None and job.document_id == "early"


async def test_idle_entry_is_reclaimed_by_another_consumer(queue: JobQueue) -> None:
    await queue.enqueue("doc-1")
    first = await _take(queue, "crashed")
    assert first is not None
    await _go_idle()
    second = await _take(queue, "c2", idle_ms=IDLE_MS)
    assert second == Job(entry_id=first.entry_id, document_id="doc-1", deliveries=2)


async def test_recent_entry_is_not_reclaimed(queue: JobQueue) -> None:
    await queue.enqueue("doc-1")
    assert await _take(queue, "c1") is not None
    assert await _take(queue, "c2") is None


async def test_touch_prevents_reclaim(queue: JobQueue) -> None:
    await queue.enqueue("doc-1")
    job = await _take(queue, "worker")
    assert job is not None
    await asyncio.sleep(0.3)
    assert await queue.touch(job, "worker") is True
    assert await queue.next("thief", block_ms=0, reclaim_idle_ms=250) is None
    await asyncio.sleep(0.3)
    reclaimed = await queue.next("thief", block_ms=0, reclaim_idle_ms=250)
    assert reclaimed is not None and reclaimed.entry_id == job.entry_id


async def test_touch_never_takes_a_job_back(queue: JobQueue) -> None:
    await queue.enqueue("doc-1")
    job = await _take(queue, "slow")
    assert job is not None
    await _go_idle()
    assert await _take(queue, "fast", idle_ms=IDLE_MS) is not None
    assert await queue.touch(job, "slow") is False
    await _go_idle()
    # Still owned by "fast": "fast" can touch it, "slow" could not move it back.
    assert await queue.touch(job, "fast") is True


async def test_touch_of_acked_job_is_false(queue: JobQueue) -> None:
    await queue.enqueue("doc-1")
    job = await _take(queue, "c1")
    assert job is not None
    await queue.ack(job)
    assert await queue.touch(job, "c1") is False


async def test_deliveries_grow_with_each_reclaim(queue: JobQueue) -> None:
    await queue.enqueue("poison")
    seen = []
    for consumer in ("c1", "c2", "c1", "c2"):
        job = await _take(queue, consumer, idle_ms=IDLE_MS)
        assert job is not None
        seen.append(job.deliveries)
        await _go_idle()
    assert seen == [1, 2, 3, 4]
    assert await queue.pending() == 1


async def test_forgive_takes_back_a_delivery(queue: JobQueue) -> None:
    await queue.enqueue("doc-1")
    first = await _take(queue, "c1")
    assert first is not None
    await _go_idle()
    second = await _take(queue, "c2", idle_ms=IDLE_MS)
    assert second is not None and second.deliveries == 2
    assert await queue.forgive(first, "c1") is False  # no longer c1's
    assert await queue.forgive(second, "c2") is True
    assert await _take(queue, "c3", idle_ms=IDLE_MS) is None  # forgiving restarts the idle time
    await _go_idle()
    third = await _take(queue, "c3", idle_ms=IDLE_MS)
    assert third is not None and third.deliveries == 2


async def test_deleted_pending_entry_is_dropped(
    queue: JobQueue, redis_client: aioredis.Redis
) -> None:
    await queue.enqueue("gone")
    await queue.enqueue("kept")
    gone = await _take(queue, "c1")
    kept = await _take(queue, "c1")
    assert gone is not None and kept is not None
    await redis_client.xdel(queue.stream, gone.entry_id)
    await _go_idle()
    reclaimed = await _take(queue, "c2", idle_ms=IDLE_MS)
    assert reclaimed == Job(entry_id=kept.entry_id, document_id="kept", deliveries=2)
    assert await queue.pending() == 1


async def test_malformed_entry_is_dropped(queue: JobQueue, redis_client: aioredis.Redis) -> None:
    await redis_client.xadd(queue.stream, {"something": "else"})
    await queue.enqueue("doc-1")
    assert await _take(queue, "c1") is None
    job = await _take(queue, "c1")
    assert job is not None and job.document_id == "doc-1"
    assert await queue.pending() == 1


async def test_dead_letter_moves_and_acks(queue: JobQueue, redis_client: aioredis.Redis) -> None:
    await queue.enqueue("poison")
    await queue.enqueue("fine")
    job = await _take(queue, "c1")
    assert job is not None
    await queue.dead_letter(job, reason="max_deliveries")
    assert await queue.pending() == 0
    assert await queue.lag() == 1
    assert await redis_client.xlen(queue.stream) == 1
    [letter] = await queue.dead_letters(10)
    assert (letter.document_id, letter.reason, letter.deliveries) == ("poison", "max_deliveries", 1)


async def test_dead_letters_newest_first(queue: JobQueue) -> None:
    for name in ("a", "b", "c"):
        await queue.enqueue(name)
        job = await _take(queue, "c1")
        assert job is not None
        await queue.dead_letter(job, reason="test")
    assert [letter.document_id for letter in await queue.dead_letters(2)] == ["c", "b"]


async def test_pending_and_lag(queue: JobQueue) -> None:
    assert (await queue.pending(), await queue.lag()) == (0, 0)
    for name in ("a", "b", "c"):
        await queue.enqueue(name)
    assert (await queue.pending(), await queue.lag()) == (0, 3)
    job = await _take(queue, "c1")
    assert job is not None
    assert (await queue.pending(), await queue.lag()) == (1, 2)
    await queue.ack(job)
    assert (await queue.pending(), await queue.lag()) == (0, 2)


async def test_document_ids(queue: JobQueue) -> None:
    for name in ("a", "b", "a"):
        await queue.enqueue(name)
    job = await _take(queue, "c1")
    assert job is not None
    assert await queue.document_ids() == {"a", "b"}
    await queue.ack(job)
    assert await queue.document_ids() == {"b", "a"}
    while (job := await _take(queue, "c1")) is not None:
        await queue.ack(job)
    assert await queue.document_ids() == set()


async def test_prune_consumers_keeps_busy_ones(queue: JobQueue) -> None:
    await queue.enqueue("doc-1")
    await queue.enqueue("doc-2")
    assert await _take(queue, "busy") is not None
    done = await _take(queue, "idle")
    assert done is not None
    await queue.ack(done)
    assert await queue.prune_consumers(idle_ms=0) == ["idle"]
    assert await queue.pending() == 1


async def test_lost_group_is_recreated(queue: JobQueue, redis_client: aioredis.Redis) -> None:
    await redis_client.delete(queue.stream)
    with pytest.raises(RedisUnavailable):
        await _take(queue, "c1")
    await queue.enqueue("after")
    job = await _take(queue, "c1")
    assert job is not None and job.document_id == "after"


async def test_works_without_decoded_responses(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.flushdb()
        queue = JobQueue(client)
        await queue.ensure_group()
        await queue.enqueue("bytes")
        job = await _take(queue, "c1")
        assert job is not None and job.document_id == "bytes"
        await asyncio.sleep(0.3)
        again = await queue.next("c2", block_ms=0, reclaim_idle_ms=200)
        assert again is not None and again.deliveries == 2
        await queue.dead_letter(again, reason="r")
        assert (await queue.dead_letters(1))[0].document_id == "bytes"
    finally:
        await client.aclose()


async def test_unreachable_redis_raises_redis_unavailable(tmp_path: Path) -> None:
    client = aioredis.Redis.from_url(f"unix://{tmp_path / 'missing.sock'}")
    try:
        queue = JobQueue(client)
        with pytest.raises(RedisUnavailable):
            await queue.ensure_group()
        with pytest.raises(RedisUnavailable):
            await queue.enqueue("x")
        with pytest.raises(RedisUnavailable):
            await _take(queue, "c1")
    finally:
        await client.aclose()
