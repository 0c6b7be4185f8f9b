"""ChatPipeline end to end on the scripted fake engine, with real Redis slots, queue and history."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from backend.chat.events import Done, Notice, NoticeKind, Outcome, Queued, Token
from backend.chat.pipeline import Turn
from backend.chat.sentiment import Sentiment
from backend.chat.shaping import Tier
from backend.embedded import EmbeddedRedis
from backend.errors import EngineRestarting, EngineTimeout, EngineUnavailable, RedisUnavailable
from backend.metrics import Metrics
from backend.serving.status import ProcessState, ProcessStatus
from backend.serving.tokenizer import EstimateTokenizer, estimate_tokens
from tests.backend.chat.stack import SYSTEM, MakeStack, dead_url, run, text_of
from tests.fixtures.engines import FakeEngineHandle, free_port


async def test_streams_exact_text(fake_engine: FakeEngineHandle, make_stack: MakeStack) -> None:
    fake_engine.script([{"text": "你好，我是测试回答。"}])
    events = await run(make_stack([fake_engine.base_url]).pipeline, "t1", "你好")
    assert text_of(events) == "你好，我是测试回答。"
    assert isinstance(events[-1], Done) and events[-1].outcome is Outcome.OK


async def test_next_turn_carries_context(
    fake_engine: FakeEngineHandle, make_stack: MakeStack
) -> None:
    stack = make_stack([fake_engine.base_url])
    fake_engine.script([{"text": "第一答"}, {"text": "第二答"}])
    await run(stack.pipeline, "t1", "第一问")
    await run(stack.pipeline, "t1", "第二问")
    sent = fake_engine.log()[-1]["body"]["messages"]
    assert sent[0]["role"] == "system" and sent[0]["content"].startswith(SYSTEM)
    assert [m["content"] for m in sent[1:]] == ["第一问", "第一答", "第二问"]


async def test_turn_returns_to_its_replica(
    fake_engine: FakeEngineHandle, make_stack: MakeStack
) -> None:
    other = fake_engine.base_url.replace("127.0.0.1", "localhost")
    stack = make_stack([fake_engine.base_url, other])
    replicas = set()
    for _ in range(3):
        events = await run(stack.pipeline, "sticky", "你好")
        done = events[-1]
        assert isinstance(done, Done)
        replicas.add(done.replica)
    assert len(replicas) == 1


async def test_sentiment_comes_before_answer(
    fake_engine: FakeEngineHandle, make_stack: MakeStack
) -> None:
    fake_engine.script([{"text": "正面"}, {"text": "正面"}])  # probe and answer, either order
    events = await run(make_stack([fake_engine.base_url], sentiment=True).pipeline, "t", "太棒了")
    kinds = [type(e).__name__ for e in events]
    assert kinds.index("SentimentLabel") < kinds.index("Token")
    label = next(e for e in events if type(e).__name__ == "SentimentLabel")
    assert label.label is Sentiment.POSITIVE  # type: ignore[attr-defined]


async def test_full_slots_queue_then_serve(
    fake_engine: FakeEngineHandle, make_stack: MakeStack
) -> None:
    stack = make_stack([fake_engine.base_url], capacity=1, budget_s=10)
    await run(stack.pipeline, "holder", "占住唯一的位置")

    async def free_later() -> None:
        await asyncio.sleep(0.5)
        await stack.slots.release("holder")

    releaser = asyncio.create_task(free_later())
    events = await run(stack.pipeline, "waiter", "我在排队")
    await releaser
    assert isinstance(events[0], Queued) and events[0].position.position == 1
    assert isinstance(events[-1], Done) and events[-1].outcome is not Outcome.REFUSED


async def test_wait_budget_refuses_politely(
    fake_engine: FakeEngineHandle, make_stack: MakeStack
) -> None:
    stack = make_stack([fake_engine.base_url], capacity=1, budget_s=0.5)
    await run(stack.pipeline, "holder", "占住唯一的位置")
    events = await run(stack.pipeline, "late", "还有位置吗")
    notice = next(e for e in events if isinstance(e, Notice))
    assert notice.kind is NoticeKind.BUSY and notice.retry_after_s
    assert isinstance(events[-1], Done) and events[-1].outcome is Outcome.REFUSED
    assert len(fake_engine.log()) == 1  # no engine call for the refused request


async def test_long_wait_degrades(fake_engine: FakeEngineHandle, make_stack: MakeStack) -> None:
    stack = make_stack([fake_engine.base_url], capacity=1, budget_s=3)
    await run(stack.pipeline, "holder", "占住唯一的位置")

    async def free_later() -> None:
        await asyncio.sleep(2.0)
        await stack.slots.release("holder")

    releaser = asyncio.create_task(free_later())
    events = await run(stack.pipeline, "waiter", "等了很久")
    await releaser
    assert any(isinstance(e, Notice) and e.kind is NoticeKind.DEGRADED for e in events)
    done = events[-1]
    assert isinstance(done, Done) and done.tier >= Tier.REDUCED


async def test_failover_moves_the_lease(
    fake_engine: FakeEngineHandle, make_stack: MakeStack
) -> None:
    dead = dead_url()
    stack = make_stack([dead, fake_engine.base_url])
    events = await run(stack.pipeline, "moved", "你好")
    done = events[-1]
    assert isinstance(done, Done) and done.replica == fake_engine.base_url
    lease = await stack.slots.acquire("moved", replicas=[dead, fake_engine.base_url])
    assert lease is not None and lease.replica == fake_engine.base_url


async def test_restarting_engine_raises_restarting(make_stack: MakeStack) -> None:
    stack = make_stack([dead_url()])
    await stack.status.publish(
        ProcessStatus(name="engine", state=ProcessState.RESTARTING, restarts=1, since=time.time())
    )
    with pytest.raises(EngineRestarting):
        await run(stack.pipeline, "t", "你好")


async def test_down_engine_raises_unavailable(make_stack: MakeStack) -> None:
    with pytest.raises(EngineUnavailable):
        await run(make_stack([dead_url()]).pipeline, "t", "你好")


async def test_early_stop_records_partial_and_aborts(
    fake_engine: FakeEngineHandle, make_stack: MakeStack
) -> None:
    stack = make_stack([fake_engine.base_url])
    fake_engine.script([{"text": "一二三四五六七八九十" * 10, "token_delay_s": 0.05}])
    answer = stack.pipeline.answer(Turn(thread_id="stop", text="长一点"))
    async for event in answer:
        if isinstance(event, Token):
            break
    await answer.aclose()
    log = await fake_engine.settled_log()
    assert log[-1]["disconnected"] is True
    past = await stack.history.load("stop")
    assert [m.role for m in past] == ["user", "assistant"] and past[1].content.startswith("一")


async def test_redis_restart_mid_conversation(
    fake_engine: FakeEngineHandle, make_stack: MakeStack, tmp_path: Path
) -> None:
    server = EmbeddedRedis(tmp_path / "redis")
    client = aioredis.from_url(server.start(), socket_timeout=2)
    try:
        stack = make_stack([fake_engine.base_url], client=client)
        fake_engine.script([{"text": "第一答"}, {"text": "第三答"}])
        await run(stack.pipeline, "r", "第一问")
        server.stop()
        with pytest.raises(RedisUnavailable):
            await run(stack.pipeline, "r", "第二问")
        server.start()
        events = await run(stack.pipeline, "r", "第三问")
        assert text_of(events) == "第三答"
        sent = fake_engine.log()[-1]["body"]["messages"]
        assert [m["content"] for m in sent[1:]] == ["第一问", "第一答", "第三问"]
    finally:
        await client.aclose()
        server.stop()


def sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    return value or 0.0


async def test_metrics_count_outcome_tier_and_ttft(
    fake_engine: FakeEngineHandle, make_stack: MakeStack
) -> None:
    stack = make_stack([fake_engine.base_url])
    await run(stack.pipeline, "m", "你好")
    assert sample(stack.metrics, "qwen_requests_total", {"outcome": "ok"}) == 1
    assert sample(stack.metrics, "qwen_degradation_tier_total", {"tier": "normal"}) == 1
    assert sample(stack.metrics, "qwen_time_to_first_token_seconds_count") == 1


async def test_metrics_count_streamed_completion_tokens(
    fake_engine: FakeEngineHandle, make_stack: MakeStack
) -> None:
    stack = make_stack([fake_engine.base_url])
    fake_engine.script([{"text": "一二三四五六七", "chunk_chars": 1}])  # one token per chunk
    await run(stack.pipeline, "m", "你好")
    assert sample(stack.metrics, "qwen_completion_tokens_total") == 7


async def test_metrics_count_whole_answer_tokens_with_the_tokenizer(
    fake_engine: FakeEngineHandle, make_stack: MakeStack
) -> None:
    stack = make_stack([fake_engine.base_url], tokenizer=EstimateTokenizer())
    answer = "这是一次不流式返回的完整回答，一共好几个词。"
    fake_engine.script([{"text": answer}])
    turn = Turn(thread_id="m", text="你好", stream=False)
    assert text_of([event async for event in stack.pipeline.answer(turn)]) == answer
    assert sample(stack.metrics, "qwen_completion_tokens_total") == estimate_tokens(answer)


async def test_metrics_count_refusals(fake_engine: FakeEngineHandle, make_stack: MakeStack) -> None:
    stack = make_stack([fake_engine.base_url], capacity=1, budget_s=0.3)
    await run(stack.pipeline, "holder", "占位")
    await run(stack.pipeline, "late", "还有位置吗")
    assert sample(stack.metrics, "qwen_requests_total", {"outcome": "refused"}) == 1
    assert sample(stack.metrics, "qwen_degradation_tier_total", {"tier": "busy"}) == 1


async def test_metrics_count_timeouts(fake_engine: FakeEngineHandle, make_stack: MakeStack) -> None:
    stack = make_stack([fake_engine.base_url])
    fake_engine.script([{"text": "卡住", "stall_after": 1}])
    with pytest.raises(EngineTimeout):
        await run(stack.pipeline, "slow", "你好")
    assert sample(stack.metrics, "qwen_requests_total", {"outcome": "timeout"}) == 1


async def test_killed_replica_sends_conversations_elsewhere(
    fake_engine: FakeEngineHandle, make_stack: MakeStack
) -> None:
    port = free_port()
    doomed = subprocess.Popen(
        [sys.executable, "-m", "backend.devtools.fake_engine", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    doomed_url = f"http://127.0.0.1:{port}/v1"
    try:
        stack = make_stack([doomed_url, fake_engine.base_url])
        for _ in range(200):
            if await stack.pool.probe(doomed_url):
                break
            await asyncio.sleep(0.05)
        first = await run(stack.pipeline, "a", "你好")
        assert isinstance(first[-1], Done) and first[-1].replica == doomed_url
        doomed.kill()
        doomed.wait()
        await stack.pool.probe(doomed_url)  # the health loop would notice within its interval
        new = await run(stack.pipeline, "b", "新的对话")
        again = await run(stack.pipeline, "a", "还在吗")
    finally:
        doomed.kill()
        doomed.wait()
    assert isinstance(new[-1], Done) and new[-1].replica == fake_engine.base_url
    assert isinstance(again[-1], Done) and again[-1].replica == fake_engine.base_url


async def test_warm_up_prefills_system_prompt_on_the_leased_replica(
    fake_engine: FakeEngineHandle, make_stack: MakeStack
) -> None:
    stack = make_stack([fake_engine.base_url], warmup=True)
    lease = await stack.pipeline.prepare("warm")
    assert lease is not None and lease.new
    log = await fake_engine.settled_log()
    for _ in range(100):
        if log:
            break
        await asyncio.sleep(0.05)
        log = await fake_engine.settled_log()
    body = log[0]["body"]
    assert body["max_tokens"] == 1
    assert body["messages"] == [{"role": "system", "content": SYSTEM}]


async def test_no_warm_up_takes_no_slot(
    fake_engine: FakeEngineHandle, make_stack: MakeStack
) -> None:
    stack = make_stack([fake_engine.base_url])
    assert await stack.pipeline.prepare("cold") is None
    assert await stack.slots.occupancy([fake_engine.base_url]) == {fake_engine.base_url: 0}
