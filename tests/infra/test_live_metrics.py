"""A real Prometheus (infra/prometheus's jobs and rules, 1 s scrapes) scraping a running chat_ui and
RAG worker through a short load: Chinese multi-turn chats over the Chainlit websocket (the client
of infra/locust/), a blocked message, a rate-limited user, an engine error, a sanitized answer with
a masked word, a knowledge-base answer with a made-up citation, uploads (indexed, duplicate,
rejected). Afterwards
every dashboard query and every alert's signal returns data, and every rule evaluates cleanly.

Not expected to return data here: vLLM's own series (no vLLM on this machine) and audit write
failures (a counter that only appears on a failure)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from backend.auth import Role
from backend.config import DEV_RAG_TOKEN
from backend.rag.client import RagClient
from tests.fixtures.engines import FakeEngineHandle
from tests.infra import files, promql, stack

pytestmark = pytest.mark.slow

PASSWORD = "infra-test-password-1"
USERS = {"admin": Role.ADMIN, "alice": Role.USER, "bob": Role.USER, "carol": Role.USER,
         "dave": Role.USER, **{f"user{i}": Role.USER for i in range(4)}}  # fmt: skip
CONVERSATION = ("你好，请介绍一下你自己。", "杭州有哪些值得去的地方？", "谢谢，再推荐一道杭帮菜。")
TRAVEL = (
    "# Travel policy\n\nHotel limit: 500 yuan per night in first-tier cities, 350 elsewhere.\n\n"
    "出差住宿标准：一线城市每晚不超过 500 元，其他城市不超过 350 元。\n"
).encode()
LEAVE = "年假：入职满一年可休 5 天，满十年 10 天。\nAnnual leave: 5 days after one year.\n".encode()
POLLS = 600  # x 0.1 s


def wait_for(check: Callable[[], bool], what: str) -> None:
    for _ in range(POLLS):
        if check():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def _value(prometheus: str, expr: str) -> float:
    result = stack.query(prometheus, expr)
    return float(result[0]["value"][1]) if result else 0.0


@pytest.fixture(scope="module")
def system(
    database_url: str, redis_url: str, fake_engine_url: str, minilm_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Any]]:  # fmt: skip
    """RAG worker + chat_ui + Prometheus scraping both; torn down in reverse order."""
    name, db_url = stack.new_database(database_url, USERS, password=PASSWORD)
    redis = stack.redis_db(redis_url, 9)
    common = {"QWEN_DATABASE__URL": db_url, "QWEN_REDIS__URL": redis}
    rag = stack.start_rag_worker(
        {**common, "QWEN_RAG__EMBEDDER": "flag", "QWEN_RAG__EMBEDDING_MODEL": str(minilm_path),
         "QWEN_RAG__EMBEDDING_DIM": "384", "QWEN_RAG__EMBEDDING_POOLING": "mean",
         "QWEN_RAG__CONSUMERS": "1", "QWEN_RAG__RECONCILE_INTERVAL_S": "1"},
        tmp_path_factory.mktemp("rag"),
    )  # fmt: skip
    processes = [rag]
    try:
        ui = stack.start_chat_ui(
            {**common, "QWEN_LLM__BASE_URL": fake_engine_url, "QWEN_RAG__WORKER_URL": rag.url,
             "QWEN_SERVING__SENTIMENT": "false", "QWEN_SERVING__WARMUP": "false",
             "QWEN_RATELIMIT__MESSAGE_BURST": "3", "QWEN_RATELIMIT__MESSAGES_PER_MINUTE": "2"},
            tmp_path_factory.mktemp("ui"),
        )  # fmt: skip
        processes.append(ui)
        prometheus = stack.start_prometheus(
            {
                "chat-ui": ui.url.removeprefix("http://"),
                "rag-worker": rag.url.removeprefix("http://"),
            },
            tmp_path_factory.mktemp("prometheus"),
        )
        processes.append(prometheus)
        yield {"ui": ui, "rag": rag, "prometheus": prometheus.url, "engine": fake_engine_url}
    finally:
        for process in reversed(processes):
            process.stop()
        stack.drop_database(database_url, name)


async def _wait_indexed(client: RagClient, document_id: str) -> None:
    for _ in range(POLLS):
        if (await client.job(document_id, user="admin")).status == "indexed":
            return
        await asyncio.sleep(0.1)
    pytest.fail("the document was not indexed")


async def _ingest(
    rag_url: str, files_: list[tuple[str, bytes]], expected: list[tuple[bool, bool]]
) -> None:
    client = RagClient(rag_url, token=DEV_RAG_TOKEN)
    try:
        if not await client.list_kbs(user="admin"):
            await client.create_kb("handbook", user="admin", public=True)
        results = await client.upload("handbook", files_, user="admin")
        assert [(r.accepted, r.duplicate) for r in results] == expected
        assert results[0].document is not None
        await _wait_indexed(client, results[0].document.id)
    finally:
        await client.aclose()


def _chat(
    client: Any, ui_url: str, user: str, texts: tuple[str, ...], *, profile: str = ""
) -> list[Any]:
    token = client.login(ui_url, user, PASSWORD)
    session = client.ChainlitSession(ui_url, token=token, user=user, profile=profile, timeout_s=60)
    session.open()
    try:
        return [session.ask(text) for text in texts]
    finally:
        session.close()


@pytest.fixture(scope="module")
def load(system: dict[str, Any]) -> dict[str, Any]:
    """The short load run; returns what was sent."""
    client = stack.load_client()
    ui = system["ui"].url
    engine = FakeEngineHandle(system["engine"])
    engine.reset()
    prometheus = system["prometheus"]
    # rate() sees an increase only between two scrapes: start once both targets are scraped, and
    # index a second document after the first one's (labelled) stage series were scraped.
    wait_for(lambda: _value(prometheus, "count(up == 1)") == 2, "the first scrapes")
    asyncio.run(_ingest(system["rag"].url,
                        [("travel.md", TRAVEL), ("travel-copy.md", TRAVEL), ("tool.exe", b"MZ\x90\x00" + bytes(range(256)))],
                        [(True, False), (True, True), (False, False)]))  # fmt: skip
    wait_for(
        lambda: _value(prometheus, "count(qwen_rag_ingest_stage_seconds_count)") >= 4,
        "stage series",
    )
    asyncio.run(_ingest(system["rag"].url, [("leave.txt", LEAVE)], [(True, False)]))
    sent = 0
    # Scripted answers first, one at a time: the fake engine answers requests in arrival order.
    engine.script([{"text": "这是一张图 ![x](http://evil.example/x.png) ，微信号不给。"}])
    sanitized = _chat(client, ui, "alice", ("给我看一张图片",))
    engine.script([{"status": 500}])
    failed = _chat(client, ui, "alice", ("这个问题会失败",))
    blocked = _chat(client, ui, "bob", ("加我微信聊聊",))
    engine.script([{"text": "根据资料[1]，一线城市每晚不超过 500 元[9]。"}])
    cited = _chat(
        client, ui, "carol", ("What is the hotel limit per night?",), profile=client.KB_PROFILE
    )
    limited = _chat(client, ui, "dave", ("第一条", "第二条", "第三条", "第四条"))
    sent += 1 + 1 + 1 + 1 + 4
    with ThreadPoolExecutor(max_workers=4) as pool:
        chats = list(pool.map(lambda i: _chat(client, ui, f"user{i}", CONVERSATION), range(4)))
    sent += 4 * len(CONVERSATION)
    assert "evil.example" not in sanitized[0].text and sanitized[0].error is None
    assert "微信号" not in sanitized[0].text  # masked
    assert failed[0].error is not None and blocked[0].error is not None  # an error notice each
    assert "[9]" not in cited[0].text and cited[0].error is None
    assert all(
        answer.error is None and answer.ttft_s is not None for chat in chats for answer in chat
    )
    assert [answer.error is None for answer in limited] == [True, True, True, False]
    return {"requests": sent}


@pytest.fixture(scope="module")
def scraped(system: dict[str, Any], load: dict[str, Any]) -> str:
    """Prometheus once it has scraped every request of the load and the indexed document."""
    prometheus = system["prometheus"]
    wait_for(
        lambda: _value(prometheus, "sum(qwen_requests_total)") == load["requests"], "the requests"
    )
    wait_for(
        lambda: _value(prometheus, 'sum(qwen_rag_documents_total{outcome="indexed"})') >= 1,
        "ingestion",
    )
    wait_for(lambda: _value(prometheus, "count(qwen_rag_stream_lag)") >= 1, "the stream gauges")
    return prometheus


def expected_absent(expr: str) -> bool:
    """Series that cannot exist in this run: vLLM's, and the audit-failure counter."""
    names = promql.metric_names(expr)
    if "qwen_audit_write_failures_total" in names:
        return True
    return (
        bool(names)
        and all(name.startswith("vllm:") or name == "up" for name in names)
        and ("vllm" in expr)
    )


def checked_queries() -> list[tuple[str, str]]:
    queries = []
    for name, dashboard in files.dashboards().items():
        variables = files.dashboard_variables(dashboard)
        for title, expr in files.dashboard_queries(dashboard):
            queries.append((f"{name}: {title}", promql.plain(expr, variables)))
    for rule in files.rules():
        signal = promql.signal(rule["expr"])
        if signal.startswith("absent("):  # fires on no data: its argument must have data now
            signal = signal.removeprefix("absent(").removesuffix(")")
        queries.append((f"alert {rule['alert']}", signal))
    return queries


def finite(samples: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in samples)


def test_every_dashboard_and_alert_query_returns_data(scraped: str) -> None:
    """Data, and a number: a histogram quantile over no observations would be NaN."""
    empty = [where for where, expr in checked_queries()
             if not expected_absent(expr) and not finite(stack.query(scraped, expr))]  # fmt: skip
    assert not empty


def test_only_vllm_and_audit_failure_queries_are_exempt(scraped: str) -> None:
    exempt = [(where, expr) for where, expr in checked_queries() if expected_absent(expr)]
    alerts = {where for where, _ in exempt if where.startswith("alert ")}
    assert alerts == {"alert QwenAuditWriteFailures", "alert QwenEngineKVCacheHigh",
                      "alert QwenEngineRequestsWaiting", "alert QwenVllmTargetDown"}  # fmt: skip
    panels = {where for where, _ in exempt} - alerts
    assert panels - {
        "qwen-overview.json: Tokens per second",
        "qwen-overview.json: Audit write failures (last hour)",
    } == {where for where in panels if where.startswith("qwen-engine.json")}
    for where, expr in exempt:
        assert not stack.query(scraped, expr), where  # really absent here, not hidden data


def test_every_rule_evaluates_cleanly(scraped: str) -> None:
    groups = httpx.get(f"{scraped}/api/v1/rules", timeout=10, trust_env=False).json()["data"][
        "groups"
    ]
    evaluated = [rule for group in groups for rule in group["rules"]]
    assert len(evaluated) == len(files.rules())
    assert all(rule["health"] == "ok" for rule in evaluated), [
        r["name"] for r in evaluated if r["health"] != "ok"
    ]


def test_the_load_produced_every_outcome(scraped: str) -> None:
    outcomes = {
        s["metric"]["outcome"]
        for s in stack.query(scraped, "sum by (outcome) (qwen_requests_total)")
    }
    assert {"ok", "blocked", "error", "rate_limited"} <= outcomes
    uploads = {
        s["metric"]["outcome"]
        for s in stack.query(scraped, "sum by (outcome) (qwen_rag_uploads_total)")
    }
    assert {"queued", "duplicate", "unsupported_type"} <= uploads
    assert _value(scraped, "sum(qwen_answer_sanitized_total)") >= 1
    assert _value(scraped, "sum(qwen_citations_removed_total)") >= 1
    assert _value(scraped, "sum(qwen_rag_retrieve_seconds_count)") >= 1
    assert _value(scraped, "max(qwen_engine_up)") == 1


def test_the_load_shows_in_guard_token_and_slot_metrics(scraped: str) -> None:
    def hits(stage: str, severity: str) -> float:
        labels = f'stage="{stage}", category="广告引流", severity="{severity}"'
        return _value(scraped, f"sum(qwen_guard_hits_total{{{labels}}})")

    assert (hits("input", "block"), hits("output", "mask")) == (1, 1)  # 加我微信, 微信号
    assert _value(scraped, 'sum(qwen_guard_hits_total{stage="retrieval"})') == 0
    assert _value(scraped, "sum(qwen_completion_tokens_total)") > 0
    assert _value(scraped, "sum(qwen_slots_capacity)") >= 1
    # sessions hold their slot until the chat closes: some scrape saw one
    assert _value(scraped, "max(max_over_time(qwen_slots_in_use[1h]))") >= 1


def test_nothing_critical_fires_in_a_healthy_run(scraped: str) -> None:
    alerts = httpx.get(f"{scraped}/api/v1/alerts", timeout=10, trust_env=False).json()["data"][
        "alerts"
    ]
    firing = {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}
    assert not firing & {"QwenNoEngineAvailable", "QwenChatUiMissing", "QwenRagWorkerMissing",
                         "QwenTargetDown", "QwenDeadLetters"}  # fmt: skip
