"""Graceful shutdown of chat_ui: on SIGTERM the running answers finish before uvicorn stops.

uvicorn's own shutdown closes every websocket first and only then waits
`--timeout-graceful-shutdown` for HTTP requests, so an answer streaming over Chainlit's socket
would be cut at once. `ShutdownSignals` takes SIGTERM/SIGINT over from uvicorn: the first one
starts the drain (`/readyz` fails, new messages get `DRAINING_NOTICE`, running answers go on)
and, once they have ended or `timeout_s` ran out, asks uvicorn to stop as usual (exit code 0);
a second signal goes to uvicorn's own handler, which stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from types import FrameType
from typing import Any

import uvicorn

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# After the last answer's task has ended, its final frames (the answer, `task_end`) may still sit
# in engine.io's send queue; uvicorn would drop them when it closes the sockets.
FLUSH_S = 1.0
DRAINING_NOTICE = "服务正在重启，这条消息没有处理。请刷新页面后重新发送。"

SignalHandler = Any  # what signal.signal returns: a callable, SIG_DFL, SIG_IGN or None


class Drain:
    """The answers running in this process, and whether it has stopped admitting new ones.

    Event-loop only, not thread-safe. An answer counts until the task running it ends (for
    Chainlit, its per-message task, which also sends the turn's `task_end`)."""

    def __init__(self) -> None:
        self._answers: set[asyncio.Task[Any]] = set()
        self._draining = False

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def running(self) -> int:
        return len(self._answers)

    def admit(self, task: asyncio.Task[Any]) -> bool:
        """Count `task` as a running answer until it ends. False (and not counted) once draining."""
        if self._draining:
            return False
        self._answers.add(task)
        task.add_done_callback(self._answers.discard)
        return True

    async def drain(self, *, timeout_s: float) -> int:
        """Stop admitting answers and wait up to `timeout_s` seconds for the running ones to end.
        Returns how many are still running (they will be cut)."""
        self._draining = True
        running = set(self._answers)
        if not running:
            return 0
        _, pending = await asyncio.wait(running, timeout=timeout_s)
        return len(pending)


class ShutdownSignals:
    """SIGTERM/SIGINT handling of a chat_ui process served by uvicorn (see the module docstring).

    `install()` must run in the main thread on the serving event loop, after uvicorn has put its
    own handlers in place (the app's lifespan startup is such a place); elsewhere (a test client's
    thread) it does nothing. `aclose()` puts the previous handlers back."""

    def __init__(self, drain: Drain, *, timeout_s: float, flush_s: float = FLUSH_S) -> None:
        self._drain = drain
        self._timeout_s = timeout_s
        self._flush_s = flush_s
        self._previous: dict[int, SignalHandler] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._signalled = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._loop = asyncio.get_running_loop()
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in SIGNALS}

    async def aclose(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler runs between two bytecodes of the main thread, possibly inside the
        # event loop's own code: only hand the work over to the loop.
        assert self._loop is not None
        if not self._signalled:
            self._signalled = True
            self._loop.call_soon_threadsafe(self._begin, sig)
        else:
            logger.warning("second %s: stopping now", signal.Signals(sig).name)
            self._forward(sig, frame)

    def _begin(self, sig: int) -> None:
        self._task = asyncio.create_task(self._run(sig))

    async def _run(self, sig: int) -> None:
        running = self._drain.running
        logger.warning(
            "%s: draining %d running answer(s), up to %gs",
            signal.Signals(sig).name, running, self._timeout_s,
        )  # fmt: skip
        cut = await self._drain.drain(timeout_s=self._timeout_s)
        if cut:
            logger.warning("drain time ran out: %d answer(s) will be cut", cut)
        elif running:
            await asyncio.sleep(self._flush_s)
        self._stop_server(sig)

    def _stop_server(self, sig: int) -> None:
        """Let uvicorn shut down as if it had the signal, but exit 0: its own handler would
        re-raise the signal after the shutdown, ending the process by it."""
        previous = self._previous.get(sig)
        server = getattr(previous, "__self__", None)
        if isinstance(server, uvicorn.Server):
            server.should_exit = True
        else:
            self._forward(sig, None)

    def _forward(self, sig: int, frame: FrameType | None) -> None:
        previous = self._previous.get(sig)
        if callable(previous):
            previous(sig, frame)
        else:  # SIG_DFL or SIG_IGN (None: not set from Python, i.e. the default action)
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
            signal.raise_signal(sig)
