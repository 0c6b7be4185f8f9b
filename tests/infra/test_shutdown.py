"""SIGTERM to chat_ui while ten answers stream, as Kubernetes and compose stop a container: the
process drains (chat_ui/drain.py) instead of letting uvicorn close the websockets at once. Every
running answer reaches its last token on an open socket, /readyz turns 503, a new message meanwhile
gets the retry notice, and the process then exits 0 on its own."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from backend.auth import Role
from backend.chat.pipeline import DEGRADED_TEXT
from chat_ui.drain import DRAINING_NOTICE
from tests.fixtures.engines import FakeEngineHandle
from tests.infra import stack

pytestmark = pytest.mark.slow

PASSWORD = "shutdown-test-password-1"
SESSIONS = 10
USERS = {f"term{i}": Role.USER for i in range(SESSIONS + 1)}  # the last one asks during the drain
ANSWER = "这是一段需要几秒钟才能说完的回答，" * 2  # 34 chunks, 0.1 s apart: ~3.4 s per answer


@pytest.fixture
def ui(
    database_url: str,
    redis_url: str,
    fake_engine_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[stack.Process]:
    name, db_url = stack.new_database(database_url, USERS, password=PASSWORD)
    settings = {
        "QWEN_DATABASE__URL": db_url, "QWEN_REDIS__URL": stack.redis_db(redis_url, 11),
        "QWEN_LLM__BASE_URL": fake_engine_url, "QWEN_SERVING__SENTIMENT": "false",
        "QWEN_SERVING__WARMUP": "false",
    }  # fmt: skip
    process = stack.start_chat_ui(settings, tmp_path_factory.mktemp("shutdown-ui"))
    try:
        yield process
    finally:
        process.stop()
        stack.drop_database(database_url, name)


def test_sigterm_lets_running_answers_finish(ui: stack.Process, fake_engine_url: str) -> None:
    client = stack.load_client()
    engine = FakeEngineHandle(fake_engine_url)
    engine.reset()
    engine.script([{"text": ANSWER, "token_delay_s": 0.1}] * SESSIONS)
    sessions: list[Any] = []
    try:
        for user in USERS:
            token = client.login(ui.url, user, PASSWORD)
            sessions.append(client.ChainlitSession(ui.url, token=token, user=user, timeout_s=60))
            sessions[-1].open()
        *running, late = sessions
        streaming = threading.Barrier(SESSIONS + 1)

        def converse(session: Any) -> Any:
            return session.ask("请慢慢回答", on_first_text=lambda: streaming.wait(30))

        with ThreadPoolExecutor(max_workers=SESSIONS) as pool:
            answers = [pool.submit(converse, session) for session in running]
            streaming.wait(30)  # every answer has started streaming
            ui.process.send_signal(signal.SIGTERM)
            readiness = wait_for_readiness(ui.url, 503)
            refused = late.ask("新的问题")
            results = [answer.result(timeout=90) for answer in answers]
        exit_code = ui.process.wait(timeout=60)
    finally:
        for session in sessions:
            session.close()
    assert [r.disconnected for r in results] == [False] * SESSIONS, ui.tail()
    assert [without_load_notice(r.text) for r in results] == [ANSWER] * SESSIONS
    assert readiness == {"status": "draining"}
    assert (refused.error, refused.disconnected) == (DRAINING_NOTICE, False)
    assert exit_code == 0, ui.tail()


def without_load_notice(text: str) -> str:
    """`text` without the degradation notice line that may come first: ten streams at once can
    make the pipeline shorten answers (the scripted engine sends them whole all the same)."""
    first, _, rest = text.partition("\n")
    return rest if DEGRADED_TEXT in first else text


def wait_for_readiness(url: str, status: int, *, timeout_s: float = 5.0) -> Any:
    """The body of the first /readyz answer with `status`. Raises AssertionError on timeout."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(trust_env=False, timeout=2) as client:
        while time.monotonic() < deadline:
            response = client.get(url + "/readyz")
            if response.status_code == status:
                return response.json()
            time.sleep(0.05)
    raise AssertionError(f"/readyz did not answer {status} within {timeout_s:.0f} s")
