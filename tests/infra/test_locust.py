"""infra/locust/locustfile.py, run headless by the real `locust` against a running chat_ui (the
scripted fake engine behind it): conversations complete over the websocket, the SLO verdicts are
computed and decide the exit code, and the chart is a PNG."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis

from backend.auth import Role
from tests.infra import files, stack

pytestmark = pytest.mark.slow

PASSWORD = "locust-test-password-1"
USERS = {f"load{i}": Role.USER for i in range(3)}


@contextlib.contextmanager
def running_ui(
    database_url: str,
    redis_url: str,
    fake_engine_url: str,
    state: Path,
    *,
    redis_db: int,
    **extra: str,
) -> Iterator[tuple[str, str]]:
    """(URL, Redis URL) of a chat_ui on a fresh database and Redis db `redis_db`, `extra`
    settings on top of the scripted engine's."""
    name, db_url = stack.new_database(database_url, USERS, password=PASSWORD)
    ui_redis = stack.redis_db(redis_url, redis_db)
    settings = {
        "QWEN_DATABASE__URL": db_url, "QWEN_REDIS__URL": ui_redis,
        "QWEN_LLM__BASE_URL": fake_engine_url, "QWEN_SERVING__SENTIMENT": "false",
        "QWEN_SERVING__WARMUP": "false", **extra,
    }  # fmt: skip
    ui = stack.start_chat_ui(settings, state)
    try:
        yield ui.url, ui_redis
    finally:
        ui.stop()
        stack.drop_database(database_url, name)


@pytest.fixture(scope="module")
def chat_ui(
    database_url: str,
    redis_url: str,
    fake_engine_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    # three logins carry nine conversations: per-user limits that never refuse
    with running_ui(
        database_url, redis_url, fake_engine_url, tmp_path_factory.mktemp("locust-ui"), redis_db=10,
        QWEN_RATELIMIT__MESSAGE_BURST="100", QWEN_RATELIMIT__MESSAGES_PER_MINUTE="1000",
    ) as (url, _):  # fmt: skip
        yield url


@pytest.fixture(scope="module")
def one_slot_ui(
    database_url: str,
    redis_url: str,
    fake_engine_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, str]]:
    """(chat_ui URL, its Redis URL) with one session slot: a second conversation waits in line."""
    with running_ui(
        database_url, redis_url, fake_engine_url, tmp_path_factory.mktemp("one-slot-ui"), redis_db=11,
        QWEN_SERVING__SLOTS_PER_REPLICA="1",
    ) as running:  # fmt: skip
        yield running


def run_locust(
    url: str, out: Path, *slo: str, conversations: int = 9
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    locust = shutil.which("locust", path=str(Path(sys.executable).parent))
    assert locust, "locust is a dev dependency (pyproject.toml)"
    users = out / "users.txt"
    users.write_text("".join(f"{name}:{PASSWORD}\n" for name in USERS), encoding="utf-8")
    argv = [
        locust, "-f", str(files.INFRA / "locust" / "locustfile.py"), "--headless", "--host", url,
        "-u", "3", "-r", "3", "--conversations", str(conversations), "--run-time", "180s", "--qwen-users", str(users),
        "--kb-share", "0", "--think-s", "0.01", "--chart", str(out / "chart.png"),
        "--summary", str(out / "summary.json"), "--only-summary", "--loglevel", "WARNING", *slo,
    ]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd=out)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    return result, summary


def test_a_run_within_its_slos_passes_and_draws_the_chart(chat_ui: str, tmp_path: Path) -> None:
    result, summary = run_locust(
        chat_ui,
        tmp_path,
        "--slo-ttft-p95",
        "2",
        "--slo-answer-p95",
        "30",
        "--slo-error-ratio",
        "0.01",
    )
    assert summary["turns"] == 9 * 3 and summary["errors"] == 0, result.stdout + result.stderr
    assert all(verdict["met"] for verdict in summary["slo"].values()), summary
    assert summary["passed"] is True and result.returncode == 0
    assert json.loads(result.stdout.strip().splitlines()[-1]) == summary
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_missed_slo_fails_the_run(chat_ui: str, tmp_path: Path) -> None:
    # An unreachable TTFT objective next to two that hold: one verdict of each kind.
    result, summary = run_locust(
        chat_ui, tmp_path, "--slo-ttft-p95", "0.000001", "--slo-answer-p95", "120",
        "--slo-error-ratio", "0", conversations=3,
    )  # fmt: skip
    assert summary["turns"] == 3 * 3 and summary["errors"] == 0, result.stdout + result.stderr
    slo = summary["slo"]
    assert slo["ttft_p95_s"]["met"] is False and slo["ttft_p95_s"]["value"] > 0
    assert slo["answer_p95_s"]["met"] is True and slo["error_ratio"]["met"] is True
    assert summary["passed"] is False and result.returncode == 1


def test_a_queued_turn_is_timed_to_its_answer_not_its_queue_note(
    one_slot_ui: tuple[str, str],
) -> None:
    """The queue position chat_ui shows while a turn waits is not the answer's first text."""
    url, redis_url = one_slot_ui
    client = stack.load_client()
    holder = client.ChainlitSession(url, token=client.login(url, "load0", PASSWORD), user="load0")
    waiter = client.ChainlitSession(url, token=client.login(url, "load1", PASSWORD), user="load1")
    holder.open()
    waiter.open()
    line = redis.Redis.from_url(redis_url)
    try:
        assert holder.ask("你好").error is None  # its conversation now holds the one slot
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(waiter.ask, "我在排队")
            for _ in range(300):  # until the waiter stands in line (chat_ui's WaitQueue)
                if line.zcard("qs:queue:line") or queued.done():
                    break
                time.sleep(0.1)
            holder.close()  # the chat ends: its slot frees, the waiter is seated
            answer = queued.result(timeout=120)
    finally:
        line.close()
        waiter.close()
    assert answer.error is None and answer.text.endswith("我在排队")
    assert any("排队中" in notice for notice in answer.notices)
    assert "排队中" not in answer.text
