"""PostgreSQL access: the connection pool and versioned migrations.

Migrations are the numbered `*.sql` files in `backend/migrations/`, applied in order, each in its own
transaction, recorded in `schema_migrations`. A transaction-level advisory lock makes concurrent
starters (several chat_ui replicas, the worker) apply them exactly once.
"""

from __future__ import annotations

import logging
from importlib import resources

import psycopg
from psycopg_pool import AsyncConnectionPool

from backend.errors import DatabaseUnavailable

logger = logging.getLogger(__name__)

_MIGRATION_LOCK = 0x7177656E  # "qwen"


def migration_files() -> list[tuple[str, str]]:
    """(version, sql) for every migration shipped with the package, in order."""
    folder = resources.files("backend") / "migrations"
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".sql"))
    return [(name.removesuffix(".sql"), (folder / name).read_text("utf-8")) for name in names]


async def migrate(url: str) -> list[str]:
    """Apply pending migrations; returns the versions applied now. Raises DatabaseUnavailable."""
    applied_now: list[str] = []
    try:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            # Under the lock too: concurrent IF NOT EXISTS creations race on the catalogs.
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                )
            for version, sql in migration_files():
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                    cur = await conn.execute(
                        "SELECT 1 FROM schema_migrations WHERE version = %s", (version,)
                    )
                    if await cur.fetchone():
                        continue
                    await conn.execute(sql.encode())
                    await conn.execute(
                        "INSERT INTO schema_migrations (version) VALUES (%s)", (version,)
                    )
                    applied_now.append(version)
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(
            f"cannot reach PostgreSQL: {exc.sqlstate or 'connect failed'}"
        ) from exc
    if applied_now:
        logger.info("applied migrations %s", ", ".join(applied_now))
    return applied_now


async def open_pool(url: str, *, min_size: int = 1, max_size: int = 10) -> AsyncConnectionPool:
    """An open pool; the caller closes it at shutdown. Raises DatabaseUnavailable."""
    pool = AsyncConnectionPool(
        url, min_size=min_size, max_size=max_size, open=False, kwargs={"autocommit": True}
    )
    try:
        await pool.open(wait=True, timeout=15)
    except Exception as exc:
        await pool.close()
        raise DatabaseUnavailable("cannot open a PostgreSQL connection pool") from exc
    return pool
