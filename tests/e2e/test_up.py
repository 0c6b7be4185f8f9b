"""`qwen-stack up` as a user runs it: ready, serves logins, restarts a crashed engine, stops cleanly
on Ctrl-C, and a second `up` finds the data of the first."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.engines import free_port

pytestmark = pytest.mark.slow

READY = re.compile(r"qwen-stack is up in [\d.]+s: (\S+)")
STARTED = re.compile(r"started ([\w-]+) \(pid (\d+)\)")


class Up:
    """One `qwen-stack up --model tiny` child; output goes to a file we scan."""

    def __init__(
        self, state: Path, *, ui_port: int, engine_port: int, extra: tuple[str, ...] = ()
    ) -> None:
        self.log = state / f"up-{time.monotonic_ns()}.log"
        env = {
            **os.environ,
            "QWEN_STATE_DIR": str(state),
            "QWEN_UI__PORT": str(ui_port),
            "QWEN_ENGINE__PORT": str(engine_port),
            "QWEN_ENGINE__N_THREADS": "1",
            "QWEN_RAG__PORT": str(free_port()),
        }
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "backend.cli", "up", "--model", "tiny", *extra],
                env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: re.Pattern[str], *, count: int = 1, polls: int = 1200) -> list[str]:
        for _ in range(polls):
            found = pattern.findall(self.text())
            if len(found) >= count:
                return list(found)
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"never saw {pattern.pattern!r}:\n{self.text()[-3000:]}")

    def interrupt(self) -> int:
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=90)


@pytest.fixture
def ports() -> Iterator[tuple[int, int]]:
    yield free_port(), free_port()


def login_status(url: str, user: str, password: str) -> int:
    response = httpx.post(
        url + "/chat/login", data={"username": user, "password": password}, trust_env=False
    )
    return response.status_code


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_serves_restarts_engine_and_stops(tmp_path: Path, ports: tuple[int, int]) -> None:
    ui_port, engine_port = ports
    up = Up(tmp_path, ui_port=ui_port, engine_port=engine_port)
    try:
        (url,) = up.wait_for(READY)
        assert httpx.get(url + "/readyz", trust_env=False).json() == {
            "redis": "ok",
            "database": "ok",
        }
        assert login_status(url, "admin", "admin123") == 200
        metrics = httpx.get(url + "/metrics", trust_env=False).text
        assert 'qwen_engine_up{replica="http://127.0.0.1:' in metrics
        assert login_status(url, "admin", "wrong-password") == 401
        engine_pid = int(dict(up.wait_for(STARTED, count=3))["engine"])  # engine, RAG worker, UI
        os.kill(engine_pid, signal.SIGKILL)
        up.wait_for(re.compile(r"engine exited with -9 .* restarting in"))
        restarted = up.wait_for(STARTED, count=4)
        new_pid = int([pid for name, pid in restarted if name == "engine"][-1])
        assert new_pid != engine_pid
        engine = f"http://127.0.0.1:{engine_port}/v1/models"
        for _ in range(600):
            try:
                if httpx.get(engine, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert httpx.get(engine, trust_env=False).status_code == 200
    finally:
        code = up.interrupt()
    assert code == 0
    assert not pid_alive(new_pid)
    assert "Traceback" not in up.text()


def test_second_up_finds_first_data(tmp_path: Path, ports: tuple[int, int]) -> None:
    ui_port, engine_port = ports
    first = Up(tmp_path, ui_port=ui_port, engine_port=engine_port)
    first.wait_for(READY)
    assert first.interrupt() == 0
    added = subprocess.run(
        [sys.executable, "-m", "backend.cli", "user", "add", "bob", "--role", "user"],
        input="bob-password-1\n", text=True, capture_output=True,
        env={**os.environ, "QWEN_STATE_DIR": str(tmp_path)}, check=False,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    second = Up(tmp_path, ui_port=ui_port, engine_port=engine_port)
    try:
        (url,) = second.wait_for(READY)
        assert login_status(url, "bob", "bob-password-1") == 200
        assert "applied migrations" not in second.text()
    finally:
        assert second.interrupt() == 0


def test_up_with_two_engines(tmp_path: Path) -> None:
    ui_port, engine_port = free_port(), free_port()
    while engine_port + 1 == ui_port:  # the replicas take two consecutive ports
        engine_port = free_port()
    up = Up(tmp_path, ui_port=ui_port, engine_port=engine_port, extra=("--engines", "2"))
    try:
        (url,) = up.wait_for(READY)
        started = dict(up.wait_for(STARTED, count=3))
        assert {"engine-1", "engine-2", "ui"} <= set(started)
        for port in (engine_port, engine_port + 1):
            models = httpx.get(f"http://127.0.0.1:{port}/v1/models", trust_env=False)
            assert models.status_code == 200
        assert httpx.get(url + "/readyz", trust_env=False).status_code == 200
    finally:
        assert up.interrupt() == 0
