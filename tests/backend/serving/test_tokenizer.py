"""EngineTokenizer against the real llama.cpp server, the scripted fake (no tokenize endpoint), a
vLLM-shaped tokenize server on loopback, and nothing at all; `fit` and the estimate."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from backend.serving.engine import Message
from backend.serving.tokenizer import (
    CHATML_MESSAGE_OVERHEAD,
    CHATML_REPLY_PRIMER,
    Dialect,
    EngineTokenizer,
    EstimateTokenizer,
    count_messages,
    estimate_tokens,
    fit,
)
from tests.fixtures.engines import FakeEngineHandle, free_port

TEXT = "今天天气很好，我们去公园散步吧。Let's go for a walk in the park!"
MARKER = "…（省略 {omitted} 字）…"


class CharTokenizer:
    """One token per character."""

    async def count(self, text: str) -> int:
        return len(text)

    def known(self, text: str) -> None:
        return None


@dataclass
class VLLMTokenizeServer:
    """vLLM's `POST /tokenize` (one token per character), with scripted statuses and a log."""

    base_url: str
    statuses: deque[int] = field(default_factory=deque)
    bodies: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/tokenize")
        async def tokenize(request: Request) -> JSONResponse:
            body: dict[str, Any] = await request.json()
            self.bodies.append(body)
            status = self.statuses.popleft() if self.statuses else 200
            if status != 200:
                return JSONResponse({"error": "scripted"}, status_code=status)
            tokens = list(range(len(body["prompt"])))
            return JSONResponse({"count": len(tokens), "tokens": tokens, "max_model_len": 4096})

        return app


@pytest.fixture(scope="module")
def vllm_server() -> Iterator[VLLMTokenizeServer]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server_state = VLLMTokenizeServer(f"http://127.0.0.1:{sock.getsockname()[1]}/v1")
    config = uvicorn.Config(server_state.app(), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(1000):
        if server.started or not thread.is_alive():
            break
        time.sleep(0.01)
    assert server.started, "the vLLM-shaped tokenize server did not start"
    yield server_state
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture
def vllm(vllm_server: VLLMTokenizeServer) -> VLLMTokenizeServer:
    vllm_server.statuses.clear()
    vllm_server.bodies.clear()
    return vllm_server


MakeTokenizer = Callable[..., EngineTokenizer]


@pytest.fixture
async def make_tokenizer() -> AsyncIterator[MakeTokenizer]:
    made: list[EngineTokenizer] = []

    def make(base_url: str, **options: Any) -> EngineTokenizer:
        made.append(EngineTokenizer(base_url, **options))
        return made[-1]

    yield make
    for tokenizer in made:
        await tokenizer.aclose()


def test_estimate_counts_letters_by_three() -> None:
    assert estimate_tokens("abcdefg") == 3


def test_estimate_counts_other_characters_singly() -> None:
    assert estimate_tokens("你好，2025!") == 8


async def test_count_messages_adds_chatml_framing() -> None:
    messages = [Message("system", "abc"), Message("user", "你好")]
    expected = 1 + 2 + 2 * CHATML_MESSAGE_OVERHEAD + CHATML_REPLY_PRIMER
    assert await count_messages(EstimateTokenizer(), messages) == expected


async def test_fit_stays_within_limit() -> None:
    _, tokens = await fit(CharTokenizer(), "一" * 1000, limit=100, tokens=1000, head_share=0.5,
                          marker=MARKER)  # fmt: skip
    assert tokens <= 100


async def test_fit_keeps_head_and_tail() -> None:
    text = "头" * 500 + "中" * 500 + "尾" * 500
    fitted, _ = await fit(CharTokenizer(), text, limit=200, tokens=1500, head_share=0.5,
                          marker=MARKER)  # fmt: skip
    assert (fitted[0], fitted[-1], "中" in fitted) == ("头", "尾", False)


async def test_fit_says_how_much_was_left_out() -> None:
    text = "文" * 1000
    fitted, _ = await fit(CharTokenizer(), text, limit=100, tokens=1000, head_share=0.5,
                          marker=MARKER)  # fmt: skip
    kept = fitted.count("文")
    assert MARKER.format(omitted=1000 - kept) in fitted


async def test_fit_head_only_cuts_the_tail() -> None:
    text = "头" * 500 + "尾" * 500
    fitted, _ = await fit(CharTokenizer(), text, limit=100, tokens=1000, head_share=1.0,
                          marker=MARKER)  # fmt: skip
    assert fitted.startswith("头") and "尾" not in fitted


@pytest.mark.slow
async def test_llama_server_uses_extras_tokenize(
    llama_server: str, make_tokenizer: MakeTokenizer
) -> None:
    tokenizer = make_tokenizer(llama_server)
    await tokenizer.count(TEXT)
    assert tokenizer.dialect is Dialect.LLAMA_CPP_PYTHON


@pytest.mark.slow
async def test_llama_server_count_is_the_engines(
    llama_server: str, make_tokenizer: MakeTokenizer
) -> None:
    root = llama_server.removesuffix("/v1")
    async with httpx.AsyncClient(trust_env=False) as client:
        reply = await client.post(f"{root}/extras/tokenize/count", json={"input": TEXT})
    assert await make_tokenizer(llama_server).count(TEXT) == reply.json()["count"]


@pytest.mark.slow
async def test_llama_server_prompt_matches_usage(
    llama_server: str, make_tokenizer: MakeTokenizer
) -> None:
    messages = [Message("system", "你是助手。"), Message("user", TEXT)]
    body = {
        "messages": [{"role": m.role, "content": m.content} for m in messages],
        "max_tokens": 1,
    }
    async with httpx.AsyncClient(trust_env=False, timeout=60) as client:
        reply = await client.post(f"{llama_server}/chat/completions", json=body)
    counted = await count_messages(make_tokenizer(llama_server), messages)
    assert counted == reply.json()["usage"]["prompt_tokens"]


async def test_fake_engine_falls_back_to_estimate(
    fake_engine: FakeEngineHandle, make_tokenizer: MakeTokenizer
) -> None:
    assert await make_tokenizer(fake_engine.base_url).count(TEXT) == estimate_tokens(TEXT)


async def test_fake_engine_is_remembered_as_estimate(
    fake_engine: FakeEngineHandle, make_tokenizer: MakeTokenizer
) -> None:
    tokenizer = make_tokenizer(fake_engine.base_url)
    await tokenizer.count(TEXT)
    assert tokenizer.dialect is Dialect.ESTIMATE


async def test_fallback_warns_once(
    fake_engine: FakeEngineHandle, make_tokenizer: MakeTokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    tokenizer = make_tokenizer(fake_engine.base_url)
    with caplog.at_level(logging.WARNING, logger="backend.serving.tokenizer"):
        for text in ("一", "二", "三"):
            await tokenizer.count(text)
    assert len([r for r in caplog.records if "no tokenize endpoint" in r.getMessage()]) == 1


async def test_unreachable_engine_is_estimated(make_tokenizer: MakeTokenizer) -> None:
    tokenizer = make_tokenizer(f"http://127.0.0.1:{free_port()}/v1")
    assert await tokenizer.count(TEXT) == estimate_tokens(TEXT)


async def test_unreachable_engine_is_asked_again(make_tokenizer: MakeTokenizer) -> None:
    tokenizer = make_tokenizer(f"http://127.0.0.1:{free_port()}/v1")
    await tokenizer.count(TEXT)
    assert tokenizer.dialect is None


async def test_vllm_tokenize_detected(
    vllm: VLLMTokenizeServer, make_tokenizer: MakeTokenizer
) -> None:
    tokenizer = make_tokenizer(vllm.base_url)
    await tokenizer.count(TEXT)
    assert tokenizer.dialect is Dialect.VLLM


async def test_vllm_count_is_the_engines(
    vllm: VLLMTokenizeServer, make_tokenizer: MakeTokenizer
) -> None:
    assert await make_tokenizer(vllm.base_url).count("一二三四五") == 5


async def test_vllm_body_adds_no_special_tokens(
    vllm: VLLMTokenizeServer, make_tokenizer: MakeTokenizer
) -> None:
    await make_tokenizer(vllm.base_url, model="qwen").count(TEXT)
    assert vllm.bodies[-1] == {"prompt": TEXT, "add_special_tokens": False, "model": "qwen"}


async def test_counts_are_cached(vllm: VLLMTokenizeServer, make_tokenizer: MakeTokenizer) -> None:
    tokenizer = make_tokenizer(vllm.base_url)
    await tokenizer.count(TEXT)
    asked = len(vllm.bodies)
    await tokenizer.count(TEXT)
    assert len(vllm.bodies) == asked


async def test_known_is_the_cached_count_only(
    vllm: VLLMTokenizeServer, make_tokenizer: MakeTokenizer
) -> None:
    tokenizer = make_tokenizer(vllm.base_url)
    assert tokenizer.known(TEXT) is None  # not counted yet: nothing asked either
    assert vllm.bodies == []
    count = await tokenizer.count(TEXT)
    assert tokenizer.known(TEXT) == count


async def test_known_is_the_estimate_once_there_is_no_endpoint(
    fake_engine: FakeEngineHandle, make_tokenizer: MakeTokenizer
) -> None:
    tokenizer = make_tokenizer(fake_engine.base_url)
    assert tokenizer.known(TEXT) is None  # the dialect is not known before the first count
    await tokenizer.count(TEXT)
    assert tokenizer.known("没有数过的") == estimate_tokens("没有数过的")


async def test_cache_evicts_least_recent(
    vllm: VLLMTokenizeServer, make_tokenizer: MakeTokenizer
) -> None:
    tokenizer = make_tokenizer(vllm.base_url, cache_size=2)
    for text in ("一", "二", "三", "一"):
        await tokenizer.count(text)
    assert [body["prompt"] for body in vllm.bodies[-2:]] == ["三", "一"]


async def test_server_error_is_estimated(
    vllm: VLLMTokenizeServer, make_tokenizer: MakeTokenizer
) -> None:
    tokenizer = make_tokenizer(vllm.base_url)
    await tokenizer.count("一")
    vllm.statuses.append(500)
    assert await tokenizer.count(TEXT) == estimate_tokens(TEXT)


async def test_server_error_is_not_cached(
    vllm: VLLMTokenizeServer, make_tokenizer: MakeTokenizer
) -> None:
    tokenizer = make_tokenizer(vllm.base_url)
    await tokenizer.count("一")
    vllm.statuses.append(500)
    await tokenizer.count(TEXT)
    assert await tokenizer.count(TEXT) == len(TEXT)
