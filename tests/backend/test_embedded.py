"""Embedded PostgreSQL and Redis: real servers in a state directory shared by this module."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import redis
import redis.asyncio as aioredis
from pydantic import SecretStr

from backend.config import DatabaseSettings, RedisSettings, Settings
from backend.embedded import (
    EmbeddedPostgres,
    EmbeddedRedis,
    EmbeddedServices,
    ServiceURLs,
    database_url_for,
)
from backend.errors import DatabaseUnavailable, RedisUnavailable


@pytest.fixture(scope="module")
def state_dir(service_dirs: Callable[[], Path]) -> Path:
    return service_dirs()


@pytest.fixture
def services(state_dir: Path) -> Iterator[EmbeddedServices]:
    services = EmbeddedServices(Settings(state_dir=state_dir))
    try:
        yield services
    finally:
        services.stop()


def _restart(services: EmbeddedServices, state_dir: Path) -> tuple[EmbeddedServices, ServiceURLs]:
    services.stop()
    again = EmbeddedServices(Settings(state_dir=state_dir))
    return again, again.start()


def test_urls_are_unix_sockets(services: EmbeddedServices) -> None:
    urls = services.start()
    assert (urls.database_url.split(":")[0], urls.redis_url.split(":")[0]) == (
        "postgresql", "unix"
    )  # fmt: skip


def test_vector_extension_exists(services: EmbeddedServices) -> None:
    urls = services.start()
    with psycopg.connect(urls.database_url) as conn:
        row = conn.execute("SELECT extname FROM pg_extension WHERE extname = 'vector'").fetchone()
    assert row == ("vector",)


def test_database_survives_restart(services: EmbeddedServices, state_dir: Path) -> None:
    urls = services.start()
    table = f"t_{uuid.uuid4().hex}"
    with psycopg.connect(urls.database_url) as conn:
        conn.execute(f"CREATE TABLE {table} (v text)")
        conn.execute(f"INSERT INTO {table} VALUES ('kept')")
    again, urls = _restart(services, state_dir)
    try:
        with psycopg.connect(urls.database_url) as conn:
            row = conn.execute(f"SELECT v FROM {table}").fetchone()
    finally:
        again.stop()
    assert row == ("kept",)


def test_redis_survives_restart(services: EmbeddedServices, state_dir: Path) -> None:
    urls = services.start()
    key = f"k-{uuid.uuid4().hex}"
    with redis.Redis.from_url(urls.redis_url) as client:
        client.set(key, "kept")
    again, urls = _restart(services, state_dir)
    try:
        with redis.Redis.from_url(urls.redis_url) as client:
            value = client.get(key)
    finally:
        again.stop()
    assert value == b"kept"


def test_urls_work_from_another_process(services: EmbeddedServices) -> None:
    urls = services.start()
    script = (
        "import sys, psycopg, redis\n"
        "psycopg.connect(sys.argv[1]).execute('SELECT 1')\n"
        "print(redis.Redis.from_url(sys.argv[2]).ping())\n"
    )
    done = subprocess.run([sys.executable, "-c", script, urls.database_url, urls.redis_url],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.stdout.strip() == "True", done.stderr


def test_stop_is_idempotent(services: EmbeddedServices, state_dir: Path) -> None:
    services.start()
    services.stop()
    services.stop()
    assert not (state_dir / "pgdata" / "postmaster.pid").exists()


def test_stop_stops_redis(services: EmbeddedServices, state_dir: Path) -> None:
    services.start()
    services.stop()
    assert not (state_dir / "redis" / "redis.pid").exists()


def _pid(pidfile: Path) -> str | None:
    return pidfile.read_text().split()[0] if pidfile.exists() else None


def test_running_postgres_is_reused(state_dir: Path) -> None:
    pidfile = state_dir / "pgdata" / "postmaster.pid"
    first, second = EmbeddedPostgres(state_dir / "pgdata"), EmbeddedPostgres(state_dir / "pgdata")
    try:
        first.start()
        pid = _pid(pidfile)
        second.start()
        assert _pid(pidfile) == pid
    finally:
        second.stop()
        first.stop()


def test_sharer_leaves_owners_postgres_running(state_dir: Path) -> None:
    pidfile = state_dir / "pgdata" / "postmaster.pid"
    owner, sharer = EmbeddedPostgres(state_dir / "pgdata"), EmbeddedPostgres(state_dir / "pgdata")
    try:
        owner.start()
        sharer.start()
        sharer.stop()
        assert _pid(pidfile) is not None
    finally:
        owner.stop()
    assert _pid(pidfile) is None


def test_orphaned_postgres_is_adopted(state_dir: Path) -> None:
    pidfile = state_dir / "pgdata" / "postmaster.pid"
    orphan, adopter = EmbeddedPostgres(state_dir / "pgdata"), EmbeddedPostgres(state_dir / "pgdata")
    try:
        orphan.start()
        (state_dir / "pgdata" / "qwen-stack.owner").write_text("999999999 crashed-run")
        adopter.start()
        adopter.stop()
        assert _pid(pidfile) is None
    finally:
        orphan.stop()
        adopter.stop()


def test_sharer_leaves_owners_redis_running(state_dir: Path) -> None:
    pidfile = state_dir / "redis" / "redis.pid"
    owner, sharer = EmbeddedRedis(state_dir / "redis"), EmbeddedRedis(state_dir / "redis")
    try:
        owner.start()
        pid = _pid(pidfile)
        sharer.start()
        sharer.stop()
        assert _pid(pidfile) == pid
    finally:
        owner.stop()


def test_foreign_pid_file_is_replaced(state_dir: Path) -> None:
    postgres = EmbeddedPostgres(state_dir / "pgdata")
    postgres.start()
    postgres.stop()
    (state_dir / "pgdata" / "postmaster.pid").write_text(f"{os.getpid()}\n")
    try:
        url = postgres.start()
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        postgres.stop()


def test_given_urls_start_nothing(tmp_path: Path) -> None:
    settings = Settings(
        state_dir=tmp_path,
        database=DatabaseSettings(url=SecretStr("postgresql://db.example/qwen")),
        redis=RedisSettings(url=SecretStr("redis://cache.example:6379/0")),
    )
    with EmbeddedServices(settings) as urls:
        assert (urls, list(tmp_path.iterdir())) == (
            ServiceURLs("postgresql://db.example/qwen", "redis://cache.example:6379/0"), []
        )  # fmt: skip


def test_postgres_failure_is_database_unavailable(tmp_path: Path) -> None:
    (tmp_path / "pgdata").write_text("not a directory")
    with pytest.raises(DatabaseUnavailable), EmbeddedServices(Settings(state_dir=tmp_path)):
        pass


def test_redis_failure_is_redis_unavailable(tmp_path: Path) -> None:
    database = DatabaseSettings(url=SecretStr("postgresql://db.example/qwen"))
    settings = Settings(state_dir=tmp_path, database=database)
    (tmp_path / "redis").write_text("not a directory")
    with pytest.raises(RedisUnavailable), EmbeddedServices(settings):
        pass


def test_database_url_for_keeps_socket_host() -> None:
    url = "postgresql://postgres@/postgres?host=/run/pg&port=5432"
    assert database_url_for(url, "qwen") == "postgresql://postgres@/qwen?host=/run/pg&port=5432"


def test_env_hands_urls_to_children() -> None:
    urls = ServiceURLs("postgresql://a/b", "unix:///r.sock")
    assert urls.env() == {
        "QWEN_DATABASE__URL": "postgresql://a/b", "QWEN_REDIS__URL": "unix:///r.sock"
    }  # fmt: skip


def test_database_fixture_is_empty_with_vector(database: str) -> None:
    with psycopg.connect(database) as conn:
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        vector = conn.execute("SELECT '[1,2]'::vector(2)::text").fetchone()
        assert (tables.fetchone(), vector) == ((0,), ("[1,2]",))


async def test_redis_client_fixture_starts_empty(redis_client: aioredis.Redis) -> None:
    await redis_client.set("left-behind", "1")
    assert await redis_client.dbsize() == 1
