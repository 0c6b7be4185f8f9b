"""The backend objects one chat_ui process uses, built at start-up and closed at shutdown.

Chainlit handlers are module-level callbacks, so the running `Runtime` is bound here by the ASGI
app's lifespan (`chat_ui.server`) and looked up by the handlers with `current()`.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis
from psycopg_pool import AsyncConnectionPool

from backend.auth import UserStore
from backend.chat.history import History
from backend.chat.pipeline import ChatPipeline, PipelineConfig
from backend.config import Settings
from backend.db import migrate, open_pool
from backend.errors import ConfigError
from backend.serving.engine import OpenAIEngine
from backend.serving.launcher import engine_base_url
from backend.serving.status import StatusBoard
from chat_ui.data_layer import PostgresDataLayer


@dataclass
class Runtime:
    settings: Settings
    pool: AsyncConnectionPool
    redis: aioredis.Redis
    engine: OpenAIEngine
    users: UserStore
    history: History
    status: StatusBoard
    pipeline: ChatPipeline
    data_layer: PostgresDataLayer

    @classmethod
    async def start(cls, settings: Settings) -> Runtime:
        """Connect to PostgreSQL (migrating it), Redis and the engine. Raises ServiceError."""
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
        engine = OpenAIEngine.from_settings(settings.llm, base_url=engine_base_url(settings))
        users = UserStore(pool)
        history = History(
            redis,
            ttl_s=settings.redis.history_ttl_s,
            max_messages=settings.redis.history_max_messages,
        )
        status = StatusBoard(redis)
        pipeline = ChatPipeline(
            engine=engine,
            history=history,
            status=status,
            config=PipelineConfig(
                system_prompt=settings.llm.system_prompt,
                max_tokens=settings.llm.max_tokens,
                temperature=settings.llm.temperature,
            ),
        )
        return cls(
            settings=settings,
            pool=pool,
            redis=redis,
            engine=engine,
            users=users,
            history=history,
            status=status,
            pipeline=pipeline,
            data_layer=PostgresDataLayer(pool, users),
        )

    async def aclose(self) -> None:
        await self.engine.aclose()
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
