"""ChatPipeline through a real OpenAIEngine on the scripted fake, with real Redis history."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from backend.chat.history import History
from backend.chat.pipeline import ENGINE_PROCESS, ChatPipeline, PipelineConfig, trim_history
from backend.errors import EngineRestarting, EngineUnavailable
from backend.serving.engine import Message, OpenAIEngine, Timeouts
from backend.serving.status import ProcessState, ProcessStatus, StatusBoard
from tests.fixtures.engines import FakeEngineHandle, free_port

SYSTEM = "你是测试助手。"
CONFIG = PipelineConfig(system_prompt=SYSTEM, max_tokens=256, temperature=0.0)
TIMEOUTS = Timeouts(connect_s=2.0, first_token_s=5.0, inter_token_s=5.0, total_s=30.0)


def _user(text: str) -> Message:
    return Message(role="user", content=text)


def _assistant(text: str) -> Message:
    return Message(role="assistant", content=text)


def _engine_status(state: ProcessState) -> ProcessStatus:
    return ProcessStatus(name=ENGINE_PROCESS, state=state, restarts=1, since=time.time())


def _wire(*messages: Message) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


@pytest.fixture
def history(redis_client: aioredis.Redis) -> History:
    return History(redis_client, ttl_s=600, max_messages=40)


@pytest.fixture
def status(redis_client: aioredis.Redis) -> StatusBoard:
    return StatusBoard(redis_client)


MakePipeline = Callable[[str], ChatPipeline]


@pytest.fixture
async def make_pipeline(history: History, status: StatusBoard) -> AsyncIterator[MakePipeline]:
    """Pipelines on an engine at a given base URL; their clients are closed after the test."""
    engines: list[OpenAIEngine] = []

    def make(base_url: str) -> ChatPipeline:
        engines.append(
            OpenAIEngine(base_url=base_url, api_key="EMPTY", model="qwen", timeouts=TIMEOUTS)
        )
        return ChatPipeline(engine=engines[-1], history=history, status=status, config=CONFIG)

    yield make
    for engine in engines:
        await engine.aclose()


@pytest.fixture
def pipeline(fake_engine: FakeEngineHandle, make_pipeline: MakePipeline) -> ChatPipeline:
    return make_pipeline(fake_engine.base_url)


@pytest.fixture
def down_pipeline(make_pipeline: MakePipeline) -> ChatPipeline:
    """A pipeline whose engine URL has nothing listening."""
    return make_pipeline(f"http://127.0.0.1:{free_port()}/v1")


async def _collect(pipeline: ChatPipeline, text: str, thread_id: str = "t1") -> list[str]:
    return [delta async for delta in pipeline.answer(thread_id, text)]


async def test_streams_exact_text(fake_engine: FakeEngineHandle, pipeline: ChatPipeline) -> None:
    fake_engine.script([{"text": "你好，世界", "chunk_chars": 2}])
    assert await _collect(pipeline, "你好") == ["你好", "，世", "界"]


async def test_sends_system_prompt_first(
    fake_engine: FakeEngineHandle, pipeline: ChatPipeline
) -> None:
    await _collect(pipeline, "你好")
    assert fake_engine.log()[0]["body"]["messages"][0] == {"role": "system", "content": SYSTEM}


async def test_exchange_is_appended(
    fake_engine: FakeEngineHandle, pipeline: ChatPipeline, history: History
) -> None:
    fake_engine.script([{"text": "答一"}])
    await _collect(pipeline, "问一")
    assert await history.load("t1") == [_user("问一"), _assistant("答一")]


async def test_next_turn_carries_context(
    fake_engine: FakeEngineHandle, pipeline: ChatPipeline
) -> None:
    fake_engine.script([{"text": "答一"}, {"text": "答二"}])
    await _collect(pipeline, "问一")
    await _collect(pipeline, "问二")
    sent = fake_engine.log()[1]["body"]["messages"]
    expected = (Message("system", SYSTEM), _user("问一"), _assistant("答一"), _user("问二"))
    assert sent == _wire(*expected)


async def test_threads_do_not_share_context(
    fake_engine: FakeEngineHandle, pipeline: ChatPipeline
) -> None:
    await _collect(pipeline, "问一", thread_id="a")
    await _collect(pipeline, "问二", thread_id="b")
    sent = fake_engine.log()[1]["body"]["messages"]
    assert sent == _wire(Message("system", SYSTEM), _user("问二"))


def test_trim_keeps_newest_within_budget() -> None:
    messages = [_user("u" * 10), _assistant("a" * 10), _user("v" * 10), _assistant("b" * 10)]
    assert trim_history(messages, char_budget=20) == messages[2:]


def test_trim_never_opens_on_assistant() -> None:
    messages = [_user("u" * 10), _assistant("a" * 10), _user("v" * 10), _assistant("b" * 10)]
    assert trim_history(messages, char_budget=30) == messages[2:]


def test_trim_keeps_all_within_budget() -> None:
    messages = [_user("u" * 10), _assistant("a" * 10)]
    assert trim_history(messages, char_budget=1000) == messages


async def test_restarting_engine_raises_restarting(
    down_pipeline: ChatPipeline, status: StatusBoard
) -> None:
    await status.publish(_engine_status(ProcessState.RESTARTING))
    with pytest.raises(EngineRestarting):
        await _collect(down_pipeline, "你好")


async def test_down_engine_raises_unavailable(down_pipeline: ChatPipeline) -> None:
    with pytest.raises(EngineUnavailable) as caught:
        await _collect(down_pipeline, "你好")
    assert not isinstance(caught.value, EngineRestarting)


async def test_running_status_does_not_claim_restart(
    down_pipeline: ChatPipeline, status: StatusBoard
) -> None:
    await status.publish(_engine_status(ProcessState.RUNNING))
    with pytest.raises(EngineUnavailable) as caught:
        await _collect(down_pipeline, "你好")
    assert not isinstance(caught.value, EngineRestarting)


async def test_failed_turn_leaves_history(down_pipeline: ChatPipeline, history: History) -> None:
    with pytest.raises(EngineUnavailable):
        await _collect(down_pipeline, "你好")
    assert await history.load("t1") == []


async def test_early_stop_records_partial(
    fake_engine: FakeEngineHandle, pipeline: ChatPipeline, history: History
) -> None:
    fake_engine.script([{"text": "一二三四五六七八", "token_delay_s": 0.05}])
    answer = pipeline.answer("t1", "数数")
    first = await anext(answer)
    await answer.aclose()
    assert await history.load("t1") == [_user("数数"), _assistant(first)]


async def test_early_stop_aborts_upstream(
    fake_engine: FakeEngineHandle, pipeline: ChatPipeline
) -> None:
    fake_engine.script([{"text": "一二三四五六七八", "token_delay_s": 0.2}])
    answer = pipeline.answer("t1", "数数")
    await anext(answer)
    await answer.aclose()
    [exchange] = await fake_engine.settled_log()
    assert exchange["disconnected"]
