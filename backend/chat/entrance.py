"""The way in for one message, in one Redis round trip: the user's rate limits, the first try for
a session slot and the conversation's history.

    entrance = Entrance(redis, limiter=limiter, queue=queue, slots=slots, history=history)
    async with entrance.enter(user, request_id=rid, thread_id=tid, replicas=healthy) as entry:
        entry.seated    # Seated, or None: no free slot, or others wait -- take the line
        entry.history   # the thread's messages, oldest first
        ...answer...    # the user's concurrent-answer place is held until the block ends

One script runs `RateLimiter.ADMIT`, then (only when admitted) `WaitQueue.SEAT`, then reads the
history list, each as a function of its own KEYS and ARGV, as `WaitQueue.SEAT` runs
`SlotTable.ACQUIRE`. Done one after another they cost three round trips, two of them in sequence;
under a burst each is a lap of the event loop behind every other request's work, which is what
the first token of the last request in the burst waits for (bench/overhead.py). The atomicity is
each step's own: nothing here needs the three to be one transaction.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from backend.chat.history import History
from backend.errors import RedisUnavailable
from backend.ratelimit import RateLimiter
from backend.serving.engine import Message
from backend.serving.queue import Seated, WaitQueue
from backend.serving.slots import SlotTable

# KEYS: the admission script's (none without limits), the seat script's (none without a replica
# to seat on), the history list. ARGV: how many KEYS and ARGV the admission takes, how many KEYS
# the seat takes, then the admission's ARGV, then the seat's. Reply: {verdict} when the admission
# refused, else {verdict, the seat's reply or false, the history list}.
_ENTER = f"""
local function admit(KEYS, ARGV)
{RateLimiter.ADMIT}
end
local function seat(KEYS, ARGV)
{WaitQueue.SEAT}
end
local function slice(list, from, to)
  local part = {{}}
  for i = from, to do part[#part + 1] = list[i] end
  return part
end
local admit_keys, admit_args, seat_keys = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local verdict = {{'', '0'}}
if admit_keys > 0 then
  verdict = admit(slice(KEYS, 1, admit_keys), slice(ARGV, 4, 3 + admit_args))
  if verdict[1] ~= '' then return {{verdict}} end
end
local seated = false
if seat_keys > 0 then
  seated = seat(slice(KEYS, admit_keys + 1, admit_keys + seat_keys), slice(ARGV, 4 + admit_args, #ARGV))
end
return {{verdict, seated, redis.call('LRANGE', KEYS[admit_keys + seat_keys + 1], 0, -1)}}
"""


@dataclass(frozen=True)
class Entry:
    """What a message found on its way in."""

    seated: Seated | None  # None: no replica, no free slot, or others waiting: take the line
    history: list[Message]  # the thread's, oldest first


class Entrance:
    """`RateLimiter.admit`, `WaitQueue.seat` and `History.load` in one script, with the same rules
    and replies as each on its own. `limiter` None: no rate limits. `client` must be the Redis
    all four keep their keys in."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        limiter: RateLimiter | None,
        queue: WaitQueue,
        slots: SlotTable,
        history: History,
    ) -> None:
        self._limiter = limiter
        self._queue = queue
        self._slots = slots
        self._history = history
        self._enter = client.register_script(_ENTER)

    @contextlib.asynccontextmanager
    async def enter(
        self, user: str, *, request_id: str, thread_id: str, replicas: Sequence[str]
    ) -> AsyncIterator[Entry]:
        """Admit one message of `user` (the rate-limit key), try to seat `thread_id` on one of
        `replicas` (the healthy ones, in order of preference) and read its history; the body
        runs holding the user's concurrent-answer place (`RateLimiter.admitted`). Raises
        RateLimited (nothing seated, nothing read), RedisUnavailable."""
        keys: list[str] = []
        args: list[str | int | float] = []
        if self._limiter is not None:
            keys, args = self._limiter.admission(user, request_id=request_id)
        admit_keys, admit_args = len(keys), len(args)
        seat_keys = 0
        if replicas:
            seat_key_list, seat_args = self._queue.seating(
                thread_id, slots=self._slots, replicas=replicas
            )
            keys, args, seat_keys = [*keys, *seat_key_list], [*args, *seat_args], len(seat_key_list)
        keys.append(self._history.key(thread_id))
        try:
            reply: Any = await self._enter(
                keys=keys, args=[admit_keys, admit_args, seat_keys, *args]
            )
        except RedisError as exc:
            raise RedisUnavailable("message entry failed") from exc
        admitted: contextlib.AbstractAsyncContextManager[None] = contextlib.nullcontext()
        if self._limiter is not None:
            admitted = self._limiter.admitted(user, request_id=request_id, reply=reply[0])
        async with admitted:  # raises RateLimited for a refusal: the reply has nothing else
            seated = self._queue.seated(thread_id, reply[1]) if reply[1] is not None else None
            yield Entry(seated, self._history.decode(reply[2]))
