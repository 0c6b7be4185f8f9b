"""Audit records and rate limits inside the conversation: exactly one record per request, whatever
the outcome, with what the pipeline knew; limits refuse before any slot or engine call."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis.asyncio as aioredis
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from pydantic import SecretStr

from backend.audit import CLIENT_DISCONNECTED, AuditLog, verify
from backend.chat.events import Token
from backend.chat.history import History
from backend.chat.pipeline import ChatPipeline, PipelineConfig, Turn
from backend.chat.shaping import Shaper
from backend.config import RateLimitSettings, ServingSettings
from backend.db import migrate, open_pool
from backend.errors import EngineTimeout, EngineUnavailable, RateLimited, RedisUnavailable
from backend.guard import LexiconStore
from backend.guard.segment import jieba_segmenter
from backend.metrics import Metrics
from backend.ratelimit import RateLimiter, _tag
from backend.serving.pool import EnginePool
from backend.serving.queue import WaitQueue
from backend.serving.slots import SlotTable
from backend.serving.status import StatusBoard
from backend.serving.tokenizer import EstimateTokenizer
from tests.backend.chat.stack import LLM, SYSTEM, dead_url, text_of
from tests.fixtures.engines import FakeEngineHandle, free_port

LIMITS = RateLimitSettings(messages_per_minute=60, message_burst=5, concurrent_answers=2)
PROMPT = "我的银行卡密码是 864209，帮我记住"


@dataclass
class Audited:
    pipeline: ChatPipeline
    metrics: Metrics
    limiter: RateLimiter


Make = Callable[..., Audited]


@pytest.fixture
async def audit_pool(database: str) -> AsyncIterator[AsyncConnectionPool]:
    await migrate(database)
    pool = await open_pool(database, min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def make(
    redis_client: aioredis.Redis, audit_pool: AsyncConnectionPool
) -> AsyncIterator[Make]:
    engines: list[EnginePool] = []

    def build(
        urls: list[str], *, capacity: int = 4, budget_s: float = 5.0, max_depth: int = 10,
        guard: LexiconStore | None = None, limits: RateLimitSettings = LIMITS,
        jsonl: Path | None = None, pool: AsyncConnectionPool | None = None,
        redis: aioredis.Redis | None = None,
    ) -> Audited:  # fmt: skip
        metrics = Metrics()
        engine_pool = EnginePool(urls, llm=LLM, serving=ServingSettings())
        engines.append(engine_pool)
        redis = redis or redis_client  # one Redis for all, as chat_ui's runtime wires it
        limiter = RateLimiter(redis, settings=limits, metrics=metrics)
        pipeline = ChatPipeline(
            pool=engine_pool,
            slots=SlotTable(redis, capacity=capacity, ttl_s=60),
            queue=WaitQueue(redis, max_depth=max_depth, poll_s=0.05),
            shaper=Shaper(tokenizer=EstimateTokenizer(), context_window=4096, max_tokens=256),
            history=History(redis, ttl_s=600, max_messages=40),
            status=StatusBoard(redis),
            sentiment=None,
            config=PipelineConfig(
                system_prompt=SYSTEM, slots_per_replica=capacity, queue_wait_budget_s=budget_s
            ),
            metrics=metrics,
            guard=guard,
            audit=AuditLog(
                pool or audit_pool, hmac_key=SecretStr("k"), jsonl_path=jsonl, metrics=metrics
            ),
            limiter=limiter,
        )
        return Audited(pipeline, metrics, limiter)

    yield build
    for engine_pool in engines:
        await engine_pool.aclose()


@pytest.fixture
def guard(tmp_path: Path) -> LexiconStore:
    path = tmp_path / "lexicon.tsv"
    path.write_text("赌博网站\t赌博\tblock\n", encoding="utf-8")
    return LexiconStore(path, segmenter=jieba_segmenter(cache_dir=tmp_path / "jieba"))


async def ask(
    pipeline: ChatPipeline, text: str = "你好", *, thread: str = "t1", user: str = "alice"
) -> list[Any]:
    turn = Turn(thread_id=thread, text=text, user=user)
    return [event async for event in pipeline.answer(turn)]


async def records(database: str) -> list[dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(database, row_factory=dict_row) as conn:
        cur = await conn.execute("SELECT * FROM audit_log ORDER BY id")
        return await cur.fetchall()


async def test_answered(fake_engine: FakeEngineHandle, make: Make, database: str) -> None:
    fake_engine.script([{"text": "你好，我是测试回答。"}])
    turn = Turn(thread_id="t1", text="你好", user="alice")
    events = [event async for event in make([fake_engine.base_url]).pipeline.answer(turn)]
    assert text_of(events) == "你好，我是测试回答。"
    [rec] = await records(database)
    assert (rec["user_identifier"], rec["thread_id"], rec["request_id"], rec["outcome"]) == (
        "alice", "t1", turn.request_id, "answered"
    )  # fmt: skip
    assert (rec["replica"], rec["tier"], rec["completion_tokens"]) == (
        fake_engine.base_url, "normal", 10
    )  # fmt: skip
    assert rec["prompt_tokens"] > 0 and 0 <= rec["ttft_ms"] <= rec["latency_ms"]
    assert (rec["retrieved_chunk_ids"], rec["cited_chunk_ids"], rec["verdicts"]) == ([], [], {})


async def test_blocked_input(
    fake_engine: FakeEngineHandle, make: Make, guard: LexiconStore, database: str
) -> None:
    await ask(make([fake_engine.base_url], guard=guard).pipeline, "推荐个賭 博网站")
    [rec] = await records(database)
    assert (rec["outcome"], rec["verdicts"], rec["replica"]) == (
        "blocked_input", {"input": ["赌博"]}, None
    )  # fmt: skip
    assert fake_engine.log() == []


async def test_blocked_output(
    fake_engine: FakeEngineHandle, make: Make, guard: LexiconStore, database: str
) -> None:
    fake_engine.script([{"text": "正常开头。" * 5 + "去赌博网站看看。" * 3, "chunk_chars": 2}])
    await ask(make([fake_engine.base_url], guard=guard).pipeline)
    [rec] = await records(database)
    assert (rec["outcome"], rec["verdicts"]) == (
        "blocked_output", {"input": [], "output": ["赌博"]}
    )  # fmt: skip


async def test_queue_timeout(fake_engine: FakeEngineHandle, make: Make, database: str) -> None:
    stack = make([fake_engine.base_url], capacity=1, budget_s=0.5)
    await ask(stack.pipeline, thread="holder", user="bob")
    await ask(stack.pipeline, thread="late")
    assert [rec["outcome"] for rec in await records(database)] == ["answered", "queue_timeout"]


async def test_queue_full(fake_engine: FakeEngineHandle, make: Make, database: str) -> None:
    stack = make([fake_engine.base_url], capacity=1, max_depth=0)  # no room to wait at all
    await ask(stack.pipeline, thread="holder", user="bob")
    await ask(stack.pipeline, thread="late")
    assert [rec["outcome"] for rec in await records(database)] == ["answered", "queue_full"]


async def test_engine_timeout(fake_engine: FakeEngineHandle, make: Make, database: str) -> None:
    fake_engine.script([{"text": "卡住了", "stall_after": 1}])
    with pytest.raises(EngineTimeout):
        await ask(make([fake_engine.base_url]).pipeline)
    [rec] = await records(database)
    assert (rec["outcome"], rec["completion_tokens"]) == ("engine_timeout", 1)


async def test_engine_error(make: Make, database: str) -> None:
    dead = dead_url()
    with pytest.raises(EngineUnavailable):
        await ask(make([dead]).pipeline)
    [rec] = await records(database)
    assert (rec["outcome"], rec["replica"], rec["ttft_ms"]) == ("engine_error", dead, None)


async def test_stopped_by_user(fake_engine: FakeEngineHandle, make: Make, database: str) -> None:
    fake_engine.script([{"text": "一二三四五六七八九十" * 10, "token_delay_s": 0.05}])
    answer = make([fake_engine.base_url]).pipeline.answer(Turn(thread_id="t", text="长", user="a"))
    async for event in answer:
        if isinstance(event, Token):
            break
    await answer.aclose()
    [rec] = await records(database)
    assert rec["outcome"] == "stopped" and rec["ttft_ms"] is not None


async def test_client_disconnected(
    fake_engine: FakeEngineHandle, make: Make, database: str
) -> None:
    fake_engine.script([{"text": "一二三四五六七八九十" * 10, "token_delay_s": 0.05}])
    pipeline = make([fake_engine.base_url]).pipeline
    first = asyncio.Event()

    async def consume() -> None:
        async for event in pipeline.answer(Turn(thread_id="t", text="长", user="a")):
            if isinstance(event, Token):
                first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    task.cancel(CLIENT_DISCONNECTED)
    with contextlib.suppress(asyncio.CancelledError):
        await task
    [rec] = await records(database)
    assert rec["outcome"] == "disconnected"


async def test_rate_limited(fake_engine: FakeEngineHandle, make: Make, database: str) -> None:
    stack = make([fake_engine.base_url], limits=LIMITS.model_copy(update={"message_burst": 1}))
    await ask(stack.pipeline)
    with pytest.raises(RateLimited) as caught:
        await ask(stack.pipeline, thread="t2")
    assert "秒后再试" in caught.value.user_message
    assert [rec["outcome"] for rec in await records(database)] == ["answered", "rate_limited"]
    assert len(fake_engine.log()) == 1  # no engine call for the refused message
    labels = {"kind": "messages"}
    assert stack.metrics.registry.get_sample_value("qwen_rate_limited_total", labels) == 1


async def test_concurrency_cap(fake_engine: FakeEngineHandle, make: Make, database: str) -> None:
    fake_engine.script([{"text": "慢慢回答" * 10, "token_delay_s": 0.05}])
    stack = make([fake_engine.base_url], limits=LIMITS.model_copy(update={"concurrent_answers": 1}))
    answer = stack.pipeline.answer(Turn(thread_id="first", text="你好", user="alice"))
    async for event in answer:
        if isinstance(event, Token):
            break
    with pytest.raises(RateLimited) as caught:
        await ask(stack.pipeline, thread="second")
    await answer.aclose()
    assert caught.value.kind == "concurrency"
    assert await stack.limiter.in_flight("alice") == 0
    assert [rec["outcome"] for rec in await records(database)] == ["rate_limited", "stopped"]


async def test_token_limit_refuses_after_a_big_charge(
    fake_engine: FakeEngineHandle, make: Make, database: str
) -> None:
    stack = make([fake_engine.base_url])
    await stack.limiter.charge("alice", LIMITS.token_burst + 1000)
    with pytest.raises(RateLimited) as caught:
        await ask(stack.pipeline)
    assert caught.value.kind == "tokens" and caught.value.retry_after_s > 0
    assert "文字量" in caught.value.user_message
    assert [rec["outcome"] for rec in await records(database)] == ["rate_limited"]
    assert fake_engine.log() == []  # no engine call for the refused message
    labels = {"kind": "tokens"}
    assert stack.metrics.registry.get_sample_value("qwen_rate_limited_total", labels) == 1


async def test_answer_is_charged_prompt_and_completion_tokens(
    fake_engine: FakeEngineHandle, make: Make, redis_client: aioredis.Redis, database: str
) -> None:
    fake_engine.script([{"text": "你好，我是测试回答。"}])
    await ask(make([fake_engine.base_url]).pipeline)
    [rec] = await records(database)
    level = float(await redis_client.hget(f"qs:rl:tokens:{_tag('alice')}", "tokens"))
    assert rec["prompt_tokens"] > 0 and rec["completion_tokens"] == 10
    assert level == LIMITS.token_burst - rec["prompt_tokens"] - rec["completion_tokens"]


async def test_stopped_answer_is_charged_what_it_streamed(
    fake_engine: FakeEngineHandle, make: Make, redis_client: aioredis.Redis, database: str
) -> None:
    fake_engine.script([{"text": "一二三四五六七八九十" * 10, "token_delay_s": 0.05}])
    answer = make([fake_engine.base_url]).pipeline.answer(Turn(thread_id="t", text="长", user="a"))
    async for event in answer:
        if isinstance(event, Token):
            break
    await answer.aclose()
    [rec] = await records(database)
    level = float(await redis_client.hget(f"qs:rl:tokens:{_tag('a')}", "tokens"))
    assert rec["outcome"] == "stopped" and 0 < rec["completion_tokens"] < 100
    assert level == LIMITS.token_burst - rec["prompt_tokens"] - rec["completion_tokens"]


async def test_redis_down_refuses_before_the_engine(
    fake_engine: FakeEngineHandle, make: Make, database: str
) -> None:
    """The limits fail closed (backend/ratelimit.py): the message is refused, not answered."""
    down = aioredis.Redis(port=free_port(), socket_connect_timeout=1)
    try:
        with pytest.raises(RedisUnavailable):
            await ask(make([fake_engine.base_url], redis=down).pipeline)
    finally:
        await down.aclose()
    assert [rec["outcome"] for rec in await records(database)] == ["error"]
    assert fake_engine.log() == []


async def test_place_freed_after_answer(fake_engine: FakeEngineHandle, make: Make) -> None:
    stack = make([fake_engine.base_url])
    await ask(stack.pipeline)
    assert await stack.limiter.in_flight("alice") == 0


async def test_prompt_never_stored(
    fake_engine: FakeEngineHandle, make: Make, database: str, tmp_path: Path
) -> None:
    sink = tmp_path / "audit.jsonl"
    await ask(make([fake_engine.base_url], jsonl=sink).pipeline, PROMPT)
    async with await psycopg.AsyncConnection.connect(database) as conn:
        cur = await conn.execute("SELECT row_to_json(a)::text FROM audit_log a")
        [(stored,)] = await cur.fetchall()
    for text in (stored, sink.read_text("utf-8")):
        assert "864209" not in text and "银行卡" not in text


async def test_failed_audit_write_keeps_answer(
    fake_engine: FakeEngineHandle, make: Make, database: str
) -> None:
    broken = await open_pool(database, min_size=1, max_size=1)
    await broken.close()  # every write now fails
    fake_engine.script([{"text": "照常回答。"}])
    stack = make([fake_engine.base_url], pool=broken)
    assert text_of(await ask(stack.pipeline)) == "照常回答。"
    labels = {"sink": "database"}
    assert stack.metrics.registry.get_sample_value("qwen_audit_write_failures_total", labels) == 1


async def test_chain_verifies_across_outcomes(
    fake_engine: FakeEngineHandle, make: Make, guard: LexiconStore, audit_pool: AsyncConnectionPool
) -> None:
    stack = make([fake_engine.base_url], guard=guard)
    await ask(stack.pipeline)
    await ask(stack.pipeline, "赌博网站在哪", thread="t2")
    fake_engine.script([{"text": "卡住了", "stall_after": 1}])
    with pytest.raises(EngineTimeout):
        await ask(stack.pipeline, thread="t3")
    result = await verify(audit_pool)
    assert (result.ok, result.checked) == (True, 3)


async def test_metrics_carry_no_user_or_thread(fake_engine: FakeEngineHandle, make: Make) -> None:
    stack = make([fake_engine.base_url], limits=LIMITS.model_copy(update={"message_burst": 1}))
    await ask(stack.pipeline, thread="thread-xyz", user="alice@example.com")
    with pytest.raises(RateLimited):
        await ask(stack.pipeline, thread="thread-xyz", user="alice@example.com")
    registry = stack.metrics.registry
    values = {v for m in registry.collect() for s in m.samples for v in s.labels.values()}
    assert "rate_limited" in values
    assert not any("alice" in v or "thread-xyz" in v for v in values)
