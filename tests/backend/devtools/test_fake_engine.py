"""The scripted fake engine, spoken to over plain HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.fixtures.engines import FakeEngineHandle, free_port

HELLO = [{"role": "user", "content": "你好"}]


async def _post(fake: FakeEngineHandle, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False) as client:
        return await client.post(f"{fake.base_url}/chat/completions", json=body)


def _events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of an SSE body, checking the framing on the way."""
    blocks = response.text.split("\n\n")
    assert blocks[-1] == ""
    assert all(block.startswith("data: ") for block in blocks[:-1])
    return [block.removeprefix("data: ") for block in blocks[:-1]]


def _streamed_text(response: httpx.Response) -> str:
    chunks = [json.loads(data) for data in _events(response)[:-1]]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


async def test_models_lists_one_model(fake_engine: FakeEngineHandle) -> None:
    async with httpx.AsyncClient(trust_env=False) as client:
        reply = (await client.get(f"{fake_engine.base_url}/models")).json()
    assert [m["id"] for m in reply["data"]] == ["qwen"]


async def test_stream_is_sse_ending_in_done(fake_engine: FakeEngineHandle) -> None:
    fake_engine.script([{"text": "你好，世界"}])
    response = await _post(fake_engine, {"messages": HELLO, "stream": True})
    assert response.headers["content-type"].startswith("text/event-stream")
    assert _events(response)[-1] == "[DONE]"


async def test_stream_sends_scripted_text(fake_engine: FakeEngineHandle) -> None:
    fake_engine.script([{"text": "你好，世界", "chunk_chars": 2}])
    response = await _post(fake_engine, {"messages": HELLO, "stream": True})
    assert _streamed_text(response) == "你好，世界"


async def test_chunk_chars_sets_chunk_size(fake_engine: FakeEngineHandle) -> None:
    fake_engine.script([{"text": "一二三四五", "chunk_chars": 2}])
    await _post(fake_engine, {"messages": HELLO, "stream": True})
    assert fake_engine.log()[0]["chunks_sent"] == 3


async def test_empty_queue_echoes_last_user_message(fake_engine: FakeEngineHandle) -> None:
    response = await _post(fake_engine, {"messages": HELLO, "stream": True})
    assert _streamed_text(response) == "收到：你好"


async def test_steps_are_consumed_in_order(fake_engine: FakeEngineHandle) -> None:
    fake_engine.script([{"text": "一"}, {"text": "二"}])
    texts = [_streamed_text(await _post(fake_engine, {"messages": HELLO, "stream": True}))
             for _ in range(3)]  # fmt: skip
    assert texts == ["一", "二", "收到：你好"]


async def test_non_stream_returns_completion(fake_engine: FakeEngineHandle) -> None:
    fake_engine.script([{"text": "整段回答"}])
    reply = (await _post(fake_engine, {"messages": HELLO})).json()
    assert reply["choices"][0]["message"]["content"] == "整段回答"


async def test_max_tokens_cuts_with_length(fake_engine: FakeEngineHandle) -> None:
    fake_engine.script([{"text": "一二三四五"}])
    reply = (await _post(fake_engine, {"messages": HELLO, "max_tokens": 2})).json()
    assert (reply["choices"][0]["message"]["content"], reply["choices"][0]["finish_reason"]) == (
        "一二",
        "length",
    )


async def test_status_step_returns_openai_error(fake_engine: FakeEngineHandle) -> None:
    fake_engine.script([{"status": 503}])
    response = await _post(fake_engine, {"messages": HELLO, "stream": True})
    assert (response.status_code, response.json()["error"]["code"]) == (503, 503)


async def test_unknown_step_field_is_refused(fake_engine: FakeEngineHandle) -> None:
    async with httpx.AsyncClient(trust_env=False) as client:
        root = fake_engine.base_url.removesuffix("/v1")
        response = await client.post(f"{root}/_fake/script", json=[{"txet": "typo"}])
    assert response.status_code == 422


async def test_log_records_request_body(fake_engine: FakeEngineHandle) -> None:
    await _post(fake_engine, {"messages": HELLO, "stream": True, "priority": 7})
    assert fake_engine.log()[0]["body"]["priority"] == 7


async def test_log_marks_finished_stream(fake_engine: FakeEngineHandle) -> None:
    await _post(fake_engine, {"messages": HELLO, "stream": True})
    entry = fake_engine.log()[0]
    assert (entry["finished"], entry["disconnected"]) == (True, False)


async def test_log_marks_client_that_left(fake_engine: FakeEngineHandle) -> None:
    fake_engine.script([{"text": "很长的回答" * 20, "token_delay_s": 0.05}])
    async with httpx.AsyncClient(trust_env=False) as client:
        body = {"messages": HELLO, "stream": True}
        url = f"{fake_engine.base_url}/chat/completions"
        async with client.stream("POST", url, json=body) as r:
            async for _line in r.aiter_lines():
                break
    entry = (await fake_engine.settled_log())[0]
    assert (entry["disconnected"], entry["finished"]) == (True, False)


async def test_reset_clears_queue_and_log(fake_engine: FakeEngineHandle) -> None:
    fake_engine.script([{"text": "不会用到"}, {"text": "也不会"}])
    await _post(fake_engine, {"messages": HELLO})
    fake_engine.reset()
    reply = (await _post(fake_engine, {"messages": HELLO})).json()
    assert (reply["choices"][0]["message"]["content"], len(fake_engine.log())) == ("收到：你好", 1)


def test_module_runs_as_a_server(tmp_path: Path) -> None:
    port = free_port()
    command = [sys.executable, "-m", "backend.devtools.fake_engine", "--port", str(port)]
    with (tmp_path / "fake.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(trust_env=False) as client:
            for _ in range(1000):
                assert process.poll() is None, (tmp_path / "fake.log").read_text()
                try:
                    models = client.get(f"http://127.0.0.1:{port}/v1/models").json()
                    break
                except httpx.ConnectError:
                    time.sleep(0.02)
        assert models["data"][0]["id"] == "qwen"
    finally:
        process.terminate()
        process.wait(timeout=10)
