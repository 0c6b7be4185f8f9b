"""Security in real Chromium and over HTTP against a running chat_ui: a hostile answer runs no
script and makes the browser contact no host but the UI's, and one user can neither read, delete,
share, resume nor upload into another user's conversation, nor learn anything from the refusals.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import pytest
import pytest_asyncio
import socketio
from playwright.async_api import Browser, ConsoleMessage, Page, Request, WebSocket

from backend.auth import Role, UserStore
from backend.db import open_pool
from tests.e2e.conftest import ALLOWED_LINK_HOST, PASSWORD, USER, RunningUI, login
from tests.fixtures.engines import FakeEngineHandle

pytestmark = [pytest.mark.slow, pytest.mark.browser]

ANSWER = '[data-step-type="assistant_message"] .message-content'
OTHER, OTHER_PASSWORD = "intruder", "intruder-password-1"
POLL_S = 0.05
HOSTILE = "\n\n".join(
    [
        "下面是几种格式。",
        "<script>window.__pwned=1</script>",
        '<img src=x onerror="window.__pwned=2">',
        "[点我](javascript:window.__pwned=3)",
        "![x](http://203.0.113.7/track.png)",
        "![参考图][r]",
        "[r]: http://203.0.113.7/ref.png",
        "![脚注图][^f]",
        "[^f]: http://203.0.113.7/f.png",
        "<iframe src=http://203.0.113.7/></iframe>",
        '<a href="http://203.0.113.7">外链</a>',
        "<javascript:window.__pwned=4>",
        "![视频](http://203.0.113.7/v.mp4)",
        "[![徽章](http://203.0.113.7/b.png)](https://example.com)",
        f"[文档](https://{ALLOWED_LINK_HOST}/guide)",
        "[钓鱼](https://evil.example.net/login) 与 https://evil.example.net/bare",
        f"[伪装](https://{ALLOWED_LINK_HOST}\\@evil.example.net/)",
        "回答结束。",
    ]
)
LEAKS = ("Traceback", 'File "', "/work/", ".py", "psycopg", "SELECT ")


async def send(page: Page, text: str) -> None:
    await page.fill("#chat-input", text)
    await page.click("#chat-submit")


async def answer_done(page: Page, *, ending: str, polls: int = 1200) -> str:
    """The last answer once it contains `ending` and the run is over."""
    for _ in range(polls):
        nodes = page.locator(ANSWER)
        if await nodes.count() and not await page.locator("#stop-button").count():
            text = await nodes.last.inner_text()
            if ending in text:
                return text
        await asyncio.sleep(POLL_S)
    raise AssertionError("the answer did not finish")


def local(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("data", "blob") or parts.hostname == "127.0.0.1"


async def test_hostile_answer_runs_nothing_and_fetches_nothing(
    page: Page, fake_ui: RunningUI, fake_engine: FakeEngineHandle
) -> None:
    contacted: list[str] = []
    refused: list[str] = []

    def on_request(request: Request) -> None:
        contacted.append(request.url)

    def on_socket(socket: WebSocket) -> None:
        contacted.append(socket.url)

    def on_console(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            refused.append(message.text)

    page.on("request", on_request)
    page.on("websocket", on_socket)
    page.on("console", on_console)
    fake_engine.script([{"text": HOSTILE, "chunk_chars": 5}])
    await login(page, fake_ui)
    await send(page, "请展示几种格式")
    text = await answer_done(page, ending="回答结束")

    answer = page.locator(ANSWER).last
    links = answer.locator("a", has_text="点我")
    if await links.count():  # it should have become text; if not, clicking must still do nothing
        await links.first.click()
    assert await page.evaluate("() => window.__pwned") is None
    assert [url for url in contacted if not local(url)] == []
    assert any("/ws/socket.io" in url for url in contacted)  # the websocket was among them
    assert refused == []  # the page never even tried what the CSP forbids
    assert await answer.locator("img, video, iframe, object, embed").count() == 0
    hrefs = await answer.locator("a").evaluate_all("els => els.map(e => e.getAttribute('href'))")
    assert all(urlsplit(h or "").scheme in ("http", "https", "mailto", "") for h in hrefs), hrefs
    # links survive only to the allow-listed host (QWEN_GUARD__LINK_HOSTS of fake_ui)
    web = [h for h in hrefs if urlsplit(h or "").scheme in ("http", "https")]
    assert web == [f"https://{ALLOWED_LINK_HOST}/guide"], hrefs
    assert "钓鱼" in text and "evil.example.net/bare" in text  # shown, as text
    assert "<script>window.__pwned=1</script>" in text  # shown, as text
    assert "点我" in text and "徽章" in text


@dataclass
class Conversation:
    """The default tester's thread, made through the UI, and the tester's live session."""

    thread_id: str
    session_id: str
    secret: str


async def rest_login(ui: RunningUI, user: str, password: str) -> httpx.AsyncClient:
    """An HTTP client holding `user`'s Chainlit login cookie."""
    client = httpx.AsyncClient(base_url=ui.chat.rstrip("/"), trust_env=False)
    response = await client.post("/login", data={"username": user, "password": password})
    assert response.status_code == 200, response.text
    return client


@pytest_asyncio.fixture(scope="module")
async def intruder(fake_ui: RunningUI) -> AsyncIterator[httpx.AsyncClient]:
    pool = await open_pool(fake_ui.env["QWEN_DATABASE__URL"], min_size=1, max_size=1)
    try:
        await UserStore(pool).ensure(OTHER, OTHER_PASSWORD, role=Role.USER)
    finally:
        await pool.close()
    client = await rest_login(fake_ui, OTHER, OTHER_PASSWORD)
    yield client
    await client.aclose()


@pytest_asyncio.fixture(scope="module")
async def owner(fake_ui: RunningUI) -> AsyncIterator[httpx.AsyncClient]:
    client = await rest_login(fake_ui, USER, PASSWORD)
    yield client
    await client.aclose()


def session_ids(page: Page) -> list[str]:
    """The Chainlit session ids the page's websockets announce (the socket.io connect packet)."""
    sessions: list[str] = []

    def on_socket(socket: WebSocket) -> None:
        def on_frame(payload: str | bytes) -> None:
            if isinstance(payload, str) and payload.startswith("40{"):
                sessions.append(json.loads(payload[2:])["sessionId"])

        socket.on("framesent", on_frame)

    page.on("websocket", on_socket)
    return sessions


@pytest_asyncio.fixture(scope="module")
async def conversation(
    browser: Browser, fake_ui: RunningUI, fake_engine_url: str, owner: httpx.AsyncClient
) -> AsyncIterator[Conversation]:
    """The tester asks a question carrying a secret; its page stays open (the session lives)."""
    secret = f"机密-{uuid.uuid4().hex[:8]}"
    context = await browser.new_context(locale="zh-CN")
    page = await context.new_page()
    sessions = session_ids(page)
    engine = FakeEngineHandle(fake_engine_url)
    engine.reset()
    engine.script([{"text": f"回答里也有{secret}。"}])
    await login(page, fake_ui)
    await send(page, f"我的问题是{secret}")
    await answer_done(page, ending=secret)
    body = {"pagination": {"first": 20}, "filter": {}}
    for _ in range(200):
        threads = (await owner.post("/project/threads", json=body)).json()["data"]
        if found := [t["id"] for t in threads if secret in (t["name"] or "")]:
            yield Conversation(thread_id=found[0], session_id=sessions[-1], secret=secret)
            await context.close()
            return
        await asyncio.sleep(POLL_S)
    await context.close()
    raise AssertionError("the thread was not persisted")


def refused(response: httpx.Response, secret: str) -> bool:
    """A 4xx whose body says nothing about the thread or the server's insides."""
    return 400 <= response.status_code < 500 and not any(
        marker in response.text for marker in (secret, *LEAKS)
    )


async def test_other_user_cannot_read_list_or_change_a_thread(
    conversation: Conversation, intruder: httpx.AsyncClient, owner: httpx.AsyncClient
) -> None:
    thread, secret = conversation.thread_id, conversation.secret
    assert refused(await intruder.get(f"/project/thread/{thread}"), secret)
    assert refused(await intruder.get(f"/project/thread/{thread}/element/x"), secret)
    listing = await intruder.post(
        "/project/threads", json={"pagination": {"first": 50}, "filter": {"userId": "any"}}
    )
    assert listing.status_code == 200 and secret not in listing.text
    rename = {"threadId": thread, "name": "被改名"}
    assert refused(await intruder.put("/project/thread", json=rename), secret)
    share = {"threadId": thread, "isShared": True}
    assert refused(await intruder.put("/project/thread/share", json=share), secret)
    deleted = await intruder.request("DELETE", "/project/thread", json={"threadId": thread})
    assert refused(deleted, secret)
    mine = await owner.get(f"/project/thread/{thread}")  # still there, unchanged, for its owner
    assert mine.status_code == 200 and secret in mine.text and "被改名" not in mine.text


async def test_other_user_cannot_give_or_remove_feedback(
    conversation: Conversation, intruder: httpx.AsyncClient, owner: httpx.AsyncClient
) -> None:
    thread, secret = conversation.thread_id, conversation.secret
    steps = (await owner.get(f"/project/thread/{thread}")).json()["steps"]
    answer = next(step["id"] for step in steps if step["type"] == "assistant_message")
    body = {"feedback": {"forId": answer, "value": 0, "comment": "差"}, "sessionId": "x"}
    forged = await intruder.put("/feedback", json=body)
    assert forged.status_code >= 400 and not any(m in forged.text for m in (secret, *LEAKS))
    mine = await owner.put("/feedback", json=body | {"feedback": {"forId": answer, "value": 1}})
    assert mine.status_code == 200
    removed = await intruder.request(
        "DELETE", "/feedback", json={"feedbackId": mine.json()["feedbackId"]}
    )
    assert removed.status_code >= 400 and not any(m in removed.text for m in (secret, *LEAKS))
    kept = (await owner.get(f"/project/thread/{thread}")).json()["steps"]
    assert [s["feedback"]["value"] for s in kept if s["id"] == answer] == [1]


async def test_nobody_reads_a_thread_without_a_login(
    conversation: Conversation, fake_ui: RunningUI
) -> None:
    async with httpx.AsyncClient(base_url=fake_ui.chat.rstrip("/"), trust_env=False) as anonymous:
        for path in (f"/project/thread/{conversation.thread_id}", "/project/threads", "/user"):
            response = await anonymous.request("POST" if path.endswith("s") else "GET", path)
            assert refused(response, conversation.secret), path


async def test_sharing_publishes_nothing(
    conversation: Conversation, owner: httpx.AsyncClient, intruder: httpx.AsyncClient
) -> None:
    # Sharing is off in this deployment (allow_thread_sharing = false), but Chainlit's share
    # endpoints do not look at that setting: the owner's request must still publish nothing.
    share = {"threadId": conversation.thread_id, "isShared": True}
    assert (await owner.put("/project/thread/share", json=share)).status_code == 200
    shared = await intruder.get(f"/project/share/{conversation.thread_id}")
    assert refused(shared, conversation.secret)


async def test_other_user_cannot_resume_or_take_over(
    conversation: Conversation, fake_ui: RunningUI, intruder: httpx.AsyncClient
) -> None:
    cookie = "; ".join(f"{name}={value}" for name, value in intruder.cookies.items())

    async def connect(*, thread_id: str | None, session_id: str) -> bool:
        client = socketio.AsyncClient(reconnection=False)
        auth = {"clientType": "webapp", "sessionId": session_id, "threadId": thread_id}
        try:
            await client.connect(
                fake_ui.url, headers={"Cookie": cookie}, auth=auth, transports=["websocket"],
                socketio_path="/chat/ws/socket.io", wait_timeout=10,
            )  # fmt: skip
        except socketio.exceptions.ConnectionError:
            return False
        await client.disconnect()
        return True

    assert await connect(thread_id=None, session_id=str(uuid.uuid4()))  # a new chat of one's own
    assert not await connect(thread_id=conversation.thread_id, session_id=str(uuid.uuid4()))
    assert not await connect(thread_id=None, session_id=conversation.session_id)


async def test_other_user_cannot_upload(
    conversation: Conversation, intruder: httpx.AsyncClient
) -> None:
    files = {"file": ("x.txt", b"hello", "text/plain")}
    into_theirs = await intruder.post(
        "/project/file", params={"session_id": conversation.session_id}, files=files
    )
    assert into_theirs.status_code == 401 and refused(into_theirs, conversation.secret)
    nowhere = await intruder.post("/project/file", params={"session_id": "none"}, files=files)
    assert refused(nowhere, conversation.secret)


async def test_spontaneous_upload_is_refused(page: Page, fake_ui: RunningUI) -> None:
    sessions = session_ids(page)
    await login(page, fake_ui)
    async with httpx.AsyncClient(base_url=fake_ui.chat.rstrip("/"), trust_env=False) as own:
        own.cookies.update({c["name"]: c["value"] for c in await page.context.cookies()})
        files = {"file": ("x.txt", b"hello", "text/plain")}
        response = await own.post("/project/file", params={"session_id": sessions[-1]}, files=files)
    assert response.status_code == 400 and "not enabled" in response.text


async def test_responses_carry_the_security_headers(fake_ui: RunningUI) -> None:
    async with httpx.AsyncClient(base_url=fake_ui.url, trust_env=False) as client:
        page = await client.get("/chat/", headers={"Accept-Encoding": "gzip"})
        health = await client.get("/healthz")
    for response in (page, health):
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    assert "googleapis" not in page.text and "jsdelivr" not in page.text
    assert "'sha256-" in page.headers["Content-Security-Policy"]
