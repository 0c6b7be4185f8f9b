"""Process bookkeeping shared by the embedded servers: owner files, pid files, socket paths."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import uuid
from pathlib import Path

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
POLL_S = 0.05
MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux, 104 on macOS


class Owner:
    """The owner file of a server: `<pid> <token>` of the object that stops it."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._token = f"{os.getpid()} {uuid.uuid4().hex}"

    def claim(self, *, launched: bool) -> None:
        """Own the server if this object launched it, or if its owner's process is gone."""
        if not launched:
            with contextlib.suppress(OSError, ValueError, IndexError):
                if process_alive(int(self._path.read_text().split()[0])):
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


def process_alive(pid: int) -> bool:
    import psutil

    alive = False
    with contextlib.suppress(psutil.Error, ValueError):
        alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    return alive


def live_pid(pidfile: Path, program: str) -> int | None:
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


def socket_dir(preferred: Path, name: str) -> Path:
    """`preferred` if a socket `name` there fits in sun_path, else a short per-path temp dir."""
    if len(os.fsencode(preferred / name)) <= MAX_SOCKET_PATH:
        return preferred
    digest = hashlib.sha256(os.fsencode(preferred)).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"qwen-stack-{digest}"
