"""The parser zygote: a warm process that forks one limited child per file.

    python -m backend.rag.zygote --max-bytes N --max-chars N --cpu-s N --memory-mb N --wall-s S

`SandboxParser` (backend/rag/sandbox.py) starts it with a bare environment and "/" as its working
directory. The zygote imports the parsers once (pypdf, python-docx, lxml: most of a cold child's
~0.12 s start), then serves requests on stdin, one at a time, until stdin closes:

    request  8-byte big-endian length, then the file's bytes
    reply    REPLY header (exit code, flags, stdout length, stderr length), the child's stdout
             (empty when over the cap), the tail of its stderr

For each request it forks a child (~2 ms), which sets its rlimits first (CPU seconds with
SIGXCPU then SIGKILL a second later, address space, no file writes, a few descriptors, no core
dumps), moves to a process group of its own, asks to be killed if the zygote dies, parses the bytes it inherited and writes one JSON
reply to stdout (`parse_reply`). The zygote reads that reply up to `memory_mb` MiB and kills the
child past the cap or after `wall_s`. A hostile file thus costs one forked child, as a fresh
interpreter per file did, and the zygote never touches file content itself: it only copies
bytes between pipes.

`--child MODULE:FUNCTION` replaces `parse_reply` (tests use it to make children that crash,
hang or flood); SandboxParser passes it only when its caller asks.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import json
import logging
import os
import resource
import selectors
import signal
import struct
import sys
import time
from collections.abc import Callable

from backend.errors import DocumentRejected, RejectReason
from backend.rag.document import ParsedDocument
from backend.rag.parsing import parse_bytes

REQUEST = struct.Struct(">Q")
REPLY = struct.Struct(">iBQI")  # exit code (negative: killed by that signal), flags, lengths
TIMED_OUT = 1  # flag: the child was killed after wall_s
TOO_LARGE = 2  # flag: the child's stdout went over the cap (it was killed; stdout not sent)
STDERR_TAIL = 4096
OPEN_FILES = 32
_MIB = 1024 * 1024
_PR_SET_PDEATHSIG = 1
_DRAIN_S = 1.0  # how long the pipes may stay open after the child was killed
# Imported once by the zygote so that no child pays for them (parsing.py imports them lazily).
PRELOADED = ("pypdf", "docx", "docx.text.paragraph", "lxml.etree", "lxml.html")

ChildFunction = Callable[[bytes, int], bytes]


def document_to_json(document: ParsedDocument) -> bytes:
    """UTF-8 JSON of a ParsedDocument; `sandbox.document_from_json` reads it back."""
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


def parse_reply(data: bytes, max_chars: int) -> bytes:
    """The child's work: the JSON reply for a file's bytes, a document or a rejection."""
    try:
        return document_to_json(parse_bytes(data, max_chars=max_chars))
    except DocumentRejected as exc:
        return rejection_to_json(exc)
    except MemoryError:
        return rejection_to_json(DocumentRejected(RejectReason.RESOURCE_LIMIT, "MemoryError"))
    except RecursionError:
        return rejection_to_json(DocumentRejected(RejectReason.MALFORMED, "nesting too deep"))
    except Exception as exc:  # a parser bug on a strange file: refuse the file, say which bug
        logging.getLogger(__name__).exception("parser failed")
        return rejection_to_json(DocumentRejected(RejectReason.MALFORMED, type(exc).__name__))


def rlimits(*, cpu_s: int, memory_mb: int) -> list[tuple[int, tuple[int, int]]]:
    """The child's rlimits, never above this process's hard limits."""
    wanted = {
        resource.RLIMIT_CPU: (cpu_s, cpu_s + 1),
        resource.RLIMIT_AS: (memory_mb * _MIB, memory_mb * _MIB),
        resource.RLIMIT_FSIZE: (0, 0),
        resource.RLIMIT_NOFILE: (OPEN_FILES, OPEN_FILES),
        resource.RLIMIT_CORE: (0, 0),
    }
    settings = []
    for kind, (soft, hard) in wanted.items():
        ceiling = resource.getrlimit(kind)[1]
        if ceiling != resource.RLIM_INFINITY:
            soft, hard = min(soft, ceiling), min(hard, ceiling)
        settings.append((kind, (soft, hard)))
    return settings


class Zygote:
    """The serving loop (runs in the zygote process)."""

    def __init__(
        self,
        child: ChildFunction,
        *,
        max_bytes: int,
        max_chars: int,
        cpu_s: int,
        memory_mb: int,
        wall_s: float,
    ) -> None:
        self._child = child
        self._max_bytes = max_bytes
        self._max_chars = max_chars
        self._limits = rlimits(cpu_s=cpu_s, memory_mb=memory_mb)
        self._out_cap = memory_mb * _MIB
        self._wall_s = wall_s
        self._libc = ctypes.CDLL(None, use_errno=True)

    def serve(self) -> int:
        """Answer requests on stdin until it closes; 0 then, 2 on a request over max_bytes."""
        stdin, stdout = (
            sys.stdin.buffer,
            sys.stdout.buffer,
        )  # buffered: read(n) is short at EOF only
        while len(header := stdin.read(REQUEST.size)) == REQUEST.size:
            (size,) = REQUEST.unpack(header)
            if size > self._max_bytes:
                return 2  # the parent checks sizes first: this is a protocol error
            data = stdin.read(size)
            if len(data) != size:
                return 0  # the parent went away mid-request
            code, flags, out, err = self.run(data)
            stdout.write(REPLY.pack(code, flags, len(out), len(err)) + out + err)
            stdout.flush()
        return 0

    def run(self, data: bytes) -> tuple[int, int, bytes, bytes]:
        """Fork a child for `data`; (exit code, flags, stdout, stderr tail) once it is gone."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            os.close(out_r)
            os.close(err_r)
            self._become_child(data, out_w, err_w)
        with contextlib.suppress(OSError):  # also here, so a kill never misses the group
            os.setpgid(pid, pid)
        os.close(out_w)
        os.close(err_w)
        try:
            flags, out, err = self._collect(pid, out_r, err_r)
        finally:
            os.close(out_r)
            os.close(err_r)
            _kill(pid)  # its process group: whatever it started goes with it
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status), flags, out, err

    def _become_child(self, data: bytes, out_w: int, err_w: int) -> None:
        code = 70
        try:
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            os.closerange(3, 1 << 16)
            os.setpgid(0, 0)  # a group of its own, which the zygote kills when done
            self._libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            for kind, pair in self._limits:
                resource.setrlimit(kind, pair)
            reply = self._child(data, self._max_chars)
            view = memoryview(reply)
            while view:
                view = view[os.write(1, view) :]
            code = 0
        except BaseException:  # the exit code and the traceback on stderr tell the parent
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(code)

    def _collect(self, pid: int, out_r: int, err_r: int) -> tuple[int, bytes, bytes]:
        """Read the child's stdout (up to the cap) and stderr tail until both close; kill it
        after wall_s or past the cap."""
        deadline = time.monotonic() + self._wall_s
        killed_at: float | None = None
        flags, size = 0, 0
        out: list[bytes] = []
        err = b""
        with selectors.DefaultSelector() as selector:
            selector.register(out_r, selectors.EVENT_READ)
            selector.register(err_r, selectors.EVENT_READ)
            while selector.get_map():
                now = time.monotonic()
                if killed_at is None and now >= deadline:
                    flags |= TIMED_OUT
                    killed_at = _kill(pid)
                if killed_at is not None and now - killed_at > _DRAIN_S:
                    break  # a grandchild holds the pipes open: stop reading
                timeout = deadline - now if killed_at is None else 0.05
                for key, _ in selector.select(timeout):
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        selector.unregister(key.fd)
                    elif key.fd == err_r:
                        err = (err + chunk)[-STDERR_TAIL:]
                    elif not flags & TOO_LARGE:
                        size += len(chunk)
                        out.append(chunk)
                        if size > self._out_cap:
                            flags |= TOO_LARGE
                            out.clear()
                            killed_at = _kill(pid)
        return flags, b"".join(out), err


def _kill(pid: int) -> float:
    """SIGKILL the child `pid` and its process group; the time it was sent."""
    for kill in (os.killpg, os.kill):  # the group may not exist yet (the child just forked)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(pid, signal.SIGKILL)
    return time.monotonic()


def _function(spec: str) -> ChildFunction:
    module, _, name = spec.partition(":")
    function: ChildFunction = getattr(importlib.import_module(module), name)
    return function


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.rag.zygote")
    parser.add_argument("--max-bytes", type=int, required=True)
    parser.add_argument("--max-chars", type=int, required=True)
    parser.add_argument("--cpu-s", type=int, required=True)
    parser.add_argument("--memory-mb", type=int, required=True)
    parser.add_argument("--wall-s", type=float, required=True)
    parser.add_argument("--child", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # pypdf logs a warning for every oddity it meets
    for module in PRELOADED:
        importlib.import_module(module)
    child = _function(args.child) if args.child else parse_reply
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent
    return Zygote(  # stops us by closing stdin or killing the group
        child, max_bytes=args.max_bytes, max_chars=args.max_chars, cpu_s=args.cpu_s,
        memory_mb=args.memory_mb, wall_s=args.wall_s,
    ).serve()  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
