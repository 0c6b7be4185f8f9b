from __future__ import annotations

import pytest

from backend.config import LLMSettings, ServingSettings
from backend.errors import EngineRejected, EngineTimeout, EngineUnavailable
from backend.serving.engine import ChatRequest, Message, TimeoutPhase
from backend.serving.pool import (
    BreakerState,
    CircuitBreaker,
    EnginePool,
    parse_vllm_metrics,
)
from tests.fixtures.engines import FakeEngineHandle, free_port

REQUEST = ChatRequest(messages=(Message(role="user", content="你好"),), max_tokens=16)
LLM = LLMSettings(first_token_timeout_s=1.0, inter_token_timeout_s=0.3, connect_timeout_s=1.0)
SERVING = ServingSettings(breaker_failures=2, breaker_reset_s=30.0)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"


def twin(url: str) -> str:
    """The same fake server under another name: a second replica for the pool."""
    return url.replace("127.0.0.1", "localhost")


async def collect(pool: EnginePool, order: list[str]) -> tuple[str, str]:
    started = await pool.start(REQUEST, order=order)
    text = started.first + "".join([d async for d in started.rest])
    return started.replica, text


def test_breaker_opens_after_threshold() -> None:
    breaker = CircuitBreaker(failures=2, reset_s=10, clock=Clock())
    breaker.record_failure()
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()


def test_breaker_half_open_allows_one_trial() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=1, reset_s=10, clock=clock)
    breaker.record_failure()
    clock.now = 10.0
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()
    assert not breaker.allow()


def test_breaker_trial_success_closes() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=1, reset_s=10, clock=clock)
    breaker.record_failure()
    clock.now = 10.0
    breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED


def test_breaker_trial_failure_reopens() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=1, reset_s=10, clock=clock)
    breaker.record_failure()
    clock.now = 10.0
    breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN


def test_parse_vllm_metrics_sums_label_sets() -> None:
    text = "\n".join(
        [
            "# HELP vllm:num_requests_waiting Number of requests waiting.",
            'vllm:num_requests_waiting{model_name="qwen"} 3.0',
            'vllm:num_requests_waiting{model_name="qwen-b"} 2.0',
            'vllm:num_requests_running{model_name="qwen"} 7.0',
            'vllm:gpu_cache_usage_perc{model_name="qwen"} 0.8',
            'vllm:prompt_tokens_total{model_name="qwen"} 12345.0',
        ]
    )
    load = parse_vllm_metrics(text)
    assert (load.waiting, load.running, load.kv_cache_usage) == (5.0, 7.0, 0.8)


async def test_failover_before_first_token(fake_engine: FakeEngineHandle) -> None:
    fake_engine.script([{"text": "备用副本的回答"}])
    dead = dead_url()
    pool = EnginePool([dead, fake_engine.base_url], llm=LLM, serving=SERVING)
    try:
        replica, text = await collect(pool, [dead, fake_engine.base_url])
    finally:
        await pool.aclose()
    assert (replica, text) == (fake_engine.base_url, "备用副本的回答")


async def test_first_token_timeout_fails_over(fake_engine: FakeEngineHandle) -> None:
    fake_engine.script([{"text": "太慢", "first_token_delay_s": 3}, {"text": "快"}])
    other = twin(fake_engine.base_url)
    pool = EnginePool([fake_engine.base_url, other], llm=LLM, serving=SERVING)
    try:
        replica, text = await collect(pool, [fake_engine.base_url, other])
    finally:
        await pool.aclose()
    assert (replica, text) == (other, "快")


async def test_no_failover_after_first_token(fake_engine: FakeEngineHandle) -> None:
    fake_engine.script([{"text": "说了一半", "stall_after": 2}, {"text": "不该出现"}])
    other = twin(fake_engine.base_url)
    pool = EnginePool([fake_engine.base_url, other], llm=LLM, serving=SERVING)
    try:
        with pytest.raises(EngineTimeout) as info:
            await collect(pool, [fake_engine.base_url, other])
    finally:
        await pool.aclose()
    assert info.value.phase is TimeoutPhase.INTER_TOKEN
    assert len(fake_engine.log()) == 1  # the second replica was never asked


async def test_rejected_request_is_not_retried(fake_engine: FakeEngineHandle) -> None:
    fake_engine.script([{"status": 400}, {"text": "不该出现"}])
    other = twin(fake_engine.base_url)
    pool = EnginePool([fake_engine.base_url, other], llm=LLM, serving=SERVING)
    try:
        with pytest.raises(EngineRejected):
            await collect(pool, [fake_engine.base_url, other])
    finally:
        await pool.aclose()
    assert len(fake_engine.log()) == 1


async def test_all_replicas_down_raises_unavailable() -> None:
    urls = [dead_url(), dead_url()]
    pool = EnginePool(urls, llm=LLM, serving=SERVING)
    try:
        with pytest.raises(EngineUnavailable):
            await collect(pool, urls)
    finally:
        await pool.aclose()


async def test_open_breaker_skips_replica(fake_engine: FakeEngineHandle) -> None:
    dead = dead_url()
    pool = EnginePool([dead, fake_engine.base_url], llm=LLM, serving=SERVING)
    try:
        for _ in range(2):  # two failures open the dead replica's breaker
            await collect(pool, [dead, fake_engine.base_url])
        assert pool.breaker_state(dead) is BreakerState.OPEN
        assert pool.available() == [fake_engine.base_url]
    finally:
        await pool.aclose()


async def test_probe_marks_dead_replica_unhealthy(fake_engine: FakeEngineHandle) -> None:
    dead = dead_url()
    pool = EnginePool([dead, fake_engine.base_url], llm=LLM, serving=SERVING)
    try:
        assert not await pool.probe(dead)
        assert await pool.probe(fake_engine.base_url)
        assert pool.available() == [fake_engine.base_url]
    finally:
        await pool.aclose()


async def test_killed_replica_sends_new_work_elsewhere(fake_engine: FakeEngineHandle) -> None:
    dead = dead_url()  # a replica that died: nothing listens any more
    pool = EnginePool([dead, fake_engine.base_url], llm=LLM, serving=SERVING)
    try:
        await pool.probe(dead)
        fake_engine.script([{"text": "在别处回答"}])
        replica, _ = await collect(pool, pool.available())
    finally:
        await pool.aclose()
    assert replica == fake_engine.base_url
