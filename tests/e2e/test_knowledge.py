"""The knowledge base in real Chromium: an admin uploads a document, watches it reach 已入库, asks
about it and sees the answer's source; a plain user gets no upload control and the API refuses them.

Runs a real RAG worker process (small MiniLM embedder) and chat_ui on one test database, with the
scripted engine, so the answer text and its citation are exact.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from playwright.async_api import Page

from backend.auth import Role, UserStore
from backend.db import open_pool
from backend.errors import Forbidden
from backend.rag.client import RagClient
from tests.e2e.conftest import (
    REPO,
    RunningUI,
    _new_database,
    _redis_db_url,
    _spawn_ui,
    _stop_ui,
    login,
)
from tests.fixtures.engines import FakeEngineHandle, free_port, stop_process

pytestmark = [pytest.mark.slow, pytest.mark.browser]

ADMIN, ADMIN_PASSWORD = "kbadmin", "kbadmin-password-1"
TOKEN = "e2e-rag-token-0123456789abcdef0123"
ANSWER = '[data-step-type="assistant_message"] .message-content'
DOCUMENT = (
    "# 星辰公司考勤制度\n\n## 午休\n\n公司午休时间为每天 12:30 至 14:00，共 90 分钟。\n\n"
    "## 打卡\n\n员工每天上下班各打卡一次，漏打卡每月可补签三次。\n"
)


@dataclass(frozen=True)
class KnowledgeStack:
    ui: RunningUI
    worker_url: str


@pytest_asyncio.fixture(scope="module")
async def kb_stack(
    fake_engine_url: str, database_url: str, redis_url: str, minilm_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[KnowledgeStack]:  # fmt: skip
    name, db_url = await _new_database(database_url)
    pool = await open_pool(db_url, min_size=1, max_size=1)
    try:
        await UserStore(pool).ensure(ADMIN, ADMIN_PASSWORD, role=Role.KB_ADMIN)
    finally:
        await pool.close()
    state = tmp_path_factory.mktemp("kb-stack")
    port = free_port()
    settings_env = {
        "QWEN_DATABASE__URL": db_url,
        "QWEN_REDIS__URL": _redis_db_url(redis_url, 6),
        "QWEN_LLM__BASE_URL": fake_engine_url,
        "QWEN_SERVING__SENTIMENT": "false",
        "QWEN_SERVING__WARMUP": "false",
        "QWEN_RAG__SERVICE_TOKEN": TOKEN,
        "QWEN_RAG__WORKER_URL": f"http://127.0.0.1:{port}",
        "QWEN_RAG__PORT": str(port),
        "QWEN_RAG__EMBEDDER": "flag",
        "QWEN_RAG__EMBEDDING_MODEL": str(minilm_path),
        "QWEN_RAG__EMBEDDING_DIM": "384",
        "QWEN_RAG__EMBEDDING_POOLING": "mean",
    }
    log = state / "rag-worker.log"
    env = {**os.environ, **settings_env, "QWEN_STATE_DIR": str(state)}
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "backend.rag.api:create_app", "--factory",
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
            env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    worker_url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(trust_env=False) as http:
        for _ in range(1200):
            if worker.poll() is not None:
                pytest.fail(f"RAG worker exited: {log.read_text(errors='replace')[-3000:]}")
            try:
                if (await http.get(worker_url + "/readyz")).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    ui_process, ui = await _spawn_ui(settings_env, state)
    yield KnowledgeStack(ui=ui, worker_url=worker_url)
    stop_process(ui_process)
    stop_process(worker)
    _stop_ui(ui_process, database_url, name)


async def open_kb_profile(page: Page) -> None:
    await page.click("#chat-profiles")
    await page.get_by_role("option", name="知识库问答").click()
    confirm = page.get_by_role("button", name="确认")
    if await confirm.count():
        await confirm.click()
    await page.wait_for_selector("#chat-input", timeout=30_000)


async def test_admin_uploads_asks_and_sees_source(
    page: Page, kb_stack: KnowledgeStack, fake_engine: FakeEngineHandle, tmp_path: Path
) -> None:
    await login(page, kb_stack.ui, user=ADMIN, password=ADMIN_PASSWORD)
    await open_kb_profile(page)
    await page.get_by_role("button", name="上传文档").click()
    upload = tmp_path / "考勤制度.md"
    upload.write_text(DOCUMENT, encoding="utf-8")
    await page.get_by_role("button", name="浏览文件").wait_for()
    await page.locator("#ask-button-input").set_input_files(
        files=[{"name": upload.name, "mimeType": "text/markdown", "buffer": upload.read_bytes()}]
    )
    await page.get_by_text("【已入库】考勤制度.md").wait_for(timeout=120_000)

    fake_engine.script([{"text": "公司午休时间为 12:30 至 14:00[1]。引用不存在的资料[9]。"}])
    await page.fill("#chat-input", "公司午休是几点到几点？")
    await page.click("#chat-submit")
    source = page.get_by_text("来源1").last
    await source.wait_for(timeout=60_000)
    answer = await page.locator(ANSWER).last.inner_text()
    assert "12:30 至 14:00[1]" in answer and "[9]" not in answer
    assert "考勤制度.md" in answer
    prompt = fake_engine.log()[-1]["body"]["messages"][-1]["content"]
    assert "午休时间为每天 12:30 至 14:00" in prompt  # the passage reached the model as a source
    await source.click()
    await page.get_by_text("公司午休时间为每天 12:30 至 14:00，共 90 分钟。").last.wait_for()


async def test_user_has_no_upload_and_api_refuses(page: Page, kb_stack: KnowledgeStack) -> None:
    client = RagClient(kb_stack.worker_url, token=TOKEN)
    try:
        if "公共资料" not in [kb.name for kb in await client.list_kbs(user=ADMIN)]:
            await client.create_kb("公共资料", user=ADMIN)
        await login(page, kb_stack.ui)
        await open_kb_profile(page)
        await page.get_by_text("可以提问的知识库").last.wait_for(timeout=30_000)
        assert await page.get_by_role("button", name="上传文档").count() == 0
        assert await page.locator("#upload-button-input").count() == 0
        with pytest.raises(Forbidden):
            await client.upload("公共资料", [("x.md", "普通用户的上传".encode())], user="tester")
    finally:
        await client.aclose()
