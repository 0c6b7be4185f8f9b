"""Child-process supervision for `qwen-stack up`.

Each child (engine, UI, later the RAG worker) runs in its own session with its output appended to a
log file. A child that exits while the supervisor is running is restarted with exponential backoff
(1 s doubling to 30 s, reset after 60 s of healthy running); every state change is published on the
StatusBoard so the UI can tell users "the engine is restarting". `stop()` sends SIGTERM in reverse
start order, waits `grace_s`, then SIGKILLs what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from backend.serving.status import ProcessState, ProcessStatus, StatusBoard

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChildSpec:
    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    log_path: Path
    cwd: Path | None = None
    ready_url: str | None = None  # GET answering 200 means ready; None: ready once started


@dataclass(frozen=True)
class Backoff:
    initial_s: float = 1.0
    max_s: float = 30.0
    reset_after_s: float = 60.0

    def delay(self, failures: int) -> float:
        return float(min(self.max_s, self.initial_s * 2 ** max(0, failures - 1)))


@dataclass
class _Child:
    spec: ChildSpec
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    failures: int = 0
    started_at: float = 0.0
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    probe: asyncio.Task[None] | None = field(default=None, repr=False)
    ready: asyncio.Event = field(default_factory=asyncio.Event, repr=False)


class Supervisor:
    def __init__(
        self,
        specs: Sequence[ChildSpec],
        *,
        status: StatusBoard | None = None,
        backoff: Backoff | None = None,
        grace_s: float = 15.0,
    ) -> None:
        self._children = [_Child(spec) for spec in specs]
        self._status = status
        self._backoff = backoff or Backoff()
        self._grace_s = grace_s
        self._stopping = False

    def pid(self, name: str) -> int | None:
        for child in self._children:
            if child.spec.name == name and child.process is not None:
                return child.process.pid
        return None

    def restarts(self, name: str) -> int:
        return next(c.restarts for c in self._children if c.spec.name == name)

    async def start(self) -> None:
        for child in self._children:
            await self._spawn(child, ProcessState.STARTING)
            child.task = asyncio.create_task(self._watch(child), name=f"watch-{child.spec.name}")

    async def _spawn(self, child: _Child, state: ProcessState) -> None:
        spec = child.spec
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with spec.log_path.open("ab") as log:
            child.process = await asyncio.create_subprocess_exec(
                *spec.argv,
                env=dict(spec.env),
                cwd=spec.cwd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us only; we stop children in order
            )
        child.started_at = time.monotonic()
        child.ready.clear()
        logger.info("started %s (pid %s)", spec.name, child.process.pid)
        await self._publish(child, state)
        child.probe = asyncio.create_task(self._probe(child), name=f"probe-{spec.name}")

    async def _probe(self, child: _Child) -> None:
        """Publish RUNNING once the child answers its readiness URL (or at once without one)."""
        process = child.process
        url = child.spec.ready_url
        if url is not None:
            async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
                while process is not None and process.returncode is None:
                    with contextlib.suppress(httpx.HTTPError):
                        if (await client.get(url)).status_code == 200:
                            break
                    await asyncio.sleep(0.25)
                else:
                    return
        child.ready.set()
        await self._publish(child, ProcessState.RUNNING)

    async def wait_running(self, name: str, *, timeout_s: float) -> bool:
        """True once `name` is ready, False if `timeout_s` passes first."""
        child = next(c for c in self._children if c.spec.name == name)
        try:
            await asyncio.wait_for(child.ready.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def _watch(self, child: _Child) -> None:
        while not self._stopping:
            assert child.process is not None
            code = await child.process.wait()
            if self._stopping:
                return
            ran_s = time.monotonic() - child.started_at
            child.failures = 1 if ran_s > self._backoff.reset_after_s else child.failures + 1
            delay = self._backoff.delay(child.failures)
            logger.warning(
                "%s exited with %s after %.1fs; restarting in %.1fs (see %s)",
                child.spec.name,
                code,
                ran_s,
                delay,
                child.spec.log_path,
            )
            await self._publish(child, ProcessState.RESTARTING, retry_in_s=delay)
            await asyncio.sleep(delay)
            if self._stopping:
                return
            child.restarts += 1
            await self._spawn(child, ProcessState.STARTING)

    async def _publish(
        self, child: _Child, state: ProcessState, *, retry_in_s: float = 0.0
    ) -> None:
        if self._status is None:
            return
        try:
            await self._status.publish(
                ProcessStatus(
                    name=child.spec.name,
                    state=state,
                    restarts=child.restarts,
                    since=time.time(),
                    retry_in_s=retry_in_s,
                )
            )
        except Exception:  # status is advisory; never let it take the supervisor down
            logger.warning("could not publish status of %s", child.spec.name, exc_info=True)

    async def stop(self) -> None:
        """Stop every child, newest first. Idempotent."""
        self._stopping = True
        for child in reversed(self._children):
            for task in (child.task, child.probe):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            process = child.process
            if process is None or process.returncode is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), self._grace_s)
            except TimeoutError:
                logger.warning(
                    "%s did not stop in %.0fs; killing it", child.spec.name, self._grace_s
                )
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
            await self._publish(child, ProcessState.STOPPED)
