"""The engine replicas one chat_ui process talks to: health, load, circuit breakers, failover.

Each replica is an OpenAI-compatible base URL (vLLM, the llama.cpp server, anything). A background
loop probes every replica's `/models` and, where the server exposes them (vLLM), reads
`vllm:num_requests_waiting`, `vllm:num_requests_running` and `vllm:gpu_cache_usage_perc` from
`/metrics` at the server root. A replica is *available* when its last probe succeeded and its
circuit breaker lets requests through.

`start()` opens a stream and returns only once the first token has arrived, trying the replicas in
the caller's order: failover happens before the first token and never after it, so a user never
sees an answer restart on another replica.

The replica set is fixed (`urls`) or discovered (`discovery`, backend/serving/discovery.py): then
every health round first re-resolves it and `set_replicas` applies the answer. A replica that
appears is probed in that round and is available once a probe succeeds. A replica that disappears
is *retired*: it leaves `urls` and `available()` at once, so no new request goes to it, but the
streams already running on it go on to their end; its client is closed when the last of them ends
(or at `aclose()`). With discovery the pool may be empty (before the first resolution, or when no
replica is left): `available()` is then `[]`, as when every replica is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass

import httpx

from backend.config import LLMSettings, ServingSettings
from backend.errors import (
    EngineError,
    EngineRejected,
    EngineTimeout,
    EngineUnavailable,
    TimeoutPhase,
)
from backend.serving.breaker import BreakerState, CircuitBreaker
from backend.serving.discovery import ReplicaDiscovery
from backend.serving.engine import ChatRequest, OpenAIEngine

logger = logging.getLogger(__name__)

_VLLM_GAUGES = {
    "vllm:num_requests_waiting": "waiting",
    "vllm:num_requests_running": "running",
    "vllm:gpu_cache_usage_perc": "kv_cache_usage",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",  # newer vLLM name
}


@dataclass(frozen=True)
class ReplicaLoad:
    """What the engine says about itself; None where it does not say (llama.cpp)."""

    waiting: float | None = None
    running: float | None = None
    kv_cache_usage: float | None = None  # 0..1


@dataclass(frozen=True)
class Started:
    """A stream whose first token has arrived."""

    replica: str
    first: str
    rest: AsyncGenerator[str, None]


class _Replica:
    def __init__(
        self, url: str, engine: OpenAIEngine, breaker: CircuitBreaker, *, healthy: bool
    ) -> None:
        self.url = url
        self.engine = engine
        self.breaker = breaker
        self.healthy = healthy
        self.load = ReplicaLoad()
        self.in_flight = 0  # streams and warm-ups using `engine` now
        self.retired = False  # no longer in the pool; `engine` closes when in_flight reaches 0


def parse_vllm_metrics(text: str) -> ReplicaLoad:
    """Sum the vLLM gauges we route on over all label sets of a Prometheus text page."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        field = _VLLM_GAUGES.get(name)
        if field is None:
            continue
        with contextlib.suppress(ValueError, IndexError):
            value = float(line.rsplit(" ", 1)[1])
            values[field] = values.get(field, 0.0) + value
    return ReplicaLoad(**values)


class EnginePool:
    """Replicas by base URL. Build at start-up, `run_health_checks()` as a task, `aclose()` at end.

    `urls` are the replicas to start with (healthy until a probe says otherwise); without
    `discovery` they are the pool for good and must not be empty. With `discovery` the pool may
    start empty and follows what it resolves to (see the module docstring).
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        llm: LLMSettings,
        serving: ServingSettings,
        clock: Callable[[], float] = time.monotonic,
        discovery: ReplicaDiscovery | None = None,
    ) -> None:
        if not urls and discovery is None:
            raise ValueError("an engine pool needs at least one replica URL or a discovery")
        self._llm = llm
        self._serving = serving
        self._clock = clock
        self._discovery = discovery
        self._replicas = {
            url: self._new_replica(url, healthy=True)  # optimistic until the first probe
            for url in dict.fromkeys(u.rstrip("/") for u in urls)
        }
        self._retiring: dict[str, _Replica] = {}  # retired, with streams still running
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(3.0), trust_env=False)

    def _new_replica(self, url: str, *, healthy: bool) -> _Replica:
        serving = self._serving
        return _Replica(
            url,
            OpenAIEngine.from_settings(
                self._llm, base_url=url, send_priority=serving.priority_scheduling
            ),
            CircuitBreaker(
                failures=serving.breaker_failures,
                reset_s=serving.breaker_reset_s,
                clock=self._clock,
            ),
            healthy=healthy,
        )

    @property
    def urls(self) -> list[str]:
        """The replicas in the pool (retired ones excluded), in configuration order."""
        return list(self._replicas)

    @property
    def retiring(self) -> list[str]:
        """Retired replicas whose streams are still running (their clients are still open)."""
        return list(self._retiring)

    def available(self) -> list[str]:
        """Healthy replicas whose breaker is not open, in configuration order (discovered
        replicas: sorted by address). Empty when none is, or the pool is empty."""
        return [
            r.url
            for r in self._replicas.values()
            if r.healthy and r.breaker.state is not BreakerState.OPEN
        ]

    def load(self, url: str) -> ReplicaLoad:
        return self._replicas[url].load

    def breaker_state(self, url: str) -> BreakerState:
        return self._replicas[url].breaker.state

    def pressure(self) -> ReplicaLoad:
        """The busiest signals across available replicas (None where no replica reports)."""
        loads = [self._replicas[u].load for u in self.available()]
        waiting = [x.waiting for x in loads if x.waiting is not None]
        kv = [x.kv_cache_usage for x in loads if x.kv_cache_usage is not None]
        return ReplicaLoad(
            waiting=sum(waiting) if waiting else None,
            kv_cache_usage=max(kv) if kv else None,
        )

    async def set_replicas(self, urls: Sequence[str]) -> None:
        """Make `urls` the pool, in that order. New replicas are unavailable until a probe
        succeeds (`probe`); replicas not in `urls` are retired (see the module docstring); a
        retired replica that comes back is taken back with its breaker and running streams."""
        wanted = list(dict.fromkeys(u.rstrip("/") for u in urls))
        previous = self._replicas
        replicas: dict[str, _Replica] = {}
        for url in wanted:
            replica = previous.get(url) or self._retiring.pop(url, None)
            if replica is None:
                replica = self._new_replica(url, healthy=False)
                logger.info("engine %s joined the pool", url)
            elif replica.retired:
                replica.retired, replica.healthy = False, False
                logger.info("engine %s rejoined the pool", url)
            replicas[url] = replica
        self._replicas = replicas
        for url, replica in previous.items():
            if url in replicas:
                continue
            replica.retired = True
            logger.info(
                "engine %s left the pool (%d stream(s) still running on it)", url, replica.in_flight
            )
            if replica.in_flight:
                self._retiring[url] = replica
            else:
                await replica.engine.aclose()

    async def rediscover(self) -> None:
        """Resolve the discovery now and apply its answer (`set_replicas`); no-op without one."""
        if self._discovery is not None:
            await self.set_replicas(await self._discovery.replicas())

    async def probe(self, url: str) -> bool:
        """Probe one replica now; updates its health and load. Never raises (False for a URL
        not in the pool)."""
        replica = self._replicas.get(url)
        if replica is None:
            return False
        try:
            response = await self._http.get(url + "/models")
            healthy = response.status_code == 200
        except httpx.HTTPError:
            healthy = False
        if healthy != replica.healthy:
            logger.warning("engine %s is now %s", url, "healthy" if healthy else "unhealthy")
        replica.healthy = healthy
        if healthy:
            replica.load = await self._read_metrics(url)
        return healthy

    async def _read_metrics(self, url: str) -> ReplicaLoad:
        root = url.removesuffix("/v1")
        try:
            response = await self._http.get(root + "/metrics")
        except httpx.HTTPError:
            return ReplicaLoad()
        if response.status_code != 200 or "vllm:" not in response.text:
            return ReplicaLoad()
        return parse_vllm_metrics(response.text)

    async def run_health_checks(self) -> None:
        """Every `health_interval_s` until cancelled: re-resolve the replicas (with discovery),
        then probe every one."""
        while True:
            await self.rediscover()
            await asyncio.gather(*(self.probe(url) for url in list(self._replicas)))
            await asyncio.sleep(self._serving.health_interval_s)

    async def start(self, request: ChatRequest, *, order: Sequence[str]) -> Started:
        """Stream `request` from the first replica in `order` that produces a first token.

        Replicas whose breaker is open are skipped. Connection failures, 5xx, and connect or
        first-token timeouts move on to the next replica; a 4xx (the request itself is bad) does
        not. Raises the last EngineError when no replica produced a first token.
        """
        last: EngineError = EngineUnavailable("no engine replica is available")
        for url in order:
            replica = self._replicas.get(url)
            if replica is None or not replica.breaker.allow():
                continue
            replica.in_flight += 1
            stream = replica.engine.stream(request)
            try:
                first = await anext(stream)
            except StopAsyncIteration:
                replica.breaker.record_success()
                await self._release(replica)
                return Started(replica=url, first="", rest=_empty())
            except EngineRejected:
                replica.breaker.record_success()  # the replica is fine; the request is not
                await self._release(replica)
                raise
            except (EngineUnavailable, EngineTimeout) as exc:
                await self._finish(replica, stream)
                if isinstance(exc, EngineTimeout) and exc.phase not in (
                    TimeoutPhase.CONNECT,
                    TimeoutPhase.FIRST_TOKEN,
                ):
                    raise
                replica.breaker.record_failure()
                logger.warning("engine %s failed before the first token; trying the next", url)
                last = exc
                continue
            except BaseException:
                await self._finish(replica, stream)
                raise
            rest = self._tracked(replica, stream)
            # Run it up to its try block, so that closing it, even before its first delta is
            # read, closes the engine stream and releases the replica.
            await anext(rest)
            return Started(replica=url, first=first, rest=rest)
        raise last

    async def _tracked(
        self, replica: _Replica, stream: AsyncGenerator[str, None]
    ) -> AsyncGenerator[str, None]:
        """The rest of a stream, primed by `start` (its first item is ""); its outcome feeds the
        replica's breaker, its end releases the replica."""
        try:
            yield ""
            async for delta in stream:
                yield delta
        except (EngineUnavailable, EngineTimeout):
            replica.breaker.record_failure()
            raise
        finally:
            await self._finish(replica, stream)
        replica.breaker.record_success()

    async def _finish(self, replica: _Replica, stream: AsyncGenerator[str, None]) -> None:
        """Close an engine stream of `replica`, then release the replica."""
        try:
            await stream.aclose()
        finally:
            await self._release(replica)

    async def _release(self, replica: _Replica) -> None:
        """One use of `replica` ended; the last use of a retired replica closes its client."""
        replica.in_flight -= 1
        if replica.in_flight == 0 and self._retiring.get(replica.url) is replica:
            del self._retiring[replica.url]
            await replica.engine.aclose()

    async def warm_up(self, url: str, request: ChatRequest) -> None:
        """Prefill `request` (max_tokens 1) on `url` so its prefix cache holds it. Never raises."""
        replica = self._replicas.get(url)
        if replica is None:
            return
        replica.in_flight += 1
        try:
            with contextlib.suppress(EngineError):
                async with contextlib.aclosing(replica.engine.stream(request)) as stream:
                    async for _ in stream:
                        pass
        finally:
            await self._release(replica)

    async def aclose(self) -> None:
        """Close every client, those of retired replicas with streams still running included."""
        await self._http.aclose()
        replicas = [*self._replicas.values(), *self._retiring.values()]
        self._retiring.clear()
        for replica in replicas:
            await replica.engine.aclose()


async def _empty() -> AsyncGenerator[str, None]:
    return
    yield  # pragma: no cover - makes this an async generator
