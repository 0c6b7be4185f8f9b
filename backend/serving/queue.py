"""The priority wait queue: requests that find every session slot taken wait here, in Redis.

Order is lower `priority` first (vLLM's convention), then arrival. Only the waiters at the head may
take a slot -- those whose rank is below the number of free slots -- so a newcomer never jumps the
line. Every chat_ui process shares the line through one Redis:

    <prefix>line     ZSET  entry -> priority; entries are "<arrival seq, 16 digits>:<random token>",
                           so equal priorities sort by arrival (Redis orders equal scores by member)
    <prefix>beats    ZSET  entry -> its last heartbeat, unix milliseconds on the Redis clock
    <prefix>seq      arrival counter
    <prefix>turn_s   moving average of turn durations, seconds (for the estimated wait)

A waiter beats on every poll. Entries silent for three heartbeat periods belong to a process that
died; whoever runs a script next drops them, so a crashed waiter never blocks the line. A live
waiter that was dropped anyway (its process stalled that long) takes its old place back.

Waiters poll (every `poll_s`, 0.2 s by default) rather than wait for a pub/sub message on release:
leases also free by expiring, which publishes nothing, so a poll would be needed anyway. One poll is
two small scripts (the waiter's standing, the slots' occupancy) and doubles as the heartbeat; even
at a few hundred waiters that is a few thousand cheap operations a second for Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from backend.errors import QueueFull, QueueTimeout, RedisUnavailable
from backend.serving.slots import Lease, SlotTable

logger = logging.getLogger(__name__)

_STALE_BEATS = 3  # heartbeat periods of silence after which an entry is dropped
_TURN_ALPHA = 0.2  # weight of the newest turn in the moving average

# `now` in Redis milliseconds. KEYS[1]: line, KEYS[2]: beats; ARGV[1]: stale after, milliseconds.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
_PRUNE = """
local cutoff = now - tonumber(ARGV[1])
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', cutoff)
if #stale > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', cutoff)
  for i = 1, #stale, 500 do
    redis.call('ZREM', KEYS[1], unpack(stale, i, math.min(i + 499, #stale)))
  end
end
"""

# KEYS: line, beats, seq. ARGV: stale_ms, max_depth, priority, token.
# Returns {1, entry} or {0, depth} when the line is full.
_ENQUEUE = (
    _NOW
    + _PRUNE
    + """
local depth = redis.call('ZCARD', KEYS[1])
if depth >= tonumber(ARGV[2]) then return {0, depth} end
local entry = string.format('%016d', redis.call('INCR', KEYS[3])) .. ':' .. ARGV[4]
redis.call('ZADD', KEYS[1], ARGV[3], entry)
redis.call('ZADD', KEYS[2], now, entry)
return {1, entry}
"""
)

# KEYS: line, beats, turn_s. ARGV: stale_ms, entry, priority.
# Beats (re-adding the entry if it was dropped), then returns {rank, waiting, turn_s or nil}.
_STANDING = (
    _NOW
    + """
redis.call('ZADD', KEYS[2], now, ARGV[2])
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) then redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2]) end
"""
    + _PRUNE
    + """
return {redis.call('ZRANK', KEYS[1], ARGV[2]), redis.call('ZCARD', KEYS[1]), redis.call('GET', KEYS[3])}
"""
)

# KEYS: line, beats. ARGV: stale_ms. Returns the number of live entries.
_DEPTH = _NOW + _PRUNE + "return redis.call('ZCARD', KEYS[1])\n"

# KEYS: slot expiry, slot owner, line, beats. ARGV: stale_ms, then the slot acquire script's ARGV.
# The way in for a request, in one round trip: renew the session's lease, or -- only when nobody
# waits in line (after dropping dead waiters) -- take a free slot. Reply: {the acquire script's
# reply, requests waiting in line}.
_SEAT = f"""
local function waiting(KEYS, ARGV)
{_DEPTH}
end
local function acquire(KEYS, ARGV)
{SlotTable.ACQUIRE}
end
local args = {{}}
for i = 2, #ARGV do args[i - 1] = ARGV[i] end
local depth = waiting({{KEYS[3], KEYS[4]}}, {{ARGV[1]}})
if depth > 0 then args[4] = '1' end
return {{acquire({{KEYS[1], KEYS[2]}}, args), depth}}
"""

# KEYS: turn_s. ARGV: seconds, alpha.
_RECORD_TURN = """
local average = tonumber(redis.call('GET', KEYS[1]))
local seconds = tonumber(ARGV[1])
if average then seconds = average + tonumber(ARGV[2]) * (seconds - average) end
redis.call('SET', KEYS[1], tostring(seconds))
"""


@dataclass(frozen=True)
class Position:
    """Where a waiting request stands."""

    position: int  # 1-based place in line
    waiting: int  # requests waiting in all
    eta_s: float  # estimated wait, seconds (0.1 s steps); math.inf while no replica is healthy


@dataclass(frozen=True)
class Seated:
    """A request's way through the line: its lease, and how many requests were waiting in line
    when it got it (the queue depth its answer is shaped by)."""

    lease: Lease
    waiting: int


class WaitQueue:
    """A priority line for session slots, shared by every chat_ui process through one Redis.

    `max_depth`: waiting requests beyond which new ones are refused. `heartbeat_s`: a waiter
    proves it is alive at least this often; entries silent for three periods are dropped.
    `poll_s` (at most `heartbeat_s`): how often a waiter checks its place. `default_turn_s`: the
    turn duration assumed until `record_turn` has been called. Methods raise RedisUnavailable when
    Redis cannot be reached.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = "qs:queue:",
        max_depth: int,
        heartbeat_s: float = 2.0,
        poll_s: float = 0.2,
        default_turn_s: float = 10.0,
    ) -> None:
        if not 0 < poll_s <= heartbeat_s:
            raise ValueError("need 0 < poll_s <= heartbeat_s")
        self._redis = client
        self._max_depth = max_depth
        self._poll_s = poll_s
        self._stale_ms = round(_STALE_BEATS * heartbeat_s * 1000)
        self._default_turn_s = default_turn_s
        self._line_keys = [prefix + "line", prefix + "beats"]
        self._seq_key = prefix + "seq"
        self._turn_key = prefix + "turn_s"
        # register_script only hashes the text; scripts load on first use.
        self._enqueue = client.register_script(_ENQUEUE)
        self._standing = client.register_script(_STANDING)
        self._depth = client.register_script(_DEPTH)
        self._record_turn = client.register_script(_RECORD_TURN)
        self._seat = client.register_script(_SEAT)

    async def line(
        self,
        session_id: str,
        *,
        slots: SlotTable,
        replicas: Callable[[], Sequence[str]],
        priority: int,
        budget_s: float,
        seat_first: bool = True,
    ) -> AsyncGenerator[Position | Seated, None]:
        """`wait_for_slot` as a stream: each new Position while waiting, then the Lease with the
        depth of the line (`Seated`). `seat_first` False: the caller has just tried `seat` (in a
        script of its own) and found no slot, so the request joins the line at once. Raises what
        `wait_for_slot` raises; closing the stream leaves the line."""
        if seat_first:
            seated = await self.seat(session_id, slots=slots, replicas=replicas())
            if seated is not None:  # the common case: one round trip, no waiter task
                yield seated
                return
        positions: asyncio.Queue[Position] = asyncio.Queue()

        async def report(position: Position) -> None:
            positions.put_nowait(position)

        waiter = asyncio.create_task(
            self.wait_for_slot(
                session_id, slots=slots, replicas=replicas, priority=priority,
                budget_s=budget_s, on_position=report, seat_first=False,
            )
        )  # fmt: skip
        try:
            while not waiter.done():
                getter = asyncio.create_task(positions.get())
                done, _ = await asyncio.wait({waiter, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                else:
                    getter.cancel()
            yield Seated(waiter.result(), await self.depth())
        finally:
            if not waiter.done():
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter

    async def wait_for_slot(
        self,
        session_id: str,
        *,
        slots: SlotTable,
        replicas: Callable[[], Sequence[str]],
        priority: int,
        budget_s: float,
        on_position: Callable[[Position], Awaitable[None]] | None = None,
        seat_first: bool = True,
    ) -> Lease:
        """Wait in line until `slots` grants the session a lease; the way in for every request.

        A lease alive on a healthy replica is renewed at once, without queueing (the session
        already holds its slot), and with nobody waiting a free slot is taken at once (`seat`,
        one round trip). Otherwise the request joins the line and, on each poll, takes a
        slot if its rank is below the number of free slots on `replicas()` (called on every poll:
        the currently healthy replicas, in order of preference). (Calling `SlotTable.acquire` directly
        while others wait lets a newcomer take a slot the head of the line was due.)

        `seat_first` False skips that first `seat`, for a caller that has just tried it and found
        no slot (`line`, the chat entrance): the request joins the line at once.

        `on_position` is awaited whenever the request is still waiting and its Position differs
        from the one last reported (the first report comes on the first poll that finds no slot).
        The estimated wait is position × the moving average of turn durations (`record_turn`) ÷
        the total slot capacity of the healthy replicas: it assumes slots free up at one per
        average turn per slot.

        Raises QueueFull when `max_depth` requests already wait on entry, QueueTimeout when
        `budget_s` seconds (the event loop's monotonic clock) pass without a slot, and
        RedisUnavailable. Every exit, cancellation included, removes the entry from the line.
        """
        if seat_first:
            seated = await self.seat(session_id, slots=slots, replicas=replicas())
            if seated is not None:
                return seated.lease
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget_s
        priority = int(priority)  # an IntEnum would reach Redis as its name
        entry = await self._join(priority)
        try:
            reported: Position | None = None
            while True:
                healthy = replicas()
                rank, waiting, turn_s = await self._stand(entry, priority)
                occupancy = await slots.occupancy(healthy)
                free = sum(max(0, slots.capacity - count) for count in occupancy.values())
                if rank < free:
                    lease = await slots.acquire(session_id, replicas=healthy)
                    if lease is not None:
                        return lease
                position = _estimate(
                    rank, waiting=waiting, turn_s=turn_s, capacity=slots.capacity * len(occupancy)
                )
                if on_position is not None and position != reported:
                    await on_position(position)
                    reported = position
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise QueueTimeout(budget_s)
                await asyncio.sleep(min(self._poll_s, remaining))
        finally:
            # Shielded so a second cancellation cannot cut the removal short.
            await asyncio.shield(self._leave(entry))

    @property
    def client(self) -> aioredis.Redis:
        """The Redis the line is kept in (scripts that seat together with other steps run there)."""
        return self._redis

    SEAT = _SEAT
    """`seat`'s script (KEYS and ARGV from `seating`; its reply for `seated`), for scripts that
    seat a request together with other steps in one round trip."""

    def seating(
        self, session_id: str, *, slots: SlotTable, replicas: Sequence[str]
    ) -> tuple[list[str], list[str | int]]:
        """KEYS and ARGV of the seat script for `session_id` on `replicas` (at least one)."""
        keys = [*slots.keys, *self._line_keys]
        args = [
            self._stale_ms,
            *slots.acquire_args(session_id, replicas=replicas, renew_only=False),
        ]
        return keys, args

    @staticmethod
    def seated(session_id: str, reply: Any) -> Seated | None:
        """The Seated in a seat script's reply (None: no slot)."""
        acquired, waiting = reply
        lease = SlotTable.lease_from(session_id, acquired)
        return None if lease is None else Seated(lease, int(waiting))

    async def seat(
        self, session_id: str, *, slots: SlotTable, replicas: Sequence[str]
    ) -> Seated | None:
        """Renew the session's lease alive on one of `replicas`, or, when nobody waits in line,
        pin it to the least-loaded of them with a free slot (`SlotTable.acquire`'s rules); None
        otherwise, changing nothing. One script: nobody can join the line in between, so this
        never jumps it; it also counts the line, so the caller needs no `depth` call. Raises
        RedisUnavailable."""
        if not replicas:
            return None
        keys, args = self.seating(session_id, slots=slots, replicas=replicas)
        try:
            reply: Any = await self._seat(keys=keys, args=args)
        except RedisError as exc:
            raise RedisUnavailable("slot acquire failed") from exc
        return self.seated(session_id, reply)

    async def record_turn(self, seconds: float) -> None:
        """Feed one turn's duration (seconds a slot was busy answering) into the wait estimate.

        The estimate is an exponentially weighted moving average (newest turn weighs 0.2), kept in
        Redis so every process shares it.
        """
        if seconds < 0:
            raise ValueError("seconds must not be negative")
        try:
            await self._record_turn(keys=[self._turn_key], args=[seconds, _TURN_ALPHA])
        except RedisError as exc:
            raise RedisUnavailable("queue turn record failed") from exc

    async def depth(self) -> int:
        """Requests waiting now (entries of dead waiters are dropped first)."""
        try:
            return int(await self._depth(keys=self._line_keys, args=[self._stale_ms]))
        except RedisError as exc:
            raise RedisUnavailable("queue depth read failed") from exc

    async def _join(self, priority: int) -> str:
        args: list[str | int] = [self._stale_ms, self._max_depth, priority, secrets.token_hex(8)]
        try:
            reply: Any = await self._enqueue(keys=[*self._line_keys, self._seq_key], args=args)
        except RedisError as exc:
            raise RedisUnavailable("queue join failed") from exc
        joined, value = reply
        if not int(joined):
            raise QueueFull(int(value), self._max_depth)
        return value.decode() if isinstance(value, bytes) else str(value)

    async def _stand(self, entry: str, priority: int) -> tuple[int, int, float]:
        """Heartbeat; returns (0-based rank, waiting, average turn seconds)."""
        keys = [*self._line_keys, self._turn_key]
        try:
            reply: Any = await self._standing(keys=keys, args=[self._stale_ms, entry, priority])
        except RedisError as exc:
            raise RedisUnavailable("queue heartbeat failed") from exc
        rank, waiting, turn_s = reply
        return int(rank), int(waiting), self._default_turn_s if turn_s is None else float(turn_s)

    async def _leave(self, entry: str) -> None:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.zrem(self._line_keys[0], entry)
                pipe.zrem(self._line_keys[1], entry)
                await pipe.execute()
        except RedisError:
            # The entry stops beating, so other waiters drop it within three heartbeats.
            logger.warning("could not leave the wait queue; the entry will go stale", exc_info=True)


def _estimate(rank: int, *, waiting: int, turn_s: float, capacity: int) -> Position:
    position = rank + 1
    eta_s = round(position * turn_s / capacity, 1) if capacity > 0 else math.inf
    return Position(position=position, waiting=waiting, eta_s=eta_s)
