"""Migrations on a fresh database: applied once, idempotent, safe when replicas start together."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import pytest

from backend.db import migrate, migration_files
from backend.errors import DatabaseUnavailable


async def _recorded_versions(url: str) -> list[str]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute("SELECT version FROM schema_migrations ORDER BY version")
        return [row[0] for row in await cur.fetchall()]


SHIPPED = [version for version, _ in migration_files()]


def test_ships_init_migration_first() -> None:
    assert SHIPPED[0] == "0001_init"


def test_migrations_are_numbered_in_order() -> None:
    assert [int(v.split("_")[0]) for v in SHIPPED] == list(range(1, len(SHIPPED) + 1))


async def test_migrate_applies_all(database: str) -> None:
    assert await migrate(database) == SHIPPED


async def test_migrate_records_version(database: str) -> None:
    await migrate(database)
    assert await _recorded_versions(database) == SHIPPED


async def test_migrate_creates_tables(database: str) -> None:
    await migrate(database)
    async with await psycopg.AsyncConnection.connect(database) as conn:
        cur = await conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
        )
        tables = {row[0] for row in await cur.fetchall()}
    assert {"users", "threads", "steps", "feedbacks", "rag_documents", "audit_log"} <= tables


async def test_second_migrate_applies_nothing(database: str) -> None:
    await migrate(database)
    assert await migrate(database) == []


async def test_concurrent_migrates_apply_once(database: str) -> None:
    results = await asyncio.gather(migrate(database), migrate(database))
    assert sorted(results) == [[], SHIPPED]


async def test_concurrent_migrates_record_once(database: str) -> None:
    await asyncio.gather(migrate(database), migrate(database), migrate(database))
    assert await _recorded_versions(database) == SHIPPED


async def test_unreachable_server_raises(tmp_path: Path) -> None:
    with pytest.raises(DatabaseUnavailable):
        await migrate(f"postgresql:///qwen?host={tmp_path}&connect_timeout=2")
