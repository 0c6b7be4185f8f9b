"""The pipeline wired to real Redis and engines, for the chat tests (fixture `make_stack` in conftest)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from backend.chat.events import Event, Token
from backend.chat.grounding import Retriever
from backend.chat.history import History
from backend.chat.pipeline import ChatPipeline, PipelineConfig, Turn
from backend.chat.sentiment import SentimentProbe
from backend.chat.shaping import Shaper
from backend.config import LLMSettings, ServingSettings
from backend.guard import LexiconStore
from backend.metrics import Metrics
from backend.serving.pool import EnginePool
from backend.serving.queue import WaitQueue
from backend.serving.slots import SlotTable
from backend.serving.status import StatusBoard
from backend.serving.tokenizer import EstimateTokenizer, Tokenizer
from chat_ui.runtime import PoolEngine
from tests.fixtures.engines import free_port

SYSTEM = "你是测试助手。"
LLM = LLMSettings(first_token_timeout_s=2.0, inter_token_timeout_s=1.0, connect_timeout_s=1.0)


@dataclass
class Stack:
    pipeline: ChatPipeline
    slots: SlotTable
    history: History
    status: StatusBoard
    pool: EnginePool
    metrics: Metrics


MakeStack = Callable[..., Stack]


@pytest.fixture
async def make_stack(redis_client: aioredis.Redis) -> AsyncIterator[MakeStack]:
    pools: list[EnginePool] = []

    def make(
        urls: list[str], *, capacity: int = 4, budget_s: float = 5.0, sentiment: bool = False,
        client: aioredis.Redis | None = None, warmup: bool = False,
        guard: LexiconStore | None = None, retriever: Retriever | None = None,
        canary: str | None = None, tokenizer: Tokenizer | None = None,
    ) -> Stack:  # fmt: skip
        redis = client or redis_client
        pool = EnginePool(urls, llm=LLM, serving=ServingSettings())
        pools.append(pool)
        slots = SlotTable(redis, capacity=capacity, ttl_s=60)
        history = History(redis, ttl_s=600, max_messages=40)
        status = StatusBoard(redis)
        metrics = Metrics()
        pipeline = ChatPipeline(
            metrics=metrics,
            guard=guard,
            retriever=retriever,
            pool=pool,
            slots=slots,
            queue=WaitQueue(redis, max_depth=10, poll_s=0.05),
            shaper=Shaper(tokenizer=EstimateTokenizer(), context_window=4096, max_tokens=256),
            history=history,
            status=status,
            sentiment=SentimentProbe(PoolEngine(pool), timeout_s=2) if sentiment else None,
            tokenizer=tokenizer,
            config=PipelineConfig(
                system_prompt=SYSTEM,
                slots_per_replica=capacity,
                queue_wait_budget_s=budget_s,
                warmup=warmup,
                canary=canary,
            ),
        )
        return Stack(pipeline, slots, history, status, pool, metrics)

    yield make
    for pool in pools:
        await pool.aclose()


async def run(pipeline: ChatPipeline, thread: str, text: str) -> list[Event]:
    return [event async for event in pipeline.answer(Turn(thread_id=thread, text=text))]


def text_of(events: list[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, Token))


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"
