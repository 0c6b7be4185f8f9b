"""Fixtures of the RAG tests: one RAG service (worker API + consumers, small model) per module on its
own database, and a client that talks to it in-process. Users: root (admin), kbadmin (kb_admin),
alice and bob (user)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import psycopg
import pytest
from psycopg import sql
from pydantic import SecretStr

from backend.auth import Role, UserStore
from backend.config import DatabaseSettings, RagSettings, RedisSettings, Settings
from backend.db import migrate, open_pool
from backend.embedded import ensure_database
from backend.rag.api import create_app
from backend.rag.client import RagClient
from backend.rag.service import RagService

TOKEN = "test-service-token-0123456789abcdef"
USERS = {"root": Role.ADMIN, "kbadmin": Role.KB_ADMIN, "alice": Role.USER, "bob": Role.USER}


@pytest.fixture(scope="module")
def api_database(database_url: str) -> Iterator[str]:
    name = f"test_api_{uuid.uuid4().hex}"
    url = ensure_database(database_url, name)
    yield url
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture(scope="module")
def api_settings(
    api_database: str,
    redis_url: str,
    rag_settings: RagSettings,
    tmp_path_factory: pytest.TempPathFactory,
) -> Settings:
    state = tmp_path_factory.mktemp("rag-api")
    rag = rag_settings.model_copy(
        update={
            "service_token": SecretStr(TOKEN),
            "storage_dir": state / "files",
            "max_file_mb": 1.0,
        }
    )
    return Settings(
        state_dir=state, rag=rag, database=DatabaseSettings(url=api_database),
        redis=RedisSettings(url=redis_url),
    )  # fmt: skip


@pytest.fixture(scope="module")
async def service(api_settings: Settings) -> AsyncIterator[RagService]:
    pool = await open_pool(api_settings.database.url.get_secret_value())  # type: ignore[union-attr]
    try:
        await migrate(api_settings.database.url.get_secret_value())  # type: ignore[union-attr]
        users = UserStore(pool)
        for name, role in USERS.items():
            await users.ensure(name, "password-" + name, role=role)
    finally:
        await pool.close()
    started = await RagService.start(api_settings)
    yield started
    await started.aclose()


@pytest.fixture(scope="module")
async def client(service: RagService) -> AsyncIterator[RagClient]:
    app = create_app(service.settings, service=service)
    rag = RagClient("http://rag", token=TOKEN, transport=httpx.ASGITransport(app=app))
    yield rag
    await rag.aclose()
