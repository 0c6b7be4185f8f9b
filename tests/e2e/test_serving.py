"""Serving behaviour a user sees: the queue, sentiment before the answer, disconnect aborts."""

from __future__ import annotations

import json

import pytest
from playwright.async_api import Browser, Page

from tests.e2e.conftest import RunningUI, login
from tests.e2e.test_chat import ANSWER, send, wait_answer_done, wait_for_partial
from tests.fixtures.engines import FakeEngineHandle

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def streamed_text(frames: list[str]) -> str:
    """The answer text the socket carried: the `token` of every stream_token event, in order,
    plus each stream_start's first output."""
    text = []
    for frame in frames:
        start = frame.find("[")
        try:
            event = json.loads(frame[start:]) if start >= 0 else None
        except ValueError:
            continue
        if isinstance(event, list) and len(event) == 2 and isinstance(event[1], dict):
            if event[0] == "stream_token":
                text.append(str(event[1].get("token", "")))
            elif event[0] == "stream_start":
                text.append(str(event[1].get("output", "")))
    return "".join(text)


def decode_frame(frame: str) -> str:
    """A socket.io frame's JSON payload with escapes undone (`42["event", {...}]`)."""
    start = frame.find("[")
    if start < 0:
        return frame
    try:
        return json.dumps(json.loads(frame[start:]), ensure_ascii=False)
    except ValueError:
        return frame


async def test_second_conversation_sees_its_place_in_line(
    browser: Browser, busy_ui: RunningUI, fake_engine: FakeEngineHandle
) -> None:
    fake_engine.script([{"text": "慢" * 60, "token_delay_s": 0.05}, {"text": "轮到我了"}])
    first = await browser.new_context(locale="zh-CN")
    second = await browser.new_context(locale="zh-CN")
    try:
        holder, waiter = await first.new_page(), await second.new_page()
        await login(holder, busy_ui)
        await send(holder, "我先占住唯一的位置")
        await holder.wait_for_selector(ANSWER, timeout=30_000)
        await login(waiter, busy_ui)
        await send(waiter, "我在排队吗")
        await waiter.get_by_text("排队中").wait_for(timeout=30_000)
        await first.close()  # the holder leaves: its slot frees and the waiter is served
        assert await wait_answer_done(waiter) == "轮到我了"
        assert await waiter.get_by_text("排队中").count() == 0
    finally:
        await second.close()


async def test_closing_the_page_aborts_the_engine_request(
    browser: Browser, fake_ui: RunningUI, fake_engine: FakeEngineHandle
) -> None:
    text = "长" * 400
    fake_engine.script([{"text": text, "token_delay_s": 0.05}])
    context = await browser.new_context(locale="zh-CN")
    page = await context.new_page()
    await login(page, fake_ui)
    await send(page, "写一篇很长的文章")
    await wait_for_partial(page)
    await context.close()
    log = await fake_engine.settled_log()
    assert log[-1]["disconnected"] is True
    assert log[-1]["chunks_sent"] < len(text)


async def test_sentiment_label_shows_before_the_answer(page: Page, llama_ui: RunningUI) -> None:
    await login(page, llama_ui)
    await send(page, "今天天气真好，我很开心！")
    await wait_answer_done(page)
    label = page.get_by_text("情感：").first
    await label.wait_for(timeout=15_000)
    answer = page.locator(ANSWER).last
    label_box, answer_box = await label.bounding_box(), await answer.bounding_box()
    assert label_box is not None and answer_box is not None
    assert label_box["y"] < answer_box["y"]


async def test_stream_setting_turns_streaming_off(
    page: Page, fake_ui: RunningUI, fake_engine: FakeEngineHandle
) -> None:
    fake_engine.script([{"text": "整段返回的回答"}])
    await login(page, fake_ui)
    await page.click("#chat-settings-open-modal")
    await page.click("#stream")
    await page.get_by_role("option", name="关").click()
    await page.get_by_role("button", name="确认").click()
    await send(page, "你好")
    assert await wait_answer_done(page) == "整段返回的回答"
    assert fake_engine.log()[-1]["body"]["stream"] is False


async def test_blocked_word_never_reaches_the_browser(
    page: Page, fake_ui: RunningUI, fake_engine: FakeEngineHandle
) -> None:
    clean = "这是一段很正常的开头，用来说明问题。" * 3  # no character of the blocked word
    fake_engine.script(
        [{"text": clean + "想要资料的话加微信吧。" * 3, "chunk_chars": 1, "token_delay_s": 0.02}]
    )
    frames: list[str] = []
    page.on(
        "websocket",
        lambda socket: socket.on("framereceived", lambda payload: frames.append(str(payload))),
    )
    await login(page, fake_ui)
    await send(page, "随便聊聊")
    await page.get_by_text("已停止显示").wait_for(timeout=30_000)
    received = "".join(decode_frame(frame) for frame in frames)
    assert "正常的开头" in streamed_text(frames)  # the clean text did arrive
    assert "加" not in received and "微信" not in received
    assert "加微信" not in await page.inner_text("body")
