"""Parse untrusted files in forked children with hard limits, so a hostile file costs one child.

`SandboxParser.parse(path)` checks the size, reads the file and hands its bytes to a parser
zygote (backend/rag/zygote.py): a warm interpreter, started with an environment of PATH and
PYTHONPATH only and "/" as its working directory, that forks one child per file. The child never
learns a path (it cannot be talked into opening another file) and runs under rlimits: CPU seconds
(SIGXCPU, then SIGKILL a second later), address space, no file writes (FSIZE 0), a few file
descriptors, no core dumps. The zygote kills it after the wall-clock budget or past `memory_mb`
MiB of output. Forking from the warm zygote takes ~2 ms where starting an interpreter and
importing the parsers for every file took ~0.12 s of CPU (bench/README.md, ingestion).

Each zygote serves one file at a time; the parser keeps the idle ones for the next call and
starts another when all are busy, so concurrent calls are safe. A zygote that misbehaves (no
reply within the wall-clock budget plus a margin, a broken pipe, a cancelled call) is killed with
its whole process group, children included, and replaced on the next call.

The child writes one JSON object to stdout and exits 0: either a document (`document_to_json`)
or a rejection {"reason": ..., "detail": ...}. Anything else (a signal, a non-zero exit,
unreadable output) becomes DocumentRejected: RESOURCE_LIMIT for kills, timeouts and memory
exhaustion, MALFORMED otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from backend.errors import DocumentRejected, RejectReason
from backend.rag.document import Block, DocumentFormat, ParsedDocument
from backend.rag.zygote import (
    REPLY,
    REQUEST,
    TIMED_OUT,
    TOO_LARGE,
    document_to_json,
    rejection_to_json,
)

if TYPE_CHECKING:
    from backend.config import RagSettings

logger = logging.getLogger(__name__)

_MIB = 1024 * 1024
_CHILD_PATH = "/usr/local/bin:/usr/bin:/bin"
_REPLY_MARGIN_S = 5.0  # beyond the child's wall-clock budget, before the zygote counts as hung
__all__ = ["ParseLimits", "SandboxParser", "document_from_json", "document_to_json"]
__all__ += ["rejection_to_json"]
_CRASH_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE})
_MEMORY_HINTS = (b"MemoryError", b"Cannot allocate memory", b"std::bad_alloc")


@dataclass(frozen=True)
class ParseLimits:
    """What one file's parse may use. `max_bytes` is the largest accepted file, `max_chars` the
    text kept; `wall_s` defaults to 3 × `cpu_s` (+2 s for the child's start)."""

    cpu_s: int
    memory_mb: int
    max_bytes: int
    max_chars: int
    wall_s: float | None = None

    @classmethod
    def from_settings(cls, rag: RagSettings) -> ParseLimits:
        """Limits from the RAG settings (`max_file_mb` in MiB)."""
        return cls(
            cpu_s=rag.parse_cpu_s,
            memory_mb=rag.parse_memory_mb,
            max_bytes=int(rag.max_file_mb * _MIB),
            max_chars=rag.parse_max_chars,
        )

    @property
    def timeout_s(self) -> float:
        return self.wall_s if self.wall_s is not None else 3.0 * self.cpu_s + 2.0


def document_from_json(data: bytes | str) -> ParsedDocument:
    """The ParsedDocument in `data`. Raises the DocumentRejected it holds if it is a rejection,
    ValueError if it is neither (wrong shape, or offsets that do not index the text)."""
    value: Any = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    if "reason" in value:
        try:
            reason = RejectReason(value["reason"])
        except ValueError:
            raise ValueError(f"unknown reject reason {value['reason']!r}") from None
        raise DocumentRejected(reason, str(value.get("detail", "")))
    blocks: list[Block] = []
    offset = 0
    for item in value["blocks"]:
        text, page, heading = item["text"], item["page"], item["heading"]
        if not isinstance(text, str) or item["offset"] != offset:
            raise ValueError("block text or offset out of order")
        if not (page is None or type(page) is int) or not (
            heading is None or isinstance(heading, str)
        ):
            raise ValueError("bad block page or heading")
        blocks.append(Block(text, offset, page=page, heading=heading))
        offset += len(text) + 1
    title = value["title"]
    if not (title is None or isinstance(title, str)):
        raise ValueError("bad title")
    return ParsedDocument(format=DocumentFormat(value["format"]), blocks=tuple(blocks), title=title)


class SandboxParser:
    """Parses files in limited children forked by parser zygotes (safe to call concurrently).

    `interpreter` is the Python that runs the zygotes (default: this one); `child`
    ("module:function", tests only) replaces what the children run (see backend/rag/zygote.py).
    `close()` stops the idle zygotes; a zygote also exits when its parent's end of the pipe
    closes, so one left behind by a crash does not outlive the worker."""

    def __init__(
        self, limits: ParseLimits, *, interpreter: str | None = None, child: str | None = None
    ) -> None:
        self._limits = limits
        self._command = [
            interpreter or sys.executable,
            *("-B", "-s", "-m", "backend.rag.zygote"),
            *("--max-bytes", str(limits.max_bytes), "--max-chars", str(limits.max_chars)),
            *("--cpu-s", str(limits.cpu_s), "--memory-mb", str(limits.memory_mb)),
            *("--wall-s", str(limits.timeout_s)),
            *(("--child", child) if child else ()),
        ]
        self._env = {"PATH": _CHILD_PATH, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        self._idle: list[_Zygote] = []
        self._lock = threading.Lock()
        # A parser dropped without close() (or left at exit) still stops its zygotes.
        self._finalizer = weakref.finalize(self, _kill_all, self._idle, self._lock)

    @property
    def zygote_pids(self) -> list[int]:
        """Process ids of the idle zygotes (diagnostics and tests)."""
        with self._lock:
            return [zygote.pid for zygote in self._idle]

    async def parse(self, path: Path) -> ParsedDocument:
        """The blocks of the file at `path`. Raises DocumentRejected for any bad file (EMPTY and
        TOO_LARGE before anything is read); OSError if the file cannot be opened, or no zygote
        starts or answers (an idle zygote found dead is replaced once). Cancelling kills the
        child (and its zygote)."""
        data = await asyncio.to_thread(self._read, path)
        for attempt in (1, 2):
            zygote, reused = await asyncio.to_thread(self._take)
            try:
                code, flags, out, err = await asyncio.wait_for(
                    asyncio.to_thread(zygote.exchange, data),
                    timeout=self._limits.timeout_s + _REPLY_MARGIN_S,
                )
            except (OSError, ValueError) as exc:
                zygote.kill()
                if reused and attempt == 1:
                    logger.warning(
                        "idle parser zygote %d was gone (%s); starting one", zygote.pid, exc
                    )
                    continue
                raise OSError(f"parser zygote failed: {exc}") from None
            except BaseException as exc:
                zygote.kill()
                if isinstance(exc, TimeoutError):
                    logger.error("parser zygote %d gave no reply; killed", zygote.pid)
                    raise DocumentRejected(RejectReason.RESOURCE_LIMIT, "parser hung") from None
                raise
            break
        with self._lock:
            self._idle.append(zygote)
        if flags & TIMED_OUT:
            logger.warning("parser child killed after %.1fs wall clock", self._limits.timeout_s)
            raise DocumentRejected(RejectReason.RESOURCE_LIMIT, "wall-clock timeout")
        return _outcome(code, None if flags & TOO_LARGE else out, err)

    def close(self) -> None:
        """Stop the idle zygotes (a call in progress keeps its own until it returns)."""
        _kill_all(self._idle, self._lock)

    def _take(self) -> tuple[_Zygote, bool]:
        """An idle zygote (True) or a new one (False)."""
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return _Zygote(self._command, self._env), False

    def _read(self, path: Path) -> bytes:
        with path.open("rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size == 0:
                raise DocumentRejected(RejectReason.EMPTY, "0 bytes")
            if size > self._limits.max_bytes:
                raise DocumentRejected(RejectReason.TOO_LARGE, f"{size} bytes")
            data = file.read(self._limits.max_bytes + 1)
        if not data:
            raise DocumentRejected(RejectReason.EMPTY, "0 bytes")
        if len(data) > self._limits.max_bytes:
            raise DocumentRejected(RejectReason.TOO_LARGE, "grew while being read")
        return data


def _kill_all(zygotes: list[_Zygote], lock: threading.Lock) -> None:
    with lock:
        taken = zygotes[:]
        zygotes.clear()
    for zygote in taken:
        zygote.kill()


class _Zygote:
    """One zygote process, in a process group of its own (with its children)."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self._process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd="/",
            start_new_session=True,
        )  # fmt: skip
        self.pid = self._process.pid

    def exchange(self, data: bytes) -> tuple[int, int, bytes, bytes]:
        """Send one file, wait for the child's (exit code, flags, stdout, stderr tail).
        Blocking. Raises OSError or ValueError when the zygote breaks the protocol or dies."""
        stdin, stdout = self._process.stdin, self._process.stdout
        assert stdin is not None and stdout is not None
        stdin.write(REQUEST.pack(len(data)))
        stdin.write(data)
        stdin.flush()
        header = _read_exact(stdout, REPLY.size)
        code, flags, out_size, err_size = REPLY.unpack(header)
        return code, flags, _read_exact(stdout, out_size), _read_exact(stdout, err_size)

    def kill(self) -> None:
        """Kill the zygote and its children; reap it."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self._process.wait()
        for pipe in (self._process.stdin, self._process.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


def _read_exact(stream: IO[bytes], size: int) -> bytes:
    data = stream.read(size)  # a buffered reader returns short only at end of file
    if len(data) != size:
        raise ValueError("the parser zygote exited mid-reply")
    return data


def _outcome(returncode: int | None, out: bytes | None, err: bytes) -> ParsedDocument:
    """What the child's exit status and output mean; raises DocumentRejected for failures."""
    if returncode == 0 and out is not None:
        try:
            return document_from_json(out)
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("parser child wrote an unreadable reply: %s", exc)
            raise DocumentRejected(RejectReason.MALFORMED, "unreadable parser reply") from None
    if out is None:
        raise DocumentRejected(RejectReason.MALFORMED, "parser reply too large")
    detail = err.decode("utf-8", "replace").strip()[-500:]
    if returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name
        logger.warning("parser child killed by %s: %s", name, detail)
        reason = (
            RejectReason.MALFORMED if -returncode in _CRASH_SIGNALS else RejectReason.RESOURCE_LIMIT
        )
        raise DocumentRejected(reason, f"parser killed by {name}")
    logger.error("parser child exited with %s: %s", returncode, detail)
    if any(hint in err for hint in _MEMORY_HINTS):
        raise DocumentRejected(RejectReason.RESOURCE_LIMIT, "parser out of memory")
    raise DocumentRejected(RejectReason.MALFORMED, f"parser exited with {returncode}")
