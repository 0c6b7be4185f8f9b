"""Multi-turn history per thread, in Redis.

One list per thread (`qs:history:<thread_id>`) of JSON messages `{"role", "content"}`, capped at
`max_messages` and expiring `ttl_s` after the last write. Redis is a cache here: the durable copy of a
thread is in PostgreSQL, and `restore` rebuilds the list from it when a thread is resumed on a replica
whose Redis entry is gone. Safe for concurrent use by several chat_ui processes (each call is one
pipelined MULTI/EXEC).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from backend.errors import RedisUnavailable
from backend.serving.engine import Message

_PREFIX = "qs:history:"


class History:
    def __init__(self, client: aioredis.Redis, *, ttl_s: int, max_messages: int) -> None:
        self._redis = client
        self._ttl_s = ttl_s
        self._max = max_messages

    @staticmethod
    def key(thread_id: str) -> str:
        """The thread's Redis list (for scripts that read it together with other steps)."""
        return _PREFIX + thread_id

    @staticmethod
    def decode(raw: Iterable[bytes | str]) -> list[Message]:
        """The messages of the list's items, as `LRANGE key 0 -1` returns them."""
        messages = []
        for item in raw:
            data = json.loads(item)
            messages.append(Message(role=data["role"], content=data["content"]))
        return messages

    async def load(self, thread_id: str) -> list[Message]:
        """Oldest first. Raises RedisUnavailable."""
        try:
            raw: list[bytes | str] = await self._redis.lrange(self.key(thread_id), 0, -1)  # type: ignore[misc]
        except RedisError as exc:
            raise RedisUnavailable("history read failed") from exc
        return self.decode(raw)

    async def append(self, thread_id: str, *messages: Message) -> None:
        """Append in order, trim to the cap, renew the TTL. Raises RedisUnavailable."""
        await self._push(thread_id, messages, replace=False)

    async def restore(self, thread_id: str, messages: Iterable[Message]) -> None:
        """Replace the thread's history (used on resume). Raises RedisUnavailable."""
        await self._push(thread_id, list(messages), replace=True)

    async def _push(self, thread_id: str, messages: Iterable[Message], *, replace: bool) -> None:
        key = self.key(thread_id)
        encoded = [
            json.dumps({"role": m.role, "content": m.content}, ensure_ascii=False) for m in messages
        ]
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                if replace:
                    pipe.delete(key)
                if encoded:
                    pipe.rpush(key, *encoded)
                pipe.ltrim(key, -self._max, -1)
                pipe.expire(key, self._ttl_s)
                await pipe.execute()
        except RedisError as exc:
            raise RedisUnavailable("history write failed") from exc
