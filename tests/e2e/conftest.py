"""Browser-test fixtures: a real chat_ui process (uvicorn, as `qwen-stack up` runs it) on the test
PostgreSQL and Redis, in front of a real llama.cpp server or the scripted fake, and real Chromium.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, WebSocket, async_playwright
from psycopg import sql

from backend.auth import Role, UserStore
from backend.db import migrate, open_pool
from backend.embedded import ensure_database
from tests.fixtures.engines import free_port, stop_process

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
USER, PASSWORD = "tester", "tester-password-1"
UI_READY_POLLS = 600  # × 0.1 s


@dataclass(frozen=True)
class RunningUI:
    url: str  # e.g. http://127.0.0.1:PORT
    log: Path
    env: dict[str, str]  # the settings it runs with, so a replica can share them

    @property
    def chat(self) -> str:
        return self.url + "/chat/"


def _redis_db_url(redis_url: str, db: int) -> str:
    """The same server, another logical database, so other tests' FLUSHDB cannot touch ours."""
    return f"{redis_url}{'&' if '?' in redis_url else '?'}db={db}"


async def _new_database(database_url: str) -> tuple[str, str]:
    """(name, URL) of a migrated database holding the test login."""
    name = f"e2e_{uuid.uuid4().hex[:12]}"
    db_url = ensure_database(database_url, name)
    await migrate(db_url)
    pool = await open_pool(db_url, min_size=1, max_size=1)
    try:
        await UserStore(pool).ensure(USER, PASSWORD, role=Role.USER)
    finally:
        await pool.close()
    return name, db_url


async def _start_ui(
    *, engine_url: str, database_url: str, redis_url: str, state: Path, extra_env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], RunningUI, str]:
    name, db_url = await _new_database(database_url)
    env = {
        "QWEN_DATABASE__URL": db_url,
        "QWEN_REDIS__URL": redis_url,
        "QWEN_LLM__BASE_URL": engine_url,
        **extra_env,
    }
    process, ui = await _spawn_ui(env, state)
    return process, ui, name


async def _spawn_ui(
    settings_env: dict[str, str], state: Path
) -> tuple[subprocess.Popen[bytes], RunningUI]:
    port = free_port()
    env = {**os.environ, **settings_env, "QWEN_STATE_DIR": str(state), "QWEN_UI__PORT": str(port)}
    log = state / "ui.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "chat_ui.server:create_app", "--factory",
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
            env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    ui = RunningUI(url=f"http://127.0.0.1:{port}", log=log, env=settings_env)
    async with httpx.AsyncClient(trust_env=False) as client:
        for _ in range(UI_READY_POLLS):
            if process.poll() is not None:
                pytest.fail(f"chat_ui exited: {log.read_text(errors='replace')[-3000:]}")
            try:
                if (await client.get(ui.url + "/healthz")).status_code == 200:
                    return process, ui
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    process.kill()
    pytest.fail(f"chat_ui did not start: {log.read_text(errors='replace')[-3000:]}")


def _stop_ui(process: subprocess.Popen[bytes], database_url: str, name: str) -> None:
    stop_process(process)
    # The session's server may already be stopping when module fixtures finalise; the database
    # lives in a temporary server then and goes with it.
    with (
        contextlib.suppress(psycopg.OperationalError),
        psycopg.connect(database_url, autocommit=True) as conn,
    ):
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest_asyncio.fixture(scope="module")
async def llama_ui(
    llama_server: str, database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningUI]:
    """chat_ui in front of the real llama.cpp server on the tiny model."""
    process, ui, name = await _start_ui(
        engine_url=llama_server, database_url=database_url,
        redis_url=_redis_db_url(redis_url, 3), state=tmp_path_factory.mktemp("ui-llama"),
        extra_env={"QWEN_LLM__MAX_TOKENS": "48"},
    )  # fmt: skip
    yield ui
    _stop_ui(process, database_url, name)


ALLOWED_LINK_HOST = "docs.example.com"  # answers of fake_ui may link here, nowhere else


@pytest_asyncio.fixture(scope="module")
async def fake_ui(
    fake_engine_url: str, database_url: str, redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[RunningUI]:  # fmt: skip
    """chat_ui in front of the scripted fake engine, with short timeouts for the fault tests."""
    process, ui, name = await _start_ui(
        engine_url=fake_engine_url, database_url=database_url,
        redis_url=_redis_db_url(redis_url, 4), state=tmp_path_factory.mktemp("ui-fake"),
        extra_env={
            "QWEN_LLM__FIRST_TOKEN_TIMEOUT_S": "2",
            "QWEN_LLM__INTER_TOKEN_TIMEOUT_S": "2",
            # exact-text tests script one reply per request; the probe and the warm-up would
            # each take one
            "QWEN_SERVING__SENTIMENT": "false",
            "QWEN_SERVING__WARMUP": "false",
            "QWEN_GUARD__LINK_HOSTS": f'["{ALLOWED_LINK_HOST}"]',
        },
    )  # fmt: skip
    yield ui
    _stop_ui(process, database_url, name)


@pytest_asyncio.fixture(scope="module")
async def busy_ui(
    fake_engine_url: str, database_url: str, redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[RunningUI]:  # fmt: skip
    """chat_ui with one session slot in all, so a second conversation has to queue."""
    process, ui, name = await _start_ui(
        engine_url=fake_engine_url, database_url=database_url,
        redis_url=_redis_db_url(redis_url, 5), state=tmp_path_factory.mktemp("ui-busy"),
        extra_env={
            "QWEN_SERVING__SLOTS_PER_REPLICA": "1",
            "QWEN_SERVING__QUEUE_WAIT_BUDGET_S": "60",
            "QWEN_SERVING__SENTIMENT": "false",
        },
    )  # fmt: skip
    yield ui
    _stop_ui(process, database_url, name)


@pytest_asyncio.fixture(scope="module")
async def fake_ui_replica(
    fake_ui: RunningUI, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningUI]:
    """A second chat_ui process sharing fake_ui's database, Redis and engine (another replica)."""
    process, ui = await _spawn_ui(fake_ui.env, tmp_path_factory.mktemp("ui-replica"))
    yield ui
    stop_process(process)


@pytest_asyncio.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is missing: `make system-deps` installs Debian's chromium")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        await browser.close()


@pytest_asyncio.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(locale="zh-CN", viewport={"width": 1280, "height": 800})
    page = await context.new_page()
    yield page
    await context.close()


async def login(page: Page, ui: RunningUI, *, user: str = USER, password: str = PASSWORD) -> None:
    """Log in and return once the chat session is live.

    Chainlit drops a message sent before its websocket session has run on_chat_start, so wait for
    that run (a task_start then task_end frame on the socket), not only for the input box.
    """
    ready = asyncio.Event()

    def on_socket(socket: WebSocket) -> None:
        started = False

        def on_frame(payload: str | bytes) -> None:
            nonlocal started
            if isinstance(payload, str) and payload.startswith('42["task_start"'):
                started = True
            elif isinstance(payload, str) and payload.startswith('42["task_end"') and started:
                ready.set()

        socket.on("framereceived", on_frame)

    page.on("websocket", on_socket)
    await page.goto(ui.chat)
    await page.fill("#email", user)
    await page.fill("#password", password)
    await page.click("button[type=submit]")
    await page.wait_for_selector("#chat-input", timeout=30_000)
    await asyncio.wait_for(ready.wait(), 30)
    page.remove_listener("websocket", on_socket)
