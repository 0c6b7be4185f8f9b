"""Parse untrusted files in a child process with hard limits, so a hostile file costs one child.

`SandboxParser.parse(path)` checks the size, reads the file and pipes its bytes to
`python -m backend.rag.sandbox` (the child never learns a path, so it cannot be talked into opening
another file). Before exec the child gets rlimits: CPU seconds (SIGXCPU, then SIGKILL a second
later), address space, no file writes (FSIZE 0), a few file descriptors, no core dumps; its
environment holds only PATH and PYTHONPATH, its working directory is "/". The parent also kills it
after a wall-clock budget and reads at most `memory_mb` MiB of its output.

Protocol: the child reads at most `max_bytes + 1` bytes of stdin, writes one JSON object to stdout
and exits 0: either a document (`document_to_json`) or a rejection {"reason": ..., "detail": ...}.
Anything else (a signal, a non-zero exit, unreadable output) becomes DocumentRejected:
RESOURCE_LIMIT for kills, timeouts and memory exhaustion, MALFORMED otherwise.

`preexec_fn` runs between fork and exec, where other threads' locks may be held; the function here
only calls `resource.setrlimit` with values computed beforehand (no imports, no logging), which
keeps clear of them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backend.errors import DocumentRejected, RejectReason
from backend.rag.document import Block, DocumentFormat, ParsedDocument
from backend.rag.parsing import parse_bytes

if TYPE_CHECKING:
    from backend.config import RagSettings

logger = logging.getLogger(__name__)

_MIB = 1024 * 1024
_OPEN_FILES = 32
_CHILD_PATH = "/usr/local/bin:/usr/bin:/bin"
_STDERR_TAIL = 4096
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


def document_to_json(document: ParsedDocument) -> bytes:
    """UTF-8 JSON of a ParsedDocument; `document_from_json` reads it back."""
    return json.dumps(
        {
            "format": str(document.format),
            "title": document.title,
            "blocks": [
                {"text": b.text, "offset": b.offset, "page": b.page, "heading": b.heading}
                for b in document.blocks
            ],
        },
        ensure_ascii=False,
    ).encode()


def rejection_to_json(error: DocumentRejected) -> bytes:
    return json.dumps({"reason": str(error.reason), "detail": error.detail[:500]}).encode()


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


def _child_limits(limits: ParseLimits) -> Callable[[], None]:
    """The preexec function: set precomputed rlimits (never above the parent's hard limits)."""
    wanted = {
        resource.RLIMIT_CPU: (limits.cpu_s, limits.cpu_s + 1),
        resource.RLIMIT_AS: (limits.memory_mb * _MIB, limits.memory_mb * _MIB),
        resource.RLIMIT_FSIZE: (0, 0),
        resource.RLIMIT_NOFILE: (_OPEN_FILES, _OPEN_FILES),
        resource.RLIMIT_CORE: (0, 0),
    }
    settings: list[tuple[int, tuple[int, int]]] = []
    for kind, (soft, hard) in wanted.items():
        ceiling = resource.getrlimit(kind)[1]
        if ceiling != resource.RLIM_INFINITY:
            soft, hard = min(soft, ceiling), min(hard, ceiling)
        settings.append((kind, (soft, hard)))

    def apply() -> None:
        for kind, pair in settings:
            resource.setrlimit(kind, pair)

    return apply


class SandboxParser:
    """Parses files in a limited child process, one child per call (safe to call concurrently).

    `interpreter` is the Python that runs the child (default: this one)."""

    def __init__(self, limits: ParseLimits, *, interpreter: str | None = None) -> None:
        self._limits = limits
        self._command = [
            interpreter or sys.executable,
            *("-B", "-s", "-m", "backend.rag.sandbox"),
            *("--max-bytes", str(limits.max_bytes), "--max-chars", str(limits.max_chars)),
        ]
        self._env = {"PATH": _CHILD_PATH, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}

    async def parse(self, path: Path) -> ParsedDocument:
        """The blocks of the file at `path`. Raises DocumentRejected for any bad file (EMPTY and
        TOO_LARGE before anything is read); OSError if the file cannot be opened or the child not
        started. Cancelling kills the child."""
        data = await asyncio.to_thread(self._read, path)
        return await self._run(data)

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

    async def _run(self, data: bytes) -> ParsedDocument:
        process = await asyncio.create_subprocess_exec(
            *self._command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self._env,
            cwd="/",
            preexec_fn=_child_limits(self._limits),
        )
        try:
            out, err = await asyncio.wait_for(
                _exchange(process, data, out_cap=self._limits.memory_mb * _MIB),
                timeout=self._limits.timeout_s,
            )
        except TimeoutError:
            logger.warning("parser child killed after %.1fs wall clock", self._limits.timeout_s)
            raise DocumentRejected(RejectReason.RESOURCE_LIMIT, "wall-clock timeout") from None
        finally:
            await _reap(process)
        return _outcome(process.returncode, out, err)


async def _exchange(
    process: asyncio.subprocess.Process, data: bytes, *, out_cap: int
) -> tuple[bytes | None, bytes]:
    """Feed `data` to the child and collect its stdout (None past `out_cap` bytes: the child is
    killed) and the tail of its stderr, until it exits."""
    assert process.stdin and process.stdout and process.stderr

    async def feed(stdin: asyncio.StreamWriter) -> None:
        try:
            stdin.write(data)
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the child exited early; its exit status says why
        finally:
            stdin.close()

    async def collect(stream: asyncio.StreamReader) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while chunk := await stream.read(1 << 16):
            size += len(chunk)
            if size <= out_cap:
                chunks.append(chunk)
            elif size - len(chunk) <= out_cap:  # just went over: kill, read on to EOF
                chunks.clear()
                process.kill()
        return None if size > out_cap else b"".join(chunks)

    async def tail(stream: asyncio.StreamReader) -> bytes:
        kept = b""
        while chunk := await stream.read(1 << 16):
            kept = (kept + chunk)[-_STDERR_TAIL:]
        return kept

    _, out, err = await asyncio.gather(
        feed(process.stdin), collect(process.stdout), tail(process.stderr)
    )
    await process.wait()
    return out, err


async def _reap(process: asyncio.subprocess.Process) -> None:
    """Kill the child if it still runs, wait for it, and read its pipes to EOF so their transports
    close (a grandchild holding them open gets 1 s)."""
    if process.returncode is None:
        process.kill()
    await process.wait()
    for stream in (process.stdout, process.stderr):
        if stream is None:
            continue
        try:
            async with asyncio.timeout(1.0):
                while await stream.read(1 << 16):
                    pass
        except TimeoutError:
            logger.warning("parser child's pipe still open after it exited")


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


def main(argv: list[str] | None = None) -> int:
    """The child: parse stdin, write one JSON reply to stdout, exit 0 (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m backend.rag.sandbox")
    parser.add_argument("--max-bytes", type=int, required=True)
    parser.add_argument("--max-chars", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # pypdf logs a warning for every oddity it meets
    out_of_memory = rejection_to_json(DocumentRejected(RejectReason.RESOURCE_LIMIT, "MemoryError"))
    try:
        data = sys.stdin.buffer.read(args.max_bytes + 1)
        if len(data) > args.max_bytes:
            raise DocumentRejected(RejectReason.TOO_LARGE, "stdin over max_bytes")
        reply = document_to_json(parse_bytes(data, max_chars=args.max_chars))
    except DocumentRejected as exc:
        reply = rejection_to_json(exc)
    except MemoryError:
        reply = out_of_memory
    except RecursionError:
        reply = rejection_to_json(DocumentRejected(RejectReason.MALFORMED, "nesting too deep"))
    except Exception as exc:  # a parser bug on a strange file: refuse the file, say which bug
        logging.getLogger(__name__).exception("parser failed")
        reply = rejection_to_json(DocumentRejected(RejectReason.MALFORMED, type(exc).__name__))
    sys.stdout.buffer.write(reply)
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
