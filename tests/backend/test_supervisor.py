"""Supervisor with real child processes (tiny `python -c` scripts) and a real Redis StatusBoard."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from backend.serving.status import ProcessState, ProcessStatus, StatusBoard
from backend.supervisor import Backoff, ChildSpec, Supervisor
from tests.fixtures.engines import free_port

FAST = Backoff(initial_s=0.05, max_s=0.2, reset_after_s=60.0)
POLL_S = 0.02
POLLS = 1500  # how often a wait polls before the test gives up
SLEEP_FOREVER = "import time; time.sleep(600)"

MakeSupervisor = Callable[..., Supervisor]


def _spec(name: str, code: str, tmp_path: Path, *, ready_url: str | None = None) -> ChildSpec:
    return ChildSpec(
        name=name, argv=[sys.executable, "-c", code], env={"PYTHONUNBUFFERED": "1"},
        log_path=tmp_path / "logs" / f"{name}.log", cwd=tmp_path, ready_url=ready_url,
    )  # fmt: skip


def _web_server(tmp_path: Path) -> ChildSpec:
    """`python -m http.server` on a free port, ready once it answers."""
    port = free_port()
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    return ChildSpec(
        name="web", argv=argv, env={}, log_path=tmp_path / "web.log", cwd=tmp_path,
        ready_url=f"http://127.0.0.1:{port}/",
    )  # fmt: skip


@pytest.fixture
def board(redis_client: aioredis.Redis) -> StatusBoard:
    return StatusBoard(redis_client)


@pytest.fixture
async def make_supervisor(board: StatusBoard) -> AsyncIterator[MakeSupervisor]:
    """Supervisors publishing on `board`; every one is stopped after the test."""
    made: list[Supervisor] = []

    def make(
        specs: Sequence[ChildSpec], *, backoff: Backoff = FAST, grace_s: float = 5.0
    ) -> Supervisor:
        made.append(Supervisor(specs, status=board, backoff=backoff, grace_s=grace_s))
        return made[-1]

    yield make
    for supervisor in made:
        await supervisor.stop()


async def _until(condition: Callable[[], bool]) -> bool:
    for _ in range(POLLS):
        if condition():
            return True
        await asyncio.sleep(POLL_S)
    return False


async def _status_until(board: StatusBoard, name: str, state: ProcessState) -> ProcessStatus:
    for _ in range(POLLS):
        status = await board.get(name)
        if status is not None and status.state is state:
            return status
        await asyncio.sleep(POLL_S)
    pytest.fail(f"{name} never reached {state}")


def test_backoff_doubles_up_to_max() -> None:
    delays = [Backoff(initial_s=1.0, max_s=30.0).delay(n) for n in range(1, 8)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
async def test_exited_child_is_restarted(make_supervisor: MakeSupervisor, tmp_path: Path) -> None:
    supervisor = make_supervisor([_spec("flaky", "raise SystemExit(3)", tmp_path)])
    await supervisor.start()
    assert await _until(lambda: supervisor.restarts("flaky") >= 2)


@pytest.mark.slow
async def test_status_shows_restarting_then_running(
    make_supervisor: MakeSupervisor, board: StatusBoard, tmp_path: Path
) -> None:
    # Exits on its first run only, then stays up; the long first delay makes RESTARTING visible.
    code = (
        "import pathlib, sys, time\n"
        "marker = pathlib.Path('ran-once')\n"
        "if not marker.exists():\n"
        "    marker.touch()\n"
        "    sys.exit(1)\n"
        "time.sleep(600)\n"
    )
    backoff = Backoff(initial_s=1.0, max_s=1.0, reset_after_s=60.0)
    supervisor = make_supervisor([_spec("once", code, tmp_path)], backoff=backoff)
    await supervisor.start()
    restarting = await _status_until(board, "once", ProcessState.RESTARTING)
    running = await _status_until(board, "once", ProcessState.RUNNING)
    assert (restarting.restarts, restarting.retry_in_s, running.restarts) == (0, 1.0, 1)


@pytest.mark.slow
async def test_wait_running_after_ready_url(
    make_supervisor: MakeSupervisor, tmp_path: Path
) -> None:
    supervisor = make_supervisor([_web_server(tmp_path)])
    await supervisor.start()
    assert await supervisor.wait_running("web", timeout_s=60)


@pytest.mark.slow
async def test_ready_url_publishes_running(
    make_supervisor: MakeSupervisor, board: StatusBoard, tmp_path: Path
) -> None:
    supervisor = make_supervisor([_web_server(tmp_path)])
    await supervisor.start()
    await supervisor.wait_running("web", timeout_s=60)
    status = await board.get("web")
    assert status is not None and status.state is ProcessState.RUNNING


@pytest.mark.slow
async def test_not_ready_child_is_not_running(
    make_supervisor: MakeSupervisor, tmp_path: Path
) -> None:
    nothing_there = f"http://127.0.0.1:{free_port()}/"
    supervisor = make_supervisor([_spec("mute", SLEEP_FOREVER, tmp_path, ready_url=nothing_there)])
    await supervisor.start()
    assert not await supervisor.wait_running("mute", timeout_s=1.0)


@pytest.mark.slow
async def test_stop_terminates_children(make_supervisor: MakeSupervisor, tmp_path: Path) -> None:
    supervisor = make_supervisor(
        [_spec("a", SLEEP_FOREVER, tmp_path), _spec("b", SLEEP_FOREVER, tmp_path)]
    )
    await supervisor.start()
    pids = [supervisor.pid("a"), supervisor.pid("b")]
    await supervisor.stop()
    assert [pid is not None and _alive(pid) for pid in pids] == [False, False]


@pytest.mark.slow
async def test_stop_publishes_stopped(
    make_supervisor: MakeSupervisor, board: StatusBoard, tmp_path: Path
) -> None:
    supervisor = make_supervisor([_spec("a", SLEEP_FOREVER, tmp_path)])
    await supervisor.start()
    await supervisor.stop()
    status = await board.get("a")
    assert status is not None and status.state is ProcessState.STOPPED


@pytest.mark.slow
async def test_stop_is_idempotent(make_supervisor: MakeSupervisor, tmp_path: Path) -> None:
    supervisor = make_supervisor([_spec("a", SLEEP_FOREVER, tmp_path)])
    await supervisor.start()
    pid = supervisor.pid("a")
    await supervisor.stop()
    await supervisor.stop()
    assert pid is not None and not _alive(pid)


@pytest.mark.slow
async def test_stopped_child_is_not_restarted(
    make_supervisor: MakeSupervisor, tmp_path: Path
) -> None:
    supervisor = make_supervisor([_spec("a", SLEEP_FOREVER, tmp_path)])
    await supervisor.start()
    await supervisor.stop()
    await asyncio.sleep(FAST.initial_s * 4)
    assert supervisor.restarts("a") == 0


@pytest.mark.slow
async def test_sigterm_ignorer_is_killed(make_supervisor: MakeSupervisor, tmp_path: Path) -> None:
    code = (
        "import pathlib, signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "pathlib.Path('ignoring').touch()\n"
        "time.sleep(600)\n"
    )
    supervisor = make_supervisor([_spec("stubborn", code, tmp_path)], grace_s=0.5)
    await supervisor.start()
    assert await _until((tmp_path / "ignoring").exists)
    pid = supervisor.pid("stubborn")
    await supervisor.stop()
    assert pid is not None and not _alive(pid)
