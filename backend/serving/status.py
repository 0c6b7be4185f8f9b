"""Process status shared through Redis: the supervisor writes, the UI reads.

`qwen-stack up` restarts a crashed child (engine, worker) with backoff and records it here, so a
chat_ui process that finds the engine unreachable can tell the user "restarting" rather than "down".
Entries expire, so a dead supervisor leaves no stale "restarting" behind.
"""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

_PREFIX = "qs:status:"


class ProcessState(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    STOPPED = "stopped"


@dataclass(frozen=True)
class ProcessStatus:
    name: str
    state: ProcessState
    restarts: int
    since: float  # unix seconds
    retry_in_s: float = 0.0


class StatusBoard:
    def __init__(self, client: aioredis.Redis, *, ttl_s: int = 300) -> None:
        self._redis = client
        self._ttl_s = ttl_s

    async def publish(self, status: ProcessStatus) -> None:
        payload = json.dumps(
            {
                "state": status.state.value,
                "restarts": status.restarts,
                "since": status.since,
                "retry_in_s": status.retry_in_s,
            }
        )
        await self._redis.set(_PREFIX + status.name, payload, ex=self._ttl_s)

    async def get(self, name: str) -> ProcessStatus | None:
        """None when unknown or when Redis cannot be read (status is advisory)."""
        try:
            raw = await self._redis.get(_PREFIX + name)
        except RedisError:
            return None
        if raw is None:
            return None
        data = json.loads(raw)
        return ProcessStatus(
            name=name,
            state=ProcessState(data["state"]),
            restarts=int(data["restarts"]),
            since=float(data.get("since", time.time())),
            retry_in_s=float(data.get("retry_in_s", 0.0)),
        )
