"""Talking to one OpenAI-compatible engine: vLLM, llama-cpp-python's server, or any such URL.

`Engine.stream(request)` yields text deltas. `OpenAIEngine` sends a streamed request itself, on the
`httpx` client it gives `openai.AsyncOpenAI` (which sends the non-streamed ones), and reads the
event stream itself: the SDK builds a pydantic model per chunk, ~0.4 ms of CPU each, which at 32
streams of 50 tokens/s took most of a core and was the largest part of what the pipeline added to
a stream (bench/overhead.py); a `json.loads` of the chunk and two lookups do it here. Its request
path (options, headers, retry wrapper) cost another 0.3-0.8 ms of CPU a request over a plain
`httpx` send (measured against the fake engine, 300 requests each). It enforces four budgets,
each raising `EngineTimeout(phase, seconds)`:

    connect      opening the TCP connection (httpx's connect timeout)
    first_token  from the call until the first content delta arrives
    inter_token  between consecutive chunks once the first content delta arrived
    total        the whole answer

Other failures: nothing listening or 5xx (and 429: busy, try another replica) → EngineUnavailable;
4xx → EngineRejected. The client never retries (retrying on another replica is the pool's job).

Stopping: when the consumer is cancelled, or closes the generator (`aclose()`,
`contextlib.aclosing`, or breaking out of `async for` and letting it be collected), the upstream
HTTP response is closed, so the engine sees the disconnect and stops generating.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import httpx
import openai
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletion

from backend.config import LLMSettings
from backend.errors import (
    EngineError,
    EngineRejected,
    EngineTimeout,
    EngineUnavailable,
    TimeoutPhase,
)

logger = logging.getLogger(__name__)

CHAT_PATH = "/chat/completions"
MAX_CONNECTIONS = 2048  # concurrent streams one process may open to one replica

_T = TypeVar("_T")


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class ChatRequest:
    """One completion call. `priority` is vLLM's (lower runs sooner under `--scheduling-policy
    priority`) and is sent only when set; `extra_body` is merged into the JSON body as is."""

    messages: tuple[Message, ...]
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.8
    presence_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stream: bool = True
    priority: int | None = None
    extra_body: Mapping[str, object] = field(default_factory=dict, hash=False)

    def body_extras(self) -> dict[str, object]:
        """The fields the OpenAI SDK has no parameter for, as sent in the JSON body."""
        extras = dict(self.extra_body)
        if self.priority is not None:
            extras["priority"] = self.priority
        return extras


class Engine(Protocol):
    def stream(self, request: ChatRequest) -> AsyncGenerator[str, None]:
        """Yield the answer as text deltas (one piece when `request.stream` is false).

        An async generator, so a consumer that stops early can `aclose()` it and the upstream
        request ends at once. Raises EngineUnavailable, EngineTimeout or EngineRejected.
        """
        ...


@dataclass(frozen=True)
class Timeouts:
    """Budgets in seconds; see the module docstring for what each one bounds."""

    connect_s: float
    first_token_s: float
    inter_token_s: float
    total_s: float

    @classmethod
    def from_settings(cls, llm: LLMSettings) -> Timeouts:
        return cls(
            connect_s=llm.connect_timeout_s,
            first_token_s=llm.first_token_timeout_s,
            inter_token_s=llm.inter_token_timeout_s,
            total_s=llm.total_timeout_s,
        )


@dataclass(frozen=True)
class _Deadline:
    at: float  # event-loop time
    phase: TimeoutPhase
    seconds: float  # the budget reported when it passes

    def or_sooner(self, other: _Deadline) -> _Deadline:
        return self if self.at <= other.at else other


class OpenAIEngine:
    """An `Engine` over the OpenAI chat-completions API. Safe to share between tasks; close with
    `aclose()` at shutdown."""

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str,
        model: str,
        timeouts: Timeouts,
        send_priority: bool = True,
    ) -> None:
        """`send_priority` False drops `priority` from requests: vLLM refuses any non-zero priority
        unless it runs with `--scheduling-policy priority`."""
        self._base_url = base_url
        self._send_priority = send_priority
        self._model = model
        self._timeouts = timeouts
        # Reads are unbounded here: the first-token, inter-token and total budgets bound them.
        http_timeout = httpx.Timeout(None, connect=timeouts.connect_s, pool=timeouts.connect_s)
        # httpx's default pool (100 connections) would hold streams 101+ of a process back until
        # another answer ends, then time them out as a connect failure (bench/overhead.py).
        limits = httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=100)
        self._http = httpx.AsyncClient(timeout=http_timeout, trust_env=False, limits=limits)
        self._client = AsyncOpenAI(
            base_url=base_url,
            api_key=api_key,
            max_retries=0,
            timeout=http_timeout,
            http_client=self._http,
        )
        self._chat_url = base_url.rstrip("/") + CHAT_PATH
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}

    @classmethod
    def from_settings(
        cls, llm: LLMSettings, *, base_url: str, send_priority: bool = True
    ) -> OpenAIEngine:
        return cls(
            base_url=base_url,
            api_key=llm.api_key.get_secret_value(),
            model=llm.model,
            timeouts=Timeouts.from_settings(llm),
            send_priority=send_priority,
        )

    async def aclose(self) -> None:
        await self._client.close()
        await self._http.aclose()

    async def stream(self, request: ChatRequest) -> AsyncGenerator[str, None]:
        """See `Engine.stream`. Raises EngineUnavailable, EngineTimeout or EngineRejected.

        An async generator, so callers can close it early with `contextlib.aclosing`.
        """
        loop = asyncio.get_running_loop()
        budget = self._timeouts
        now = loop.time()
        total = _Deadline(now + budget.total_s, TimeoutPhase.TOTAL, budget.total_s)
        first_s = budget.first_token_s
        first = _Deadline(now + first_s, TimeoutPhase.FIRST_TOKEN, first_s).or_sooner(total)
        try:
            if not request.stream:
                completion = await _within(self._complete(request), first)
                text = completion.choices[0].message.content if completion.choices else None
                if text:
                    yield text
                return
            async with contextlib.AsyncExitStack() as opened:
                # leaving it closes the response: that drops the connection, which is how the
                # engine learns to stop (on exhaustion, errors, CancelledError, GeneratorExit)
                response = await _within(opened.enter_async_context(self._open(request)), first)
                chunks = _contents(response.aiter_lines())
                opened.push_async_callback(chunks.aclose)
                deadline, started = first, False
                while True:
                    try:
                        delta = await _within(anext(chunks), deadline)
                    except StopAsyncIteration:
                        return
                    if delta:
                        yield delta
                    started = started or bool(delta)
                    if started:
                        inter = budget.inter_token_s
                        deadline = _Deadline(loop.time() + inter, TimeoutPhase.INTER_TOKEN, inter)
                        deadline = deadline.or_sooner(total)
        except EngineError as exc:
            logger.warning("engine %s: %s", self._base_url, exc)
            raise
        except (openai.OpenAIError, httpx.HTTPError) as exc:
            error = self._engine_error(exc)
            logger.warning("engine %s: %s: %s", self._base_url, type(error).__name__, exc)
            raise error from exc

    @contextlib.asynccontextmanager
    async def _open(self, request: ChatRequest) -> AsyncIterator[httpx.Response]:
        """The streamed response, body unread, closed on exit. Raises EngineUnavailable or
        EngineRejected for an error status, httpx.HTTPError when the engine cannot be reached.

        The body is the one `_json` builds for both kinds of call (`chat.completions.create`
        would first run its typed transform over the arguments, ~0.8 ms of CPU a request)."""
        body = json.dumps({**self._json(request), "stream": True}, ensure_ascii=False)
        sent = self._http.build_request(
            "POST", self._chat_url, content=body.encode(), headers=self._headers
        )
        response = await self._http.send(sent, stream=True)
        try:
            if response.is_error:
                await response.aread()
                raise _status_error(response.status_code, _error_message(response))
            yield response
        finally:
            await response.aclose()

    def _json(self, request: ChatRequest) -> dict[str, object]:
        body: dict[str, object] = {
            "model": self._model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "presence_penalty": request.presence_penalty,
        }
        if request.stop:
            body["stop"] = list(request.stop)
        return body | self._extras(request)

    def _complete(self, request: ChatRequest) -> Awaitable[ChatCompletion]:
        body = {**self._json(request), "stream": False}
        return self._client.post(CHAT_PATH, cast_to=ChatCompletion, body=body)

    def _extras(self, request: ChatRequest) -> dict[str, object]:
        extras = request.body_extras()
        if not self._send_priority:
            extras.pop("priority", None)
        return extras

    def _engine_error(self, exc: openai.OpenAIError | httpx.HTTPError) -> EngineError:
        if isinstance(exc, openai.APITimeoutError | httpx.TimeoutException):
            # Reads are unbounded at the HTTP layer, so only connecting can time out there.
            return EngineTimeout(TimeoutPhase.CONNECT, self._timeouts.connect_s)
        if isinstance(exc, openai.APIStatusError):
            return _status_error(exc.status_code, exc.message)
        # Refused/unreachable, the connection dropped mid-stream, an error event inside the
        # stream, or a reply that is not OpenAI's format.
        return EngineUnavailable(f"engine failed: {type(exc).__name__}: {exc}")


def _status_error(status: int, message: str) -> EngineError:
    """5xx and 429 (busy: another replica may serve it) → EngineUnavailable; other 4xx →
    EngineRejected."""
    if status >= 500 or status == httpx.codes.TOO_MANY_REQUESTS:
        return EngineUnavailable(f"engine answered HTTP {status}: {message}")
    return EngineRejected(f"engine refused the request, HTTP {status}: {message}")


def _error_message(response: httpx.Response) -> str:
    """The `error.message` of an OpenAI-style error body, else the body's start."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    return response.text[:200]


async def _contents(lines: AsyncIterator[str]) -> AsyncGenerator[str, None]:
    """The content delta of each chunk of an OpenAI server-sent event stream ("" for a chunk
    without text), until `data: [DONE]` or the end of the body. Raises EngineUnavailable for an
    error event or a chunk that is not JSON."""
    data: list[str] = []
    failed = False
    async for line in lines:
        if line.startswith("data:"):
            data.append(line[6:] if line.startswith("data: ") else line[5:])
            continue
        if line.startswith("event:"):
            failed = failed or line[6:].strip() == "error"
            continue
        if line or not data:  # a comment (": ping"), another field, or a blank between events
            continue
        payload, data = "\n".join(data), []
        if payload == "[DONE]":
            return
        yield _content(payload, failed=failed)
    if data and (payload := "\n".join(data)) != "[DONE]":  # a last event without its blank line
        yield _content(payload, failed=failed)


def _content(payload: str, *, failed: bool) -> str:
    try:
        chunk = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise EngineUnavailable(f"engine sent a chunk that is not JSON: {payload[:80]!r}") from exc
    if not isinstance(chunk, dict):
        raise EngineUnavailable(f"engine sent a chunk that is not an object: {payload[:80]!r}")
    if failed or "error" in chunk:
        error = chunk.get("error", chunk)
        message = error.get("message", error) if isinstance(error, dict) else error
        raise EngineUnavailable(f"engine reported an error mid-stream: {message}")
    choices = chunk.get("choices")
    if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
        return ""  # e.g. a usage-only chunk
    delta = choices[0].get("delta")
    content = delta.get("content") if isinstance(delta, dict) else None
    return content if isinstance(content, str) else ""


async def _within(awaitable: Awaitable[_T], deadline: _Deadline) -> _T:
    """Await `awaitable` in the current task; raise EngineTimeout once `deadline` passes."""
    try:
        async with asyncio.timeout_at(deadline.at):
            return await awaitable
    except TimeoutError as exc:
        raise EngineTimeout(deadline.phase, deadline.seconds) from exc
