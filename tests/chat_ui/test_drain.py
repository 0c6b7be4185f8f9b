"""The drain: `Drain` in process, and `ShutdownSignals` under a real uvicorn with real signals
(tests/fixtures/drain_app.py; chat_ui itself is tested end to end in tests/infra/test_shutdown.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import struct
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import websocket

from chat_ui.drain import Drain
from tests.fixtures.engines import free_port
from tests.infra import stack

SHUTDOWN_CLOSE_CODE = 1012  # uvicorn closes open websockets with "service restart"

Serve = Callable[[str], stack.Process]


async def test_an_answer_counts_until_its_task_ends() -> None:
    drain = Drain()
    answer = asyncio.create_task(asyncio.sleep(0.05))
    assert drain.admit(answer)
    assert drain.running == 1
    await answer
    await asyncio.sleep(0)  # done callbacks run on the next loop turn
    assert drain.running == 0


async def test_drain_refuses_new_answers() -> None:
    drain = Drain()
    assert await drain.drain(timeout_s=1) == 0
    late = asyncio.create_task(asyncio.sleep(0))
    assert (drain.draining, drain.admit(late), drain.running) == (True, False, 0)
    await late


async def test_drain_waits_for_running_answers() -> None:
    drain = Drain()
    answers = [asyncio.create_task(asyncio.sleep(0.1 * i)) for i in range(1, 4)]
    for answer in answers:
        drain.admit(answer)
    assert await drain.drain(timeout_s=5) == 0
    assert all(answer.done() for answer in answers)


async def test_drain_returns_the_answers_it_would_cut() -> None:
    drain = Drain()
    quick, slow = asyncio.create_task(asyncio.sleep(0)), asyncio.create_task(asyncio.sleep(60))
    drain.admit(quick), drain.admit(slow)
    assert await drain.drain(timeout_s=0.2) == 1
    assert (quick.done(), slow.done()) == (True, False)
    slow.cancel()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    """Start tests/fixtures/drain_app.py's `factory` under uvicorn, as chat_ui runs."""
    started: list[stack.Process] = []

    def start(factory: str) -> stack.Process:
        port = free_port()
        argv = [
            sys.executable, "-m", "uvicorn", f"tests.fixtures.drain_app:{factory}", "--factory",
            "--host", "127.0.0.1", "--port", str(port), "--timeout-graceful-shutdown", "1",
            "--log-level", "warning",
        ]  # fmt: skip
        url, log = f"http://127.0.0.1:{port}", tmp_path / f"{factory}.log"
        started.append(
            stack.spawn(factory, argv, env=dict(os.environ), url=url, ready="/draining", log=log)
        )
        return started[-1]

    yield start
    for process in started:
        process.stop(grace_s=5)


@contextlib.contextmanager
def open_answer(url: str) -> Iterator[websocket.WebSocket]:
    ws = websocket.create_connection(url.replace("http", "ws", 1) + "/answer", timeout=10)
    try:
        yield ws
    finally:
        ws.close()
        ws.shutdown()  # close() leaves the socket open once a close frame was received


def close_code(ws: websocket.WebSocket) -> int:
    """The code of the close frame that ends `ws` (skipping any text before it)."""
    while True:
        opcode, data = ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            code: int = struct.unpack("!H", data[:2])[0]
            return code


def wait_draining(url: str) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if httpx.get(url + "/draining", trust_env=False).json()["draining"]:
            return
        time.sleep(0.05)
    raise AssertionError("the drain did not begin within 5 s")


def test_sigterm_lets_the_running_answer_finish(serve: Serve) -> None:
    app = serve("create_app")
    with open_answer(app.url) as running:
        assert running.recv() == "start"
        app.process.send_signal(signal.SIGTERM)
        wait_draining(app.url)
        with open_answer(app.url) as late:
            assert late.recv() == "refused"
        assert running.recv() == "end"
    assert app.process.wait(timeout=10) == 0, app.tail()


def test_drain_time_bounds_the_wait(serve: Serve) -> None:
    app = serve("short_drain_app")  # drain 0.5 s, answers 60 s
    with open_answer(app.url) as running:
        assert running.recv() == "start"
        app.process.send_signal(signal.SIGTERM)
        assert close_code(running) == SHUTDOWN_CLOSE_CODE
    assert app.process.wait(timeout=10) == 0, app.tail()


def test_second_signal_stops_at_once(serve: Serve) -> None:
    app = serve("long_answer_app")  # drain 30 s, answers 60 s
    with open_answer(app.url) as running:
        assert running.recv() == "start"
        app.process.send_signal(signal.SIGTERM)
        wait_draining(app.url)
        app.process.send_signal(signal.SIGTERM)
        assert close_code(running) == SHUTDOWN_CLOSE_CODE
    # uvicorn's own handler: after its shutdown it ends the process by the signal it caught
    assert app.process.wait(timeout=10) == -signal.SIGTERM, app.tail()
