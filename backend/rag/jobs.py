"""The ingestion job queue: a Redis stream read by one consumer group.

    <stream>        entries {document_id}; the API appends one per document to index
    <group>         the ingestion consumers; an entry stays pending until acknowledged
    <dead_stream>   entries {document_id, reason, deliveries, entry_id} given up on

Delivery is at least once. A consumer that dies leaves its entries pending; once an entry has been
idle for `reclaim_idle_ms` another consumer (or the same one, restarted) takes it over, and the
entry's delivery count grows by one. A consumer that is still working on an entry `touch`es it
(the heartbeat) so it is not taken over, and `forgive`s a delivery that failed through no fault
of the job (a service outage) so it does not count. Acknowledged entries are deleted from the stream, so the
stream holds only pending and not-yet-delivered entries and stays small. Duplicates are expected
(a reclaim racing a slow consumer, a reconciler's re-enqueue): the store's claim/lease decides who
indexes a document.

Works on Redis 6.2 (XAUTOCLAIM has a two-element reply there and keeps deleted entries in the
pending list: they are acknowledged and skipped). Every method raises RedisUnavailable when Redis
cannot be reached or refuses a command.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from backend.errors import RedisUnavailable

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_RECLAIM_SCAN = 100  # idle entries looked at per `next` call at most (deleted ones are dropped)
_DEAD_MAXLEN = 10_000  # dead letters kept (approximately)

# KEYS: stream. ARGV: group, consumer, min_idle_ms, max_scan.
# Takes over the oldest entry idle for min_idle_ms; returns {id, deliveries, fields} or false.
# JUSTID lists entries even when they were deleted from the stream (6.2 would answer nil without
# their id); those are acknowledged and skipped. The delivery count is then raised by one, as a
# plain XAUTOCLAIM would.
_RECLAIM = """
local stream, group, consumer, min_idle = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local start = '0-0'
for _ = 1, tonumber(ARGV[4]) do
  local reply = redis.call('XAUTOCLAIM', stream, group, consumer, min_idle, start, 'COUNT', 1, 'JUSTID')
  local id = reply[2][1]
  if not id then return false end
  local entry = redis.call('XRANGE', stream, id, id)
  if #entry == 0 then
    redis.call('XACK', stream, group, id)
  else
    local deliveries = redis.call('XPENDING', stream, group, id, id, 1)[1][4] + 1
    redis.call('XCLAIM', stream, group, consumer, 0, id, 'RETRYCOUNT', deliveries, 'JUSTID')
    return {id, deliveries, entry[1][2]}
  end
  start = reply[1]
  if start == '0-0' then return false end
end
return false
"""

# KEYS: stream. ARGV: group, consumer, id[, retry count]. Resets the entry's idle time (and sets
# its delivery count) if `consumer` still owns it, never taking it from a consumer that reclaimed
# it. Returns 1 if done, else 0.
_TOUCH = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #pending == 0 or pending[1][2] ~= ARGV[2] then return 0 end
if ARGV[4] then
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'RETRYCOUNT', ARGV[4], 'JUSTID')
else
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
end
return 1
"""

# KEYS: stream. ARGV: group, id. Returns the number acknowledged (0 or 1).
_ACK = """
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return acked
"""

# KEYS: stream, dead stream. ARGV: group, id, document_id, reason, deliveries, dead maxlen.
_DEAD_LETTER = """
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'document_id', ARGV[3],
  'reason', ARGV[4], 'deliveries', ARGV[5], 'entry_id', ARGV[2])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
"""


@dataclass(frozen=True)
class Job:
    """One delivery of a stream entry: index `document_id`. `deliveries` counts this one."""

    entry_id: str
    document_id: str
    deliveries: int


@dataclass(frozen=True)
class DeadLetter:
    entry_id: str  # the dead-letter stream's own id (its time is when the job was given up)
    document_id: str
    reason: str
    deliveries: int


class JobQueue:
    """The ingestion stream and its consumer group. Safe for concurrent use by many consumers in
    many processes; one instance may serve several consumers of one process."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        stream: str = "qwen:rag:jobs",
        group: str = "rag-workers",
        dead_stream: str = "qwen:rag:dead",
    ) -> None:
        self._redis = redis
        self.stream = self._stream = stream
        self.group = self._group = group
        self._dead_stream = dead_stream
        self._reclaim = redis.register_script(_RECLAIM)
        self._touch = redis.register_script(_TOUCH)
        self._ack = redis.register_script(_ACK)
        self._dead_letter = redis.register_script(_DEAD_LETTER)

    async def ensure_group(self) -> None:
        """Create the stream and the group if missing (idempotent). The group starts at the
        beginning of the stream, so jobs enqueued before any worker ran are delivered too."""
        try:
            await self._redis.xgroup_create(self._stream, self._group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise RedisUnavailable(f"cannot create consumer group: {exc}") from exc
        except RedisError as exc:
            raise RedisUnavailable(f"cannot create consumer group: {exc}") from exc

    async def enqueue(self, document_id: str) -> str:
        """Append a job for `document_id`; returns its entry id."""
        entry_id = await self._call(self._redis.xadd(self._stream, {"document_id": document_id}))
        return _text(entry_id)

    async def next(self, consumer: str, *, block_ms: int, reclaim_idle_ms: int) -> Job | None:
        """The next job for `consumer`: first an entry idle for at least `reclaim_idle_ms` (taken
        over from a consumer presumed dead), else a new entry, waiting up to `block_ms` for one
        (0: do not wait). None when there is nothing to do. Recreates a lost group."""
        args: list[str | int] = [self._group, consumer, reclaim_idle_ms, _RECLAIM_SCAN]
        reply = await self._call(self._reclaim(keys=[self._stream], args=args), on_nogroup=True)
        if reply:
            entry_id, deliveries, fields = reply
            job = await self._job(_text(entry_id), _pairs(fields), int(deliveries))
            if job is not None:
                logger.info("reclaimed job %s (delivery %d)", job.entry_id, job.deliveries)
            return job
        options: dict[str, Any] = {"count": 1}
        if block_ms > 0:
            options["block"] = block_ms
        read = await self._call(
            self._redis.xreadgroup(self._group, consumer, {self._stream: ">"}, **options),
            on_nogroup=True,
        )
        for _stream, entries in read or []:
            for entry_id, fields in entries:
                return await self._job(_text(entry_id), _decoded(fields), 1)
        return None

    async def touch(self, job: Job, consumer: str) -> bool:
        """Reset the idle time of `job`'s entry (heartbeat). False when `consumer` no longer owns
        it: it was acknowledged, or reclaimed by another consumer after a long silence."""
        touched = await self._call(
            self._touch(keys=[self._stream], args=[self._group, consumer, job.entry_id])
        )
        return bool(touched)

    async def forgive(self, job: Job, consumer: str) -> bool:
        """Take back the count of this delivery: the failure was not the job's (a service was
        down), so an outage does not push jobs towards the dead letters. The job stays pending
        and is reclaimed after the reclaim idle time with the same delivery count. False when
        `consumer` no longer owns it."""
        args: list[str | int] = [self._group, consumer, job.entry_id, job.deliveries - 1]
        return bool(await self._call(self._touch(keys=[self._stream], args=args)))

    async def ack(self, job: Job) -> bool:
        """Acknowledge and delete `job`'s entry; False when it was acknowledged already."""
        acked = await self._call(self._ack(keys=[self._stream], args=[self._group, job.entry_id]))
        return bool(acked)

    async def dead_letter(self, job: Job, *, reason: str) -> None:
        """Record `job` in the dead-letter stream and acknowledge it, in one step."""
        args: list[str | int] = [
            self._group,
            job.entry_id,
            job.document_id,
            reason,
            job.deliveries,
            _DEAD_MAXLEN,
        ]
        await self._call(self._dead_letter(keys=[self._stream, self._dead_stream], args=args))
        logger.warning(
            "dead-lettered job %s for document %s after %d deliveries: %s",
            job.entry_id,
            job.document_id,
            job.deliveries,
            reason,
        )

    async def pending(self) -> int:
        """Entries delivered to a consumer and not yet acknowledged."""
        summary = await self._call(self._redis.xpending(self._stream, self._group), on_nogroup=True)
        return int(summary["pending"])

    async def lag(self) -> int:
        """Entries not yet delivered to any consumer.

        Redis 6.2 has no `lag` in XINFO GROUPS; since acknowledged entries are deleted, the stream
        holds exactly the pending and the undelivered entries, so this is XLEN minus pending
        (read atomically). Approximate only if something else deletes or adds stream entries.
        """
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xlen(self._stream)
            pipe.xpending(self._stream, self._group)
            length, summary = await self._call(pipe.execute(), on_nogroup=True)
        return max(0, int(length) - int(summary["pending"]))

    async def document_ids(self) -> set[str]:
        """Documents with an entry in the stream (pending or waiting). Reads the whole stream;
        it is small because acknowledged entries are deleted."""
        found: set[str] = set()
        start = "-"
        while True:
            page = await self._call(self._redis.xrange(self._stream, start, "+", count=1000))
            for entry_id, fields in page:
                document_id = _decoded(fields).get("document_id")
                if document_id:
                    found.add(document_id)
                start = "(" + _text(entry_id)
            if len(page) < 1000:
                return found

    async def dead_letters(self, count: int) -> list[DeadLetter]:
        """The newest `count` dead letters, newest first."""
        entries = await self._call(self._redis.xrevrange(self._dead_stream, count=count))
        letters = []
        for entry_id, raw in entries:
            fields = _decoded(raw)
            letters.append(
                DeadLetter(
                    entry_id=_text(entry_id),
                    document_id=fields.get("document_id", ""),
                    reason=fields.get("reason", ""),
                    deliveries=int(fields.get("deliveries", "0")),
                )
            )
        return letters

    async def prune_consumers(self, *, idle_ms: int) -> list[str]:
        """Remove consumers with nothing pending that have been silent for `idle_ms` (crashed or
        replaced processes leave their names behind). Returns the names removed."""
        consumers = await self._call(
            self._redis.xinfo_consumers(self._stream, self._group), on_nogroup=True
        )
        removed = []
        for consumer in consumers:
            name = _text(consumer["name"])
            if int(consumer["pending"]) == 0 and int(consumer["idle"]) >= idle_ms:
                await self._call(self._redis.xgroup_delconsumer(self._stream, self._group, name))
                removed.append(name)
        return removed

    async def _job(self, entry_id: str, fields: dict[str, str], deliveries: int) -> Job | None:
        """The job of an entry just delivered; an entry without a document id is acknowledged
        and dropped (it could never succeed)."""
        document_id = fields.get("document_id")
        if document_id:
            return Job(entry_id=entry_id, document_id=document_id, deliveries=deliveries)
        logger.error("dropping malformed job %s without a document_id", entry_id)
        await self._call(self._ack(keys=[self._stream], args=[self._group, entry_id]))
        return None

    async def _call(self, operation: Awaitable[_T], *, on_nogroup: bool = False) -> _T:
        """Await a Redis call, mapping failures to RedisUnavailable. With `on_nogroup`, a missing
        stream or group (Redis restarted empty, flushed) is recreated and reported as such."""
        try:
            return await operation
        except ResponseError as exc:
            if on_nogroup and "NOGROUP" in str(exc):
                logger.warning("consumer group %s was missing; recreating it", self._group)
                await self.ensure_group()
            raise RedisUnavailable(f"Redis refused a job-queue command: {exc}") from exc
        except RedisError as exc:
            raise RedisUnavailable(f"Redis unavailable for the job queue: {exc}") from exc


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decoded(fields: dict[Any, Any]) -> dict[str, str]:
    return {_text(key): _text(value) for key, value in fields.items()}


def _pairs(flat: list[Any]) -> dict[str, str]:
    """A Lua reply's flat [field, value, ...] list as a dict."""
    return {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}
