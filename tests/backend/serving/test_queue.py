"""WaitQueue in a real Redis: order by priority then arrival, live positions, the wait estimate,
budget and depth limits, cancellation, and a waiter whose process was killed."""

from __future__ import annotations

import asyncio
import itertools
import math
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from backend.errors import QueueFull, QueueTimeout, RedisUnavailable
from backend.serving.queue import Position, WaitQueue
from backend.serving.slots import Lease, SlotTable

A = "http://a:8000/v1"
BUDGET_S = 30.0
Spawn = Callable[[Coroutine[Any, Any, Lease]], "asyncio.Task[Lease]"]


class Recorder:
    """An `on_position` callback that keeps every report and can wait for one."""

    def __init__(self) -> None:
        self.positions: list[Position] = []
        self._changed = asyncio.Event()

    async def __call__(self, position: Position) -> None:
        self.positions.append(position)
        self._changed.set()

    async def until(self, predicate: Callable[[Position], bool]) -> None:
        async with asyncio.timeout(10):
            while not (self.positions and predicate(self.positions[-1])):
                self._changed.clear()
                await self._changed.wait()

    def places(self) -> list[int]:
        """Reported positions, consecutive repeats collapsed."""
        return [place for place, _ in itertools.groupby(p.position for p in self.positions)]


@pytest_asyncio.fixture
async def spawn() -> AsyncIterator[Spawn]:
    """Run waiters as tasks; any still running are cancelled after the test."""
    tasks: list[asyncio.Task[Lease]] = []

    def start(waiter: Coroutine[Any, Any, Lease]) -> asyncio.Task[Lease]:
        tasks.append(asyncio.create_task(waiter))
        return tasks[-1]

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def line(client: aioredis.Redis, *, max_depth: int = 10) -> WaitQueue:
    return WaitQueue(client, max_depth=max_depth, heartbeat_s=0.2, poll_s=0.05)


async def full_table(client: aioredis.Redis, *, capacity: int = 1) -> SlotTable:
    """One replica, every slot held by sessions `holder-<i>`."""
    slots = SlotTable(client, capacity=capacity, ttl_s=120)
    for i in range(capacity):
        assert await slots.acquire(f"holder-{i}", replicas=[A]) is not None
    return slots


def wait(
    queue: WaitQueue,
    session_id: str,
    slots: SlotTable,
    *,
    priority: int = 0,
    budget_s: float = BUDGET_S,
    on_position: Recorder | None = None,
) -> Coroutine[Any, Any, Lease]:
    return queue.wait_for_slot(
        session_id, slots=slots, replicas=lambda: [A], priority=priority, budget_s=budget_s,
        on_position=on_position,
    )  # fmt: skip


async def test_free_slot_granted_at_once(redis_client: aioredis.Redis) -> None:
    recorder = Recorder()
    slots = SlotTable(redis_client, capacity=1, ttl_s=120)
    lease = await wait(line(redis_client), "s1", slots, on_position=recorder)
    assert (lease.replica, lease.new, recorder.positions) == (A, True, [])


async def test_without_seat_first_a_free_slot_is_taken_on_the_first_poll(
    redis_client: aioredis.Redis,
) -> None:
    recorder = Recorder()
    slots = SlotTable(redis_client, capacity=1, ttl_s=120)
    lease = await line(redis_client).wait_for_slot(
        "s1", slots=slots, replicas=lambda: [A], priority=0, budget_s=BUDGET_S,
        on_position=recorder, seat_first=False,
    )  # fmt: skip
    assert (lease.replica, lease.new, recorder.positions) == (A, True, [])


async def test_live_lease_skips_line(redis_client: aioredis.Redis, spawn: Spawn) -> None:
    queue, slots = line(redis_client), await full_table(redis_client)
    recorder = Recorder()
    spawn(wait(queue, "waiter", slots, on_position=recorder))
    await recorder.until(lambda p: p.position == 1)
    lease = await wait(queue, "holder-0", slots, priority=9)
    assert lease.new is False


async def serve_three(client: aioredis.Redis, spawn: Spawn) -> tuple[list[str], Recorder]:
    """Three waiters join (priorities 5, 0, 3) behind a full table; each grant is released in
    turn. Returns the order of grants and the reports of the first to join."""
    queue, slots = line(client), await full_table(client)
    first = Recorder()
    tasks = [spawn(wait(queue, "p5", slots, priority=5, on_position=first))]
    await first.until(lambda p: p.position == 1)
    for name, priority, first_at in (("p0", 0, 2), ("p3", 3, 3)):
        tasks.append(spawn(wait(queue, name, slots, priority=priority)))
        await first.until(lambda p, at=first_at: p.position == at)  # type: ignore[misc]
    order: list[str] = []
    holder, pending = "holder-0", set(tasks)
    for first_next in (2, 1, None):
        await slots.release(holder)
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        holder = done.pop().result().session_id
        order.append(holder)
        if first_next is not None:
            await first.until(lambda p, at=first_next: p.position == at)  # type: ignore[misc]
    return order, first


async def test_lower_priority_value_served_first(
    redis_client: aioredis.Redis, spawn: Spawn
) -> None:
    order, _ = await serve_three(redis_client, spawn)
    assert order == ["p0", "p3", "p5"]


async def test_positions_reported_live(redis_client: aioredis.Redis, spawn: Spawn) -> None:
    _, first = await serve_three(redis_client, spawn)
    assert first.places() == [1, 2, 3, 2, 1]


async def test_equal_priority_served_in_arrival_order(
    redis_client: aioredis.Redis, spawn: Spawn
) -> None:
    queue, slots = line(redis_client), await full_table(redis_client)
    early, late = Recorder(), Recorder()
    first = spawn(wait(queue, "early", slots, on_position=early))
    await early.until(lambda p: p.waiting == 1)
    spawn(wait(queue, "late", slots, on_position=late))
    await late.until(lambda p: p.waiting == 2)
    await slots.release("holder-0")
    assert (await first).session_id == "early"


async def test_newcomer_does_not_jump_line(redis_client: aioredis.Redis, spawn: Spawn) -> None:
    queue, slots = line(redis_client), await full_table(redis_client)
    recorder = Recorder()
    waiter = spawn(wait(queue, "waiter", slots, on_position=recorder))
    await recorder.until(lambda p: p.position == 1)
    await slots.release("holder-0")
    with pytest.raises(QueueTimeout):
        await wait(queue, "newcomer", slots, budget_s=0.5)
    assert (await waiter).session_id == "waiter"


async def test_seat_takes_a_free_slot_when_nobody_waits(redis_client: aioredis.Redis) -> None:
    slots = SlotTable(redis_client, capacity=1, ttl_s=120)
    seated = await line(redis_client).seat("s1", slots=slots, replicas=[A])
    assert seated is not None
    assert (seated.lease.replica, seated.lease.new, seated.waiting) == (A, True, 0)


async def test_seat_renews_and_counts_the_line(redis_client: aioredis.Redis, spawn: Spawn) -> None:
    queue, slots, recorder = line(redis_client), await full_table(redis_client), Recorder()
    spawn(wait(queue, "waiter", slots, on_position=recorder))
    await recorder.until(lambda p: p.position == 1)
    seated = await queue.seat("holder-0", slots=slots, replicas=[A])  # holds its slot: renewed
    assert seated is not None
    assert (seated.lease.session_id, seated.lease.new, seated.waiting) == ("holder-0", False, 1)


async def test_seat_leaves_a_free_slot_to_the_line(
    redis_client: aioredis.Redis, spawn: Spawn
) -> None:
    # the waiter polls once, then sleeps 5 s: it is still in line when the slots free up
    queue = WaitQueue(redis_client, max_depth=10, heartbeat_s=5, poll_s=5)
    slots, recorder = await full_table(redis_client, capacity=2), Recorder()
    spawn(wait(queue, "waiter", slots, on_position=recorder))
    await recorder.until(lambda p: p.position == 1)
    await slots.release("holder-0")
    await slots.release("holder-1")  # two free, one waiter: the newcomer still may not take one
    assert await queue.seat("newcomer", slots=slots, replicas=[A]) is None


async def test_eta_from_turn_average(redis_client: aioredis.Redis, spawn: Spawn) -> None:
    queue, slots = line(redis_client), await full_table(redis_client, capacity=2)
    await queue.record_turn(10.0)
    await queue.record_turn(20.0)  # moving average: 10 + 0.2 * (20 - 10) = 12
    recorder = Recorder()
    spawn(wait(queue, "s1", slots, on_position=recorder))
    await recorder.until(lambda p: True)
    assert recorder.positions[0] == Position(position=1, waiting=1, eta_s=6.0)  # 1 × 12 ÷ 2


async def test_eta_infinite_without_replicas(redis_client: aioredis.Redis, spawn: Spawn) -> None:
    queue, slots = line(redis_client), SlotTable(redis_client, capacity=1, ttl_s=120)
    recorder = Recorder()
    spawn(
        queue.wait_for_slot(
            "s1", slots=slots, replicas=list, priority=0, budget_s=BUDGET_S, on_position=recorder
        )
    )
    await recorder.until(lambda p: True)
    assert math.isinf(recorder.positions[0].eta_s)


async def test_budget_raises_timeout(redis_client: aioredis.Redis) -> None:
    queue, slots = line(redis_client), await full_table(redis_client)
    with pytest.raises(QueueTimeout):
        await wait(queue, "s1", slots, budget_s=0.2)


async def test_timeout_leaves_no_entry(redis_client: aioredis.Redis) -> None:
    queue, slots = line(redis_client), await full_table(redis_client)
    with pytest.raises(QueueTimeout):
        await wait(queue, "s1", slots, budget_s=0.2)
    assert await queue.depth() == 0


async def test_max_depth_raises_full(redis_client: aioredis.Redis, spawn: Spawn) -> None:
    queue, slots = line(redis_client, max_depth=1), await full_table(redis_client)
    recorder = Recorder()
    spawn(wait(queue, "s1", slots, on_position=recorder))
    await recorder.until(lambda p: True)
    with pytest.raises(QueueFull):
        await wait(queue, "s2", slots)


async def test_full_leaves_no_entry(redis_client: aioredis.Redis, spawn: Spawn) -> None:
    queue, slots = line(redis_client, max_depth=1), await full_table(redis_client)
    recorder = Recorder()
    spawn(wait(queue, "s1", slots, on_position=recorder))
    await recorder.until(lambda p: True)
    with pytest.raises(QueueFull):
        await wait(queue, "s2", slots)
    assert await queue.depth() == 1


async def test_cancel_removes_entry(redis_client: aioredis.Redis, spawn: Spawn) -> None:
    queue, slots = line(redis_client), await full_table(redis_client)
    recorder = Recorder()
    waiter = spawn(wait(queue, "s1", slots, on_position=recorder))
    await recorder.until(lambda p: True)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert await queue.depth() == 0


# A waiter in its own process: joins the line at priority 0, prints its first position, waits.
WAITER = """
import asyncio, sys
import redis.asyncio as aioredis
from backend.serving.queue import WaitQueue
from backend.serving.slots import SlotTable

async def main(url, replica):
    client = aioredis.Redis.from_url(url)
    queue = WaitQueue(client, max_depth=10, heartbeat_s=0.2, poll_s=0.05)
    async def report(position):
        print(position.position, flush=True)
    await queue.wait_for_slot(
        "killed", slots=SlotTable(client, capacity=1, ttl_s=120), replicas=lambda: [replica],
        priority=0, budget_s=60, on_position=report,
    )

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_killed_waiter_is_skipped(redis_url: str, redis_client: aioredis.Redis) -> None:
    queue, slots = line(redis_client), await full_table(redis_client)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WAITER, redis_url, A, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        assert (await process.stdout.readline()).strip() == b"1"
    finally:
        process.kill()
        await process.wait()
    await slots.release("holder-0")
    lease = await wait(queue, "alive", slots, priority=5, budget_s=10)
    assert lease.session_id == "alive"


async def test_unreachable_redis_raises(tmp_path: Path) -> None:
    client = aioredis.Redis(unix_socket_path=str(tmp_path / "missing.sock"))
    try:
        with pytest.raises(RedisUnavailable):
            await line(client).depth()
    finally:
        await client.aclose()
