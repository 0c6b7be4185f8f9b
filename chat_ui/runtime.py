"""The backend objects one chat_ui process uses, built at start-up and closed at shutdown.

Chainlit handlers are module-level callbacks, so the running `Runtime` is bound here by the ASGI
app's lifespan (`chat_ui.server`) and looked up by the handlers with `current()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncGenerator
from contextvars import ContextVar
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from psycopg_pool import AsyncConnectionPool

from backend.audit import AuditLog
from backend.auth import UserStore
from backend.chat.canary import canary_for
from backend.chat.history import History
from backend.chat.pipeline import ChatPipeline, PipelineConfig
from backend.chat.sentiment import SentimentProbe
from backend.chat.shaping import Shaper
from backend.config import Settings
from backend.db import migrate, open_pool
from backend.errors import ConfigError
from backend.guard import LexiconStore, builtin_lexicon_dir, jieba_segmenter
from backend.metrics import Metrics
from backend.rag.client import RagClient
from backend.ratelimit import LoginLimiter, RateLimiter
from backend.serving.discovery import ReplicaDiscovery
from backend.serving.engine import ChatRequest
from backend.serving.launcher import engine_urls
from backend.serving.pool import EnginePool
from backend.serving.queue import WaitQueue
from backend.serving.slots import SlotTable
from backend.serving.status import StatusBoard
from backend.serving.tokenizer import EngineTokenizer
from chat_ui.data_layer import PostgresDataLayer
from chat_ui.drain import Drain

SENTIMENT_TIMEOUT_S = 10.0

# The client address of the HTTP request being served (set by chat_ui.server's middleware), for
# the per-IP login limit: Chainlit's password callback does not get the request.
client_ip: ContextVar[str | None] = ContextVar("client_ip", default=None)


class PoolEngine:
    """The `Engine` interface over the pool: the first available replica that answers."""

    def __init__(self, pool: EnginePool) -> None:
        self._pool = pool

    async def stream(self, request: ChatRequest) -> AsyncGenerator[str, None]:
        started = await self._pool.start(request, order=self._pool.available())
        async with contextlib.aclosing(started.rest) as rest:
            if started.first:
                yield started.first
            async for delta in rest:
                yield delta


@dataclass
class Runtime:
    settings: Settings
    pool: AsyncConnectionPool
    redis: aioredis.Redis
    engines: EnginePool
    users: UserStore
    history: History
    status: StatusBoard
    pipeline: ChatPipeline
    slots: SlotTable  # the pipeline's, read for the slot gauges at each scrape
    data_layer: PostgresDataLayer
    tokenizer: EngineTokenizer
    metrics: Metrics
    rag: RagClient
    logins: LoginLimiter
    drain: Drain = field(default_factory=Drain)  # answers in flight; refuses new ones on SIGTERM
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    async def start(cls, settings: Settings) -> Runtime:
        """Connect to PostgreSQL (migrating it), Redis and the engines. Raises ServiceError."""
        if settings.database.url is None or settings.redis.url is None:
            raise ConfigError(
                "chat_ui needs QWEN_DATABASE__URL and QWEN_REDIS__URL (`qwen-stack up` sets both)"
            )
        database_url = settings.database.url.get_secret_value()
        await migrate(database_url)
        pool = await open_pool(database_url)
        redis = aioredis.from_url(
            settings.redis.url.get_secret_value(), socket_connect_timeout=3, socket_timeout=5
        )
        serving = settings.serving
        urls = engine_urls(settings)
        # With discovery the pool starts empty and fills on the health loop's first round; token
        # counts still go to the configured URL (any replica counts the same).
        engines = EnginePool(
            [] if serving.discover else urls,
            llm=settings.llm,
            serving=serving,
            discovery=ReplicaDiscovery(serving.discover) if serving.discover else None,
        )
        tokenizer = EngineTokenizer(
            urls[0], model=settings.llm.model, api_key=settings.llm.api_key.get_secret_value()
        )
        history = History(
            redis,
            ttl_s=settings.redis.history_ttl_s,
            max_messages=settings.redis.history_max_messages,
        )
        status = StatusBoard(redis)
        probe = (
            SentimentProbe(PoolEngine(engines), timeout_s=SENTIMENT_TIMEOUT_S)
            if serving.sentiment
            else None
        )
        metrics = Metrics()
        rag = RagClient(
            settings.rag.worker_url, token=settings.rag.service_token.get_secret_value()
        )
        guard = LexiconStore(
            settings.guard.lexicon_dir or builtin_lexicon_dir(),
            segmenter=jieba_segmenter(cache_dir=settings.state_dir / "jieba"),
            check_interval_s=math.inf,  # reloaded by `watch` below, off the event loop
        )
        slots = SlotTable(redis, capacity=serving.slots_per_replica, ttl_s=serving.lease_ttl_s)
        pipeline = ChatPipeline(
            audit=AuditLog(
                pool,
                hmac_key=settings.audit.hmac_key,
                jsonl_path=settings.audit.jsonl_path,
                metrics=metrics,
            ),
            limiter=RateLimiter(redis, settings=settings.ratelimit, metrics=metrics),
            retriever=rag,
            metrics=metrics,
            guard=guard,
            pool=engines,
            slots=slots,
            queue=WaitQueue(redis, max_depth=serving.queue_max_depth),
            shaper=Shaper(
                tokenizer=tokenizer,
                context_window=settings.engine.n_ctx,
                max_tokens=settings.llm.max_tokens,
            ),
            history=history,
            status=status,
            sentiment=probe,
            tokenizer=tokenizer,
            config=PipelineConfig(
                system_prompt=settings.llm.system_prompt,
                slots_per_replica=serving.slots_per_replica,
                queue_wait_budget_s=serving.queue_wait_budget_s,
                warmup=serving.warmup,
                engine_processes=tuple(serving.engine_processes),
                top_k=settings.rag.top_k,
                canary=canary_for(settings.audit.hmac_key.get_secret_value()),
                stream_batch_chars=settings.guard.stream_batch_chars,
                stream_max_delay_s=settings.guard.stream_max_delay_ms / 1000,
                link_hosts=tuple(settings.guard.link_hosts),
            ),
        )
        users = UserStore(pool)
        runtime = cls(
            settings=settings, pool=pool, redis=redis, engines=engines, users=users,
            history=history, status=status, pipeline=pipeline, slots=slots,
            data_layer=PostgresDataLayer(pool, users), tokenizer=tokenizer, metrics=metrics,
            rag=rag, logins=LoginLimiter(redis, settings=settings.ratelimit, metrics=metrics),
        )  # fmt: skip
        runtime._tasks.append(asyncio.create_task(engines.run_health_checks()))
        runtime._tasks.append(asyncio.create_task(guard.watch(settings.guard.reload_interval_s)))
        return runtime

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.pipeline.aclose()
        await self.engines.aclose()
        await self.tokenizer.aclose()
        await self.rag.aclose()
        await self.redis.aclose()
        await self.pool.close()


_current: Runtime | None = None


def bind(runtime: Runtime | None) -> None:
    global _current
    _current = runtime


def current() -> Runtime:
    if _current is None:
        raise RuntimeError("chat_ui runtime is not started")
    return _current
