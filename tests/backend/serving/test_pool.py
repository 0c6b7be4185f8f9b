from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from backend.config import LLMSettings, ServingSettings
from backend.errors import EngineRejected, EngineTimeout, EngineUnavailable, TimeoutPhase
from backend.serving.breaker import BreakerState
from backend.serving.discovery import ReplicaDiscovery
from backend.serving.engine import ChatRequest, Message
from backend.serving.pool import EnginePool, parse_vllm_metrics
from backend.serving.slots import SlotTable
from tests.fixtures.engines import PAIR_ADDRESSES, FakeEngineHandle, ScriptedResolver, free_port

REQUEST = ChatRequest(messages=(Message(role="user", content="你好"),), max_tokens=16)
LLM = LLMSettings(first_token_timeout_s=1.0, inter_token_timeout_s=0.3, connect_timeout_s=1.0)
SERVING = ServingSettings(breaker_failures=2, breaker_reset_s=30.0)


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"


def twin(url: str) -> str:
    """The same fake server under another name: a second replica for the pool."""
    return url.replace("127.0.0.1", "localhost")


async def collect(pool: EnginePool, order: list[str]) -> tuple[str, str]:
    started = await pool.start(REQUEST, order=order)
    text = started.first + "".join([d async for d in started.rest])
    return started.replica, text


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


# Replicas discovered through DNS: `fake_engine_pair` listens on 127.0.0.1 and 127.0.0.2 with one
# port, and a ScriptedResolver answers for the name with either address or both.
Pair = tuple[FakeEngineHandle, FakeEngineHandle]
FAST_ROUNDS = ServingSettings(breaker_failures=2, breaker_reset_s=30.0, health_interval_s=0.01)
A_ONLY, B_ONLY, BOTH = [PAIR_ADDRESSES[0]], [PAIR_ADDRESSES[1]], list(reversed(PAIR_ADDRESSES))


def discovered(pair: Pair, resolver: ScriptedResolver) -> EnginePool:
    port = pair[0].base_url.removesuffix("/v1").rsplit(":", 1)[1]
    discovery = ReplicaDiscovery(f"engines.test:{port}", resolver=resolver)
    return EnginePool([], llm=LLM, serving=FAST_ROUNDS, discovery=discovery)


@contextlib.asynccontextmanager
async def health_checked(pool: EnginePool) -> AsyncIterator[EnginePool]:
    """The pool with its health loop running; closed on the way out."""
    task = asyncio.create_task(pool.run_health_checks())
    try:
        yield pool
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await pool.aclose()


def test_pool_needs_replicas_or_discovery() -> None:
    with pytest.raises(ValueError, match="at least one replica"):
        EnginePool([], llm=LLM, serving=SERVING)


async def test_discovered_pool_is_empty_until_resolved() -> None:
    resolver = ScriptedResolver()
    resolver.failure = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    pool = EnginePool(
        [], llm=LLM, serving=SERVING,
        discovery=ReplicaDiscovery("engines.test:8080", resolver=resolver),
    )  # fmt: skip
    try:
        await pool.rediscover()
        assert (pool.urls, pool.available()) == ([], [])
        with pytest.raises(EngineUnavailable):
            await pool.start(REQUEST, order=pool.available())
    finally:
        await pool.aclose()


async def test_discovered_replica_is_available_after_a_probe(fake_engine_pair: Pair) -> None:
    a, b = fake_engine_pair
    pool = discovered(fake_engine_pair, ScriptedResolver(BOTH))
    try:
        await pool.rediscover()
        assert (pool.urls, pool.available()) == ([a.base_url, b.base_url], [])
        assert await pool.probe(b.base_url)
        assert pool.available() == [b.base_url]
    finally:
        await pool.aclose()


async def test_replicas_follow_dns_across_health_rounds(fake_engine_pair: Pair) -> None:
    a, b = fake_engine_pair
    resolver = ScriptedResolver(A_ONLY)
    async with health_checked(discovered(fake_engine_pair, resolver)) as pool:
        await resolver.rounds()
        assert pool.available() == [a.base_url]
        resolver.addresses = BOTH
        await resolver.rounds()
        assert pool.available() == [a.base_url, b.base_url]
        resolver.addresses = B_ONLY
        await resolver.rounds()
        assert (pool.urls, pool.available()) == ([b.base_url], [b.base_url])
        resolver.failure = socket.gaierror(socket.EAI_AGAIN, "Temporary failure")
        await resolver.rounds()
        assert pool.available() == [b.base_url]  # a failed resolution keeps the pool


async def test_retired_replica_gets_no_new_requests(fake_engine_pair: Pair) -> None:
    a, b = fake_engine_pair
    resolver = ScriptedResolver(BOTH)
    pool = discovered(fake_engine_pair, resolver)
    try:
        await pool.rediscover()
        resolver.addresses = A_ONLY
        await pool.rediscover()
        a.script([{"text": "留下的副本"}])
        replica, text = await collect(pool, [b.base_url, a.base_url])
    finally:
        await pool.aclose()
    assert (replica, text) == (a.base_url, "留下的副本")
    assert b.log() == []


async def test_stream_on_retired_replica_finishes_whole(fake_engine_pair: Pair) -> None:
    _, b = fake_engine_pair
    whole = "退出时的回答要完整送达"  # within max_tokens: one character per token
    b.script([{"text": whole, "token_delay_s": 0.02}])
    resolver = ScriptedResolver(BOTH)
    pool = discovered(fake_engine_pair, resolver)
    try:
        await pool.rediscover()
        started = await pool.start(REQUEST, order=[b.base_url])
        resolver.addresses = A_ONLY
        await pool.rediscover()
        assert b.base_url not in pool.urls and b.base_url not in pool.available()
        assert pool.retiring == [b.base_url]  # its stream runs on: its client stays open
        text = started.first + "".join([delta async for delta in started.rest])
        assert pool.retiring == []  # the stream ended: the client is closed
    finally:
        await pool.aclose()
    assert (started.replica, text) == (b.base_url, whole)
    (exchange,) = await b.settled_log()
    assert exchange["finished"] and not exchange["disconnected"]


async def test_returning_replica_keeps_its_running_stream(fake_engine_pair: Pair) -> None:
    a, b = fake_engine_pair
    b.script([{"text": "回来了", "token_delay_s": 0.02}, {"text": "再来一次"}])
    resolver = ScriptedResolver(BOTH)
    pool = discovered(fake_engine_pair, resolver)
    try:
        await pool.rediscover()
        started = await pool.start(REQUEST, order=[b.base_url])
        resolver.addresses = A_ONLY
        await pool.rediscover()
        resolver.addresses = BOTH
        await pool.rediscover()
        assert (pool.urls, pool.retiring) == ([a.base_url, b.base_url], [])
        assert b.base_url not in pool.available()  # unavailable again until a probe succeeds
        first = started.first + "".join([delta async for delta in started.rest])
        assert await pool.probe(b.base_url)
        replica, again = await collect(pool, [b.base_url])  # its client was not closed
    finally:
        await pool.aclose()
    assert (first, replica, again) == ("回来了", b.base_url, "再来一次")


async def test_new_replica_receives_new_conversations(
    fake_engine_pair: Pair, redis_client: aioredis.Redis
) -> None:
    a, b = fake_engine_pair
    slots = SlotTable(redis_client, capacity=4, ttl_s=120)
    resolver = ScriptedResolver(A_ONLY)
    async with health_checked(discovered(fake_engine_pair, resolver)) as pool:
        await resolver.rounds()
        for session in ("s1", "s2"):
            lease = await slots.acquire(session, replicas=pool.available())
            assert lease is not None and lease.replica == a.base_url
        resolver.addresses = BOTH
        await resolver.rounds()
        lease = await slots.acquire("s3", replicas=pool.available())
        assert lease is not None and (lease.replica, lease.new) == (b.base_url, True)
        b.script([{"text": "新副本接手新对话"}])
        order = [lease.replica, *(u for u in pool.available() if u != lease.replica)]
        replica, text = await collect(pool, order)
        kept = await slots.acquire("s1", replicas=pool.available())
    assert (replica, text) == (b.base_url, "新副本接手新对话")
    assert a.log() == []
    assert kept is not None and (kept.replica, kept.new) == (a.base_url, False)
