"""Embedded PostgreSQL 16 + pgvector from pgserver's binaries."""

from __future__ import annotations

import importlib
import logging
import os
import pwd
import shlex
import stat
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
from psycopg import sql

from backend.embedded.process import (
    POLL_S,
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    Owner,
    live_pid,
    socket_dir,
)
from backend.errors import DatabaseUnavailable

logger = logging.getLogger(__name__)

DATABASE = "qwen"


class EmbeddedPostgres:
    """PostgreSQL 16 + pgvector from pgserver, data in `pgdata`, listening on a unix socket only.

    As root, postgres refuses to run, so (like pgserver) it runs as OS user `pgserver`, who owns
    `pgdata`; the directories above it become world-traversable.
    """

    def __init__(self, pgdata: Path) -> None:
        self._pgdata = pgdata.expanduser().resolve()
        self._user = "pgserver" if os.geteuid() == 0 else None
        self._owner = Owner(self._pgdata / "qwen-stack.owner")

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
        return live_pid(self._pgdata / "postmaster.pid", "postgres")

    def _launch(self) -> None:
        sock_dir = socket_dir(self._pgdata, ".s.PGSQL.5432")
        if sock_dir != self._pgdata:
            sock_dir.mkdir(mode=0o700, exist_ok=True)
            if self._user is not None:
                sock_dir.chmod(0o1777)  # postgres runs as another user; the socket is 0700
        logger.info("starting PostgreSQL on %s", self._pgdata)
        options = f'-h "" -k {shlex.quote(str(sock_dir))} -c unix_socket_permissions=0700'
        log = str(self._pgdata / "postgres.log")
        args = ["-w", "-t", str(int(START_TIMEOUT_S)), "-o", options, "-l", log, "start"]
        _pgserver().pg_ctl(args, pgdata=self._pgdata, user=self._user, timeout=START_TIMEOUT_S + 5)

    def _wait_ready(self) -> str:
        """Wait until postmaster.pid says `ready`; return the URL of database `postgres`."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            lines = (self._pgdata / "postmaster.pid").read_text().splitlines()
            if len(lines) >= 8 and lines[7].strip() == "ready":
                sock_dir, port = lines[4].strip(), lines[3].strip()
                return f"postgresql://postgres@/postgres?host={quote(sock_dir)}&port={port}"
            if time.monotonic() > deadline:
                raise DatabaseUnavailable(f"PostgreSQL not ready after {START_TIMEOUT_S:g}s")
            time.sleep(POLL_S)


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
