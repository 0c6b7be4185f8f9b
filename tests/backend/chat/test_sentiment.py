"""SentimentProbe through a real OpenAIEngine on the scripted fake engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from backend.chat.sentiment import PROBE_MAX_TOKENS, Sentiment, SentimentProbe, parse_label
from backend.chat.shaping import Priority
from backend.serving.engine import OpenAIEngine, Timeouts
from tests.fixtures.engines import FakeEngineHandle

TIMEOUTS = Timeouts(connect_s=2.0, first_token_s=5.0, inter_token_s=5.0, total_s=10.0)


@pytest.fixture
async def engine(fake_engine: FakeEngineHandle) -> AsyncIterator[OpenAIEngine]:
    client = OpenAIEngine(
        base_url=fake_engine.base_url, api_key="EMPTY", model="qwen", timeouts=TIMEOUTS
    )
    yield client
    await client.aclose()


@pytest.fixture
def probe(engine: OpenAIEngine) -> SentimentProbe:
    return SentimentProbe(engine, timeout_s=5.0)


async def _label(
    fake_engine: FakeEngineHandle, probe: SentimentProbe, step: dict[str, Any]
) -> Sentiment:
    fake_engine.script([step])
    return await probe.classify("今天的实验终于成功了，太棒了！")


async def _sent_body(fake_engine: FakeEngineHandle, probe: SentimentProbe) -> dict[str, Any]:
    await _label(fake_engine, probe, {"text": "正面"})
    body: dict[str, Any] = fake_engine.log()[-1]["body"]
    return body


async def test_positive(fake_engine: FakeEngineHandle, probe: SentimentProbe) -> None:
    assert await _label(fake_engine, probe, {"text": "正面"}) is Sentiment.POSITIVE


async def test_negative_with_punctuation(
    fake_engine: FakeEngineHandle, probe: SentimentProbe
) -> None:
    assert await _label(fake_engine, probe, {"text": "负面。"}) is Sentiment.NEGATIVE


async def test_neutral(fake_engine: FakeEngineHandle, probe: SentimentProbe) -> None:
    assert await _label(fake_engine, probe, {"text": "中性"}) is Sentiment.NEUTRAL


async def test_two_labels_unknown(fake_engine: FakeEngineHandle, probe: SentimentProbe) -> None:
    step = {"text": "中性/正面", "chunk_chars": 8}  # one chunk: the fake counts chunks as tokens
    assert await _label(fake_engine, probe, step) is Sentiment.UNKNOWN


async def test_garbage_unknown(fake_engine: FakeEngineHandle, probe: SentimentProbe) -> None:
    assert await _label(fake_engine, probe, {"text": "\ufffdxq7 的了"}) is Sentiment.UNKNOWN


async def test_empty_reply_unknown(fake_engine: FakeEngineHandle, probe: SentimentProbe) -> None:
    assert await _label(fake_engine, probe, {"text": ""}) is Sentiment.UNKNOWN


async def test_server_error_unknown(fake_engine: FakeEngineHandle, probe: SentimentProbe) -> None:
    assert await _label(fake_engine, probe, {"status": 500}) is Sentiment.UNKNOWN


async def test_rejected_unknown(fake_engine: FakeEngineHandle, probe: SentimentProbe) -> None:
    assert await _label(fake_engine, probe, {"status": 400}) is Sentiment.UNKNOWN


async def test_own_timeout_unknown(fake_engine: FakeEngineHandle, engine: OpenAIEngine) -> None:
    probe = SentimentProbe(engine, timeout_s=0.2)
    step = {"text": "正面", "first_token_delay_s": 30}
    assert await _label(fake_engine, probe, step) is Sentiment.UNKNOWN


async def test_timeout_closes_upstream(fake_engine: FakeEngineHandle, engine: OpenAIEngine) -> None:
    # A budget long enough for the request to reach the engine even on a loaded machine.
    probe = SentimentProbe(engine, timeout_s=1.0)
    await _label(fake_engine, probe, {"text": "正面", "first_token_delay_s": 30})
    log = await fake_engine.settled_log()
    assert len(log) == 1, "the probe request never reached the engine"
    assert log[0]["disconnected"] is True


async def test_sends_temperature_above_zero(
    fake_engine: FakeEngineHandle, probe: SentimentProbe
) -> None:
    assert (await _sent_body(fake_engine, probe))["temperature"] > 0


async def test_sends_small_max_tokens(fake_engine: FakeEngineHandle, probe: SentimentProbe) -> None:
    assert (await _sent_body(fake_engine, probe))["max_tokens"] == PROBE_MAX_TOKENS <= 8


async def test_does_not_stream(fake_engine: FakeEngineHandle, probe: SentimentProbe) -> None:
    assert (await _sent_body(fake_engine, probe))["stream"] is False


async def test_sends_probe_priority(fake_engine: FakeEngineHandle, probe: SentimentProbe) -> None:
    assert (await _sent_body(fake_engine, probe))["priority"] == Priority.PROBE


async def test_asks_for_one_word(fake_engine: FakeEngineHandle, probe: SentimentProbe) -> None:
    system = (await _sent_body(fake_engine, probe))["messages"][0]
    assert system["role"] == "system" and "正面、负面或中性" in system["content"]


async def test_long_message_sends_head_and_tail(
    fake_engine: FakeEngineHandle, probe: SentimentProbe
) -> None:
    fake_engine.script([{"text": "中性"}])
    await probe.classify("头" * 1000 + "腰" * 1000 + "尾" * 1000)
    user = fake_engine.log()[-1]["body"]["messages"][-1]["content"]
    assert (user[0], user[-1], "腰" in user) == ("头", "尾", False)


@pytest.mark.parametrize(
    ("reply", "label"),
    [("积极", Sentiment.POSITIVE), ("消极", Sentiment.NEGATIVE), ("正面正面", Sentiment.POSITIVE),
     ("正面，不是负面", Sentiment.UNKNOWN), ("positive", Sentiment.UNKNOWN)],
)  # fmt: skip
def test_parse_label(reply: str, label: Sentiment) -> None:
    assert parse_label(reply) is label
