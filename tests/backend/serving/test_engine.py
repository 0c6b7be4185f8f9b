"""OpenAIEngine against the scripted fake (exact text, faults) and the real llama.cpp server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from subprocess import Popen

import pytest
import pytest_asyncio

from backend.config import LLMSettings
from backend.errors import EngineRejected, EngineTimeout, EngineUnavailable, TimeoutPhase
from backend.serving.engine import ChatRequest, Message, OpenAIEngine, Timeouts, _contents
from tests.fixtures.engines import FakeEngineHandle, free_port

HELLO = ChatRequest(messages=(Message("user", "你好"),))
LONG_STEP = {"text": "一个很长的回答" * 20, "token_delay_s": 0.05}

MakeEngine = Callable[..., OpenAIEngine]


@pytest_asyncio.fixture
async def make_engine(fake_engine: FakeEngineHandle) -> AsyncIterator[MakeEngine]:
    """Build clients (default: the fake, generous budgets); all are closed after the test."""
    clients: list[OpenAIEngine] = []

    def make(
        base_url: str = fake_engine.base_url,
        *,
        connect_s: float = 2.0,
        first_token_s: float = 5.0,
        inter_token_s: float = 5.0,
        total_s: float = 30.0,
        send_priority: bool = True,
    ) -> OpenAIEngine:
        timeouts = Timeouts(connect_s, first_token_s, inter_token_s, total_s)
        clients.append(OpenAIEngine(base_url=base_url, api_key="EMPTY", model="qwen",
                                    timeouts=timeouts, send_priority=send_priority))  # fmt: skip
        return clients[-1]

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture
def engine(make_engine: MakeEngine) -> OpenAIEngine:
    return make_engine()


async def _collect(engine: OpenAIEngine, request: ChatRequest = HELLO) -> list[str]:
    return [delta async for delta in engine.stream(request)]


async def _timeout_phase(engine: OpenAIEngine, request: ChatRequest = HELLO) -> TimeoutPhase:
    with pytest.raises(EngineTimeout) as caught:
        await _collect(engine, request)
    return caught.value.phase


async def test_streams_exact_deltas(fake_engine: FakeEngineHandle, engine: OpenAIEngine) -> None:
    fake_engine.script([{"text": "你好，世界", "chunk_chars": 1}])
    assert await _collect(engine) == ["你", "好", "，", "世", "界"]


async def test_non_stream_yields_one_piece(
    fake_engine: FakeEngineHandle, engine: OpenAIEngine
) -> None:
    fake_engine.script([{"text": "你好，世界"}])
    assert await _collect(engine, replace(HELLO, stream=False)) == ["你好，世界"]


async def test_non_stream_asks_without_stream(
    fake_engine: FakeEngineHandle, engine: OpenAIEngine
) -> None:
    await _collect(engine, replace(HELLO, stream=False))
    assert fake_engine.log()[0]["stream"] is False


async def test_sends_sampling_parameters(
    fake_engine: FakeEngineHandle, engine: OpenAIEngine
) -> None:
    await _collect(engine, replace(HELLO, max_tokens=64, temperature=0.3, stop=("。",)))
    body = fake_engine.log()[0]["body"]
    assert (body["model"], body["max_tokens"], body["temperature"], body["stop"]) == (
        "qwen", 64, 0.3, ["。"],
    )  # fmt: skip


async def test_priority_sent_when_set(fake_engine: FakeEngineHandle, engine: OpenAIEngine) -> None:
    await _collect(engine, replace(HELLO, priority=-1))
    assert fake_engine.log()[0]["body"]["priority"] == -1


async def test_priority_dropped_when_engine_lacks_priority_scheduling(
    fake_engine: FakeEngineHandle, make_engine: MakeEngine
) -> None:
    await _collect(make_engine(send_priority=False), replace(HELLO, priority=-1))
    assert "priority" not in fake_engine.log()[0]["body"]


async def test_priority_absent_when_unset(
    fake_engine: FakeEngineHandle, engine: OpenAIEngine
) -> None:
    await _collect(engine)
    assert "priority" not in fake_engine.log()[0]["body"]


async def test_extra_body_is_merged(fake_engine: FakeEngineHandle, engine: OpenAIEngine) -> None:
    await _collect(engine, replace(HELLO, extra_body={"top_k": 20}))
    assert fake_engine.log()[0]["body"]["top_k"] == 20


async def test_engine_down_is_unavailable(make_engine: MakeEngine) -> None:
    with pytest.raises(EngineUnavailable):
        await _collect(make_engine(f"http://127.0.0.1:{free_port()}/v1"))


@pytest.fixture
def full_backlog() -> Iterator[int]:
    """A loopback port whose accept queue is full, so a new connection hangs in SYN-SENT."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        fillers = []
        for _ in range(4):  # never accepted: once the queue is full, SYNs are dropped
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        yield port
        for filler in fillers:
            filler.close()


async def test_connect_timeout(make_engine: MakeEngine, full_backlog: int) -> None:
    engine = make_engine(f"http://127.0.0.1:{full_backlog}/v1", connect_s=0.2)
    assert await _timeout_phase(engine) is TimeoutPhase.CONNECT


async def test_slow_first_token_times_out(
    fake_engine: FakeEngineHandle, make_engine: MakeEngine
) -> None:
    fake_engine.script([{"text": "迟到", "first_token_delay_s": 2.0}])
    assert await _timeout_phase(make_engine(first_token_s=0.2)) is TimeoutPhase.FIRST_TOKEN


async def test_slow_non_stream_reply_times_out(
    fake_engine: FakeEngineHandle, make_engine: MakeEngine
) -> None:
    fake_engine.script([{"text": "迟到", "first_token_delay_s": 2.0}])
    engine = make_engine(first_token_s=0.2)
    assert await _timeout_phase(engine, replace(HELLO, stream=False)) is TimeoutPhase.FIRST_TOKEN


async def test_stall_times_out_between_tokens(
    fake_engine: FakeEngineHandle, make_engine: MakeEngine
) -> None:
    fake_engine.script([{"text": "说到一半停住", "stall_after": 2}])
    assert await _timeout_phase(make_engine(inter_token_s=0.2)) is TimeoutPhase.INTER_TOKEN


async def test_stall_timeout_drops_connection(
    fake_engine: FakeEngineHandle, make_engine: MakeEngine
) -> None:
    fake_engine.script([{"text": "说到一半停住", "stall_after": 2}])
    await _timeout_phase(make_engine(inter_token_s=0.2))
    assert (await fake_engine.settled_log())[0]["disconnected"] is True


async def test_total_budget_times_out(
    fake_engine: FakeEngineHandle, make_engine: MakeEngine
) -> None:
    fake_engine.script([{"text": "慢慢说" * 50, "token_delay_s": 0.05}])
    assert await _timeout_phase(make_engine(total_s=0.3)) is TimeoutPhase.TOTAL


async def test_server_error_is_unavailable(
    fake_engine: FakeEngineHandle, engine: OpenAIEngine
) -> None:
    fake_engine.script([{"status": 500}])
    with pytest.raises(EngineUnavailable):
        await _collect(engine)


async def test_too_many_requests_is_unavailable(
    fake_engine: FakeEngineHandle, engine: OpenAIEngine
) -> None:
    fake_engine.script([{"status": 429}])
    with pytest.raises(EngineUnavailable):
        await _collect(engine)


async def test_bad_request_is_rejected(fake_engine: FakeEngineHandle, engine: OpenAIEngine) -> None:
    fake_engine.script([{"status": 400}])
    with pytest.raises(EngineRejected):
        await _collect(engine)


async def test_cancel_disconnects_upstream(
    fake_engine: FakeEngineHandle, engine: OpenAIEngine
) -> None:
    fake_engine.script([LONG_STEP])
    two_deltas = asyncio.Event()
    seen: list[str] = []

    async def consume() -> None:
        async for delta in engine.stream(HELLO):
            seen.append(delta)
            if len(seen) == 2:
                two_deltas.set()

    task = asyncio.create_task(consume())
    await two_deltas.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    entry = (await fake_engine.settled_log())[0]
    assert (entry["disconnected"], entry["finished"]) == (True, False)


async def test_aclose_disconnects_upstream(
    fake_engine: FakeEngineHandle, engine: OpenAIEngine
) -> None:
    fake_engine.script([LONG_STEP])
    async with contextlib.aclosing(engine.stream(HELLO)) as deltas:
        async for _ in deltas:
            break
    entry = (await fake_engine.settled_log())[0]
    assert (entry["disconnected"], entry["finished"]) == (True, False)


async def test_break_disconnects_upstream(
    fake_engine: FakeEngineHandle, engine: OpenAIEngine
) -> None:
    fake_engine.script([LONG_STEP])
    async for _ in engine.stream(HELLO):
        break  # the abandoned generator is closed by the event loop's finalizer
    assert (await fake_engine.settled_log())[0]["disconnected"] is True


async def test_next_request_after_cancel(
    fake_engine: FakeEngineHandle, engine: OpenAIEngine
) -> None:
    fake_engine.script([LONG_STEP, {"text": "好"}])
    async with contextlib.aclosing(engine.stream(HELLO)) as deltas:
        await anext(deltas)
    assert await _collect(engine) == ["好"]


def test_timeouts_from_settings() -> None:
    llm = LLMSettings(
        connect_timeout_s=1, first_token_timeout_s=2, inter_token_timeout_s=3, total_timeout_s=4
    )
    assert Timeouts.from_settings(llm) == Timeouts(1.0, 2.0, 3.0, 4.0)


@pytest.mark.slow
async def test_llama_streams_chinese(llama_server: str, make_engine: MakeEngine) -> None:
    request = ChatRequest(messages=(Message("user", "请用中文介绍一下你自己。"),), max_tokens=16)
    deltas = await _collect(make_engine(llama_server, first_token_s=60.0), request)
    assert deltas and all(isinstance(d, str) and d for d in deltas)


@pytest.mark.slow
async def test_llama_serves_after_cancel(llama_server: str, make_engine: MakeEngine) -> None:
    engine = make_engine(llama_server, first_token_s=60.0)
    long = ChatRequest(messages=(Message("user", "写一篇很长的文章。"),), max_tokens=400)
    async with contextlib.aclosing(engine.stream(long)) as deltas:
        await anext(deltas)
    short = ChatRequest(messages=(Message("user", "你好"),), max_tokens=8, temperature=0.0)
    assert "".join(await _collect(engine, short))


@pytest.mark.slow
async def test_llama_sees_disconnect(
    llama_server: str, llama_process: tuple[Popen[bytes], str, Path], make_engine: MakeEngine
) -> None:
    engine = make_engine(llama_server, first_token_s=60.0)
    long = ChatRequest(messages=(Message("user", "写一篇很长的文章。"),), max_tokens=400)
    async with contextlib.aclosing(engine.stream(long)) as deltas:
        await anext(deltas)
    log_path = llama_process[2]
    for _ in range(500):  # llama-cpp-python logs this when it aborts a stream
        if "Disconnected from client" in log_path.read_text(errors="replace"):
            break
        await asyncio.sleep(0.01)
    assert "Disconnected from client" in log_path.read_text(errors="replace")


async def _lines(*lines: str) -> AsyncIterator[str]:
    for line in lines:
        yield line


async def _read(*lines: str) -> list[str]:
    return [delta async for delta in _contents(_lines(*lines))]


def _chunk(text: str) -> str:
    return "data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": text}}]})


async def test_event_stream_yields_each_content_until_done() -> None:
    lines = [_chunk("你"), "", ": ping", "", _chunk("好"), "", "data: [DONE]", "", _chunk("x")]
    assert await _read(*lines) == ["你", "好"]


async def test_event_stream_chunk_without_text_is_empty() -> None:
    assert await _read('data: {"choices": [], "usage": {"prompt_tokens": 3}}', "") == [""]


async def test_event_stream_error_event_is_unavailable() -> None:
    with pytest.raises(EngineUnavailable, match="overloaded"):
        await _read("event: error", 'data: {"message": "overloaded"}', "")


async def test_event_stream_error_object_is_unavailable() -> None:
    with pytest.raises(EngineUnavailable, match="boom"):
        await _read(_chunk("你"), "", 'data: {"error": {"message": "boom"}}', "")


async def test_event_stream_malformed_chunk_is_unavailable() -> None:
    with pytest.raises(EngineUnavailable, match="not JSON"):
        await _read("data: {not json", "")
