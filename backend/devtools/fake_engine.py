"""A scripted OpenAI-compatible engine: exact text, delays, stalls and error statuses on demand.

For tests and demos that need deterministic answers or faults. Run it with
`python -m backend.devtools.fake_engine --host 127.0.0.1 --port 8099`, or build the app with
`create_app()`.

    GET  /v1/models              the one model
    POST /v1/chat/completions    streaming (SSE, `data: {json}` ... `data: [DONE]`) or not
    POST /_fake/script           body: a list of steps, appended to the queue
    GET  /_fake/log              every completion request seen, in order (see `Exchange`)
    POST /_fake/reset            empty the queue and the log

Each completion request consumes the next step (see `Step`); with the queue empty it answers
"<default_prefix><last user message>". The server watches for the client leaving while it answers
and stops sending at once, which is how tests prove that "stop" aborts the upstream request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import Receive, Scope, Send


class Step(BaseModel):
    """How to answer one completion request.

    `text` None means the default reply. It is sent `chunk_chars` characters per chunk (one chunk is
    one "token" for `max_tokens`), the first after `first_token_delay_s` seconds, the others
    `token_delay_s` apart. `stall_after` N: after N chunks send nothing more and hold the connection
    open until the client leaves. `status` other than 200: an OpenAI-style error with that status.
    """

    model_config = ConfigDict(extra="forbid")

    text: str | None = None
    chunk_chars: int = Field(default=1, ge=1)
    first_token_delay_s: float = Field(default=0.0, ge=0)
    token_delay_s: float | None = Field(default=None, ge=0)  # None: the server's default
    stall_after: int | None = Field(default=None, ge=0)
    status: int = Field(default=200, ge=200, le=599)


@dataclass
class Exchange:
    """One completion request as the fake saw it; updated while the answer is being sent.

    `chunks_sent` counts content chunks (a non-streaming reply counts as one). `finished`: the whole
    answer went out. `disconnected`: the client left before that.
    """

    body: dict[str, Any]
    stream: bool
    status: int
    chunks_sent: int = 0
    finished: bool = False
    disconnected: bool = False


class _Reply(Response):
    """Plays one step while watching for the client leaving; notes progress in `exchange`."""

    def __init__(self, exchange: Exchange, pieces: list[str], finish: str, step: Step,
                 *, model: str, token_delay_s: float) -> None:  # fmt: skip
        super().__init__()
        self._exchange = exchange
        self._pieces = pieces
        self._finish = finish
        self._step = step
        self._model = model
        self._token_delay_s = token_delay_s
        self._id = f"chatcmpl-{uuid.uuid4().hex[:24]}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        play = asyncio.ensure_future(self._play(send))
        left = asyncio.ensure_future(_client_left(receive))
        try:
            await asyncio.wait({play, left}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            client_left = left.done() and not left.cancelled()
            play.cancel()
            left.cancel()
            outcome = (await asyncio.gather(play, left, return_exceptions=True))[0]
        if client_left or isinstance(outcome, OSError):  # uvicorn raises OSError on a closed socket
            self._exchange.disconnected = not self._exchange.finished
        elif isinstance(outcome, Exception):
            raise outcome

    async def _play(self, send: Send) -> None:
        step, exchange = self._step, self._exchange
        if not exchange.stream:
            await asyncio.sleep(step.first_token_delay_s)
            if step.stall_after is not None:
                await asyncio.Event().wait()
            await self._send_json(send, self._completion())
            exchange.chunks_sent, exchange.finished = 1, True
            return
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
        ]})  # fmt: skip
        await self._event(send, {"role": "assistant", "content": ""})
        await asyncio.sleep(step.first_token_delay_s)
        for index, piece in enumerate(self._pieces):
            if index == step.stall_after:
                await asyncio.Event().wait()
            if index:
                await asyncio.sleep(self._token_delay_s)
            await self._event(send, {"content": piece})
            exchange.chunks_sent += 1
        if step.stall_after is not None and step.stall_after >= len(self._pieces):
            await asyncio.Event().wait()
        await self._event(send, {}, finish=self._finish)
        options = exchange.body.get("stream_options") or {}
        if isinstance(options, dict) and options.get("include_usage"):
            await self._send_data(send, self._chunk([], usage=self._usage()))
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        exchange.finished = True

    async def _event(self, send: Send, delta: dict[str, Any], *, finish: str | None = None) -> None:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        await self._send_data(send, self._chunk([choice]))

    async def _send_data(self, send: Send, payload: dict[str, Any]) -> None:
        data = b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"
        await send({"type": "http.response.body", "body": data, "more_body": True})

    async def _send_json(self, send: Send, payload: dict[str, Any]) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self._id, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self._model, "choices": choices, **extra}  # fmt: skip

    def _completion(self) -> dict[str, Any]:
        message = {"role": "assistant", "content": "".join(self._pieces)}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": self._finish}
        return {"id": self._id, "object": "chat.completion", "created": int(time.time()),
                "model": self._model, "choices": [choice], "usage": self._usage()}  # fmt: skip

    def _usage(self) -> dict[str, int]:
        messages = self._exchange.body.get("messages") or []
        prompt = sum(len(str(m.get("content", ""))) for m in messages)
        completion = len(self._pieces)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}  # fmt: skip


async def _client_left(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else ""
    return ""


def create_app(
    *, model: str = "qwen", default_prefix: str = "收到：", default_token_delay_s: float = 0.02
) -> FastAPI:
    """The fake engine. Without a script it answers `default_prefix` + the last user message,
    one character per chunk, `default_token_delay_s` seconds apart."""
    app = FastAPI(title="fake OpenAI-compatible engine")
    queue: deque[Step] = deque()
    log: list[Exchange] = []

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        entry = {"id": model, "object": "model", "created": 0, "owned_by": "fake"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions")
    async def completions(request: Request) -> Response:
        body: dict[str, Any] = await request.json()
        step = queue.popleft() if queue else Step()
        exchange = Exchange(body=body, stream=bool(body.get("stream")), status=step.status)
        log.append(exchange)
        if step.status != 200:
            exchange.finished = True
            error = {"message": f"scripted status {step.status}", "type": "fake_error",
                     "param": None, "code": step.status}  # fmt: skip
            return JSONResponse({"error": error}, status_code=step.status)
        text = step.text if step.text is not None else default_prefix + _last_user_text(body)
        size = step.chunk_chars
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        limit = body.get("max_tokens")
        finish = "stop"
        if isinstance(limit, int) and len(pieces) > limit:
            pieces, finish = pieces[:limit], "length"
        delay = step.token_delay_s if step.token_delay_s is not None else default_token_delay_s
        return _Reply(exchange, pieces, finish, step, model=model, token_delay_s=delay)

    @app.post("/_fake/script")
    async def script(steps: list[Step]) -> dict[str, int]:
        queue.extend(steps)
        return {"queued": len(queue)}

    @app.get("/_fake/log")
    async def read_log() -> list[dict[str, Any]]:
        return [asdict(exchange) for exchange in log]

    @app.post("/_fake/reset")
    async def reset() -> dict[str, int]:
        queue.clear()
        log.clear()
        return {"queued": 0}

    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Scripted OpenAI-compatible fake engine.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--model", default="qwen")
    parser.add_argument("--default-prefix", default="收到：")
    parser.add_argument("--default-token-delay-s", type=float, default=0.02)
    args = parser.parse_args(argv)
    app = create_app(
        model=args.model,
        default_prefix=args.default_prefix,
        default_token_delay_s=args.default_token_delay_s,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", ws="none")


if __name__ == "__main__":
    main()
