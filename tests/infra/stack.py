"""The system as processes for the infra tests: a RAG worker and a chat_ui (uvicorn, as the images
run them) on the test PostgreSQL and Redis, a real Prometheus scraping both, and the Chainlit client
of infra/locust/ loaded from its file."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import psycopg
import yaml
from psycopg import sql

from backend.auth import Role, UserStore
from backend.db import migrate, open_pool
from backend.embedded import ensure_database
from tests.fixtures.engines import free_port, stop_process
from tests.infra import files

READY_POLLS = 1200  # x 0.1 s: the RAG worker loads torch and the embedder


def load_client() -> ModuleType:
    """infra/locust/chainlit_client.py as a module (infra/ is not a package)."""
    path = files.INFRA / "locust" / "chainlit_client.py"
    spec = importlib.util.spec_from_file_location("chainlit_client", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("chainlit_client", module)
    spec.loader.exec_module(module)
    return module


async def _prepare(url: str, users: dict[str, Role], password: str) -> None:
    await migrate(url)
    pool = await open_pool(url, min_size=1, max_size=1)
    try:
        store = UserStore(pool)
        for user, role in users.items():
            await store.ensure(user, password, role=role)
    finally:
        await pool.close()


def new_database(server_url: str, users: dict[str, Role], *, password: str) -> tuple[str, str]:
    """(name, URL) of a fresh migrated database on `server_url` holding `users`."""
    name = f"infra_{uuid.uuid4().hex[:12]}"
    url = ensure_database(server_url, name)
    asyncio.run(_prepare(url, users, password))
    return name, url


def drop_database(server_url: str, name: str) -> None:
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def redis_db(redis_url: str, db: int) -> str:
    """The same server, another logical database, so other tests' FLUSHDB cannot touch ours."""
    return f"{redis_url}{'&' if '?' in redis_url else '?'}db={db}"


@dataclass
class Process:
    name: str
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self, *, grace_s: float = 30.0) -> None:
        stop_process(self.process, grace_s=grace_s)


def spawn(
    name: str, argv: list[str], *, env: dict[str, str], url: str, ready: str, log: Path
) -> Process:
    """Start `argv` and wait until GET url+ready answers 200. Raises RuntimeError with the log."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, env=env, cwd=files.ROOT, stdout=out, stderr=subprocess.STDOUT
        )
    running = Process(name, process, url, log)
    with httpx.Client(trust_env=False, timeout=2) as client:
        for _ in range(READY_POLLS):
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited: {running.tail()}")
            try:
                if client.get(url + ready).status_code == 200:
                    return running
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    running.stop()
    raise RuntimeError(f"{name} did not become ready: {running.tail()}")


def base_env(settings: dict[str, str], state: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DATABASE_URL", "CI"} and not k.startswith("QWEN_")
    }
    return {**env, "QWEN_STATE_DIR": str(state), **settings}


def uvicorn(app: str, port: int, *, drain_s: int) -> list[str]:
    return [
        sys.executable, "-m", "uvicorn", app, "--factory", "--host", "127.0.0.1",
        "--port", str(port), "--timeout-graceful-shutdown", str(drain_s), "--log-level", "warning",
    ]  # fmt: skip


def start_rag_worker(settings: dict[str, str], state: Path) -> Process:
    port = free_port()
    env = base_env({**settings, "QWEN_RAG__PORT": str(port)}, state)
    url = f"http://127.0.0.1:{port}"
    argv = uvicorn("backend.rag.api:create_app", port, drain_s=30)
    return spawn(
        "rag-worker", argv, env=env, url=url, ready="/readyz", log=state / "rag-worker.log"
    )


def start_chat_ui(settings: dict[str, str], state: Path) -> Process:
    port = free_port()
    env = base_env({**settings, "QWEN_UI__PORT": str(port)}, state)
    url = f"http://127.0.0.1:{port}"
    argv = uvicorn("chat_ui.server:create_app", port, drain_s=15)
    return spawn("chat-ui", argv, env=env, url=url, ready="/readyz", log=state / "chat-ui.log")


def prometheus_config(targets: dict[str, str], *, interval: str = "1s") -> dict[str, Any]:
    """infra/prometheus/prometheus.yml's jobs and rules, with static local targets."""
    shipped = files.load_yaml(files.PROMETHEUS / "prometheus.yml")
    jobs = []
    for job in shipped["scrape_configs"]:
        if job["job_name"] in targets:
            jobs.append(
                {
                    "job_name": job["job_name"],
                    "metrics_path": job.get("metrics_path", "/metrics"),
                    "static_configs": [{"targets": [targets[job["job_name"]]]}],
                }
            )
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(files.PROMETHEUS / "rules" / "*.yml")],
        "scrape_configs": jobs,
    }


def start_prometheus(targets: dict[str, str], state: Path) -> Process:
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("prometheus is missing: `make system-deps` installs it")
    config = state / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(targets)), encoding="utf-8")
    port = free_port()
    argv = [
        binary, f"--config.file={config}", f"--storage.tsdb.path={state / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h",
        "--log.level=warn",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    return spawn(
        "prometheus",
        argv,
        env=dict(os.environ),
        url=url,
        ready="/-/ready",
        log=state / "prometheus.log",
    )


def query(prometheus_url: str, expr: str) -> list[dict[str, Any]]:
    """The instant vector (or scalar as one sample) of `expr`. Raises AssertionError on an error."""
    response = httpx.get(
        f"{prometheus_url}/api/v1/query", params={"query": expr}, timeout=10, trust_env=False
    )
    body = response.json()
    assert body.get("status") == "success", (expr, body)
    data = body["data"]
    if data["resultType"] in {"scalar", "string"}:
        return [{"metric": {}, "value": data["result"]}]
    result: list[dict[str, Any]] = data["result"]
    return result
