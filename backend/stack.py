"""`qwen-stack up`: the whole system on one machine.

Starts embedded PostgreSQL and Redis (or uses the configured URLs), applies migrations, makes sure
the admin login exists, then supervises the engine (unless an external LLM URL is configured), the
RAG worker and the chat UI as child processes until SIGINT/SIGTERM, when everything stops in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import redis.asyncio as aioredis

from backend.auth import Role, UserStore
from backend.config import Mode, Settings, child_env
from backend.db import migrate, open_pool
from backend.embedded import EmbeddedServices
from backend.errors import QwenStackError
from backend.serving.launcher import engine_base_url, engine_command, local_engine_settings
from backend.serving.models import resolve_model
from backend.serving.status import StatusBoard
from backend.supervisor import ChildSpec, Supervisor

ENGINE = "engine"
RAG = "rag-worker"
UI = "ui"
ENGINE_READY_TIMEOUT_S = 600.0
UI_READY_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class StackPlan:
    """What `up` will run: the child processes and where the user finds the UI."""

    children: tuple[ChildSpec, ...]
    ui_url: str


UI_GRACEFUL_SHUTDOWN_S = 15  # uvicorn's wait for open requests, after chat_ui's own drain


def ui_command(settings: Settings) -> list[str]:
    return [
        sys.executable, "-m", "uvicorn", "chat_ui.server:create_app", "--factory",
        "--host", settings.ui.host, "--port", str(settings.ui.port),
        "--timeout-graceful-shutdown", str(UI_GRACEFUL_SHUTDOWN_S), "--log-level", "warning",
    ]  # fmt: skip


def rag_command(settings: Settings) -> list[str]:
    return [
        sys.executable, "-m", "uvicorn", "backend.rag.api:create_app", "--factory",
        "--host", settings.rag.host, "--port", str(settings.rag.port),
        "--timeout-graceful-shutdown", "30", "--log-level", "warning",
    ]  # fmt: skip


def rag_env(settings: Settings) -> dict[str, str]:
    """The embedder settings as the worker child must see them (`--model tiny` changes them)."""
    rag = settings.rag
    return {
        "QWEN_RAG__EMBEDDER": str(rag.embedder),
        "QWEN_RAG__EMBEDDING_MODEL": rag.embedding_model,
        "QWEN_RAG__EMBEDDING_DIM": str(rag.embedding_dim),
        "QWEN_RAG__EMBEDDING_POOLING": rag.embedding_pooling,
    }


def engine_process_names(count: int) -> list[str]:
    """`engine` for one replica; `engine-1` … `engine-N` for several."""
    return [ENGINE] if count == 1 else [f"{ENGINE}-{i + 1}" for i in range(count)]


def plan(
    settings: Settings, *, env: dict[str, str], model: Path | None, engines: int = 1
) -> StackPlan:
    """The children for these settings; `model` is None when an external engine is configured.

    With a model, `engines` llama.cpp replicas run on consecutive ports from `engine.port`, sharing
    the cores, and the UI is told their URLs (`QWEN_SERVING__REPLICAS`).
    """
    logs = settings.run_dir / "logs"
    host = "127.0.0.1" if settings.ui.host in {"0.0.0.0", ""} else settings.ui.host  # noqa: S104
    ui_url = f"http://{host}:{settings.ui.port}"
    children = []
    ui_env = dict(env)
    if model is not None:
        replicas = local_engine_settings(settings, count=engines)
        names = engine_process_names(engines)
        for name, replica in zip(names, replicas, strict=True):
            children.append(
                ChildSpec(
                    name=name,
                    argv=engine_command(replica, model),
                    env=env,
                    log_path=logs / f"{name}.log",
                    ready_url=engine_base_url(replica) + "/models",
                )
            )
        urls = [engine_base_url(replica) for replica in replicas]
        ui_env["QWEN_SERVING__REPLICAS"] = json.dumps(urls)
        ui_env["QWEN_SERVING__ENGINE_PROCESSES"] = json.dumps(names)
    rag_host = "127.0.0.1" if settings.rag.host in {"0.0.0.0", ""} else settings.rag.host  # noqa: S104
    ui_env["QWEN_RAG__WORKER_URL"] = f"http://{rag_host}:{settings.rag.port}"  # the worker we run
    children.append(
        ChildSpec(
            name=RAG,
            argv=rag_command(settings),
            env={**env, **rag_env(settings)},
            log_path=logs / "rag-worker.log",
            cwd=Path(__file__).resolve().parent.parent,
            ready_url=f"http://{rag_host}:{settings.rag.port}/readyz",
        )
    )
    children.append(
        ChildSpec(
            name=UI,
            argv=ui_command(settings),
            env=ui_env,
            log_path=logs / "ui.log",
            cwd=Path(__file__).resolve().parent.parent,
            ready_url=ui_url + "/healthz",
        )
    )
    return StackPlan(children=tuple(children), ui_url=ui_url)


async def ensure_admin(database_url: str, settings: Settings) -> None:
    pool = await open_pool(database_url, min_size=1, max_size=2)
    try:
        await UserStore(pool).ensure(
            settings.ui.admin_user,
            settings.ui.admin_password.get_secret_value(),
            role=Role.ADMIN,
        )
    finally:
        await pool.close()


async def load_demo_kb(settings: Settings, out: TextIO) -> None:
    """Upload the demo knowledge base; a failure is reported, not fatal (the chat still works)."""
    from backend.rag import demo
    from backend.rag.commands import client_for

    client = client_for(settings)
    try:
        results = await demo.load_demo(client, user=settings.ui.admin_user)
    except QwenStackError as exc:
        out.write(f"demo knowledge base not loaded: {exc}\n")
        return
    finally:
        await client.aclose()
    new = sum(1 for r in results if r.accepted and not r.duplicate)
    out.write(f"demo knowledge base {demo.DEMO_KB}: {len(results)} files ({new} new, indexing)\n")


async def run(settings: Settings, *, out: TextIO, engines: int = 1, demo: bool = False) -> int:
    """Run until a stop signal; returns the exit code. Raises QwenStackError on start-up failure."""
    started = time.monotonic()
    # Resolve the model first: offline without a local file this fails in seconds, before anything
    # else has been started.
    model = (
        None
        if settings.llm.base_url
        else await asyncio.to_thread(resolve_model, settings, progress=True)
    )
    services = EmbeddedServices(settings)
    urls = await asyncio.to_thread(services.start)
    redis = aioredis.from_url(urls.redis_url)
    supervisor: Supervisor | None = None
    try:
        await migrate(urls.database_url)
        await ensure_admin(urls.database_url, settings)
        stack = plan(settings, env=child_env(urls.env()), model=model, engines=engines)
        # chat_ui drains for up to drain_s on SIGTERM, then uvicorn takes up to its 15 s
        grace_s = settings.ui.drain_s + UI_GRACEFUL_SHUTDOWN_S + 5
        supervisor = Supervisor(stack.children, status=StatusBoard(redis), grace_s=grace_s)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await supervisor.start()
        out.write("starting… (logs in %s)\n" % (settings.run_dir / "logs"))
        out.flush()
        if not await _wait_all(supervisor, stack, stop):
            out.write("a process did not become ready; see the logs above\n")
            return 1
        if demo:
            await load_demo_kb(settings, out)
        out.write(f"\nqwen-stack is up in {time.monotonic() - started:.1f}s: {stack.ui_url}\n")
        if settings.mode is Mode.DEV:
            out.write(
                f"dev login: {settings.ui.admin_user} / "
                f"{settings.ui.admin_password.get_secret_value()}\n"
            )
        out.write("Ctrl-C stops everything.\n")
        out.flush()
        await stop.wait()
        out.write("stopping…\n")
        out.flush()
        return 0
    finally:
        if supervisor is not None:
            await supervisor.stop()
        with contextlib.suppress(Exception):
            await redis.aclose()
        await asyncio.to_thread(services.stop)


async def _wait_all(supervisor: Supervisor, stack: StackPlan, stop: asyncio.Event) -> bool:
    for child in stack.children:
        slow = child.name.startswith(ENGINE) or child.name == RAG  # load models
        timeout = ENGINE_READY_TIMEOUT_S if slow else UI_READY_TIMEOUT_S
        waiter = asyncio.create_task(supervisor.wait_running(child.name, timeout_s=timeout))
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if stopper in done:
            waiter.cancel()
            return True  # the user asked to stop while starting: stop quietly
        if not waiter.result():
            return False
    return True
