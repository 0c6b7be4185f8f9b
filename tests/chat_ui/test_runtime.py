"""The chat_ui runtime against real PostgreSQL, Redis and the fake engine: how it builds the pool."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pydantic import SecretStr

from backend.config import (
    DatabaseSettings,
    LLMSettings,
    RedisSettings,
    ServingSettings,
    Settings,
)
from chat_ui.runtime import Runtime
from tests.fixtures.engines import FakeEngineHandle, free_port


async def test_discovery_replaces_the_configured_engine_urls(
    database: str, redis_url: str, fake_engine: FakeEngineHandle, tmp_path: Path
) -> None:
    port = int(fake_engine.base_url.removesuffix("/v1").rsplit(":", 1)[1])
    settings = Settings(
        state_dir=tmp_path,
        database=DatabaseSettings(url=SecretStr(database)),
        redis=RedisSettings(url=SecretStr(redis_url)),
        llm=LLMSettings(base_url=f"http://127.0.0.1:{free_port()}/v1"),  # token counts only
        serving=ServingSettings(discover=f"localhost:{port}", health_interval_s=0.05),
    )
    runtime = await Runtime.start(settings)
    try:
        for _ in range(1000):  # the health loop's first round resolves, then probes
            if runtime.engines.available():
                break
            await asyncio.sleep(0.01)
        available = runtime.engines.available()
    finally:
        await runtime.aclose()
    assert available == [fake_engine.base_url]
