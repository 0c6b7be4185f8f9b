import asyncio
import itertools
from collections.abc import AsyncGenerator

import pytest

from backend.chat.events import Done, Event, Outcome, Token
from backend.chat.pacing import RAMP_STEPS, _Schedule, paced
from backend.chat.shaping import Tier
from backend.errors import EngineTimeout, TimeoutPhase

INTERVAL = 0.033  # a 30 tokens/s engine
DONE = Done(Outcome.OK, "r0", Tier.NORMAL, None, 10, True)


def _dues(arrivals: list[tuple[str, float, float]], *, max_delay_s: float = 0.1) -> list[float]:
    """Due times for (text, arrived, released) pieces, released in order."""
    schedule = _Schedule(max_delay_s=max_delay_s)
    return [schedule.due(Token(text, arrived=at), released) for text, at, released in arrivals]


def _gaps(times: list[float]) -> list[float]:
    return [round(b - a, 4) for a, b in itertools.pairwise(times)]


def test_the_first_text_is_not_delayed() -> None:
    assert _dues([("西", 1.0, 1.002)]) == [1.002]


def test_a_held_character_gets_its_own_slot() -> None:
    # 一 arrives at token 8 and is held until 面 comes: both are released together
    pieces = [(str(k), k * INTERVAL, k * INTERVAL) for k in range(8)]
    pieces += [("一", 8 * INTERVAL, 9 * INTERVAL), ("面", 9 * INTERVAL, 9 * INTERVAL)]
    pieces += [(str(k), k * INTERVAL, k * INTERVAL) for k in range(10, 14)]
    gaps = _gaps(_dues(pieces))
    assert max(gaps) < 1.5 * INTERVAL  # released unpaced, 一 would have come 2 intervals late
    assert min(gaps) > 0.5 * INTERVAL  # and 一面 together


def test_the_delay_builds_up_in_small_steps() -> None:
    pieces = [(str(k), k * INTERVAL, k * INTERVAL) for k in range(12)]
    gaps = _gaps(_dues(pieces))
    assert max(gaps) == pytest.approx(INTERVAL * (1 + 1 / RAMP_STEPS), abs=1e-4)
    assert gaps[-1] == pytest.approx(INTERVAL)  # steady once built


def test_the_delay_is_capped() -> None:
    slow = 0.5  # a pause-free but slow engine: 2 tokens/s
    pieces = [(str(k), k * slow, k * slow) for k in range(10)]
    dues = _dues(pieces, max_delay_s=0.1)
    assert dues[-1] - pieces[-1][1] == pytest.approx(0.1)


def test_events_keep_their_order_behind_text() -> None:
    schedule = _Schedule(max_delay_s=0.1)
    first = schedule.due(Token("a", arrived=0.0), 0.0)
    second = schedule.due(Token("b", arrived=INTERVAL), INTERVAL)
    assert schedule.due(DONE, INTERVAL) == second > first


async def _events(*items: Event, fail: Exception | None = None) -> AsyncGenerator[Event, None]:
    for item in items:
        await asyncio.sleep(0)
        yield item
    if fail is not None:
        raise fail


async def _all(events: AsyncGenerator[Event, None]) -> list[Event]:
    return [event async for event in events]


async def test_paced_yields_every_event_in_order() -> None:
    now = asyncio.get_running_loop().time
    items: list[Event] = [Token("你", arrived=now()), Token("好", arrived=now()), DONE]
    assert await _all(paced(_events(*items), max_delay_s=0.05)) == items


async def test_paced_raises_after_the_text_before_the_error() -> None:
    error = EngineTimeout(TimeoutPhase.INTER_TOKEN, 5.0)
    seen: list[Event] = []
    with pytest.raises(EngineTimeout):
        async for event in paced(_events(Token("你"), fail=error), max_delay_s=0.05):
            seen.append(event)
    assert seen == [Token("你")]


async def _endless(closed: asyncio.Event) -> AsyncGenerator[Event, None]:
    """A stream that never ends by itself; sets `closed` when it is closed."""
    try:
        while True:
            await asyncio.sleep(0.001)
            yield Token("字")
    finally:
        closed.set()


async def test_closing_paced_closes_the_source() -> None:
    closed = asyncio.Event()
    stream = paced(_endless(closed), max_delay_s=0.05)
    assert isinstance(await anext(stream), Token)
    await stream.aclose()
    assert closed.is_set()


async def test_cancelling_the_consumer_closes_the_source() -> None:
    closed = asyncio.Event()

    async def consume() -> None:
        async for _ in paced(_endless(closed), max_delay_s=0.05):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert closed.is_set()


async def test_zero_delay_passes_through() -> None:
    items: list[Event] = [Token("你"), DONE]
    assert await _all(paced(_events(*items), max_delay_s=0)) == items
