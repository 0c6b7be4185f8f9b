"""Launching the local llama.cpp engine (llama-cpp-python's OpenAI-compatible server).

`engine_command` builds the argv, `engine_base_url` says where clients reach the engine, and
`wait_ready` waits until it answers. Starting and supervising the process is the caller's job
(`qwen-stack engine` / `up`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Protocol

import httpx

from backend.config import EngineSettings, Settings
from backend.errors import EngineUnavailable

logger = logging.getLogger(__name__)

PROBE_INTERVAL_S = 0.25
PROBE_TIMEOUT_S = 2.0


class Process(Protocol):
    """What `wait_ready` needs of a child process (`subprocess.Popen` fits)."""

    def poll(self) -> int | None: ...


def engine_threads(engine: EngineSettings) -> int:
    """Threads the engine computes with: `engine.n_threads`, or every core when it is 0."""
    if engine.n_threads > 0:
        return engine.n_threads
    return os.cpu_count() or 1


def engine_command(settings: Settings, model: Path) -> list[str]:
    """The argv that serves `model` with llama.cpp under the current interpreter.

    ChatML template (Qwen's), one request at a time without aborting running streams
    (`--interrupt_requests False`), and a RAM prompt cache of `engine.cache_bytes` bytes so a
    request that extends an earlier prompt skips most of its prefill. `--logits_all False`: the
    server's default keeps every prompt token's logits (n_vocab floats each, ~600 KiB with Qwen's
    vocabulary), which only logprobs need, and each cached state would carry them (a 1,400-token
    conversation: ~820 MiB instead of ~17 MiB; backend/serving/llama_server.py). `--flash_attn`
    (`engine.flash_attn`, on by default): llama.cpp's fused attention kernel. On the 0.5B model,
    240 new tokens after a cached 1,200-token history (a pinned conversation's next turn) took
    1.30-1.32 s against 1.49-2.09 s in three runs (one and two threads); a fresh 240-token or a
    whole 1,440-token prompt cost about the same either way (-22% to +4%)."""
    engine = settings.engine
    threads = str(engine_threads(engine))
    return [
        sys.executable, "-m", "backend.serving.llama_server",
        "--model", str(model),
        "--model_alias", settings.llm.model,
        "--chat_format", "chatml",
        "--n_threads", threads,
        "--n_threads_batch", threads,
        "--n_ctx", str(engine.n_ctx),
        "--host", engine.host,
        "--port", str(engine.port),
        "--interrupt_requests", "False",
        "--logits_all", "False",
        "--flash_attn", str(engine.flash_attn),
        "--cache", "True",
        "--cache_type", "ram",
        "--cache_size", str(engine.cache_bytes),
    ]  # fmt: skip


def engine_base_url(settings: Settings) -> str:
    """The OpenAI-compatible base URL (ending in /v1): `llm.base_url`, else the local engine."""
    if settings.llm.base_url:
        return settings.llm.base_url.rstrip("/")
    host = settings.engine.host
    if host in {"0.0.0.0", ""}:  # noqa: S104 - a wildcard bind is reached through loopback
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.engine.port}/v1"


def engine_urls(settings: Settings) -> list[str]:
    """The engine replicas to use: `serving.replicas`, else the one `engine_base_url`."""
    if settings.serving.replicas:
        return [url.rstrip("/") for url in settings.serving.replicas]
    return [engine_base_url(settings)]


def local_engine_settings(settings: Settings, *, count: int) -> list[Settings]:
    """Settings for `count` local llama.cpp replicas on consecutive ports from `engine.port`.

    Each replica gets an equal share of the cores (at least one thread).
    """
    threads = max(1, engine_threads(settings.engine) // count)
    return [
        settings.model_copy(
            update={
                "engine": settings.engine.model_copy(
                    update={"port": settings.engine.port + i, "n_threads": threads}
                )
            }
        )
        for i in range(count)
    ]


async def wait_ready(base_url: str, *, timeout_s: float, process: Process | None = None) -> None:
    """Return once `GET {base_url}/models` answers 200 (the server has no /health).

    Loading a model takes seconds to minutes, so probes repeat every PROBE_INTERVAL_S.
    Raises EngineUnavailable when `timeout_s` (seconds) passes, or at once when `process` exits.
    """
    url = base_url.rstrip("/") + "/models"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last_problem = "no answer yet"
    async with httpx.AsyncClient(timeout=PROBE_TIMEOUT_S, trust_env=False) as client:
        while True:
            if process is not None and (code := process.poll()) is not None:
                raise EngineUnavailable(f"engine process exited with code {code} while starting")
            try:
                response = await client.get(url)
            except httpx.HTTPError as exc:
                last_problem = f"{type(exc).__name__}"
            else:
                if response.status_code == httpx.codes.OK:
                    logger.info("engine ready at %s", base_url)
                    return
                last_problem = f"HTTP {response.status_code}"
            if loop.time() >= deadline:
                raise EngineUnavailable(
                    f"engine at {base_url} not ready after {timeout_s:g}s ({last_problem})"
                )
            await asyncio.sleep(PROBE_INTERVAL_S)
