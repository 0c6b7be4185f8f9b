"""Even pacing of an answer on screen: the guard's hold-back without the stutter.

The answer guard (`StreamGuard`) holds back a character that could begin a lexicon word until
the next delta decides it, so that character and the next reach the screen together, one token
interval late: a gap twice as long as the others, then two characters at once. `paced` plays
the text out a little behind the engine instead: each piece is shown at the time it arrived
from the engine (`Token.arrived`) plus a playout delay, and a held piece, released one interval
late, lands on its own slot. The delay is the stream's own token interval (an average of the
gaps between arrivals, capped by `max_delay_s`), reached step by step over the first tokens so
that no gap grows by more than an eighth of an interval while it builds; the first text is never
delayed. Only the spacing changes: events keep their order, and nothing is shown before the
guard released it.

Cost: at most one token interval (`max_delay_s`) more until the last character; time to first
token is unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from backend.chat.events import Event, Token

RAMP_STEPS = 8  # tokens over which the playout delay grows to one interval
SMOOTHING = 0.2  # weight of the newest gap in the running interval
LONGEST_GAP_S = 0.5  # gaps above this (a pause, not the token pace) do not set the interval


@dataclass(frozen=True)
class _End:
    error: Exception | None


class _Schedule:
    """When each event is due on screen. Not thread-safe: one per answer."""

    def __init__(self, *, max_delay_s: float) -> None:
        self._max_delay_s = max_delay_s
        self._interval: float | None = None
        self._last_arrival: float | None = None
        self._delay = 0.0
        self._due = -float("inf")

    def due(self, event: Event | _End, now: float) -> float:
        if isinstance(event, Token) and event.text:
            arrived = now if event.arrived is None else event.arrived
            if self._last_arrival is not None:
                gap = arrived - self._last_arrival
                if 0 < gap <= LONGEST_GAP_S:
                    self._interval = (
                        gap
                        if self._interval is None
                        else (1 - SMOOTHING) * self._interval + SMOOTHING * gap
                    )
                if self._interval is not None:
                    target = min(self._interval, self._max_delay_s)
                    self._delay = min(target, self._delay + target / RAMP_STEPS)
                self._due = max(self._due, arrived + self._delay)
            else:
                self._due = max(self._due, now)  # the first text: at once
            last = self._last_arrival
            self._last_arrival = arrived if last is None else max(arrived, last)
        return self._due


async def paced(
    events: AsyncGenerator[Event, None],
    *,
    max_delay_s: float,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncGenerator[Event, None]:
    """`events` in order, each `Token` held until its due time (see the module docstring);
    `max_delay_s` 0 passes them through untouched. `events` is read by a task of its own, so
    arrivals are timed while earlier text waits. Raises what `events` raises, after the events
    before it. Closing this generator (or cancelling its reader) cancels that task, which closes
    `events` -- and with it the upstream request."""
    if max_delay_s <= 0:
        async with contextlib.aclosing(events):
            async for event in events:
                yield event
        return
    buffer: deque[tuple[float, Event | _End]] = deque()
    arrived = asyncio.Event()
    schedule = _Schedule(max_delay_s=max_delay_s)

    async def read() -> None:
        error: Exception | None = None
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    buffer.append((schedule.due(event, clock()), event))
                    arrived.set()
        except Exception as exc:  # handed over, raised in order by the consumer
            error = exc
        finally:  # cancelled too: the consumer must not wait for more
            buffer.append((-float("inf"), _End(error)))
            arrived.set()

    reader = asyncio.create_task(read())
    try:
        while True:
            if not buffer:
                arrived.clear()
                await arrived.wait()
                continue
            due, item = buffer[0]
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                return
            if (wait := due - clock()) > 0:
                await asyncio.sleep(wait)
            buffer.popleft()
            yield item
    finally:
        reader.cancel()
        await asyncio.wait({reader})  # lets `events` close; never raises
