"""The chat in real Chromium: log in, stream, reload and resume, stop, and clear errors."""

from __future__ import annotations

import asyncio

import pytest
from playwright.async_api import Browser, Page

from tests.e2e.conftest import RunningUI, login
from tests.fixtures.engines import FakeEngineHandle

pytestmark = [pytest.mark.slow, pytest.mark.browser]

ANSWER = '[data-step-type="assistant_message"] .message-content'
POLL_S = 0.05


async def send(page: Page, text: str) -> None:
    await page.fill("#chat-input", text)
    await page.click("#chat-submit")


async def answer_text(page: Page) -> str:
    nodes = page.locator(ANSWER)
    if await nodes.count() == 0:
        return ""
    return (await nodes.last.inner_text()).strip()


async def wait_for_partial(page: Page, *, chars: int = 5, polls: int = 400) -> None:
    """Until the streaming answer shows at least `chars` characters."""
    for _ in range(polls):
        if len(await answer_text(page)) >= chars:
            return
        await asyncio.sleep(POLL_S)
    raise AssertionError("no partial answer appeared")


async def wait_answer_done(page: Page, *, polls: int = 1200) -> str:
    """The last answer once the stop button is gone (the run ended)."""
    for _ in range(polls):
        if await answer_text(page) and not await page.locator("#stop-button").count():
            return await answer_text(page)
        await asyncio.sleep(POLL_S)
    raise AssertionError("the answer did not finish")


async def test_login_chat_reload_resume(page: Page, llama_ui: RunningUI) -> None:
    await login(page, llama_ui)
    question = "你好，请介绍一下你自己"
    await send(page, question)
    first = await wait_answer_done(page)
    assert first  # random weights: any text, but some text
    await page.reload()
    await page.wait_for_selector("#chat-input", timeout=30_000)
    thread = page.get_by_text(question).first
    await thread.wait_for(timeout=15_000)  # the thread is listed in the history sidebar
    await thread.click()
    await page.wait_for_selector(ANSWER, timeout=15_000)
    assert await answer_text(page) == first  # resumed thread shows the same answer


async def test_answer_streams_in(
    page: Page, fake_ui: RunningUI, fake_engine: FakeEngineHandle
) -> None:
    # Long enough to outrun the guard's hold-back window (the answer trails it by ~18-34 chars).
    text = "这是一个逐字流式输出的回答，用来确认界面边生成边显示。" * 4
    fake_engine.script([{"text": text, "chunk_chars": 1, "token_delay_s": 0.03}])
    await login(page, fake_ui)
    await send(page, "请流式回答")
    seen: set[str] = set()
    for _ in range(400):
        current = await answer_text(page)
        if current:
            seen.add(current)
        if current == text:
            break
        await asyncio.sleep(POLL_S)
    partial = [s for s in seen if s != text and text.startswith(s)]
    assert partial, "no partial answer was ever shown"
    assert await wait_answer_done(page) == text


async def test_stop_aborts_engine_request(
    page: Page, fake_ui: RunningUI, fake_engine: FakeEngineHandle
) -> None:
    text = "长" * 400
    fake_engine.script([{"text": text, "chunk_chars": 1, "token_delay_s": 0.05}])
    await login(page, fake_ui)
    await send(page, "写一篇很长的文章")
    await wait_for_partial(page)
    await page.click("#stop-button")
    log = await fake_engine.settled_log()
    assert len(log) == 1
    assert log[0]["disconnected"] is True
    assert log[0]["chunks_sent"] < len(text)


async def test_engine_error_is_clear(
    page: Page, fake_ui: RunningUI, fake_engine: FakeEngineHandle
) -> None:
    fake_engine.script([{"status": 500}])
    await login(page, fake_ui)
    await send(page, "你好")
    notice = page.get_by_text("模型服务暂时不可用")
    await notice.wait_for(timeout=30_000)
    body = await page.inner_text("body")
    assert "Traceback" not in body
    assert "Error" not in body


async def test_first_token_timeout_is_clear(
    page: Page, fake_ui: RunningUI, fake_engine: FakeEngineHandle
) -> None:
    fake_engine.script([{"text": "太迟了", "first_token_delay_s": 5}])
    await login(page, fake_ui)
    await send(page, "你好")
    notice = page.get_by_text("模型响应超时")
    await notice.wait_for(timeout=30_000)
    assert await notice.is_visible()
    log = await fake_engine.settled_log()
    assert log[-1]["disconnected"] is True  # we gave up on the engine, and it knows


async def test_other_replica_resumes_thread(
    page: Page, fake_ui: RunningUI, fake_ui_replica: RunningUI, fake_engine: FakeEngineHandle
) -> None:
    fake_engine.script([{"text": "第一轮的回答"}, {"text": "第二轮的回答"}])
    await login(page, fake_ui)
    await send(page, "第一轮的问题")
    assert await wait_answer_done(page) == "第一轮的回答"
    await page.reload()
    await page.get_by_text("第一轮的问题").first.click()  # open it from the history sidebar
    await page.wait_for_url("**/thread/**", timeout=15_000)
    thread_url = page.url.replace(fake_ui.url, fake_ui_replica.url)
    await page.goto(thread_url)  # same login cookie (cookies are per host, not per port)
    await page.wait_for_selector(ANSWER, timeout=30_000)
    assert await answer_text(page) == "第一轮的回答"
    await send(page, "第二轮的问题")
    for _ in range(600):
        if await answer_text(page) == "第二轮的回答":
            break
        await asyncio.sleep(POLL_S)
    second = fake_engine.log()[-1]["body"]["messages"]
    assert [m["content"] for m in second[1:]] == ["第一轮的问题", "第一轮的回答", "第二轮的问题"]


async def test_starter_sends_its_message(
    page: Page, fake_ui: RunningUI, fake_engine: FakeEngineHandle
) -> None:
    await login(page, fake_ui)
    await page.click("#starter-自我介绍")
    await wait_answer_done(page)
    assert (
        fake_engine.log()[-1]["body"]["messages"][-1]["content"]
        == "你好！请用三句话介绍一下你自己。"
    )


async def test_stalled_stream_keeps_partial_answer(
    page: Page, fake_ui: RunningUI, fake_engine: FakeEngineHandle
) -> None:
    fake_engine.script([{"text": "说到一半就卡住了", "stall_after": 4}])
    await login(page, fake_ui)
    await send(page, "你好")
    await page.get_by_text("模型回答中途停顿过久").wait_for(timeout=30_000)
    assert (await answer_text(page)).startswith("说到一半")


async def test_ui_is_chinese_for_an_english_browser(browser: Browser, fake_ui: RunningUI) -> None:
    context = await browser.new_context(locale="en-US")
    try:
        page = await context.new_page()
        await page.goto(fake_ui.chat)
        await page.wait_for_selector("#email", timeout=30_000)
        body = await page.inner_text("body")
    finally:
        await context.close()
    assert "用户名" in body
    assert "密码" in body
