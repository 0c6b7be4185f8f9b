"""A Chainlit chat session without a browser: what the web app does, over socket.io.

REST login (`POST /chat/login`, the `access_token` cookie), a socket.io connection over websocket at
`/chat/ws/socket.io` with the web app's auth payload (`chatProfile` picks 知识库问答 or the plain
chat), `connection_successful`, then one `client_message` per turn; the turn is over at the
server's `task_end`. Answer text arrives as `stream_start` (the first piece, inside the step),
`stream_token` and, for answers and notices sent whole, `new_message` / `update_message`.

Synchronous (python-socketio's Client over websocket-client), so it runs under Locust's gevent and in
plain threads (tests/infra). Timings use time.perf_counter().
"""

from __future__ import annotations

import datetime
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import socketio

SOCKET_PATH = "/chat/ws/socket.io"
KB_PROFILE = "知识库问答"  # chat_ui/knowledge.py KB_PROFILE
NOTICE_AUTHOR = "系统"  # chat_ui/app.py SYSTEM_AUTHOR: queue positions and notices, not answers


class ChatError(Exception):
    """The session could not log in, connect, or finish a turn in time."""


@dataclass
class Answer:
    """One turn as the browser saw it. Seconds from sending; `ttft_s` None: no text came.
    `error`: the text of an error notice the UI showed (blocked, rate limited, busy, engine
    failure), None for an answer."""

    text: str
    ttft_s: float | None
    total_s: float
    pieces: int
    error: str | None = None
    disconnected: bool = False  # the server closed the socket before the turn ended
    notices: list[str] = field(default_factory=list)  # queue positions, notices, in order


@dataclass
class _Turn:
    sent_at: float
    done: threading.Event = field(default_factory=threading.Event)
    first_text: threading.Event = field(default_factory=threading.Event)
    first_at: float | None = None
    pieces: int = 0
    texts: dict[str, str] = field(default_factory=dict)  # step id -> its text so far, in order
    error: str | None = None
    disconnected: bool = False
    notices: list[str] = field(default_factory=list)


def login(base_url: str, user: str, password: str, *, timeout_s: float = 30.0) -> str:
    """Chainlit's password login; returns the access_token cookie. Raises ChatError."""
    try:
        response = httpx.post(
            f"{base_url}/chat/login",
            data={"username": user, "password": password},
            timeout=timeout_s,
            trust_env=False,
        )
    except httpx.HTTPError as exc:
        raise ChatError(f"login failed: {type(exc).__name__}") from exc
    token = response.cookies.get("access_token")
    if response.status_code != 200 or not token:
        raise ChatError(f"login refused: HTTP {response.status_code}")
    return token


class ChainlitSession:
    """One conversation (one Chainlit thread). Not thread-safe: one caller at a time."""

    def __init__(
        self, base_url: str, *, token: str, user: str, profile: str = "", timeout_s: float = 120.0
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._token, self._user, self._profile = token, user, profile
        self._timeout_s = timeout_s
        self._sio = socketio.Client(reconnection=False)
        self._started = threading.Event()
        self._ready = threading.Event()
        self._turn: _Turn | None = None
        for event, handler in {
            "connect": self._on_connect,
            "disconnect": self._on_disconnect,
            "task_start": self._on_task_start,
            "task_end": self._on_task_end,
            "stream_start": self._on_step,
            "new_message": self._on_step,
            "update_message": self._on_step,
            "stream_token": self._on_token,
        }.items():
            self._sio.on(event, handler)

    # ------------------------------------------------------------------ socket.io handlers
    def _on_connect(self) -> None:
        self._sio.emit("connection_successful")

    def _on_disconnect(self, *_: Any) -> None:
        turn = self._turn
        if turn is not None and not turn.done.is_set():
            turn.disconnected = True
            turn.done.set()

    def _on_task_start(self, _: Any) -> None:
        self._started.set()

    def _on_task_end(self, _: Any) -> None:
        if self._turn is not None:
            self._turn.done.set()
        elif self._started.is_set():
            self._ready.set()  # on_chat_start finished

    def _text(self, step_id: str, text: str, *, append: bool) -> None:
        turn = self._turn
        if turn is None or not text:
            return
        if turn.first_at is None:
            turn.first_at = time.perf_counter()
            turn.first_text.set()
        turn.pieces += 1
        turn.texts[step_id] = (turn.texts.get(step_id, "") if append else "") + text

    def _on_step(self, step: dict[str, Any]) -> None:
        # new_message / update_message / stream_start carry the step's whole text so far.
        if step.get("type") != "assistant_message" or not step.get("output"):
            return
        turn = self._turn
        if step.get("isError") and turn is not None:
            turn.error = str(step["output"])
            turn.first_text.set()  # wakes `on_first_text` waiters: no answer text will come
        if step.get("name") == NOTICE_AUTHOR:  # the queue position or a notice, not the answer
            if turn is not None:
                turn.notices.append(str(step["output"]))
            return
        self._text(str(step.get("id")), str(step["output"]), append=False)

    def _on_token(self, data: dict[str, Any]) -> None:
        if not data.get("isInput"):
            sequence = bool(data.get("isSequence"))
            self._text(str(data.get("id")), str(data.get("token") or ""), append=not sequence)

    # ------------------------------------------------------------------ API
    def open(self) -> None:
        """Connect and wait until the chat has started. Raises ChatError."""
        auth = {
            "clientType": "webapp",
            "sessionId": str(uuid.uuid4()),
            "threadId": "",
            "userEnv": "{}",
            "chatProfile": self._profile,
        }
        try:
            self._sio.connect(
                self.base_url,
                headers={"Cookie": f"access_token={self._token}", "Origin": self.base_url},
                auth=auth,
                transports=["websocket"],
                socketio_path=SOCKET_PATH,
                wait_timeout=30,
            )
        except socketio.exceptions.ConnectionError as exc:
            raise ChatError(f"socket.io connection refused: {exc}") from exc
        if not self._ready.wait(self._timeout_s):
            raise ChatError("the chat did not start")

    def ask(self, text: str, *, on_first_text: Callable[[], object] | None = None) -> Answer:
        """Send one message and wait for the end of its turn (or the socket's). Raises ChatError
        on timeout. `on_first_text` is called once, in the caller's thread, when text arrives."""
        turn = self._turn = _Turn(sent_at=time.perf_counter())
        message = {
            "threadId": "",
            "id": str(uuid.uuid4()),
            "name": self._user,
            "type": "user_message",
            "output": text,
            "createdAt": datetime.datetime.now(datetime.UTC).isoformat(),
        }
        self._sio.emit("client_message", {"message": message, "fileReferences": []})
        if on_first_text is not None:
            if not turn.first_text.wait(self._timeout_s):
                raise ChatError(f"no text within {self._timeout_s:.0f} s")
            on_first_text()
        finished = turn.done.wait(self._timeout_s)
        self._turn = None
        if not finished:
            raise ChatError(f"no answer within {self._timeout_s:.0f} s")
        done_at = time.perf_counter()
        return Answer(
            text="\n".join(turn.texts.values()),
            ttft_s=None if turn.first_at is None else turn.first_at - turn.sent_at,
            total_s=done_at - turn.sent_at,
            pieces=turn.pieces,
            error=turn.error,
            disconnected=turn.disconnected,
            notices=turn.notices,
        )

    @property
    def connected(self) -> bool:
        return bool(self._sio.connected)

    def close(self) -> None:
        """As the web app's "new chat": clear the session, then disconnect. Also after the server
        dropped the connection: the websocket is closed either way."""
        try:
            if self._sio.connected:
                try:
                    self._sio.emit("clear_session")
                finally:
                    self._sio.disconnect()
        finally:
            ws = getattr(self._sio.eio, "ws", None)
            if ws is not None:  # websocket-client's close() skips a socket it saw closed
                ws.close()
                ws.shutdown()
